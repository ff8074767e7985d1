"""Images in and out: model range [-1, 1] <-> uint8, resizing inputs, PNG grids with row labels
(shown in a notebook by `show`), and loss-curve plots."""
from __future__ import annotations

import math

import numpy as np


def to_uint8(x) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8, as guided-diffusion's samplers write their npz:
    (x + 1) * 127.5 clamped to [0, 255] and truncated (torch's float -> uint8 cast)."""
    return np.clip((np.asarray(x, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)


def to_model_range(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as guided-diffusion); float input is
    taken to be in [-1, 1] already."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def read_image(path, channels: int = 3) -> np.ndarray:
    """An image file as uint8 [H, W, channels] (RGB or grayscale)."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    return array if channels == 3 else array[..., None]


def resize(images, size: int):
    """[B, H, W, C] -> [B, size, size, C] in [-1, 1], bicubic with antialiasing (GLIDE's notebooks
    read their input image with PIL's BICUBIC at each stage's size)."""
    import jax
    import jax.numpy as jnp

    images = jnp.asarray(to_model_range(images))
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jnp.clip(jax.image.resize(images, (b, size, size, c), "cubic", antialias=True), -1, 1)


def resize_mask(mask, size: int):
    """Nearest-neighbour resize of a [B, h, w, 1] mask to size x size (F.interpolate 'nearest':
    source index floor(i * h / size))."""
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 3:
        mask = mask[..., None]
    rows = (np.arange(size) * mask.shape[1]) // size
    cols = (np.arange(size) * mask.shape[2]) // size
    return mask[:, rows][:, :, cols]


def grid(images, cols: int | None = None, scale: int = 1, row_labels=None, pad: int = 2):
    """A PIL image of uint8 `images` [N, H, W, C] (C = 1 or 3) on a grid of `cols` columns
    (default: square), each enlarged `scale` times (nearest), with an optional text label left of
    each row. Save it with `.save(path)`."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"grid expects uint8 [N, H, W, C], got {images.dtype} {images.shape}: "
                         "convert model outputs with to_uint8 first")
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = h * scale, w * scale
    left = 90 if row_labels else 0
    canvas = Image.new("RGB", (left + cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        tile = Image.fromarray(image[..., 0] if c == 1 else image).convert("RGB")
        tile = tile.resize((w, h), Image.NEAREST)
        r, col = divmod(i, cols)
        canvas.paste(tile, (left + pad + col * (w + pad), pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), str(label), fill="black")
    return canvas


def show(images, cols: int | None = None, min_size: int = 128, row_labels=None):
    """A grid of uint8 `images` [N, H, W, C] as a PIL image, each enlarged (nearest) to at least
    `min_size` pixels; a notebook displays it when it is a cell's last expression."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    scale = max(1, -(-min_size // max(images.shape[1:3])))
    return grid(images, cols, scale=scale, row_labels=row_labels)


def loss_curve(steps, values, path, title: str = "training loss") -> None:
    """A PNG line plot of values against steps (log-scaled y), drawn with PIL only."""
    from PIL import Image, ImageDraw

    steps, values = np.asarray(steps, float), np.log10(np.maximum(np.asarray(values, float), 1e-8))
    width, height, margin = 640, 400, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1, y0, y1 = margin, width - 20, height - margin, 30
    draw.rectangle([x0, y1, x1, y0], outline="black")
    if len(steps) >= 2:
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1
        xs = x0 + (steps - steps[0]) / max(steps[-1] - steps[0], 1) * (x1 - x0)
        ys = y0 - (values - lo) / (hi - lo) * (y0 - y1)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        for frac in (0.0, 0.5, 1.0):
            draw.text((4, y0 - frac * (y0 - y1) - 6), f"{10 ** (lo + frac * (hi - lo)):.3g}",
                      fill="black")
        draw.text((x0, y0 + 8), f"{int(steps[0])}", fill="black")
        draw.text((x1 - 40, y0 + 8), f"{int(steps[-1])}", fill="black")
    draw.text((x0, 8), f"{title} (log scale) vs step", fill="black")
    image.save(path)
