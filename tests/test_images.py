"""Image output helpers: GD's uint8 conversion, grids, loss curves."""
import numpy as np
import pytest
from PIL import Image

from diffjax import images


def test_to_uint8_truncates_like_torch():
    # GD: ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8), a truncating cast
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 0, 127, 254, 255, 255])


def test_grid_layout_scale_and_labels(tmp_path):
    tiles = np.stack([np.full((4, 5, 1), 10 * i, np.uint8) for i in range(6)])
    canvas = images.grid(tiles, cols=3, scale=2, pad=1)
    assert canvas.size == (3 * (10 + 1) + 1, 2 * (8 + 1) + 1)
    pixels = np.asarray(canvas)
    assert tuple(pixels[1 + 9 + 3, 1 + 2 * 11 + 4]) == (50, 50, 50)  # row 1, column 2 = tile 5
    labelled = images.grid(tiles, cols=3, row_labels=["a", "b"])
    assert labelled.size[0] == 90 + 3 * (5 + 2) + 2
    with pytest.raises(ValueError, match="to_uint8 first"):
        images.grid(tiles.astype(np.float32))


def test_loss_curve_writes_a_png(tmp_path):
    path = tmp_path / "loss.png"
    images.loss_curve(np.arange(1, 50), 1 / np.arange(1, 50), path)
    assert Image.open(path).size[0] > 100
