"""The feature classifier of the classifier-feature metrics (`diffjax.pipelines.evaluation.
classifier`): a small CNN trained on clean images, whose penultimate features stand in for Inception's
on small datasets. Not a guidance classifier (that one is noise-conditioned: EncoderUNetModel)."""
from __future__ import annotations

import flax.linen as nn


class FeatureClassifier(nn.Module):
    """A small CNN: per width, a 3x3 conv, ReLU and 2x2 max-pooling; then a ReLU dense layer of
    `features` units (the metric's features) and the class logits.

    images [B, H, W, C] float32 in [0, 1] (H, W divisible by 2 ** len(widths)) ->
    {"features": [B, features], "logits": [B, num_classes]}."""

    num_classes: int = 10
    widths: tuple = (16, 32, 64)
    features: int = 128

    @nn.compact
    def __call__(self, images):
        x = images * 2.0 - 1.0
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        return {"features": features, "logits": nn.Dense(self.num_classes)(features)}
