# Cascade Mask R-CNN, Swin-S (depths 2-2-18-2, drop path 0.3): the 51.9 box / 45.0 mask AP model.
_base_ = ['./cascade_mask_rcnn_swin_t.py']
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
