"""Train two source models on disjoint Fashion-MNIST tasks and evaluate them alone and jointly.

    .venv/bin/python examples/train_source_pair.py --arch mlp          # seconds on 2 idle CPU cores
    .venv/bin/python examples/train_source_pair.py --arch resnet20 --epochs 1

The joint prediction (argmax over both models' logits on all 10 classes) is what a merged model
should approach with a single network.
"""

from __future__ import annotations

import argparse

import torch

from lightning_merge.data import FASHION_MNIST_CLASSES, TaskSplitDataModule
from lightning_merge.models import SourceClassifier, task_accuracy, train_source


@torch.no_grad()
def joint_accuracy(models: list[SourceClassifier], data: TaskSplitDataModule) -> float:
    """Accuracy over all classes of all tasks when the models predict together."""
    correct = total = 0
    for images, labels in data.task_test_dataloader(None):
        correct += int((SourceClassifier.joint_predict(models, images) == labels).sum())
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="mlp", choices=["mlp", "vgg11_bn", "resnet20"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--head", default="embedding", choices=["embedding", "linear"])
    parser.add_argument("--cache-dir", default="artifacts/examples")
    args = parser.parse_args()

    data = TaskSplitDataModule()
    lr = 0.05 if args.arch == "mlp" else 0.1
    models = [
        train_source(
            args.arch,
            classes,
            seed,
            width=args.width,
            max_epochs=args.epochs,
            head=args.head,
            lr=lr,
            cache_dir=args.cache_dir,
        )
        for seed, classes in enumerate(data.tasks)
    ]
    for task, model in enumerate(models):
        names = ", ".join(FASHION_MNIST_CLASSES[c] for c in model.classes)
        accuracy = task_accuracy(model, data.task_test_dataloader(task))
        print(f"model {task} ({names}): {100 * accuracy:.2f}% on its own task")
    print(f"both models jointly, all 10 classes: {100 * joint_accuracy(models, data):.2f}%")


if __name__ == "__main__":
    main()
