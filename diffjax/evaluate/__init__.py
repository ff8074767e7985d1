"""Evaluation: Inception features, FID / sFID / IS / precision-recall, bits/dim."""
