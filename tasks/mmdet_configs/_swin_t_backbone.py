# The Swin-T backbone and FPN input widths shared by the project's Mask R-CNN and Cascade Mask R-CNN
# configs (mmdet's Swin Mask R-CNN configs). Not a detector: its name starts with "_" so model.arch never
# lists it; the detector configs name it in their _base_ and take `swin_t_backbone` by reference.
swin_t_backbone = dict(
    _delete_=True,  # replaces the ResNet-50 of mmdet's base model
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
    init_cfg=None)  # no ImageNet initialisation: weights come from model.checkpoint
swin_t_neck_in_channels = [96, 192, 384, 768]
