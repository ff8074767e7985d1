"""Inception-v3 as used for FID / sFID / IS: the 2015 TF graph, in pytorch-fid's port, NHWC.

The network is torchvision's `Inception3` with pytorch-fid's patches (`FIDInceptionA` for
Mixed_5b..5d, `FIDInceptionC` for Mixed_6b..6e, `FIDInceptionE_1` / `FIDInceptionE_2` for
Mixed_7b / 7c; Mixed_6a / 7a are torchvision's InceptionB / InceptionD). The patches exist because
the TF graph's average pools ignore padding (`count_include_pad=False`) and because its last module
max-pools in the pool branch. Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a
conversion of TF's `classify_image_graph_def.pb` (the graph ADM's evaluator runs).

    module, variables = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    out = module.apply(variables, images)          # images: [B, H, W, 3] float32 in [0, 1]
    out["pool3"]  # [B, 2048] FID features;  out["spatial"]  # [B, 2023] sFID features

Intermediate tensors (`net_input`, `block0..block2`, `mixed_6d_branch1x1`, all NHWC) are sown into
the `intermediates` collection: `module.apply(variables, x, mutable=["intermediates"])`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.io import torch_pt

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
INPUT_SIZE = 299
NUM_SPATIAL_CHANNELS = 7  # ADM's evaluator keeps mixed_6/conv:0[..., :7] for sFID
PREPROCESSING = ("pytorch_fid", "adm_tf")


# --------------------------------------------------------------------------------------------
# Preprocessing


def bilinear_matrix(in_size: int, out_size: int, half_pixel_centers: bool) -> np.ndarray:
    """[out_size, in_size] float64 matrix of 1-D bilinear interpolation without antialiasing.

    half_pixel_centers=True: src = (dst + 0.5) * in/out - 0.5, clamped below at 0 (PyTorch
    `F.interpolate(mode='bilinear', align_corners=False)`; TF2 `resize(..., antialias=False)`).
    half_pixel_centers=False: src = dst * in/out (TF1 `ResizeBilinear` with align_corners=False and
    no half_pixel_centers: the op in the 2015 Inception graph that ADM's evaluator feeds).
    Both take rows floor(src) and min(floor(src) + 1, in_size - 1) with weights 1 - f and f.
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5 if half_pixel_centers else dst * scale
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def resize_bilinear(
    x: jax.Array, size: int, half_pixel_centers: bool, precision: Any = "highest"
) -> jax.Array:
    """x: [B, H, W, C] -> [B, size, size, C], separable bilinear (see `bilinear_matrix`).

    Written as two small matmuls rather than `jax.image.resize` so that both pixel conventions
    share one code path; for half-pixel centres the result equals `jax.image.resize(...,
    'bilinear', antialias=False)`.
    """
    _, h, w, _ = x.shape
    if (h, w) == (size, size):
        return x  # both conventions are the identity here
    mh = jnp.asarray(bilinear_matrix(h, size, half_pixel_centers), x.dtype)
    mw = jnp.asarray(bilinear_matrix(w, size, half_pixel_centers), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=precision)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)


# --------------------------------------------------------------------------------------------
# Network


class ConvBN(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _branch(x, precision, *layers):
    """A chain of ConvBN layers; each layer is (name, features, kernel[, strides[, padding]]).

    Called inside a compact method, so the layers become children of that module under their
    torch names (Mixed_6d/branch1x1/conv/kernel <-> Mixed_6d.branch1x1.conv.weight).
    """
    for name, features, kernel, *rest in layers:
        strides = rest[0] if rest else 1
        padding = rest[1] if len(rest) > 1 else (0, 0)
        x = ConvBN(features, kernel, strides, padding, precision, name=name)(x)
    return x


def _avg_pool_same(x):
    # TF's AvgPool (SAME padding) divides by the number of valid inputs: count_include_pad=False.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, pad=0):
    return nn.max_pool(x, (3, 3), (strides, strides), ((pad, pad), (pad, pad)))


K1, K3, K5 = (1, 1), (3, 3), (5, 5)
K1x3, K3x1, K1x7, K7x1 = (1, 3), (3, 1), (1, 7), (7, 1)
P1, P2, P0_1, P1_0, P0_3, P3_0 = (1, 1), (2, 2), (0, 1), (1, 0), (0, 3), (3, 0)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (pytorch-fid FIDInceptionA): 35x35, out 224 + pool_features channels."""

    pool_features: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate(
            [
                _branch(x, p, ("branch1x1", 64, K1)),
                _branch(x, p, ("branch5x5_1", 48, K1), ("branch5x5_2", 64, K5, 1, P2)),
                _branch(
                    x,
                    p,
                    ("branch3x3dbl_1", 64, K1),
                    ("branch3x3dbl_2", 96, K3, 1, P1),
                    ("branch3x3dbl_3", 96, K3, 1, P1),
                ),
                _branch(_avg_pool_same(x), p, ("branch_pool", self.pool_features, K1)),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    """Mixed_6a (torchvision InceptionB): 35x35 -> 17x17, out 384 + 96 + in channels."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate(
            [
                _branch(x, p, ("branch3x3", 384, K3, 2)),
                _branch(
                    x,
                    p,
                    ("branch3x3dbl_1", 64, K1),
                    ("branch3x3dbl_2", 96, K3, 1, P1),
                    ("branch3x3dbl_3", 96, K3, 2),
                ),
                _max_pool(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    """Mixed_6b..6e (pytorch-fid FIDInceptionC): 17x17, 768 channels; branch1x1 comes first,
    so out[..., :192] is branch1x1's output (TF's mixed_N/conv)."""

    channels_7x7: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        p, c7 = self.precision, self.channels_7x7
        return jnp.concatenate(
            [
                _branch(x, p, ("branch1x1", 192, K1)),
                _branch(
                    x,
                    p,
                    ("branch7x7_1", c7, K1),
                    ("branch7x7_2", c7, K1x7, 1, P0_3),
                    ("branch7x7_3", 192, K7x1, 1, P3_0),
                ),
                _branch(
                    x,
                    p,
                    ("branch7x7dbl_1", c7, K1),
                    ("branch7x7dbl_2", c7, K7x1, 1, P3_0),
                    ("branch7x7dbl_3", c7, K1x7, 1, P0_3),
                    ("branch7x7dbl_4", c7, K7x1, 1, P3_0),
                    ("branch7x7dbl_5", 192, K1x7, 1, P0_3),
                ),
                _branch(_avg_pool_same(x), p, ("branch_pool", 192, K1)),
            ],
            axis=-1,
        )


class InceptionD(nn.Module):
    """Mixed_7a (torchvision InceptionD): 17x17 -> 8x8, out 320 + 192 + in channels."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate(
            [
                _branch(x, p, ("branch3x3_1", 192, K1), ("branch3x3_2", 320, K3, 2)),
                _branch(
                    x,
                    p,
                    ("branch7x7x3_1", 192, K1),
                    ("branch7x7x3_2", 192, K1x7, 1, P0_3),
                    ("branch7x7x3_3", 192, K7x1, 1, P3_0),
                    ("branch7x7x3_4", 192, K3, 2),
                ),
                _max_pool(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    """Mixed_7b / 7c (pytorch-fid FIDInceptionE_1 / _2): 8x8, 2048 channels.

    max_pool=True is E_2 (Mixed_7c): the 2015 graph max-pools in the pool branch of its last module.
    """

    max_pool: bool = False
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        p = self.precision

        def split(y, name):  # 1x3 and 3x1 side by side
            return jnp.concatenate(
                [
                    _branch(y, p, (name + "a", 384, K1x3, 1, P0_1)),
                    _branch(y, p, (name + "b", 384, K3x1, 1, P1_0)),
                ],
                axis=-1,
            )

        pooled = _max_pool(x, strides=1, pad=1) if self.max_pool else _avg_pool_same(x)
        return jnp.concatenate(
            [
                _branch(x, p, ("branch1x1", 320, K1)),
                split(_branch(x, p, ("branch3x3_1", 384, K1)), "branch3x3_2"),
                split(
                    _branch(
                        x, p, ("branch3x3dbl_1", 448, K1), ("branch3x3dbl_2", 384, K3, 1, P1)
                    ),
                    "branch3x3dbl_3",
                ),
                _branch(pooled, p, ("branch_pool", 192, K1)),
            ],
            axis=-1,
        )


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. images: [B, H, W, 3] float32 in [0, 1] -> dict of float32 arrays:

    pool3 [B, 2048] (FID), logits [B, 1008] = pool3 @ W + b, logits_nobias [B, 1008] = pool3 @ W
    (ADM's Inception Score), spatial [B, 2023] = Mixed_6d.branch1x1[..., :7] flattened in NHWC
    order (ADM's sFID: TF's mixed_6/conv:0).

    preprocess="pytorch_fid" (default): bilinear resize to 299 with half-pixel centres and no
    antialiasing, then 2x - 1 (pytorch-fid's InceptionV3.forward).
    preprocess="adm_tf": what ADM's evaluator feeds the 2015 TF graph: u = 255 x, TF1 ResizeBilinear
    to 299 without half-pixel centres (src = dst * in/out), then (u - 128) / 128. Pass images that
    are uint8 / 255 to reproduce ADM on uint8 samples.
    precision: of every conv / matmul; "highest" keeps float32 on GPUs/TPUs that would otherwise
    use TF32 / bfloat16 passes.
    """

    preprocess: str = "pytorch_fid"
    precision: Any = "highest"

    @nn.compact
    def __call__(self, images):
        if self.preprocess not in PREPROCESSING:
            raise ValueError(
                f"preprocess={self.preprocess!r} is unknown: choose from {PREPROCESSING}"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images of shape {images.shape} are not [B, H, W, 3] (NHWC RGB); transpose NCHW "
                "arrays with x.transpose(0, 2, 3, 1)"
            )
        p = self.precision
        x = images.astype(jnp.float32)
        if self.preprocess == "pytorch_fid":
            x = 2.0 * resize_bilinear(x, INPUT_SIZE, True, p) - 1.0
        else:
            x = (resize_bilinear(x * 255.0, INPUT_SIZE, False, p) - 128.0) / 128.0
        self.sow("intermediates", "net_input", x)

        x = _branch(
            x,
            p,
            ("Conv2d_1a_3x3", 32, K3, 2),
            ("Conv2d_2a_3x3", 32, K3),
            ("Conv2d_2b_3x3", 64, K3, 1, P1),
        )
        x = _max_pool(x)
        self.sow("intermediates", "block0", x)
        x = _branch(x, p, ("Conv2d_3b_1x1", 80, K1), ("Conv2d_4a_3x3", 192, K3))
        x = _max_pool(x)
        self.sow("intermediates", "block1", x)

        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        mixed_6d_branch1x1 = x[..., :192]
        self.sow("intermediates", "mixed_6d_branch1x1", mixed_6d_branch1x1)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        self.sow("intermediates", "block2", x)

        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))

        fc = nn.Dense(1008, precision=p, name="fc")
        logits = fc(pool3)
        kernel = fc.variables["params"]["kernel"]
        logits_nobias = jnp.dot(pool3, kernel, precision=p)
        spatial = mixed_6d_branch1x1[..., :NUM_SPATIAL_CHANNELS]
        return {
            "pool3": pool3,
            "logits": logits,
            "logits_nobias": logits_nobias,
            "spatial": spatial.reshape(spatial.shape[0], -1),
        }


# --------------------------------------------------------------------------------------------
# Weights


def _torch_layout(variables) -> dict[str, tuple[tuple[str, ...], str]]:
    """torch state_dict key -> (path in the Flax variables, how to convert) for every variable."""
    table = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        names = tuple(k.key for k in path)
        collection, *mods, leaf_name = names
        prefix = ".".join(mods)
        torch_leaf, how = {
            ("params", "kernel"): ("weight", "conv" if leaf.ndim == 4 else "dense"),
            ("params", "scale"): ("weight", "copy"),
            ("params", "bias"): ("bias", "copy"),
            ("batch_stats", "mean"): ("running_mean", "copy"),
            ("batch_stats", "var"): ("running_var", "copy"),
        }[(collection, leaf_name)]
        table[f"{prefix}.{torch_leaf}"] = (names, how)
    return table


def _torch_shape(shape, how):
    if how == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if how == "dense":  # [in, out] -> [out, in]
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(array, how):
    a = np.asarray(array, np.float32)
    if how == "conv":
        return a.transpose(2, 3, 1, 0)
    if how == "dense":
        return a.T
    return a


def variables_from_state_dict(
    state_dict: Mapping[str, Any], module: FIDInceptionV3 | None = None
) -> dict:
    """pytorch-fid's state_dict (torch keys, OIHW) -> Flax variables {params, batch_stats}.

    Strict: every key of the network must be present with its shape, nothing else is accepted
    except `*.num_batches_tracked` (unused in eval); all problems are reported in one error.
    """
    module = module or FIDInceptionV3()
    image = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), image)
    abstract = {k: abstract[k] for k in ("params", "batch_stats")}
    table = _torch_layout(abstract)
    leaves = dict(
        (tuple(k.key for k in path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    )
    given = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(table) - given)
    unexpected = sorted(given - set(table))
    bad_shape = []
    for key in sorted(given & set(table)):
        names, how = table[key]
        want = _torch_shape(leaves[names].shape, how)
        got = tuple(np.shape(state_dict[key]))
        if got != want:
            bad_shape.append(f"{key}: got {got}, expected {want}")
    if missing or unexpected or bad_shape:
        lines = [
            "the weights are not pytorch-fid's FID Inception-v3 state_dict "
            f"({WEIGHTS_FILE}, keys like 'Mixed_6d.branch1x1.conv.weight'):"
        ]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", bad_shape),
        ):
            if items:
                more = f", ... ({len(items) - 20} more)" if len(items) > 20 else ""
                shown = ", ".join(items[:20]) + more
                lines.append(f"  {len(items)} {title}: {shown}")
        raise ValueError("\n".join(lines))

    variables: dict = {}
    for key, (names, how) in table.items():
        node = variables
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = jnp.asarray(_to_flax(state_dict[key], how))
    return variables


def load_fid_inception(
    source: str | os.PathLike | Mapping[str, Any] | None,
    preprocess: str = "pytorch_fid",
    precision: Any = "highest",
) -> tuple[FIDInceptionV3, dict]:
    """-> (module, variables) of the FID Inception-v3.

    source: path to pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read without executing
    pickled code), a `.npz` of the same state_dict, or a Mapping from its state_dict keys to arrays.
    Nothing is downloaded.
    """
    if source is None:
        raise ValueError(
            "no Inception weights given: download pytorch-fid's FID Inception-v3 weights "
            f"{WEIGHTS_FILE} from {WEIGHTS_URL} (pytorch-fid's GitHub release) and pass its path"
        )
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess={preprocess!r} is unknown: choose from {PREPROCESSING}")
    if isinstance(source, Mapping):
        state_dict = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Inception weights {path!r} do not exist: download {WEIGHTS_FILE} from "
                f"{WEIGHTS_URL} (pytorch-fid's GitHub release) and pass its path"
            )
        if path.endswith(".npz"):
            with np.load(path) as f:
                state_dict = {k: f[k] for k in f.files}
        else:
            state_dict = torch_pt.read_pt(path)
    module = FIDInceptionV3(preprocess=preprocess, precision=precision)
    return module, variables_from_state_dict(state_dict, module)
