# Mask R-CNN, Swin-T, FPN: mmdet 3.3's packaged Mask R-CNN base with the Swin-T backbone of
# configs/swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py (the 46.0 box / 41.6 mask AP model).
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=False,
        init_cfg=None),  # no ImageNet initialisation: weights come from model.checkpoint
    neck=dict(in_channels=[96, 192, 384, 768]))
