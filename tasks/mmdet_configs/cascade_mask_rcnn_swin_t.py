# Cascade Mask R-CNN, Swin-T, FPN, three 4conv1fc box heads with GIoU loss: the detector of the Swin
# paper's COCO table (50.4 box / 43.7 mask AP, 3x multi-scale). mmdet 3 ships no such config: this is
# mmdet 3.3's packaged Cascade Mask R-CNN base, the box heads of configs/convnext/cascade-mask-rcnn_
# convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py (BN in place of SyncBN: the same keys, and
# single-process inference), and the Swin-T backbone of mmdet's Swin Mask R-CNN configs.
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', './_swin_t_backbone.py']


def _box_head(stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='BN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone={{_base_.swin_t_backbone}},
    neck=dict(in_channels={{_base_.swin_t_neck_in_channels}}),
    roi_head=dict(bbox_head=[
        _box_head([0.1, 0.1, 0.2, 0.2]),
        _box_head([0.05, 0.05, 0.1, 0.1]),
        _box_head([0.033, 0.033, 0.067, 0.067]),
    ]))
