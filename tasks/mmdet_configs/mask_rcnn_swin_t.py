# Mask R-CNN, Swin-T, FPN: mmdet 3.3's packaged Mask R-CNN base with the Swin-T backbone of
# configs/swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py (the 46.0 box / 41.6 mask AP model).
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', './_swin_t_backbone.py']
model = dict(backbone={{_base_.swin_t_backbone}}, neck=dict(in_channels={{_base_.swin_t_neck_in_channels}}))
