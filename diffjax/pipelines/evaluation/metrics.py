"""FID, sFID, Inception Score and precision/recall, as openai/guided-diffusion's evaluator computes
them (evaluations/evaluator.py), on features from `diffjax.evaluate.inception`.

File formats (GD's evaluator): a sample batch is an npz with `arr_0` [N, H, W, 3] uint8 (NHWC); a
reference batch is the same plus, optionally, precomputed statistics `mu`, `sigma` (pool3) and
`mu_s`, `sigma_s` (spatial), which then replace the statistics of its images (as GD does).

    module, variables = load_fid_inception(weights, preprocess="adm_tf")
    results = evaluate("ref.npz", "samples.npz", module, variables)
    # {"inception_score": ..., "fid": ..., "sfid": ..., "precision": ..., "recall": ...}

Why one module of ~570 lines: because it ports guided-diffusion's evaluator as one unit (its
statistics, Inception Score, precision / recall and npz formats), to be read beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

IS_SPLIT_SIZE = 5000  # GD's compute_inception_score(split_size=5000)
PR_NEIGHBOURHOOD = 3  # GD's ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH_SIZE = 10000  # GD's row/col_batch_size


# --------------------------------------------------------------------------------------------
# Gaussian statistics and the Fréchet distance


@dataclasses.dataclass(frozen=True)
class FIDStatistics:
    """Mean mu [D] and covariance sigma [D, D] (float64, ddof=1 as np.cov) of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other: "FIDStatistics") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


class RunningStatistics:
    """Streaming float64 mean and covariance of feature rows [N, D].

    Chunks are merged with the pairwise update of Chan, Golub & LeVeque (1979): each chunk is
    centred on its own mean, so no E[x x^T] - mu mu^T cancellation. Rows are buffered to
    `chunk_rows` so the D x D update runs as one large float64 matmul.
    """

    def __init__(self, chunk_rows: int = 4096):
        self.chunk_rows = chunk_rows
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of centred outer products
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"features of shape {x.shape} are not [N, D]")
        self._buffer.append(x)
        self._buffered += len(x)
        if self._buffered >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        x = np.concatenate(self._buffer, axis=0).astype(np.float64)
        self._buffer, self._buffered = [], 0
        nb, mean_b = len(x), x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def result(self) -> FIDStatistics:
        self._flush()
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        return FIDStatistics(self.mean.copy(), self.m2 / (self.n - 1))


def feature_statistics(features: np.ndarray) -> FIDStatistics:
    """features [N, D] -> FIDStatistics in float64 (np.mean, np.cov(rowvar=False))."""
    stats = RunningStatistics()
    stats.update(features)
    return stats.result()


def _psd_eigh(a: np.ndarray, vectors: bool):
    """Eigen-decomposition of a symmetric PSD matrix with rounding noise removed: eigenvalues below
    D * eps * max|eig| (numpy.linalg.matrix_rank's tolerance) are those of the null space of a
    rank-deficient matrix and are set to 0, so their square roots do not add up to a bias."""
    a = (a + a.T) / 2
    w, v = scipy.linalg.eigh(a) if vectors else (scipy.linalg.eigvalsh(a), None)
    tol = np.abs(w).max(initial=0.0) * len(a) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0), v


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(sigma1 @ sigma2) for symmetric PSD sigma1, sigma2 [D, D], also when singular.

    With sigma1 = R R^T (R = V sqrt(W) from its eigen-decomposition, null directions dropped),
    sigma1 sigma2 = R R^T sigma2 has the same non-zero eigenvalues as R^T sigma2 R, which is
    symmetric PSD; Tr sqrtm(sigma1 sigma2) is the sum of their square roots. Unlike
    scipy.linalg.sqrtm of the non-symmetric product (pytorch-fid, GD), this needs no eps
    fallback and has no imaginary part to discard.
    """
    w, v = _psd_eigh(sigma1, vectors=True)
    keep = w > 0
    r = v[:, keep] * np.sqrt(w[keep])
    ev, _ = _psd_eigh(r.T @ sigma2 @ r, vectors=False)
    return float(np.sum(np.sqrt(ev)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID:
    Heusel et al. 2017): |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}; both sets need the same features (pool3: 2048, spatial: 2023)"
        )
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------
# Inception Score


def inception_score_from_probs(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """probs [N, C] class probabilities -> mean over splits of exp(E_x KL(p(y|x) || p(y)))
    (Salimans et al. 2016; GD's split size 5000, last split as it falls). 0 log 0 = 0."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """logits [N, C] -> Inception Score of softmax(logits). For GD's value pass the Inception's
    `logits_nobias` (GD multiplies pool3 by the softmax/logits weight only)."""
    return inception_score_from_probs(
        scipy.special.softmax(np.asarray(logits, np.float64), axis=1), split_size
    )


# --------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019), as GD's ManifoldEstimator


@functools.partial(jax.jit, static_argnames="dtype")
def pairwise_sq_distances(u: jax.Array, v: jax.Array, dtype=jnp.float16) -> jax.Array:
    """u [M, D], v [N, D] -> squared Euclidean distances [M, N] float32, clipped at 0.

    Computed as |u|^2 - 2 u.v + |v|^2 in `dtype`; GD computes in float16 and falls back to float32
    where that overflows, which this reproduces for dtype=float16.
    """

    def dist(dt):
        a, b = u.astype(dt), v.astype(dt)
        nu = jnp.sum(a * a, axis=1)[:, None]
        nv = jnp.sum(b * b, axis=1)[None, :]
        return jnp.maximum(nu - 2 * (a @ b.T) + nv, 0).astype(jnp.float32)

    if jnp.dtype(dtype) == jnp.float32:
        return dist(jnp.float32)
    d = dist(dtype)
    return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d, lambda: dist(jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _smallest_block(best, rows, cols, k, dtype):
    """Merge the k+1 smallest distances from rows to cols into best [R, k+1]."""
    d = pairwise_sq_distances(rows, cols, dtype)
    cand = jnp.concatenate([best, d], axis=1)
    return -jax.lax.top_k(-cand, k + 1)[0]


@functools.partial(jax.jit, static_argnames="dtype")
def _inside_block(ref, ref_radii, samples, sample_radii, dtype):
    """-> (ref rows inside some sample ball [R], sample rows inside some ref ball [S])."""
    d = pairwise_sq_distances(ref, samples, dtype)
    return jnp.any(d <= sample_radii[None, :], axis=1), jnp.any(d <= ref_radii[:, None], axis=0)


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(
    features: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    dtype=jnp.float16,
) -> np.ndarray:
    """features [N, D] -> [N] float32 squared distance of each point to its k-th nearest
    neighbour, the point itself counting as the 0th (GD's manifold_radii with nhood_sizes=(k,))."""
    features = np.asarray(features, np.float32)
    n = len(features)
    if n < k + 1:
        raise ValueError(f"{n} feature rows cannot define {k}-nearest-neighbour balls: need > {k}")
    radii = np.empty(n, np.float32)
    for r0, r1 in _blocks(n, batch_size):
        best = jnp.full((r1 - r0, k + 1), jnp.inf, jnp.float32)
        for c0, c1 in _blocks(n, batch_size):
            best = _smallest_block(best, features[r0:r1], features[c0:c1], k, dtype)
        radii[r0:r1] = np.asarray(best[:, k])
    return radii


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    batch_size: int = PR_BATCH_SIZE,
    dtype=jnp.float16,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples against a reference.

    precision: fraction of samples inside the union of reference k-NN balls; recall: fraction of
    reference points inside the union of sample k-NN balls (squared distances, `<=`, as GD).
    """
    ref = np.asarray(ref_features, np.float32)
    samples = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise ValueError(
            f"feature sets of shapes {ref.shape} and {samples.shape} are not [N, D] with one D"
        )
    ref_radii = manifold_radii(ref, k, batch_size, dtype)
    sample_radii = manifold_radii(samples, k, batch_size, dtype)
    ref_in = np.zeros(len(ref), bool)
    sample_in = np.zeros(len(samples), bool)
    for r0, r1 in _blocks(len(ref), batch_size):
        for c0, c1 in _blocks(len(samples), batch_size):
            a, b = _inside_block(
                ref[r0:r1], ref_radii[r0:r1], samples[c0:c1], sample_radii[c0:c1], dtype
            )
            ref_in[r0:r1] |= np.asarray(a)
            sample_in[c0:c1] |= np.asarray(b)
    return float(sample_in.mean()), float(ref_in.mean())


# --------------------------------------------------------------------------------------------
# Feature extraction


@dataclasses.dataclass
class Activations:
    """What the metrics need from one image set: pool3 [N, 2048] and logits_nobias [N, 1008]
    (float32, kept whole for precision/recall and IS), float64 statistics of pool3 and spatial."""

    pool3: np.ndarray
    logits_nobias: np.ndarray
    stats: FIDStatistics
    spatial_stats: FIDStatistics


class FeatureExtractor:
    """extractor(images [b <= batch_size, H, W, 3]) -> dict of host float32 feature arrays.

    One jit-compiled apply of `module` (any network mapping images [B, H, W, channels] in [0, 1]
    to a dict of [B, ...] arrays: the Inception-v3, or a small classifier for grayscale data),
    batch axis sharded over a 1-D Mesh of `devices` (default: all local devices), variables
    replicated. batch_size is rounded up to a multiple of the device count;
    a short batch is padded to it (one compilation per image size) and the pad dropped. uint8
    images are divided by 255 on device (4x less host-to-device traffic); float images are taken
    as already in [0, 1].
    """

    def __init__(self, module, variables, batch_size: int = 64, devices=None, channels: int = 3):
        self.channels = channels
        devices = list(devices or jax.local_devices())
        mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self._data = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        self._variables = jax.device_put(variables, replicated)

        @functools.partial(jax.jit, in_shardings=(replicated, self._data), out_shardings=self._data)
        def apply(variables, images):
            if images.dtype == jnp.uint8:
                images = images.astype(jnp.float32) / 255.0
            return module.apply(variables, images)

        self._apply = apply

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(
                f"images of shape {images.shape} are not [B, H, W, {self.channels}] NHWC "
                f"(GD's arr_0 layout) as this network takes"
            )
        if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"images of dtype {images.dtype}: pass uint8 [0, 255] or float [0, 1]")
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} images exceeds batch_size={self.batch_size}: "
                             "split it (metrics.rebatch) or build the extractor with a larger one")
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad], axis=0)
        out = self._apply(self._variables, jax.device_put(images, self._data))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def batches(
        self,
        images: np.ndarray | Iterable[np.ndarray],
        total: int | None = None,
        progress: bool = True,
        desc: str = "features",
    ) -> Iterator[dict[str, np.ndarray]]:
        """Outputs of each batch_size batch of `images`: one [N, H, W, C] array or an iterable of
        batches of any size (uint8, or float in [0, 1]); total: the image count, for the
        progress bar of an iterator."""
        from tqdm.auto import tqdm

        if isinstance(images, np.ndarray):
            total = len(images) if total is None else total
            images = [images]
        with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
            for batch in rebatch(images, self.batch_size):
                yield self(batch)
                bar.update(len(batch))

    def outputs(self, images, total=None, progress=True, desc="features") -> dict[str, np.ndarray]:
        """Every output of the network over all `images` (see `batches`), concatenated: [N, ...]."""
        collected: dict[str, list[np.ndarray]] = {}
        for out in self.batches(images, total, progress, desc):
            for k, v in out.items():
                collected.setdefault(k, []).append(v)
        if not collected:
            raise ValueError("no images to evaluate")
        return {k: np.concatenate(v, axis=0) for k, v in collected.items()}

    def activations(
        self,
        images: np.ndarray | Iterable[np.ndarray],
        total: int | None = None,
        progress: bool = True,
        desc: str = "inception",
    ) -> Activations:
        """The Inception activations of `images` (see `batches`); the spatial features are
        reduced to their statistics as they stream (2023 floats per image are not kept)."""
        pool3, logits, spatial = [], [], RunningStatistics()
        for out in self.batches(images, total, progress, desc):
            pool3.append(out["pool3"])
            logits.append(out["logits_nobias"])
            spatial.update(out["spatial"])
        if not pool3:
            raise ValueError("no images to evaluate")
        pool3 = np.concatenate(pool3, axis=0)
        return Activations(
            pool3=pool3,
            logits_nobias=np.concatenate(logits, axis=0),
            stats=feature_statistics(pool3),
            spatial_stats=spatial.result(),
        )


def rebatch(arrays: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Re-chunk a stream of [n_i, ...] arrays into [batch_size, ...] arrays (the last shorter)."""
    pending, count = [], 0
    for a in arrays:
        a = np.asarray(a)
        while len(a):
            take = min(batch_size - count, len(a))
            pending.append(a[:take])
            count += take
            a = a[take:]
            if count == batch_size:
                yield np.concatenate(pending, axis=0)
                pending, count = [], 0
    if pending:
        yield np.concatenate(pending, axis=0)


def compute_activations(
    module, variables, images, batch_size: int = 64, total=None, progress=True, devices=None
) -> Activations:
    """FeatureExtractor(module, variables, batch_size, devices).activations(images, ...)."""
    extractor = FeatureExtractor(module, variables, batch_size, devices)
    return extractor.activations(images, total, progress)


# --------------------------------------------------------------------------------------------
# GD's npz files


@contextlib.contextmanager
def _npz_member(path, key):
    with zipfile.ZipFile(path) as z:
        names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        if key not in names:
            raise KeyError(
                f"{os.fspath(path)!r} has no array {key!r} (it has {sorted(names)}); GD's batches "
                "store images as arr_0 [N, H, W, 3] uint8"
            )
        with z.open(key + ".npy") as f:
            yield f


def npz_keys(path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of an open .npy stream, or None for format versions that
    numpy reads only as a whole (then the array is loaded instead of streamed)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def npz_array_info(path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an npz, from its header (nothing else is read)."""
    with _npz_member(path, key) as f:
        header = _read_npy_header(f)
    if header is None:
        with np.load(path) as z:
            return tuple(z[key].shape), z[key].dtype
    return tuple(header[0]), header[2]


def iter_npz_array(path, key: str = "arr_0", batch_size: int = 64) -> Iterator[np.ndarray]:
    """Yield `key` of an npz in [batch_size, ...] slices without loading the whole array
    (GD's sample batches reach tens of GB). Compressed members are decompressed as streamed."""
    with _npz_member(path, key) as f:
        header = _read_npy_header(f)
        if header is None or header[1] or header[2].hasobject or not header[0]:
            with np.load(path) as z:
                yield from rebatch([z[key]], batch_size)
            return
        shape, _, dtype = header
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{os.fspath(path)!r}: {key} is truncated at row {start}")
            yield np.frombuffer(buf, dtype).reshape(n, *shape[1:])


def read_precomputed_statistics(path) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool3, spatial) statistics stored in a GD reference batch (mu, sigma, mu_s, sigma_s)."""
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in keys]
    if missing:
        raise KeyError(f"{os.fspath(path)!r} has mu but lacks {missing}: GD's reference batches "
                       "store mu, sigma, mu_s, sigma_s together")
    with np.load(path) as f:
        return (
            FIDStatistics(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)),
            FIDStatistics(np.asarray(f["mu_s"], np.float64), np.asarray(f["sigma_s"], np.float64)),
        )


def read_batch_activations(extractor: FeatureExtractor, path, progress=True, desc=None):
    """Activations of arr_0 of a GD batch file (None if it has no arr_0) and its statistics
    (the stored ones when the file has mu/sigma/mu_s/sigma_s, as GD's read_statistics)."""
    stored = read_precomputed_statistics(path)
    acts = None
    if "arr_0" in npz_keys(path):
        shape, dtype = npz_array_info(path, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            # GD feeds arr_0 as [0, 255] whatever its dtype; refuse rather than guess the range.
            raise ValueError(
                f"{os.fspath(path)!r}: arr_0 is {dtype} {list(shape)}, GD's batches store uint8 "
                "[N, H, W, 3] (NHWC RGB): convert with "
                "np.clip(np.round(x), 0, 255).astype(np.uint8)"
            )
        acts = extractor.activations(
            iter_npz_array(path, "arr_0", extractor.batch_size),
            total=shape[0],
            progress=progress,
            desc=desc or os.path.basename(os.fspath(path)),
        )
    if stored is None and acts is None:
        raise KeyError(f"{os.fspath(path)!r} has neither arr_0 images nor mu/sigma statistics")
    stats = stored or (acts.stats, acts.spatial_stats)
    return acts, stats


def save_reference_batch(path, images: np.ndarray, extractor: FeatureExtractor, progress=True):
    """Write a GD reference batch: arr_0 (images [N, H, W, 3] uint8) and the float64 statistics
    mu, sigma (pool3) and mu_s, sigma_s (spatial) of `extractor`'s network."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images are {images.dtype}: GD's batches store uint8 [N, H, W, 3]")
    acts = extractor.activations(images, progress=progress, desc="reference")
    np.savez(
        path,
        arr_0=images,
        mu=acts.stats.mu,
        sigma=acts.stats.sigma,
        mu_s=acts.spatial_stats.mu,
        sigma_s=acts.spatial_stats.sigma,
    )


def evaluate(
    ref_path,
    sample_path,
    module,
    variables,
    batch_size: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, float | None]:
    """GD's evaluator: Inception Score, FID, sFID, precision, recall of a sample batch against a
    reference batch. Precision/recall are None when the reference file stores no images."""
    extractor = FeatureExtractor(module, variables, batch_size)
    log("computing reference batch activations and statistics...")
    ref_acts, (ref_stats, ref_spatial) = read_batch_activations(
        extractor, ref_path, progress, "reference"
    )
    log("computing sample batch activations and statistics...")
    sample_acts, (sample_stats, sample_spatial) = read_batch_activations(
        extractor, sample_path, progress, "samples"
    )
    if sample_acts is None:
        raise KeyError(f"{os.fspath(sample_path)!r} stores no arr_0 images to score")
    log("computing evaluations...")
    results: dict[str, float | None] = {
        "inception_score": inception_score(sample_acts.logits_nobias),
        "fid": sample_stats.frechet_distance(ref_stats),
        "sfid": sample_spatial.frechet_distance(ref_spatial),
        "precision": None,
        "recall": None,
    }
    if ref_acts is not None:
        results["precision"], results["recall"] = precision_recall(
            ref_acts.pool3, sample_acts.pool3
        )
    return results
