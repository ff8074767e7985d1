"""Flax Linen models: the ADM UNet, its super-resolution variant and the noisy classifier."""
from diffjax.models.classifier import POOLS, EncoderUNetModel
from diffjax.models.layers import (
    AttentionBlock, AttentionPool2d, Downsample, GroupNorm32, ResBlock, Upsample, qkv_attention,
    resize_bilinear_torch, timestep_embedding)
from diffjax.models.unet import ADMTrunk, SuperResModel, UNetModel

__all__ = [
    "UNetModel", "SuperResModel", "EncoderUNetModel", "ADMTrunk", "POOLS",
    "ResBlock", "AttentionBlock", "AttentionPool2d", "GroupNorm32", "Upsample", "Downsample",
    "qkv_attention", "resize_bilinear_torch", "timestep_embedding",
]
