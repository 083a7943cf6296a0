"""Dataset adapters for stage one: the paper's datasets read from local files, split, transformed, augmented.

    splits = load_splits(DataSettings("cifar100", "data", img_size=224, mean=MEAN, std=STD, views=2))
    image, label = splits.train[0]          # float32 (3, 224, 224) normalised, int
    splits.describe()                       # JSON-able record for the cache manifest

Datasets and the files expected under --data-dir (the datasets' own formats):
  cifar10        cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   (python pickles)
  cifar100       cifar-100-python/{train, test, meta}
  cifar100-lt    the CIFAR-100 files, training classes made long-tailed (below)
  svhn           train_32x32.mat, test_32x32.mat  (cropped digits; the `extra` set is not used)
  fashion-mnist  {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; default /usr/share/datasets/fashion-mnist
                 (Debian: `apt-get install dataset-fashion-mnist`)
  imagefolder    train/<class>/<image> and optionally val/<class>/<image> (ImageNet layout)
The CIFAR/SVHN folders may also be the --data-dir itself. With `download=True` a missing CIFAR, SVHN or
Fashion-MNIST is fetched by torchvision into --data-dir first; nothing is ever downloaded otherwise.

Splits (the paper's appendix 9.1.1; "official" = the dataset's own train/test files):
  cifar10        train 45,000 / val 5,000 / test 10,000    val = 1/10 of official train, test = official test
  cifar100       train 40,000 / val 10,000 / test 10,000   val = 1/5 of official train
  cifar100-lt    train 8,668 / val 10,000 / test 10,000    val = 100 images of every class (1/5, stratified) of
                 official train, so val and test stay balanced as in the long-tail literature (Cao et al. 2019,
                 LDAM); the remaining 400 per class form the training pool, from which class c keeps
                 floor(400 * 100^(-c/99)) images: an exponential profile from 400 (class 0) to 4 (class 99),
                 imbalance factor 100 exactly. Which images a class keeps is seeded.
  svhn           train 68,293 / val 4,964 / test 26,032    of 99,289 = train+test: test = official test (26.2%),
                 val = round(5% of 99,289) from official train, train = the rest (68.8%; the paper's 68.6% +
                 5% + 26.2% does not reach 100%)
  fashion-mnist  train 55,000 / val 5,000 / test 10,000    val = 1/12 of official train
  imagefolder    with val/: test = val/, val = 1/10 of train/ capped at 50,000 (the paper's ImageNet choice);
                 without val/: test = 1/6 and val = 1/12 of train/ (the paper's 75 / 8.3 / 16.6 %)
Every split is in a seeded order (split_seed): the indices sorted by a splitmix64 hash of (seed, index), which
is plain integer arithmetic, so the order does not depend on the numpy or torch version. Stage two halves the
validation split (V1/V2) in this order. `limit` keeps the first `limit` images of every split (the train
split then has limit * (views + 1) rows), so every limited split, and every view block of train, is a prefix of
the full one. The split_seed also seeds the augmented views.

Transform of every image: resize to img_size x img_size with PIL and `interpolation` (imagefolder photos:
shorter side to floor(img_size / crop_pct), then a centre crop, as timm evaluates), to float in [0, 1],
grayscale copied to 3 channels, normalised with mean/std. This is the same uint8 PIL pipeline that
torchvision's Resize + ToTensor + Normalize gives. With views=N the train split has n * (N + 1) rows: row r is
image r % n, view r // n; view 0 is the plain image, views >= 1 are padded by img_size // 8 pixels (zeros) on
every side, randomly cropped back to img_size and flipped horizontally with probability 1/2, after the resize
(the T2T-ViT / JEI-DNN training transform). Crop offsets and flip come from a hash of (split_seed, image index,
view), so any row gives the same tensor in any order, process or run. SVHN views are not flipped: a mirrored
digit is not a digit. Fashion-MNIST views are (clothes are left-right symmetric).
"""
import gzip
import hashlib
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DATASETS = ("cifar10", "cifar100", "cifar100-lt", "svhn", "fashion-mnist", "imagefolder")
DEFAULT_DATA_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DEFAULT_DATA_DIR = "data"      # every other dataset (imagefolder has no default)
# Per-dataset channel statistics (mean, std) for "--normalize dataset"; the CIFAR ones are those the
# authors' transfer learning used, ImageNet's for class-folder trees.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.24703, 0.24348, 0.26158)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar100-lt": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "fashion-mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
LT_IMBALANCE = 100            # |most common class| / |least common class| of cifar100-lt's training split
IMAGENET_VAL_CAP = 50_000     # the paper reserved 50,000 ImageNet training images for validation
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
NO_FLIP = {"svhn"}
SPLIT_RULES = {
    "cifar10": "val = 1/10 of official train, test = official test",
    "cifar100": "val = 1/5 of official train, test = official test",
    "cifar100-lt": f"val = 1/5 of every class of official train; train = the rest, class c keeping "
                   f"floor(n_max * {LT_IMBALANCE}^(-c/(K-1))); test = official test",
    "svhn": "val = round(5% of train+test) from official train, test = official test",
    "fashion-mnist": "val = 1/12 of official train, test = official test",
    "imagefolder": f"test = val/ and val = min({IMAGENET_VAL_CAP}, 1/10 of train/); without val/: "
                   f"test = 1/6 and val = 1/12 of train/",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


class DatasetNotFound(FileNotFoundError, ValueError):
    """Missing or unreadable dataset files (a ValueError too, so the CLI reports it as bad input)."""


@dataclass(frozen=True)
class DataSettings:
    name: str                       # one of DATASETS
    data_dir: str | None            # None: DEFAULT_DATA_DIRS[name], else "data"
    img_size: int                   # the backbone's input size (square)
    mean: tuple                     # per channel (3 values, or 1 for all channels)
    std: tuple
    interpolation: str = "bicubic"  # PIL resampling filter
    views: int = 0                  # extra random-crop+flip views of every training image
    split_seed: int = 0
    limit: int | None = None        # keep the first `limit` images of every split (quick runs)
    download: bool = False          # let torchvision fetch a missing dataset into data_dir
    crop_pct: float = 1.0           # imagefolder only: centre crop of the resized photo (timm's crop_pct)

    @classmethod
    def for_backbone(cls, name: str, data_config: dict, normalize: str, **kw) -> "DataSettings":
        """The settings a backbone's data_config implies for dataset `name`: its input size and interpolation, its
        mean/std (normalize="backbone") or the dataset's own (DATASET_STATS), and, for imagefolder photos only, its
        centre crop. kw: the other fields."""
        mean, std = (data_config["mean"], data_config["std"]) if normalize == "backbone" else DATASET_STATS[name]
        return cls(name=name, img_size=data_config["input_size"][-1], mean=mean, std=std,
                   interpolation=data_config.get("interpolation") or "bicubic",
                   crop_pct=(data_config.get("crop_pct") or 1.0) if name == "imagefolder" else 1.0, **kw)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.img_size < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean) or min(self.std) <= 0:
            raise ValueError(f"mean/std need 1 or 3 values each and std > 0, got {self.mean} / {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; "
                             f"choose one of {', '.join(INTERPOLATIONS)}")
        if self.views < 0 or self.split_seed < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"views and split_seed must be >= 0 and limit >= 1, got views={self.views}, "
                             f"split_seed={self.split_seed}, limit={self.limit}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        if self.name == "imagefolder":
            raise ValueError("imagefolder: pass --data-dir, the folder that holds train/<class>/...")
        return Path(DEFAULT_DATA_DIRS.get(self.name, DEFAULT_DATA_DIR))


def _missing(message: str):
    raise DatasetNotFound(message)


# ---------------------------------------------------------------- seeded order (version-independent)
_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _keys(*parts) -> np.ndarray:
    """A keyed hash of integer parts (scalars or equal-shape arrays), at least 1-d uint64."""
    arrays = [np.atleast_1d(np.asarray(p).astype(_U64)) for p in parts]
    h = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), dtype=_U64)
    for a in arrays:
        h = _splitmix64(h ^ a)
    return h


_ORDER, _VIEW = 1, 2     # hash domains, so the split order and the crop offsets are unrelated


def seeded_order(indices: np.ndarray, seed: int, domain: int) -> np.ndarray:
    """`indices` sorted by hash(seed, domain, index): a permutation fixed by the seed."""
    indices = np.asarray(indices, dtype=np.int64)
    return indices[np.argsort(_keys(seed, _ORDER, domain, indices), kind="stable")]


# ---------------------------------------------------------------- splits (index math only)
def lt_class_counts(pool_counts, factor: int = LT_IMBALANCE) -> list[int]:
    """Exponential long-tail profile over classes 0..K-1: floor(n_max * factor^(-c/(K-1))), n_max = the smallest
    class of the pool (so every class can supply its count). The epsilon keeps 400 * 0.01 from flooring to 3."""
    n_max, k = min(pool_counts), len(pool_counts)
    return [int(n_max * factor ** (-c / (k - 1)) + 1e-6) for c in range(k)]


def split_indices(name: str, train_labels: np.ndarray, n_test: int,
                  seed: int) -> dict[str, tuple[str, np.ndarray]]:
    """The three splits as (source, indices): source "train" indexes the official training images (for
    imagefolder: train/), "test" the official test images (imagefolder: val/, n_test = 0 when absent)."""
    train_labels = np.asarray(train_labels)
    n = len(train_labels)
    order = seeded_order(np.arange(n), seed, domain=0)
    test = ("test", seeded_order(np.arange(n_test), seed, domain=1))
    if name == "cifar100-lt":
        num_classes = int(train_labels.max()) + 1
        per_class = [order[train_labels[order] == c] for c in range(num_classes)]   # each in seeded order
        n_val = [round(len(idx) / 5) for idx in per_class]
        keep = lt_class_counts([len(idx) - v for idx, v in zip(per_class, n_val)])
        val = np.concatenate([idx[:v] for idx, v in zip(per_class, n_val)])
        train = np.concatenate([idx[v:v + k] for idx, v, k in zip(per_class, n_val, keep)])
        return {"train": ("train", seeded_order(train, seed, 0)), "val": ("train", seeded_order(val, seed, 0)),
                "test": test}
    if name == "imagefolder" and n_test == 0:
        n_carved, n_val = round(n / 6), round(n / 12)
        return {"train": ("train", order[n_carved + n_val:]), "val": ("train", order[n_carved:n_carved + n_val]),
                "test": ("train", order[:n_carved])}
    n_val = {"cifar10": round(n / 10), "cifar100": round(n / 5), "fashion-mnist": round(n / 12),
             "svhn": round(0.05 * (n + n_test)), "imagefolder": min(IMAGENET_VAL_CAP, round(n / 10))}[name]
    return {"train": ("train", order[n_val:]), "val": ("train", order[:n_val]), "test": test}


# ---------------------------------------------------------------- readers (the datasets' own formats)
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles: allow what rebuilds numpy arrays (and bytes, `_codecs.encode`, which
    Python 3 writes into protocol-2 pickles) and nothing else."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def _find_folder(root: Path, folder: str, needed: list[str]) -> Path | None:
    for candidate in (root / folder, root):
        if all((candidate / f).is_file() for f in needed):
            return candidate
    return None


def _read_cifar(root: Path, name: str, download: bool):
    folder, train_files, test_file, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                    "labels", "label_names"),
        "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
    }[name]
    needed = train_files + [test_file, meta]
    where = _find_folder(root, folder, needed)
    if where is None and download:
        from ._torchvision import torchvision as tv
        (tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100)(str(root), download=True)
        where = _find_folder(root, folder, needed)
    if where is None:
        _missing(f"{name}: expected {root / folder}/{{{', '.join(needed)}}} (CIFAR python version); "
                 f"pass --data-dir or --download")

    def read(files):
        batches = [_unpickle(where / f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y

    return read(train_files), read([test_file]), list(_unpickle(where / meta)[names_key])


def _read_svhn(root: Path, download: bool):
    needed = ["train_32x32.mat", "test_32x32.mat"]
    where = _find_folder(root, "svhn", needed)
    if where is None and download:
        from ._torchvision import torchvision as tv
        for split in ("train", "test"):
            tv.datasets.SVHN(str(root), split=split, download=True)
        where = _find_folder(root, "svhn", needed)
    if where is None:
        _missing(f"svhn: expected {root}/{{{', '.join(needed)}}} (cropped digits, format 2); "
                 f"pass --data-dir or --download")
    import scipy.io   # only SVHN needs scipy

    def read(file):
        mat = scipy.io.loadmat(where / file)
        x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10    # the files label the digit 0 as 10
        return x, y

    return read(needed[0]), read(needed[1]), [str(d) for d in range(10)]


def _read_idx(path: Path, dims: int) -> np.ndarray:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        _missing(f"{path}: not an idx file of unsigned bytes with {dims} dimensions")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    if len(data) != 4 + 4 * dims + math.prod(shape):
        _missing(f"{path}: truncated (header says {shape})")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _read_fashion(root: Path, download: bool):
    stems = [f"{prefix}-{kind}-ubyte" for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]

    def locate():
        found = []
        for stem in stems:
            hits = [d / f for d in (root, root / "FashionMNIST" / "raw") for f in (stem + ".gz", stem)
                    if (d / f).is_file()]
            found.append(hits[0] if hits else None)
        return found

    paths = locate()
    if None in paths and download:
        from ._torchvision import torchvision as tv
        tv.datasets.FashionMNIST(str(root), download=True)
        paths = locate()
    if None in paths:
        _missing(f"fashion-mnist: expected {root}/{{{', '.join(s + '.gz' for s in stems)}}}; "
                 f"`apt-get install dataset-fashion-mnist` puts them in {DEFAULT_DATA_DIRS['fashion-mnist']}")
    x_tr, y_tr, x_te, y_te = (_read_idx(p, 3 if "images" in p.name else 1) for p in paths)
    return (x_tr, y_tr.astype(np.int64)), (x_te, y_te.astype(np.int64)), list(FASHION_CLASSES)


def _scan_tree(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) \
            if (folder / cls).is_dir() else []
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _read_imagefolder(root: Path):
    train_dir, test_dir = root / "train", root / "val"
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else []
    paths, labels = _scan_tree(train_dir, classes)
    if not paths:
        _missing(f"imagefolder: expected images in {train_dir}/<class>/ ({', '.join(IMAGE_EXTENSIONS)}), "
                 f"optionally {test_dir}/<class>/")
    if len(classes) < 2:
        raise ValueError(f"imagefolder: {train_dir} holds {len(classes)} class folder ({', '.join(classes)}); "
                         "a classifier needs at least 2")
    test = ([], np.zeros(0, dtype=np.int64))
    if test_dir.is_dir():
        extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
        if extra:
            raise ValueError(f"imagefolder: {test_dir} has classes that {train_dir} lacks: {', '.join(extra[:5])}")
        test = _scan_tree(test_dir, classes)
    return (paths, labels), test, classes


def _read(settings: DataSettings):
    root = settings.resolved_data_dir()
    if settings.name == "imagefolder":
        if settings.download:
            raise ValueError("imagefolder: there is nothing to download; point --data-dir at a class-folder tree")
        return _read_imagefolder(root)
    if settings.name.startswith("cifar"):
        return _read_cifar(root, settings.name.removesuffix("-lt"), settings.download)
    if settings.name == "svhn":
        return _read_svhn(root, settings.download)
    return _read_fashion(root, settings.download)


# ---------------------------------------------------------------- one split as a torch Dataset
class ImageSplit(torch.utils.data.Dataset):
    """Rows of one split: (float32 (3, S, S) normalised image, int label). `labels` holds every row's label and
    `indices` the source index of every image, so the cache can be filled without decoding anything."""

    def __init__(self, name: str, source_name: str, source, indices: np.ndarray, source_labels: np.ndarray,
                 settings: DataSettings, views: int):
        self.name, self.source_name, self.source = name, source_name, source
        self.settings, self.views = settings, views
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_labels = np.asarray(source_labels, dtype=np.int64)[self.indices]
        self.labels = np.tile(self.image_labels, views + 1)
        self.flip = settings.name not in NO_FLIP
        self.from_files = settings.name == "imagefolder"
        # (channel, uint8 value) -> (value / 255 - mean) / std, the same float32 arithmetic as ToTensor +
        # Normalize, looked up instead of computed per pixel (faster, bitwise identical)
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float32), (3,)) for v in (settings.mean, settings.std))
        self.normalised = np.ascontiguousarray(((levels[:, None] - mean) / std).T)

    def __len__(self) -> int:
        return len(self.indices) * (self.views + 1)

    def __getitem__(self, row: int):
        if not 0 <= row < len(self):
            raise IndexError(f"{self.name} has {len(self)} rows, asked for row {row}")
        n = len(self.indices)
        image, view = int(self.indices[row % n]), row // n
        pixels = self._resized(image)
        if view > 0:
            pixels = self._augment(pixels, image, view)
        # numpy, not torch: torch's intra-op threads stall on per-image work when the main process loads
        # (num_workers=0) on a busy machine. A grayscale image feeds its one channel to all three.
        x = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self.normalised[c], pixels[:, :, c if pixels.shape[2] == 3 else 0], out=x[c])
        return torch.from_numpy(x), int(self.labels[row])

    def _resized(self, i: int) -> np.ndarray:
        """uint8 (S, S, C) image at the backbone's input size."""
        size, resample = self.settings.img_size, INTERPOLATIONS[self.settings.interpolation]
        if self.from_files:
            try:
                with Image.open(self.source[i]) as f:
                    img = f.convert("RGB")
            except (OSError, SyntaxError) as err:   # what PIL raises for truncated or foreign files
                raise ValueError(f"{self.source[i]}: unreadable image ({err}); replace or remove it and rerun "
                                 "(the cache resumes where it stopped)") from None
            # timm's eval transform: Resize(floor(S / crop_pct)) of the shorter side, CenterCrop(S), with
            # torchvision's rounding, so features match what the pretrained backbone was evaluated on
            short, long = sorted(img.size)
            new_short = math.floor(size / self.settings.crop_pct)
            new_long = int(new_short * long / short)
            img = img.resize((new_short, new_long) if img.width == short else (new_long, new_short), resample)
            left, top = int(round((img.width - size) / 2)), int(round((img.height - size) / 2))
            img = img.crop((left, top, left + size, top + size))
        else:
            img = Image.fromarray(self.source[i])
            if img.size != (size, size):
                img = img.resize((size, size), resample)
        pixels = np.array(img)   # a writable copy: torch.from_numpy warns on read-only arrays
        return pixels if pixels.ndim == 3 else pixels[:, :, None]

    def _augment(self, pixels: np.ndarray, image: int, view: int) -> np.ndarray:
        """Zero-pad by S // 8, crop S x S at hashed offsets, flip on a hashed bit (fixed by seed, image, view)."""
        size = pixels.shape[0]
        pad = size // 8
        h = int(_keys(self.settings.split_seed, _VIEW, image, view)[0])
        dy, dx, flip = h % (2 * pad + 1), (h >> 20) % (2 * pad + 1), self.flip and (h >> 40) & 1
        padded = np.zeros((size + 2 * pad, size + 2 * pad, pixels.shape[2]), dtype=np.uint8)
        padded[pad:pad + size, pad:pad + size] = pixels
        crop = padded[dy:dy + size, dx:dx + size]
        return crop[:, ::-1] if flip else crop


# ---------------------------------------------------------------- the three splits
@dataclass
class Splits:
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int
    class_names: list[str]
    settings: DataSettings

    def describe(self) -> dict:
        """JSON-able record of what the rows are: the cache manifest's `dataset`."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            digest.update(f"{split.name}:{split.source_name}:".encode())
            digest.update(split.indices.astype("<i8").tobytes())
            digest.update(split.image_labels.astype("<i8").tobytes())
        s = self.settings
        augment = f"pad {s.img_size // 8} + random crop {s.img_size}"
        augment += "" if s.name in NO_FLIP else " + horizontal flip"
        return {
            "name": s.name,
            "num_classes": self.num_classes,
            "sizes": {sp.name: len(sp) for sp in (self.train, self.val, self.test)},
            "images": {sp.name: len(sp.indices) for sp in (self.train, self.val, self.test)},
            "split_seed": s.split_seed,
            "split_hash": digest.hexdigest(),
            "split_rule": SPLIT_RULES[s.name],
            "limit": s.limit,
            "views": s.views,
            "train_class_counts": np.bincount(self.train.image_labels, minlength=self.num_classes).tolist(),
            "transform": {"img_size": s.img_size, "interpolation": s.interpolation,
                          "crop_pct": s.crop_pct if s.name == "imagefolder" else None,
                          "mean": list(s.mean), "std": list(s.std),
                          "augment": augment if s.views else None},
        }


def load_splits(settings: DataSettings) -> Splits:
    """Read the dataset's files, split them as in the paper (module docstring) and wrap each split."""
    (train_src, train_labels), (test_src, test_labels), class_names = _read(settings)
    parts = split_indices(settings.name, train_labels, len(test_labels), settings.split_seed)
    sources = {"train": (train_src, train_labels), "test": (test_src, test_labels)}
    splits = {}
    for name, (source_name, indices) in parts.items():
        images, labels = sources[source_name]
        splits[name] = ImageSplit(name, source_name, images, indices[:settings.limit], labels, settings,
                                  views=settings.views if name == "train" else 0)
    return Splits(**splits, num_classes=len(class_names), class_names=class_names, settings=settings)

