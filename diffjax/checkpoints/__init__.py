"""Checkpoints: orbax save/restore and a PyTorch `.pt` reader that executes no pickled code."""
