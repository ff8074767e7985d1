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

Order: the process's shard (a contiguous 1/process_count of the records) is shuffled with `seed`,
reshuffled every epoch (grain seeds each epoch's permutation from the seed and the epoch number),
and cut into batches. Batch k is a pure function of (seed, k, process), so the iterator state is
just the index of the next batch: saved in the checkpoint, a resumed run continues with the very
next batch.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from typing import Any, Sequence

import grain
import jax
import numpy as np
from PIL import Image

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

    def __post_init__(self):
        if not (self.source in ("fashion_mnist", "folder") or self.source.startswith("tfds:")):
            raise ValueError(f"data.source={self.source!r} is unknown: use 'fashion_mnist', "
                             f"'folder' (with data.path) or 'tfds:<name>'")
        if self.resize not in ("center_crop", "pad"):
            raise ValueError(f"data.resize={self.resize!r}: choose 'center_crop' or 'pad'")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels={self.channels}: choose 1 (grayscale) or 3 (RGB)")


# --------------------------------------------------------------------------- sources


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: images [N, 28, 28], labels [N]."""
    path = pathlib.Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
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


def fashion_mnist(split: str = "train", path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28, 1] uint8, labels [N] int32) of Fashion-MNIST's "train" or "test" split,
    from IDX files (`path`, then the Debian package) or tfds."""
    if split not in _IDX_PREFIX:
        raise ValueError(f"Fashion-MNIST split={split!r}: choose 'train' or 'test'")
    prefix = _IDX_PREFIX[split]
    tried = [path] if path else []
    tried += [os.environ.get("DIFFJAX_FASHION_MNIST", "")] + list(FASHION_MNIST_DIRS)
    for directory in filter(None, tried):
        images = _find_idx(pathlib.Path(directory), f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(pathlib.Path(directory), f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return read_idx(images)[..., None], read_idx(labels).astype(np.int32)
    try:
        source = _tfds_source("fashion_mnist", split, path or None)
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


def _tfds_source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # imported lazily: a heavy import the IDX path never needs

    return tfds.data_source(name, split=split, data_dir=data_dir)


def list_image_files(directory: str | os.PathLike) -> list[str]:
    """Every image file under `directory`, recursively, sorted (GD's _list_image_files_recursively)."""
    found = []
    for root, _, files in os.walk(directory):
        found += [os.path.join(root, f) for f in files
                  if "." in f and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {directory}")
    return sorted(found)


def class_from_filename(path: str) -> str:
    """GD's convention: the class of "dir/n01440764_10026.JPEG" is "n01440764"."""
    return os.path.basename(path).split("_")[0]


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
        with Image.open(self.files[i]) as im:
            image = np.asarray(im.convert(self.mode))
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
    return {"image": to_model_range(image), "label": np.int32(label)}


# --------------------------------------------------------------------------- batches


def process_shard(num_records: int, index: int, count: int) -> slice:
    """The contiguous slice of records of process `index` of `count`; every process gets the same
    number (the remainder is dropped) so that all take the same number of steps."""
    per = num_records // count
    if per == 0:
        raise ValueError(f"{num_records} records cannot be split across {count} processes")
    return slice(index * per, (index + 1) * per)


def batched_dataset(config: DataConfig, source, local_batch: int, *, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """An infinite grain MapDataset whose element k is batch k of this process."""
    ds = grain.MapDataset.source(source)
    ds = ds[process_shard(len(source), process_index, process_count)]
    # One seed per process for shuffle and flips, so that shards are shuffled independently.
    ds = ds.seed(config.seed * 1_000_003 + process_index).shuffle().repeat(None)
    ds = ds.random_map(lambda record, rng: preprocess(config, record, rng))
    return ds.batch(local_batch, drop_remainder=True)


class BatchIterator:
    """Batches of this process: `next()` -> {"image": [B, S, S, C] float32, "label": [B] int32}
    (B = the process's share of the global batch); `next(n)` stacks n batches -> [n, B, ...].
    `get_state()` / `set_state()` give the index of the next batch (JSON-serialisable)."""

    def __init__(self, dataset: grain.MapDataset, next_batch: int = 0):
        self.dataset = dataset
        self.next_batch = next_batch

    def next(self, n: int | None = None) -> dict:
        if n is None:
            batch = self.dataset[self.next_batch]
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
        self.next_batch = int(state["next_batch"])


def make_iterator(config: DataConfig, local_batch: int, state: dict | None = None) -> BatchIterator:
    """The training iterator of this process (jax.process_index() of jax.process_count())."""
    source = make_source(config)
    dataset = batched_dataset(config, source, local_batch, process_index=jax.process_index(),
                              process_count=jax.process_count())
    iterator = BatchIterator(dataset)
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
    if config.source == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    if config.source == "folder":
        return sorted({class_from_filename(f) for f in list_image_files(config.path)})
    return None
