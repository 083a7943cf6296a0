"""Dataset adapters: each format written tiny in tmp_path, the paper's splits checked as index math on the real
totals, transforms checked against torchvision's own PIL pipeline, determinism of rows and augmented views."""
import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract  # noqa: F401  (torchvision guard before torchvision and timm)
import timm.data
from extract._torchvision import torchvision
from extract.datasets import (DATASET_STATS, DataSettings, DatasetNotFound, load_splits, lt_class_counts,
                              split_indices)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
rng = np.random.default_rng(0)


# ---------------------------------------------------------------- tiny files in the real formats
def write_cifar10(root: Path, per_batch=20, n_test=30):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        raw[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)], "num_vis": 3072}, f, protocol=2)
    train = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    return train.transpose(0, 2, 3, 1), raw["test_batch"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_cifar100(root: Path, per_class=10, n_test=50):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, labels in [("train", np.repeat(np.arange(100), per_class)), ("test", rng.integers(0, 100, n_test))]:
        labels = rng.permutation(labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                         "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{c}" for c in range(100)], "coarse_label_names": []}, f, protocol=2)


def write_svhn(root: Path, n_train=60, n_test=20):
    import scipy.io
    root.mkdir(parents=True, exist_ok=True)
    for name, n in [("train_32x32.mat", n_train), ("test_32x32.mat", n_test)]:
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)      # 10 stands for the digit 0
        scipy.io.savemat(root / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root: Path, n_train=48, n_test=12):
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
        if prefix == "train":
            train_images = images
    return train_images


def write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=8, val_per_class=0):
    for split, n in [("train", per_class), ("val", val_per_class)]:
        for c in classes if n else ():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                shape = (h, w) if i == 0 else (h, w, 3)                     # a grayscale photo per class
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / c / f"{i}.png")
            (root / split / c / "notes.txt").write_text("not an image")


def settings(name, data_dir, size=32, **kw):
    return DataSettings(name, str(data_dir), size, *DATASET_STATS[name], **kw)


# ---------------------------------------------------------------- the paper's splits on the real totals
def check_partition(parts, n_train, n_test):
    train_pool = np.concatenate([idx for src, idx in parts.values() if src == "train"])
    assert len(np.unique(train_pool)) == len(train_pool) and train_pool.min() >= 0 and train_pool.max() < n_train
    if parts["test"][0] == "test":
        assert sorted(parts["test"][1]) == list(range(n_test))


@pytest.mark.parametrize("name, n_train, n_test, sizes", [
    ("cifar10", 50_000, 10_000, (45_000, 5_000, 10_000)),
    ("cifar100", 50_000, 10_000, (40_000, 10_000, 10_000)),
    ("fashion-mnist", 60_000, 10_000, (55_000, 5_000, 10_000)),
    ("svhn", 73_257, 26_032, (68_293, 4_964, 26_032)),           # of 99,289: 68.8 / 5.0 / 26.2 %
    ("imagefolder", 600_000, 50_000, (550_000, 50_000, 50_000)),     # val capped at 50,000
    ("imagefolder", 1_200, 0, (900, 100, 200)),
])
def test_split_sizes_follow_the_paper(name, n_train, n_test, sizes):
    labels = np.arange(n_train) % 10
    parts = split_indices(name, labels, n_test, seed=3)
    assert tuple(len(parts[s][1]) for s in ("train", "val", "test")) == sizes
    check_partition(parts, n_train, n_test)
    if name == "svhn":
        total = n_train + n_test
        assert abs(len(parts["val"][1]) / total - 0.05) < 1e-4 and abs(n_test / total - 0.262) < 1e-3


def test_cifar100_lt_split_on_real_totals():
    labels = rng.permutation(np.repeat(np.arange(100), 500))
    parts = split_indices("cifar100-lt", labels, 10_000, seed=1)
    check_partition(parts, 50_000, 10_000)
    val_counts = np.bincount(labels[parts["val"][1]], minlength=100)
    train_counts = np.bincount(labels[parts["train"][1]], minlength=100)
    assert (val_counts == 100).all()                                 # balanced, like the test set
    assert train_counts[0] == 400 and train_counts[-1] == 4 and train_counts.sum() == 8_668
    assert train_counts.tolist() == lt_class_counts([400] * 100)


def test_lt_profile_is_exponential_with_factor_100():
    counts = lt_class_counts([400] * 100)
    assert counts[0] / counts[-1] == 100
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    for c, n in enumerate(counts):                                   # floor of 400 * 100^(-c/99)
        assert n <= 400 * 100 ** (-c / 99) + 1e-6 < n + 1


def test_split_order_is_a_seeded_permutation():
    labels = np.arange(50_000) % 100
    a, b = split_indices("cifar100", labels, 10_000, 0), split_indices("cifar100", labels, 10_000, 0)
    other = split_indices("cifar100", labels, 10_000, 1)
    for s in ("train", "val", "test"):
        assert np.array_equal(a[s][1], b[s][1])
    assert not np.array_equal(a["val"][1], other["val"][1])
    val = a["val"][1]
    assert not np.all(np.diff(val) > 0)                              # shuffled, so V1/V2 halves are random
    half = np.bincount(labels[val[:5_000]], minlength=100)
    assert half.min() > 20                                           # every class in V1


# ---------------------------------------------------------------- each format, read from disk
@pytest.fixture
def cifar10_dir(tmp_path):
    train, test = write_cifar10(tmp_path)
    return tmp_path, train, test


def test_cifar10_sizes_labels_and_names(cifar10_dir):
    root, train, test = cifar10_dir
    splits = load_splits(settings("cifar10", root))
    assert [len(splits.train), len(splits.val), len(splits.test)] == [90, 10, 30]
    assert splits.num_classes == 10 and splits.class_names[3] == "class3"
    x, y = splits.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert np.array_equal(splits.train.labels, [splits.train[r][1] for r in range(len(splits.train))])


def test_cifar100_and_lt(tmp_path):
    write_cifar100(tmp_path)
    plain = load_splits(settings("cifar100", tmp_path))
    assert [len(plain.train), len(plain.val), len(plain.test)] == [800, 200, 50]
    lt = load_splits(settings("cifar100-lt", tmp_path))
    assert lt.num_classes == 100 and len(lt.test) == 50
    assert (np.bincount(lt.val.labels, minlength=100) == 2).all()
    assert lt.describe()["train_class_counts"] == lt_class_counts([8] * 100)


def test_svhn_mat_files(tmp_path):
    write_svhn(tmp_path)
    splits = load_splits(settings("svhn", tmp_path, size=24))
    assert [len(splits.train), len(splits.val), len(splits.test)] == [56, 4, 20]
    labels = np.concatenate([s.labels for s in (splits.train, splits.val, splits.test)])
    assert labels.min() >= 0 and labels.max() <= 9 and splits.class_names == [str(d) for d in range(10)]
    assert splits.train[0][0].shape == (3, 24, 24)


def test_fashion_grayscale_to_three_normalised_channels(tmp_path):
    train = write_fashion(tmp_path)
    s = DataSettings("fashion-mnist", str(tmp_path), 28, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    splits = load_splits(s)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [44, 4, 12]
    x, _ = splits.train[5]
    gray = torch.from_numpy(train[splits.train.indices[5]].astype(np.float32) / 255)
    for c in range(3):                                               # each channel: (gray - mean_c) / std_c
        assert torch.allclose(x[c], (gray - s.mean[c]) / s.std[c], atol=1e-6)


def test_resize_and_normalise_match_torchvision(cifar10_dir):
    root, _, test = cifar10_dir
    T = torchvision.transforms
    mean, std = DATASET_STATS["cifar10"]
    for interpolation in ("bicubic", "bilinear"):
        mode = T.InterpolationMode(interpolation)
        splits = load_splits(settings("cifar10", root, size=56, interpolation=interpolation))
        reference = T.Compose([T.Resize(56, interpolation=mode), T.ToTensor(), T.Normalize(mean, std)])
        for row in (0, 7):
            expected = reference(Image.fromarray(test[splits.test.indices[row]]))
            assert torch.allclose(splits.test[row][0], expected, atol=1e-5)


def test_imagefolder_carves_val_and_test(tmp_path):
    write_imagefolder(tmp_path, per_class=8)
    splits = load_splits(settings("imagefolder", tmp_path, size=32, crop_pct=0.875))
    assert splits.class_names == ["cat", "dog", "eel"]
    assert [len(splits.train), len(splits.val), len(splits.test)] == [18, 2, 4]   # 24 images: 3/4, 1/12, 1/6
    for split in (splits.train, splits.val, splits.test):
        for row in range(len(split)):
            assert split[row][0].shape == (3, 32, 32)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_imagefolder_photos_match_timms_eval_transform(tmp_path, crop_pct):
    write_imagefolder(tmp_path, per_class=4)
    mean, std = DATASET_STATS["imagefolder"]
    splits = load_splits(settings("imagefolder", tmp_path, size=24, crop_pct=crop_pct))
    reference = timm.data.create_transform(24, crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std)
    for split in (splits.train, splits.test):
        for row in range(len(split)):
            with Image.open(split.source[split.indices[row]]) as photo:
                expected = reference(photo.convert("RGB"))
            assert torch.allclose(split[row][0], expected, atol=1e-5)


def test_imagefolder_val_folder_is_the_test_split(tmp_path):
    write_imagefolder(tmp_path, per_class=10, val_per_class=2)
    splits = load_splits(settings("imagefolder", tmp_path, size=32))
    assert [len(splits.train), len(splits.val), len(splits.test)] == [27, 3, 6]
    assert splits.test.source_name == "test" and sorted(splits.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------- determinism, views, limit, describe
def test_same_settings_give_identical_tensors_in_any_order(cifar10_dir):
    root, _, _ = cifar10_dir
    s = settings("cifar10", root, views=2, split_seed=5)
    a, b = load_splits(s), load_splits(s)
    rows = list(range(len(a.train)))
    forward = {r: a.train[r][0] for r in rows}
    for r in reversed(rows):                                         # out of order, fresh object
        assert torch.equal(b.train[r][0], forward[r])
    loader = torch.utils.data.DataLoader(b.train, batch_size=16, num_workers=2)   # other processes
    batched = torch.cat([x for x, _ in loader])
    assert torch.equal(batched, torch.stack([forward[r] for r in rows]))
    assert a.describe() == b.describe()
    other = load_splits(settings("cifar10", root, views=2, split_seed=6))
    assert other.describe()["split_hash"] != a.describe()["split_hash"]


def crops_of(plain: torch.Tensor, fill: torch.Tensor, flips: bool):
    """Every zero-pixel-padded crop (pad = size // 8) of a normalised image, and its mirror when allowed."""
    size = plain.shape[-1]
    pad = size // 8
    padded = fill.expand(3, size + 2 * pad, size + 2 * pad).clone()
    padded[:, pad:pad + size, pad:pad + size] = plain
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + size, dx:dx + size]
            yield crop
            if flips:
                yield crop.flip(-1)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_views_are_padded_crops_and_flips_of_the_plain_image(tmp_path, name):
    (write_cifar10 if name == "cifar10" else write_svhn)(tmp_path)
    splits = load_splits(settings(name, tmp_path, size=32, views=3))
    train = splits.train
    n = len(train.indices)
    assert len(train) == 4 * n and np.array_equal(train.labels, np.tile(train.labels[:n], 4))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in DATASET_STATS[name])
    moved = 0
    for i in range(6):
        plain = train[i][0]
        for view in (1, 2, 3):
            x, y = train[view * n + i]
            assert y == train[i][1]
            assert any(torch.equal(x, c) for c in crops_of(plain, -mean / std, flips=name != "svhn"))
            moved += not torch.equal(x, plain)
    assert moved >= 15                                               # views differ from the plain image


def test_limit_keeps_a_prefix_of_every_split(cifar10_dir):
    root, _, _ = cifar10_dir
    full = load_splits(settings("cifar10", root, views=1))
    short = load_splits(settings("cifar10", root, views=1, limit=5))
    assert [len(short.train), len(short.val), len(short.test)] == [10, 5, 5]   # 5 images, 2 views in train
    n = len(full.train.indices)
    for split in ("val", "test"):
        for r in range(5):
            assert torch.equal(getattr(short, split)[r][0], getattr(full, split)[r][0])
    for view in (0, 1):
        for i in range(5):
            assert torch.equal(short.train[view * 5 + i][0], full.train[view * n + i][0])
    assert short.describe()["images"] == {"train": 5, "val": 5, "test": 5}


def test_describe_is_json_and_complete(cifar10_dir):
    root, _, _ = cifar10_dir
    d = json.loads(json.dumps(load_splits(settings("cifar10", root, views=1, split_seed=2)).describe()))
    assert d["sizes"] == {"train": 180, "val": 10, "test": 30} and d["images"]["train"] == 90
    assert d["split_seed"] == 2 and len(d["split_hash"]) == 64 and d["views"] == 1
    assert d["transform"]["img_size"] == 32 and d["transform"]["augment"].endswith("flip")


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("cifar100-lt", "cifar-100-python"),
    ("svhn", "train_32x32.mat"), ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("imagefolder", "train/<class>"),
])
def test_missing_files_say_what_was_expected_where(tmp_path, name, expected):
    with pytest.raises(DatasetNotFound, match=expected) as err:
        load_splits(settings(name, tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        DataSettings("mnist", None, 32, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std > 0"):
        DataSettings("cifar10", None, 32, (0.5,), (0.0,))
    with pytest.raises(ValueError, match="interpolation"):
        DataSettings("cifar10", None, 32, (0.5,), (0.5,), interpolation="cubic")
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_splits(DataSettings("imagefolder", None, 32, (0.5,), (0.5,)))
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x0c" + b"\0" * 5))
    with pytest.raises(ValueError, match="truncated"):
        load_splits(settings("fashion-mnist", tmp_path))
    folder = tmp_path / "c10"
    write_cifar10(folder)
    with open(folder / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": Path("x")}, f)                   # a non-numpy object in the pickle
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_splits(settings("cifar10", folder))


def test_imagefolder_val_classes_must_exist_in_train(tmp_path):
    write_imagefolder(tmp_path, per_class=2, val_per_class=1)
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        load_splits(settings("imagefolder", tmp_path))


# ---------------------------------------------------------------- the real Fashion-MNIST
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    splits = load_splits(DataSettings("fashion-mnist", None, 64, *DATASET_STATS["fashion-mnist"], views=1))
    d = splits.describe()
    assert d["images"] == {"train": 55_000, "val": 5_000, "test": 10_000} and d["sizes"]["train"] == 110_000
    assert (np.bincount(splits.test.labels) == 1_000).all()
    assert sum(d["train_class_counts"]) == 55_000 and splits.class_names[-1] == "Ankle boot"
    batch = torch.stack([splits.test[r][0] for r in range(256)])
    assert batch.shape == (256, 3, 64, 64) and torch.isfinite(batch).all()
    assert abs(batch.mean().item()) < 0.2 and abs(batch.std().item() - 1) < 0.2      # the dataset's own stats
