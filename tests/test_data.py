"""Data: IDX parsing, the real Fashion-MNIST, GD's folder convention and preprocessing, and
deterministic, resumable, per-process batches."""
import gzip
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from diffjax import data as D
from tests._util import REPO


def write_idx(path, array):
    """An IDX file written from the format's definition: two zero bytes, type 0x08, ndim, then
    big-endian uint32 dims and the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(D.read_idx(tmp_path / name), array)


def test_fashion_mnist_from_any_idx_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    labels = np.arange(7) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    x, y = D.fashion_mnist("test", str(tmp_path))
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


@pytest.fixture(scope="module")
def real_fashion_mnist():
    try:
        return D.fashion_mnist("train")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_real_fashion_mnist(real_fashion_mnist):
    images, labels = real_fashion_mnist
    assert images.shape == (60000, 28, 28, 1) and labels.shape == (60000,)
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)  # balanced, as published
    assert labels[0] == 9  # the first training image is an ankle boot
    record = D.preprocess(D.DataConfig(), {"image": images[0], "label": labels[0]}, None)
    x = record["image"]
    assert x.shape == (32, 32, 1) and x.min() == -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x[:2], -1.0)  # padded with black
    np.testing.assert_allclose(x[2:30, 2:30, 0], images[0, :, :, 0] / 127.5 - 1, atol=1e-6)


def test_folder_classes_from_file_name_prefix(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, value in [("dog_1.png", 10), ("cat_2.png", 20), ("sub/cat_10.jpg", 30),
                        ("ant_x_y.png", 40)]:
        Image.fromarray(np.full((40, 60, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    source = D.ImageFolderSource(str(tmp_path))
    assert source.classes == ["ant", "cat", "dog"]
    by_file = {f.split("/")[-1]: int(l) for f, l in zip(source.files, source.labels)}
    assert by_file == {"ant_x_y.png": 0, "cat_2.png": 1, "cat_10.jpg": 1, "dog_1.png": 2}
    config = D.DataConfig(source="folder", path=str(tmp_path), image_size=16, channels=3,
                          resize="center_crop")
    out = D.preprocess(config, source[0], None)
    assert out["image"].shape == (16, 16, 3)


def test_center_crop_follows_gd():
    """A 100x60 (w x h) image to 16: one BOX halving (60 >= 32) to 50x30, BICUBIC to round(50 *
    16/30)=27 x 16, then the centre 16 columns. A vertical bar in the middle stays centred."""
    image = np.zeros((60, 100, 1), np.uint8)
    image[:, 46:54] = 255
    out = D.center_crop(image, 16)
    assert out.shape == (16, 16, 1)
    column = out[8, :, 0].astype(float)
    assert abs(np.average(np.arange(16), weights=column) - 7.5) < 0.6
    assert column[0] == column[-1] == 0


def test_pad_rejects_images_larger_than_the_target():
    with pytest.raises(ValueError, match="image_size=16"):
        D.pad_to(np.zeros((28, 28, 1), np.uint8), 16)


def _labelled_source(n):
    """Records whose label is their index, so batches reveal which records they hold."""
    return D.ArraySource(np.zeros((n, 4, 4, 1), np.uint8), np.arange(n, dtype=np.int32))


def test_batches_are_deterministic_epochs_are_permutations_and_resume_exactly():
    config = D.DataConfig(image_size=4, seed=7)
    source = _labelled_source(40)
    ds = D.batched_dataset(config, source, 8)
    a, b = D.BatchIterator(ds), D.BatchIterator(D.batched_dataset(config, source, 8))
    first = [a.next()["label"] for _ in range(10)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate([b.next()["label"] for _ in range(10)]))
    # Each epoch (5 batches of 8) holds every record once, in a different order each epoch.
    epoch1, epoch2 = np.concatenate(first[:5]), np.concatenate(first[5:])
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(40))
    np.testing.assert_array_equal(np.sort(epoch2), np.arange(40))
    assert not np.array_equal(epoch1, epoch2)
    # A new iterator set to the saved state continues with the very next batch.
    resumed = D.BatchIterator(D.batched_dataset(config, source, 8))
    resumed.set_state({"next_batch": 6})
    np.testing.assert_array_equal(resumed.next()["label"], first[6])
    stacked = resumed.next(3)["label"]
    np.testing.assert_array_equal(stacked, np.stack(first[7:10]))
    # Another seed, another order.
    other = D.BatchIterator(D.batched_dataset(D.DataConfig(image_size=4, seed=8), source, 8))
    assert not np.array_equal(other.next()["label"], first[0])


def test_random_flips_are_deterministic_and_about_half():
    image = np.zeros((4, 4, 1), np.uint8)
    image[:, 0] = 255  # a bright left column: flipped images have it on the right
    source = D.ArraySource(np.repeat(image[None], 400, 0), np.arange(400, dtype=np.int32))
    config = D.DataConfig(image_size=4, seed=0)
    batch = D.BatchIterator(D.batched_dataset(config, source, 400)).next()
    again = D.BatchIterator(D.batched_dataset(config, source, 400)).next()
    np.testing.assert_array_equal(batch["image"], again["image"])
    flipped = batch["image"][:, 0, -1, 0] > 0
    assert 0.4 < flipped.mean() < 0.6


@pytest.mark.parametrize("count", [2, 4])
def test_processes_split_every_global_batch_into_contiguous_rows(count):
    """Process p's batch k is rows [p B/P, (p+1) B/P) of global batch k of the one-process run
    (images and flips included): the global batch does not depend on the process count."""
    config, source = D.DataConfig(image_size=4, seed=3), _labelled_source(37)  # 37: epochs straddle
    images = np.random.default_rng(0).integers(0, 256, (37, 4, 4, 1)).astype(np.uint8)
    source = D.ArraySource(images, source.labels)
    one = D.BatchIterator(D.batched_dataset(config, source, 8))
    parts = [D.BatchIterator(D.batched_dataset(config, source, 8, process_index=p,
                                               process_count=count)) for p in range(count)]
    for _ in range(12):
        whole, pieces = one.next(), [it.next() for it in parts]
        assert all(len(x["label"]) == 8 // count for x in pieces)
        for key in ("image", "label"):
            np.testing.assert_array_equal(whole[key], np.concatenate([x[key] for x in pieces]))


def test_iterator_state_resumes_with_another_process_count():
    """The state is the next global batch: saved by 1 process, it resumes 2 processes (and the
    reverse) on the very next global batch."""
    config, source = D.DataConfig(image_size=4, seed=5), _labelled_source(40)
    one = D.BatchIterator(D.batched_dataset(config, source, 8))
    expected = [one.next()["label"] for _ in range(7)]
    state = {"next_batch": 4}
    halves = []
    for p in range(2):
        it = D.BatchIterator(D.batched_dataset(config, source, 8, process_index=p, process_count=2))
        it.set_state(state)
        halves.append(it.next(3)["label"])
        assert it.get_state() == {"next_batch": 7}
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), np.stack(expected[4:7]))


@pytest.mark.parametrize("workers, threads", [(2, 0), (0, 3)])
def test_workers_give_the_synchronous_batches_and_resume_exactly(workers, threads):
    """Batches made ahead by worker processes (or threads) are those of the synchronous
    iterator, in its order, for any process's rows; the state counts the batches handed out,
    not the ones prefetched, and resuming from it (a new iterator, or set_state on a running
    one) continues with the very next batch."""
    rng = np.random.default_rng(1)
    source = D.ArraySource(rng.integers(0, 256, (37, 4, 4, 1)).astype(np.uint8),
                           np.arange(37, dtype=np.int32))
    config = D.DataConfig(image_size=4, seed=2)
    sync = D.BatchIterator(D.batched_dataset(config, source, 8))
    expected = [sync.next() for _ in range(10)]

    def rows(k):  # process 1 of 2 reads rows 4..7 of every global batch
        return {key: value[4:] for key, value in expected[k].items()}

    def check(got, k):
        for key in ("image", "label"):
            np.testing.assert_array_equal(got[key], rows(k)[key])

    def iterator():
        return D.BatchIterator(D.batched_dataset(config, source, 8, process_index=1,
                                                 process_count=2),
                               workers=workers, threads=threads, prefetch=2)

    with iterator() as it:
        for k in range(4):
            check(it.next(), k)
        saved = it.get_state()
        assert saved == {"next_batch": 4}  # the workers have made more than 4 by now
        it.set_state({"next_batch": 7})
        stacked = it.next(3)
        for key in ("image", "label"):
            np.testing.assert_array_equal(stacked[key], np.stack([rows(k)[key] for k in (7, 8, 9)]))
        assert it.get_state() == {"next_batch": 10}
    with iterator() as resumed:
        resumed.set_state(saved)
        check(resumed.next(), 4)


_KILLED_PARENT = """
import os, signal, numpy as np
from diffjax import data as D

if __name__ == "__main__":
    source = D.ArraySource(np.zeros((16, 4, 4, 1), np.uint8), np.arange(16, dtype=np.int32))
    it = D.BatchIterator(D.batched_dataset(D.DataConfig(image_size=4), source, 4), workers=2)
    it.next()
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs
"""


def _live_workers(marker):
    """PIDs of live (not zombie) worker processes (spawned Pythons) whose environment holds
    `marker`."""
    found = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            spawned = b"spawn_main" in (proc / "cmdline").read_bytes()
            marked = marker.encode() in (proc / "environ").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if state != "Z" and spawned and marked:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not pathlib.Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_workers_end_when_the_training_process_is_killed(tmp_path):
    """SIGKILL runs no clean-up: the workers notice that their parent is gone and exit within
    seconds instead of living on as orphans."""
    marker = f"diffjax-test-{os.getpid()}-{time.time_ns()}"
    with open(tmp_path / "log", "w") as log:  # not a pipe: orphans would hold it open
        run = subprocess.run([sys.executable, "-c", _KILLED_PARENT], stdout=log, stderr=log,
                             timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO), DIFFJAX_TEST_MARKER=marker))
    assert run.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    deadline = time.time() + 15
    while _live_workers(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert not _live_workers(marker)


@pytest.mark.parametrize("field, value", [("workers", -1), ("threads", 1.5), ("prefetch", 0)])
def test_loading_settings_name_the_fix(field, value):
    with pytest.raises(ValueError, match=f"data.{field}={value}"):
        D.DataConfig(**{field: value})


def test_batch_not_divisible_by_processes_names_the_fix():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 processes"):
        D.batched_dataset(D.DataConfig(image_size=4), _labelled_source(40), 6, process_index=0,
                          process_count=4)


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DIRS", ())
    monkeypatch.setattr(D, "_tfds_source", lambda *a: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.fashion_mnist("train", str(tmp_path))
