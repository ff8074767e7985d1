"""Training data: deterministic, per-process, resumable batches of images in [-1, 1] (NHWC).

Sources (all random-access, read through grain's `MapDataset`; no TensorFlow at train time):
* "fashion_mnist": real Fashion-MNIST from the standard IDX files (`*-images-idx3-ubyte[.gz]`,
  `*-labels-idx1-ubyte[.gz]`) in `path`, else in the Debian package `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist), else through `tfds.data_source("fashion_mnist")`.
  28x28 images are padded to `image_size` with black (-1), as in ../shared/design/TARGETS.md.
* "folder": a directory tree of jpg / jpeg / png / gif images; the class is the file name's
  prefix before the first "_" (guided-diffusion's image_datasets.py convention), classes indexed
  in sorted order.
* "tfds:<name>": any tensorflow-datasets dataset with "image" (and "label") features, prepared as
  array_record, read with `tfds.data_source`.

Preprocessing is guided-diffusion's: halve with a BOX filter while the short side is at least
twice the target, BICUBIC-resize the short side to the target, centre crop, scale to [-1, 1],
random horizontal flip. Small datasets whose images are smaller than the target ("pad" mode, the
Fashion-MNIST default) are padded with -1 instead.

Order: one global stream, independent of how many processes read it. Every epoch is a permutation
of all records seeded by (seed, epoch) (grain's shuffle), with each record's random flip seeded by
its position in the stream; global batch k is stream elements [k B, (k + 1) B) (B = the global
batch size). Process p of P reads only rows [p B / P, (p + 1) B / P) of every global batch, the
rows that `jax.make_array_from_process_local_data` places on its devices. So global batch k is the
same set of images, in the same row order, whether 1 or 64 processes assemble it, and the iterator
state is just k, the index of the next global batch: saved in the checkpoint, a resumed run
continues with the very next batch, with any number of processes.

Workers: `data.workers` grain worker processes (`mp_prefetch`) and / or `data.threads` threads per
process (`ReadOptions`) read, decode, resize and flip whole batches ahead of the training loop, each
keeping up to `data.prefetch` batches ready; with both 0 every batch is made on the calling thread
when it is asked for. Global batch k is made by one worker from the same records with the same
flips either way, and the batches come back in stream order, so the batches, their order and the
iterator state do not depend on these settings; the state counts the batches handed out, not the
ones prefetched, so a resumed run continues exactly where the saved one stopped.

Why one module of ~580 lines: because the sources, the preprocessing and the ordered, resumable
batching share one contract (the "Order" above); splitting it would spread that contract out.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib
import socket
import threading
import time
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags as absl_flags
from PIL import Image

from diffjax import paths
from diffjax import tokenizer as tokenizer_lib

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # the Debian package's files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
_IDX_PREFIX = {"train": "train", "test": "t10k"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are shaped.

    source: "fashion_mnist" | "folder" | "tfds:<name>"; path: the IDX folder, the image folder or
    the tfds data_dir; resize: "center_crop" (GD) | "pad" (pad smaller images with -1);
    channels: 1 (grayscale) or 3 (RGB)."""

    source: str = "fashion_mnist"
    path: str = ""
    split: str = "train"
    image_size: int = 32
    channels: int = 1
    resize: str = "pad"
    random_flip: bool = True
    seed: int = 0
    # Captions (GLIDE; see "captions" below): the caption feature ("" = none), the tokenizer
    # (glide-text2im's tokenizer folder, or "bytes") and the tokens per caption.
    captions: str = ""
    tokenizer: str = ""
    text_ctx: int = 128
    # Loading (see "Workers" above): worker processes and threads per process preparing batches
    # ahead of the training loop (0 and 0: synchronously on the calling thread), and how many
    # batches each worker (or the thread pool) keeps ready.
    workers: int = 0
    threads: int = 0
    prefetch: int = 2

    def __post_init__(self):
        if not (self.source in ("fashion_mnist", "folder", "shapes")
                or self.source.startswith("tfds:")):
            raise ValueError(f"data.source={self.source!r} is unknown: use 'fashion_mnist', "
                             f"'folder' (with data.path), 'shapes' or 'tfds:<name>'")
        _check_caption_config(self)
        if self.resize not in ("center_crop", "pad"):
            raise ValueError(f"data.resize={self.resize!r}: choose 'center_crop' or 'pad'")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels={self.channels}: choose 1 (grayscale) or 3 (RGB)")
        for name in ("workers", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be an int >= 0 "
                                 f"(0: batches are made on the training thread)")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"data.prefetch={self.prefetch!r} must be an int >= 1 (batches "
                             f"buffered per worker)")


# --------------------------------------------------------------------------- sources


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: images [N, 28, 28], labels [N]."""
    path = paths.as_path(path)  # local or gs://...
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    zero, dtype_code, ndim = raw[0] | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes (truncated?)")
    return data.reshape(shape)


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def _read_idx_split(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images [N, 28, 28, 1], labels [N] int32) of the IDX pair `prefix`-* in `directory`, or
    None when either file is missing."""
    images = _find_idx(paths.as_path(directory), f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(paths.as_path(directory), f"{prefix}-labels-idx1-ubyte")
    if not (images and labels):
        return None
    return read_idx(images)[..., None], read_idx(labels).astype(np.int32)


def fashion_mnist(split: str = "train", path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28, 1] uint8, labels [N] int32) of Fashion-MNIST's "train" or "test" split,
    from IDX files (`path`, then the Debian package) or tfds."""
    if split not in _IDX_PREFIX:
        raise ValueError(f"Fashion-MNIST split={split!r}: choose 'train' or 'test'")
    prefix = _IDX_PREFIX[split]
    if path:  # a path given is the only place looked at: never silently another copy
        found = _read_idx_split(path, prefix)
        if found is not None:
            return found
        raise FileNotFoundError(
            f"data.path={path!r} holds no {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]: point it at the folder of Fashion-MNIST's IDX "
            f"files, or leave it empty for the system copy "
            f"(`apt-get install -y dataset-fashion-mnist`)")
    tried = [os.environ.get("DIFFJAX_FASHION_MNIST", "")] + list(FASHION_MNIST_DIRS)
    for directory in filter(None, tried):
        found = _read_idx_split(directory, prefix)
        if found is not None:
            return found
    try:
        source = _tfds_source("fashion_mnist", split, None)
        images = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.asarray([source[i]["label"] for i in range(len(source))], np.int32)
        return images, labels
    except Exception as err:  # noqa: BLE001 - the message below says what to do
        raise FileNotFoundError(
            f"Fashion-MNIST ({split}) not found: no IDX files in {[d for d in tried if d]} and "
            f"tfds failed ({type(err).__name__}: {err}). Install the offline copy with "
            f"`apt-get install -y dataset-fashion-mnist`, or set data.path to a folder holding "
            f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz"
        ) from None


# Where tfds downloads from; probed before a download so that an offline machine fails in seconds
# (tfds itself retries every file for minutes).
TFDS_HOST = ("storage.googleapis.com", 443)


def _reachable(host: tuple[str, int], timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection(host, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _tfds_source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # imported lazily: a heavy import the IDX path never needs

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared() and not _reachable(TFDS_HOST):
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared under {builder.data_dir} and "
            f"{TFDS_HOST[0]} cannot be reached to download it: run `tfds build {name} "
            f"--data_dir DIR` where there is network, copy DIR here and set data.path=DIR")
    return tfds.data_source(name, split=split, data_dir=data_dir)


def list_image_files(directory: str | os.PathLike) -> list[str]:
    """Every image file under `directory`, recursively, sorted (GD's _list_image_files_recursively)."""
    found = []
    if paths.is_remote(directory):  # a bucket: epath's recursive glob (os.walk is local only)
        found = [os.fspath(f) for f in paths.as_path(directory).rglob("*")
                 if f.suffix[1:].lower() in IMAGE_EXTENSIONS]
    for root, _, files in os.walk(directory) if not found else ():
        found += [os.path.join(root, f) for f in files
                  if "." in f and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {directory}")
    return sorted(found)


def class_from_filename(path: str) -> str:
    """GD's convention: the class of "dir/n01440764_10026.JPEG" is "n01440764"."""
    return os.path.basename(path).split("_")[0]


class ImageReadError(ValueError):
    """An image file of a folder dataset that cannot be decoded (named in the message)."""


class ImageFolderSource:
    """Random-access records {"image": uint8 [H, W, C], "label": int32} of an image folder."""

    def __init__(self, directory: str, channels: int = 3):
        self.files = list_image_files(directory)
        self.classes = sorted({class_from_filename(f) for f in self.files})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.asarray([index[class_from_filename(f)] for f in self.files], np.int32)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        name = self.files[i]
        try:
            with Image.open(paths.as_path(name).open("rb") if paths.is_remote(name) else name) as im:
                image = np.asarray(im.convert(self.mode))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's truncated / corrupt files
            raise ImageReadError(f"{name}: not a readable image ({err}): replace or remove the "
                                 f"file") from None
        return {"image": image, "label": self.labels[i]}


class ArraySource:
    """Random-access records of in-memory arrays: images [N, H, W, C] uint8, labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def make_source(config: DataConfig, split: str | None = None):
    """The random-access source of a DataConfig (records {"image": uint8 HWC, "label"})."""
    split = split or config.split
    if config.source == "shapes" or (config.source == "folder" and config.captions):
        return make_caption_source(config, split)
    if config.source == "fashion_mnist":
        return ArraySource(*fashion_mnist(split, config.path))
    if config.source == "folder":
        if not config.path:
            raise ValueError("data.source='folder' needs data.path, the directory of images: "
                             "pass --config.data.path=/path/to/images")
        return ImageFolderSource(config.path, config.channels)
    return _tfds_source(config.source.split(":", 1)[1], split, config.path or None)


# --------------------------------------------------------------------------- preprocessing


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """GD's center_crop_arr: BOX-halve while the short side >= 2 size, BICUBIC-resize the short
    side to size, centre crop. uint8 [H, W, C] -> uint8 [size, size, C]."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil).reshape(pil.size[1], pil.size[0], channels)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Centre a smaller uint8 image [h, w, C] on a black (0, i.e. -1 after scaling) size x size
    canvas."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"data.resize='pad' cannot fit {h}x{w} images into image_size={size}: "
                         f"raise data.image_size or use data.resize='center_crop'")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as GD)."""
    return image.astype(np.float32) / 127.5 - 1.0


def preprocess(config: DataConfig, record: dict, rng: np.random.Generator | None) -> dict:
    """One record -> {"image": float32 [S, S, C] in [-1, 1], "label": int32}; flipped
    left-right with probability 1/2 when `rng` is given and random_flip is set."""
    image = np.asarray(record["image"])
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] != config.channels:
        image = image[..., :1] if config.channels == 1 else np.repeat(image[..., :1], 3, -1)
    if config.resize == "pad":
        image = pad_to(image, config.image_size)
    else:
        image = center_crop(image, config.image_size)
    if rng is not None and config.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    label = record.get("label", 0)
    out = {"image": to_model_range(image), "label": np.int32(label)}
    if config.captions:
        out.update(caption_tokens(config, record, rng))
    return out


# --------------------------------------------------------------------------- batches


class _ProcessRows(grain.MapDataset):
    """Element i = (k, j) of this dataset is row p b + j of global batch k of the parent stream
    (b = B / P rows per process): `.batch(b)` of it gives process p's slice of every global batch,
    and only those records are ever read and preprocessed."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self.global_batch, self.rows = global_batch, global_batch // process_count
        self.offset = process_index * self.rows

    def __len__(self) -> int:
        return len(self._parent) // self.global_batch * self.rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self.rows)
        return self._parent[batch * self.global_batch + self.offset + row]


def batched_dataset(config: DataConfig, source, global_batch: int, *, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """An infinite grain MapDataset whose element k is process `process_index`'s rows of global
    batch k: {"image": [global_batch / process_count, S, S, C], "label": [...]}."""
    if global_batch % process_count:
        raise ValueError(f"global batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes: choose a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    # One stream for all processes: shuffle and flips depend on the seed and the position only.
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(None)
    ds = ds.random_map(functools.partial(preprocess, config))  # a partial: workers unpickle it
    ds = _ProcessRows(ds, global_batch, process_index, process_count)
    return ds.batch(global_batch // process_count, drop_remainder=True)


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """grain worker_init_fn (with `parent`, the training process's pid, bound): end this worker
    when that process is gone. A process killed by SIGKILL (an out-of-memory kill, a preempted
    node) runs no clean-up, and grain 0.2.18's workers would live on as orphans holding CPU,
    memory and shared-memory batches. `parent` is bound when the workers are made, not read in the
    worker, which may start only after the parent has died."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _plain_array(x) -> np.ndarray:
    return x if type(x) is np.ndarray else np.array(x)


class BatchIterator:
    """Batches of this process: `next()` -> {"image": [b, S, S, C] float32, "label": [b] int32}
    (b = the process's rows of the global batch); `next(n)` stacks n batches -> [n, b, ...].
    `get_state()` / `set_state()` give the index of the next GLOBAL batch (JSON-serialisable, the
    same on every process, valid for any process count).

    `workers` processes and `threads` threads make batches ahead, `prefetch` each (see the module
    docstring, "Workers"); they start at the first `next()` and are restarted by `set_state()`.
    `close()` (or the end of a `with` block) stops them; they also stop when the interpreter
    exits."""

    def __init__(self, dataset: grain.MapDataset, next_batch: int = 0, *, workers: int = 0,
                 threads: int = 0, prefetch: int = 2):
        self.dataset = dataset
        self.next_batch = next_batch
        self.workers, self.threads, self.prefetch = workers, threads, prefetch
        self._stream = None  # a grain iterator over dataset[next_batch], dataset[next_batch + 1], ...

    def _open_stream(self):
        ds = self.dataset[self.next_batch:].to_iter_dataset(grain.ReadOptions(
            num_threads=self.threads, prefetch_buffer_size=self.threads * self.prefetch))
        if self.workers:
            if not absl_flags.FLAGS.is_parsed():
                # grain 0.2.18's mp_prefetch reads an absl flag, which fails in a script that
                # parsed none (google/grain#1355, fixed after 0.2.18): use the defaults.
                absl_flags.FLAGS.mark_as_parsed()
            # Worker w makes batches w, w + W, w + 2W, ... of the slice; grain interleaves them
            # back in order.
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=self.prefetch),
                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
        return iter(ds)

    def next(self, n: int | None = None) -> dict:
        if n is None:
            if self._stream is None:
                self._stream = self._open_stream()
            # Worker batches arrive in shared memory that grain frees when they are dropped:
            # copy them into plain arrays the caller may keep.
            batch = jax.tree.map(_plain_array, next(self._stream))
            self.next_batch += 1
            return batch
        batches = [self.next() for _ in range(n)]
        return jax.tree.map(lambda *xs: np.stack(xs), *batches)

    __next__ = next

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": int(self.next_batch)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()  # the prefetched batches belong to the old position
        self.next_batch = int(state["next_batch"])

    def close(self) -> None:
        """Stop the workers and drop the prefetched batches (a later `next()` starts anew)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_iterator(config: DataConfig, global_batch: int, state: dict | None = None) -> BatchIterator:
    """The training iterator of this process (jax.process_index() of jax.process_count()): its
    rows of each global batch of `global_batch` images, made by config.workers / config.threads."""
    source = make_source(config)
    dataset = batched_dataset(config, source, global_batch, process_index=jax.process_index(),
                              process_count=jax.process_count())
    iterator = BatchIterator(dataset, workers=config.workers, threads=config.threads,
                             prefetch=config.prefetch)
    if state:
        iterator.set_state(state)
    return iterator


def eval_arrays(config: DataConfig, split: str, num: int, seed: int = 0) -> dict:
    """`num` records of `split` drawn without replacement with `seed`, preprocessed without flips:
    {"image": [num, S, S, C] float32, "label": [num] int32} (for bits/dim and sample grids)."""
    source = make_source(config, split)
    if num > len(source):
        raise ValueError(f"asked for {num} {split} images but the split holds {len(source)}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(source))[:num])
    records = [preprocess(config, source[int(i)], None) for i in idx]
    return {k: np.stack([r[k] for r in records]) for k in ("image", "label")}


def num_classes(config: DataConfig) -> int | None:
    """The number of classes of a source, when it knows it cheaply."""
    if config.source == "fashion_mnist":
        return len(FASHION_MNIST_CLASSES)
    if config.source == "folder":
        return len({class_from_filename(f) for f in list_image_files(config.path)})
    return None


def class_names(config: DataConfig) -> Sequence[str] | None:
    if config.captions:  # captioned data is labelled by its captions
        return None
    if config.source == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    if config.source == "folder":
        return sorted({class_from_filename(f) for f in list_image_files(config.path)})
    return None


# --------------------------------------------------------------------------- captions (GLIDE)
#
# Image-caption pairs for text-conditional training. `data.captions` names the caption: a feature
# of a tfds dataset ("caption", or "captions/text" for a nested one; a list of captions gives one
# at random per read), the extension of the same-stem caption files of an image folder ("txt":
# dir/cat_01.png + dir/cat_01.txt), or "caption" for the synthetic "shapes" source. Captions are
# tokenized in the data pipeline with `data.tokenizer` (see diffjax.tokenizer.load) into
# "tokens" [text_ctx] int32 and "mask" [text_ctx] bool (True for real tokens), GLIDE's model inputs.

SHAPE_COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 235)}
SHAPE_KINDS = ("square", "circle")


def _check_caption_config(config: DataConfig) -> None:
    if config.source == "shapes" and config.captions not in ("", "caption"):
        raise ValueError(f"data.captions={config.captions!r}: the shapes source's caption feature "
                         f"is 'caption'")
    if config.captions and not config.tokenizer:
        raise ValueError(f"data.captions={config.captions!r} needs data.tokenizer: the folder of "
                         f"glide-text2im's tokenizer files (glide_text2im/tokenizer/, with "
                         f"encoder.json.gz and vocab.bpe.gz) or 'bytes' (byte-level, 257 tokens)")
    if config.captions and config.text_ctx < 1:
        raise ValueError(f"data.text_ctx={config.text_ctx} must be >= 1 (GLIDE: 128)")


class ShapesSource:
    """Synthetic captioned shapes, made on the fly and deterministic per index: a red, green or
    blue filled square or circle (side / diameter 40-70 % of the image, anywhere inside it) on a
    black background, captioned "<colour> <shape>"; label = colour index * 2 + shape index.
    Records {"image": uint8 [size, size, 3], "label", "caption"}."""

    def __init__(self, size: int, num: int = 10_000, seed: int = 0):
        self.size, self.num, self.seed = size, num, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        colour, kind = rng.integers(len(SHAPE_COLOURS)), rng.integers(len(SHAPE_KINDS))
        image = render_shape(self.size, list(SHAPE_COLOURS)[colour], SHAPE_KINDS[kind], rng)
        return {"image": image, "label": np.int32(colour * len(SHAPE_KINDS) + kind),
                "caption": f"{list(SHAPE_COLOURS)[colour]} {SHAPE_KINDS[kind]}"}


def render_shape(size: int, colour: str, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One filled shape of SHAPE_COLOURS[colour] on black: uint8 [size, size, 3]."""
    extent = rng.uniform(0.4, 0.7) * size
    cy, cx = rng.uniform(extent / 2, size - extent / 2, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    if kind == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (extent / 2) ** 2
    else:
        inside = (np.abs(yy - cy) <= extent / 2) & (np.abs(xx - cx) <= extent / 2)
    image = np.zeros((size, size, 3), np.uint8)
    image[inside] = SHAPE_COLOURS[colour]
    return image


class CaptionedFolderSource(ImageFolderSource):
    """An image folder whose every image has a same-stem caption file (`extension`, e.g. "txt")."""

    def __init__(self, directory: str, channels: int = 3, extension: str = "txt"):
        super().__init__(directory, channels)
        self.caption_files = [os.path.splitext(f)[0] + "." + extension for f in self.files]
        missing = [c for c in self.caption_files if not os.path.exists(c)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.files)} images have no caption "
                                    f"file, e.g. {missing[0]}: write one .{extension} per image "
                                    f"(same name), or unset data.captions")

    def __getitem__(self, i):
        record = super().__getitem__(i)
        with open(self.caption_files[i], encoding="utf-8") as f:
            record["caption"] = f.read().strip()
        return record


def make_caption_source(config: DataConfig, split: str):
    if config.source == "shapes":
        # Disjoint synthetic records per split.
        return ShapesSource(config.image_size, seed=config.seed * 7919 + (split != "train"))
    if not config.path:
        raise ValueError("data.source='folder' needs data.path, the directory of images and "
                         "captions: pass --config.data.path=/path/to/images")
    return CaptionedFolderSource(config.path, config.channels, config.captions)


def caption_text(record: dict, feature: str, rng: np.random.Generator | None) -> str:
    """The caption of a record: feature "a/b" reads record["a"]["b"]; bytes are decoded as UTF-8;
    of several captions one is chosen with `rng` (the first without)."""
    value = record
    for part in feature.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"data.captions={feature!r}: no feature {part!r} in the record "
                           f"(it has {have})")
        value = value[part]
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (str, bytes)):
        values = list(np.asarray(value, dtype=object).reshape(-1))
        if not values:
            return ""
        value = values[int(rng.integers(len(values))) if rng is not None else 0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8")
    return str(value)


def caption_tokens(config: DataConfig, record: dict, rng: np.random.Generator | None) -> dict:
    """{"tokens": int32 [text_ctx], "mask": bool [text_ctx]} of the record's caption."""
    tokenizer = tokenizer_lib.load(config.tokenizer)
    tokens, mask = tokenizer_lib.tokens_and_mask(tokenizer, caption_text(record, config.captions, rng),
                                   config.text_ctx)
    return {"tokens": tokens[0], "mask": mask[0]}
