"""Flax Linen models: the ADM UNet, its super-resolution variant and the noisy classifier."""
