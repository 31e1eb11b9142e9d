# Mask R-CNN, Swin-S, FPN (configs/swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py: depths
# 2-2-18-2, drop path 0.3; the 48.5 box / 43.3 mask AP model).
_base_ = ['./mask_rcnn_swin_t.py']
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
