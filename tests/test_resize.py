"""MATLAB-style imresize (diffjax.core.resize, the official ILVR code's resizer) against an
independent float64 implementation written from MATLAB's definition: one output pixel at a time,
a direct double sum over both axes' taps, reflection by repeated mirroring; borders included.
PIL (and jax.image.resize) are a second truth away from the borders, where they agree with it, and
the reason for this module at the borders, where they truncate the kernel instead of reflecting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffjax.core.resize import imresize, resize_weights


def keys_cubic(d: float) -> float:
    """Keys (1981), a = -0.5, written from the paper's piecewise polynomial."""
    d = abs(d)
    if d <= 1:
        return 1.5 * d**3 - 2.5 * d**2 + 1
    if d < 2:
        return -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2
    return 0.0


def mirror(i: int, n: int) -> int:
    """Half-sample symmetric extension: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..., applied until inside."""
    while not 0 <= i < n:
        i = -1 - i if i < 0 else 2 * n - 1 - i
    return i


def taps(j: int, n_in: int, n_out: int, antialias: bool = True):
    """[(raw input position, weight)] of output pixel j along one axis."""
    s = n_out / n_in
    k = s if antialias and s < 1 else 1.0  # the kernel u -> k cubic(k u), support 2 / k
    centre = (j + 0.5) / s - 0.5
    positions = range(math.floor(centre - 2 / k), math.ceil(centre + 2 / k) + 1)
    weights = [k * keys_cubic(k * (centre - i)) for i in positions]
    total = sum(weights)
    return [(i, w / total) for i, w in zip(positions, weights) if w != 0]


def reference_imresize(image: np.ndarray, size, antialias: bool = True) -> np.ndarray:
    """image [H, W] float64 -> [h, w], pixel by pixel."""
    (n_rows, n_cols), (h, w) = image.shape, size
    out = np.zeros((h, w))
    for p in range(h):
        for q in range(w):
            out[p, q] = sum(a * b * image[mirror(i, n_rows), mirror(k, n_cols)]
                            for i, a in taps(p, n_rows, h, antialias)
                            for k, b in taps(q, n_cols, w, antialias))
    return out


def touches_edge(n_in: int, n_out: int) -> np.ndarray:
    """[n_out] bool: output pixels whose kernel reaches past either end of the input."""
    return np.array([any(not 0 <= i < n_in for i, _ in taps(j, n_in, n_out)) for j in range(n_out)])


# (H, W) -> (h, w): ILVR's factors down and up, several reflections at once (4 -> 1, 8 -> 2: the
# stretched kernel is wider than the image), non-integer scales and non-square images.
CASES = [((16, 16), (4, 4)), ((32, 32), (4, 4)), ((8, 8), (2, 2)), ((4, 8), (1, 2)),
         ((4, 4), (16, 16)), ((2, 2), (8, 8)), ((3, 5), (12, 20)),
         ((10, 7), (7, 10)), ((12, 20), (9, 6))]


@pytest.mark.parametrize("shape_in, shape_out", CASES)
def test_imresize_matches_the_per_pixel_definition(shape_in, shape_out):
    image = np.random.default_rng(sum(shape_in) + sum(shape_out)).standard_normal(shape_in)
    expected = reference_imresize(image, shape_out)
    with jax.enable_x64(True):  # float64: the definitions agree, not merely to float32
        exact = np.asarray(imresize(jnp.asarray(image)[None, :, :, None], shape_out))[0, ..., 0]
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-12)
    got = np.asarray(imresize(jnp.asarray(image, jnp.float32)[None, :, :, None], shape_out))[0, ..., 0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(image).max())


def test_imresize_without_antialiasing_keeps_the_narrow_kernel():
    image = np.random.default_rng(1).standard_normal((16, 12))
    expected = reference_imresize(image, (4, 6), antialias=False)
    got = np.asarray(imresize(jnp.asarray(image, jnp.float32)[None, :, :, None], (4, 6),
                              antialias=False))[0, ..., 0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_weights_rows_sum_to_one_and_batch_and_channels_pass_through():
    for n_in, n_out in ((256, 8), (8, 256), (7, 10), (4, 1)):
        np.testing.assert_allclose(resize_weights(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 12, 2))
    out = jax.jit(lambda a: imresize(a, (4, 6)))(x)
    for b in range(3):
        for c in range(2):
            expected = reference_imresize(np.asarray(x[b, :, :, c], np.float64), (4, 6))
            np.testing.assert_allclose(out[b, :, :, c], expected, atol=1e-5)


@pytest.mark.parametrize("size_in, size_out", [(64, 16), (64, 8), (16, 64), (10, 7), (7, 10)])
def test_pil_and_jax_agree_away_from_the_borders_and_truncate_at_them(size_in, size_out):
    """PIL's and jax.image.resize's bicubic is the same kernel and antialiasing, so they are a
    second truth in the interior; at the borders they renormalise a truncated kernel, which is
    exactly where the MATLAB resizer differs."""
    image = np.random.default_rng(size_in).standard_normal((size_in, size_in)).astype(np.float32)
    ours = np.asarray(imresize(jnp.asarray(image)[None, :, :, None], (size_out,) * 2))[0, ..., 0]
    pil = np.asarray(Image.fromarray(image, mode="F").resize((size_out,) * 2, Image.Resampling.BICUBIC))
    jx = np.asarray(jax.image.resize(jnp.asarray(image), (size_out,) * 2, "cubic", antialias=True))
    edge = touches_edge(size_in, size_out)
    interior = ~edge[:, None] & ~edge[None, :]
    assert interior.any() and edge.any()
    for other in (pil, jx):
        np.testing.assert_allclose(other[interior], ours[interior], atol=2e-6)
        assert np.abs(other - ours)[~interior].max() > 1e-2
    np.testing.assert_allclose(jx, pil, atol=2e-6)
