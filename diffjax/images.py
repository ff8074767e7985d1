"""Images out: model range [-1, 1] -> uint8, and PNG grids."""
from __future__ import annotations

import math
import pathlib

import numpy as np


def to_uint8(x) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8, as guided-diffusion's samplers write their npz:
    (x + 1) * 127.5 clamped to [0, 255] and truncated (torch's float -> uint8 cast)."""
    return np.clip((np.asarray(x, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)


def grid(images, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image, row-major."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"grid expects uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return out


def save_png(path, image) -> pathlib.Path:
    """Write uint8 [H, W, C] (C = 1 or 3) as a PNG."""
    from PIL import Image

    image = np.asarray(image)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path
