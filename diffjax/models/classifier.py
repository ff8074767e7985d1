"""guided-diffusion's noisy-image classifier (`EncoderUNetModel`, the UNet's encoder half) in Flax.

`model.apply(variables, x, t, train=False)`: x [B, H, W, in_channels], timesteps [B] -> logits
[B, out_channels] float32. The trunk (input blocks and middle block) is the UNet's
(`diffjax.models.unet.ADMTrunk`); only the pooling head differs:

* "adaptive": GN, SiLU, global average pool, zero-init 1x1 conv;
* "attention": GN, SiLU, AttentionPool2d over the (image_size // ds)^2 final features (new head order
  always, `num_head_channels` heads width; needs image_size);
* "spatial": the spatial means of every input block and of the middle block, concatenated, then
  Linear(2048), ReLU, Linear;
* "spatial_v2": as "spatial" with Linear(2048), GN, SiLU, Linear.

The head runs in float32 whatever the trunk's compute dtype, as in guided-diffusion.
"""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from diffjax.models.layers import AttentionPool2d, GroupNorm32, conv, linear
from diffjax.models.unet import ADMTrunk

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
_SPATIAL_HIDDEN = 2048


class EncoderUNetModel(ADMTrunk):
    """guided_diffusion.unet.EncoderUNetModel (constructor arguments as the reference, plus `pool`).

    `num_heads_upsample` is accepted for signature compatibility and unused (there is no decoder).
    """
    pool: str = "adaptive"

    def _validate(self):
        super()._validate()
        name = type(self).__name__
        if self.pool not in POOLS:
            raise ValueError(f"{name}: pool={self.pool!r} is not a pooling head: choose from {POOLS}")
        if self.pool == "attention":
            if self.num_head_channels == -1:
                raise ValueError(f"{name}: pool='attention' needs num_head_channels (the width of the "
                                 f"AttentionPool2d heads), got -1: set e.g. num_head_channels=64")
            last = 2 ** (len(self.channel_mult) - 1)
            if self.image_size is None or self.image_size % last:
                raise ValueError(f"{name}: pool='attention' sizes its positional embedding from "
                                 f"image_size, got image_size={self.image_size!r}: give an image_size "
                                 f"divisible by {last} (2 ** (len(channel_mult) - 1))")

    @nn.compact
    def __call__(self, x, timesteps, train: bool = False):
        self._check_input(x, self.in_channels)
        emb = self._time_embed(timesteps)
        h, hs, ds = self._encode(x, emb, train)

        if self.pool.startswith("spatial"):
            feats = jnp.concatenate([a.astype(jnp.float32).mean(axis=(1, 2)) for a in hs + [h]], -1)
            h = linear(_SPATIAL_HIDDEN, feats.shape[-1], precision=self.precision, name="out_0")(feats)
            if self.pool == "spatial":
                h, last = nn.relu(h), "out_2"
            else:
                h, last = nn.silu(GroupNorm32(name="out_1")(h)), "out_3"
            return linear(self.out_channels, _SPATIAL_HIDDEN, precision=self.precision, name=last)(h)

        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        if self.pool == "adaptive":
            h = h.mean(axis=(1, 2), keepdims=True)
            h = conv(self.out_channels, h.shape[-1], 1, zero_init=True, precision=self.precision,
                     algorithm=self.conv_algorithm, name="out_3")(h)
            return h.reshape(h.shape[0], self.out_channels)
        return AttentionPool2d(self.image_size // ds, self.num_head_channels, self.out_channels,
                               precision=self.precision, conv_algorithm=self.conv_algorithm,
                               attention_impl=self.attention_impl, name="out_2")(h)
