"""Flax Linen models: the ADM UNet, its super-resolution variant, the noisy classifier and GLIDE's
text-conditional UNets."""
from diffjax.models.classifier import POOLS, EncoderUNetModel
from diffjax.models.glide import (
    InpaintText2ImUNet, SuperResInpaintText2ImUNet, SuperResText2ImUNet, Text2ImUNet)
from diffjax.models.layers import (
    AttentionBlock, AttentionPool2d, Downsample, GroupNorm32, ResBlock, Upsample, qkv_attention,
    resize_bilinear_torch, timestep_embedding)
from diffjax.models.unet import ADMTrunk, SuperResModel, UNetModel

__all__ = [
    "UNetModel", "SuperResModel", "EncoderUNetModel", "ADMTrunk", "POOLS",
    "Text2ImUNet", "InpaintText2ImUNet", "SuperResText2ImUNet", "SuperResInpaintText2ImUNet",
    "ResBlock", "AttentionBlock", "AttentionPool2d", "GroupNorm32", "Upsample", "Downsample",
    "qkv_attention", "resize_bilinear_torch", "timestep_embedding",
]
