"""Accuracy of a merge on disjoint tasks: per task (over its own classes) and joint (over all classes).

Models trained on different tasks speak different label spaces. Everything here first maps a
model's output to *global logits* (``batch × num_classes``, ``-inf`` for classes the model cannot
score), then:

* **joint accuracy**: argmax over all classes, on the test images of every task;
* **task-t accuracy**: argmax over task t's classes only, on task t's test images.

The references the papers report use the same rule: each source alone, and the *ensemble* (every
source's own-class logits placed at their global positions, argmax over all, i.e. the concatenated
heads). A partial zip returns one output per source; it is scored like the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_merge.dataflow import model_device

HeadKind = Literal["embedding", "linear"]


@dataclass(frozen=True)
class SourceHead:
    """How source i's output columns map to global classes.

    ``kind="embedding"``: the output scores all ``num_classes`` classes (shared class embeddings);
    ``kind="linear"``: the output has one column per class of ``classes`` (the source's own task).
    """

    kind: HeadKind
    classes: tuple[int, ...]
    num_classes: int

    @property
    def width(self) -> int:
        return self.num_classes if self.kind == "embedding" else len(self.classes)

    def to_global(self, logits: torch.Tensor, own_only: bool = False) -> torch.Tensor:
        """Global logits; ``own_only`` keeps only the source's own classes (embedding heads too)."""
        if logits.shape[-1] != self.width:
            raise ValueError(
                f"a {self.kind} head over classes {list(self.classes)} gives {self.width} logits, "
                f"got {logits.shape[-1]}"
            )
        if self.kind == "embedding" and not own_only:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.num_classes), float("-inf"))
        idx = torch.tensor(self.classes, device=logits.device)
        out[..., idx] = logits.index_select(-1, idx) if self.kind == "embedding" else logits
        return out

    def covered(self, own_only: bool = False) -> frozenset[int]:
        """The global classes this head gives a finite score."""
        if self.kind == "embedding" and not own_only:
            return frozenset(range(self.num_classes))
        return frozenset(self.classes)


def head_of(
    i: int,
    model: nn.Module,
    tasks: Sequence[Sequence[int]],
    num_classes: int,
    example: torch.Tensor,
    *,
    kind: HeadKind | None = None,
    classes: Sequence[int] | None = None,
    name: str | None = None,
) -> SourceHead:
    """Source ``i``'s head: a ``SourceClassifier``'s own record, else its declared ``kind`` / ``classes``
    (default ``classes``: task i's) checked against its output width on ``example``: all
    ``num_classes`` columns (embedding head: a shared head / label space) or one per class (linear)."""
    from lightning_merge.models.classifier import SourceClassifier

    name = name or f"source {i}"
    if isinstance(model, SourceClassifier):
        if kind is not None and kind != model.head_kind:
            raise ValueError(
                f"{name} declares head={kind!r} but its checkpoint records head={model.head_kind!r}"
            )
        if classes is None and model.num_classes != num_classes:
            raise ValueError(
                f"{name} was trained on a {model.num_classes}-class label space but the data have "
                f"{num_classes} classes: declare its global class ids (classes: [...])"
            )
        if classes is None:
            return SourceHead(model.head_kind, tuple(model.classes), model.num_classes)
        kind = model.head_kind  # its own label space, placed at the declared global ids
    if classes is None:
        if i >= len(tasks):
            raise ValueError(f"{name} declares no classes and the data have only {len(tasks)} tasks")
        classes = tasks[i]
    classes = _checked_classes(classes, num_classes, name)
    with torch.no_grad():
        output = model(example[:1])
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{name} returns {type(output).__name__}; a source must return one logits tensor")
    width = output.shape[-1]
    widths = {"embedding": num_classes, "linear": len(classes)}
    if kind is None:
        kind = "embedding" if width == num_classes else "linear" if width == len(classes) else None
    if kind not in widths or width != widths[kind]:
        wanted = f"a {kind} head needs {widths[kind]}" if kind in widths else "neither"
        raise ValueError(
            f"{name} outputs {width} logits: {wanted} (all {num_classes} classes for an embedding / shared "
            f"head, its {len(classes)} classes {list(classes)} for a linear head)"
        )
    return SourceHead(kind, classes, num_classes)


def _checked_classes(classes: Sequence[int], num_classes: int, name: str) -> tuple[int, ...]:
    out = tuple(int(c) for c in classes)
    if not out or len(set(out)) != len(out) or not all(0 <= c < num_classes for c in out):
        raise ValueError(f"{name}: classes must be distinct ids in [0, {num_classes}), got {list(classes)}")
    return out


def combine(global_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint logits of several models: the best score any of them gives each class."""
    if not global_logits:
        raise ValueError("combine needs at least one logits tensor")
    return torch.stack(list(global_logits)).amax(0)


def ensemble_logits(outputs: Sequence[torch.Tensor], heads: Sequence[SourceHead]) -> torch.Tensor:
    """The concatenated own-class heads of N outputs (the ensemble, or a partial zip's tuple)."""
    if len(outputs) != len(heads):
        raise ValueError(f"got {len(outputs)} outputs for {len(heads)} source heads")
    return combine([h.to_global(o, own_only=True) for o, h in zip(outputs, heads, strict=True)])


def merged_logits(output: torch.Tensor | Sequence[torch.Tensor], heads: Sequence[SourceHead]) -> torch.Tensor:
    """Global logits of a merged model's output.

    * a tuple/list of N tensors (partial zip: one head per source) → :func:`ensemble_logits`;
    * a tensor with ``num_classes`` columns when the sources have embedding heads (one shared head);
    * a tensor whose columns are the sources' linear heads side by side (concatenated heads).
    """
    if isinstance(output, (tuple, list)):
        return ensemble_logits(output, heads)
    num_classes = heads[0].num_classes
    width = output.shape[-1]
    if all(h.kind == "embedding" for h in heads) and width == num_classes:
        return output
    widths = [h.width for h in heads]
    if all(h.kind == "linear" for h in heads) and width == sum(widths):
        return ensemble_logits(list(output.split(widths, dim=-1)), heads)
    hint = (
        "; linear heads over different classes cannot be merged into one: keep one head per source "
        "with a partial zip at the head's input (e.g. ZipItMerge(stop_at=1.0))"
        if all(h.kind == "linear" for h in heads) and width in widths
        else ""
    )
    raise ValueError(
        f"merged model output has {width} columns; expected {num_classes} (shared embedding head) "
        f"or {sum(widths)} (the sources' linear heads {widths} concatenated){hint}"
    )


def predict_within(global_logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Global class ids of the argmax restricted to ``classes`` (per-task prediction)."""
    idx = torch.as_tensor(list(classes), device=global_logits.device)
    return idx[global_logits.index_select(-1, idx).argmax(-1)]


class TaskAccuracies(nn.Module):
    """Joint and per-task accuracy of one model (torchmetrics: synced across ranks at ``compute``).

    ``covered`` is the set of classes the model can score; a task it cannot score at all gets no
    metric (a linear-head source on another task's images has no defined prediction).
    """

    def __init__(self, tasks: Sequence[Sequence[int]], num_classes: int, covered: frozenset[int]) -> None:
        super().__init__()
        self.tasks = [list(t) for t in tasks]
        self.num_classes = num_classes
        self.joint = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.per_task = nn.ModuleDict(
            {
                str(t): MulticlassAccuracy(num_classes=num_classes, average="micro")
                for t, classes in enumerate(self.tasks)
                if set(classes) <= covered
            }
        )

    def update(self, global_logits: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """One batch of task ``task``'s test images."""
        self.joint.update(global_logits.argmax(-1), labels)
        if str(task) in self.per_task:
            self.per_task[str(task)].update(predict_within(global_logits, self.tasks[task]), labels)

    def compute(self) -> dict[str, float]:
        """``{"joint_acc": .., "task0_acc": ..}`` over every rank's samples."""
        out = {"joint_acc": float(self.joint.compute())}
        for t, metric in self.per_task.items():
            out[f"task{t}_acc"] = float(metric.compute())
        return out

    def reset(self) -> None:
        self.joint.reset()
        for metric in self.per_task.values():
            metric.reset()


class MergeScores(nn.Module):
    """Accuracies of a merge and of its references (each source, the ensemble), on every task.

    One :class:`TaskAccuracies` per scored model, keyed ``merged``, ``source<i>``, ``ensemble``.
    """

    def __init__(
        self,
        heads: Sequence[SourceHead],
        tasks: Sequence[Sequence[int]],
        *,
        sources: bool = True,
        ensemble: bool = True,
    ) -> None:
        super().__init__()
        self.heads = list(heads)
        covered = {"merged": frozenset().union(*[h.covered() for h in heads])}
        if sources:
            covered |= {f"source{i}": h.covered() for i, h in enumerate(heads)}
        if ensemble:
            covered["ensemble"] = frozenset().union(*[h.covered(own_only=True) for h in heads])
        num_classes = heads[0].num_classes
        self.models = nn.ModuleDict({k: TaskAccuracies(tasks, num_classes, c) for k, c in covered.items()})
        self.sources, self.ensemble = sources, ensemble

    @property
    def needs_sources(self) -> bool:
        """Whether :meth:`update` needs the sources' outputs."""
        return self.sources or self.ensemble

    def update(
        self,
        merged: torch.Tensor | Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor] | None,
        labels: torch.Tensor,
        task: int,
    ) -> None:
        """One batch of task ``task``: the merge's output and (when needed) every source's."""
        self.models["merged"].update(merged_logits(merged, self.heads), labels, task)
        if not self.needs_sources:
            return
        if outputs is None:
            raise ValueError("scoring the sources or the ensemble needs the sources' outputs")
        if self.sources:
            for i, (out, head) in enumerate(zip(outputs, self.heads, strict=True)):
                self.models[f"source{i}"].update(head.to_global(out), labels, task)
        if self.ensemble:
            self.models["ensemble"].update(ensemble_logits(outputs, self.heads), labels, task)

    def compute(self) -> dict[str, float]:
        """``{"<model>/joint_acc": .., "<model>/task<t>_acc": ..}`` over every rank's samples."""
        return {f"{n}/{k}": v for n, metric in self.models.items() for k, v in metric.compute().items()}

    def reset(self) -> None:
        for metric in self.models.values():
            metric.reset()


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loaders: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    tasks: Sequence[Sequence[int]],
    heads: Sequence[SourceHead],
    *,
    as_source: int | None = None,
) -> dict[str, float]:
    """Accuracies of a plain model over task loaders, outside any Trainer (e.g. a reloaded export).

    ``as_source=i`` scores the model as source i (its own head); otherwise as a merged model.
    """
    device = model_device(model)
    model.eval()
    covered = (
        heads[as_source].covered()
        if as_source is not None
        else frozenset().union(*[h.covered() for h in heads])
    )
    metrics = TaskAccuracies(tasks, heads[0].num_classes, covered).to(device)
    for task, loader in enumerate(loaders):
        for images, labels in loader:
            out = model(images.to(device))
            logits = heads[as_source].to_global(out) if as_source is not None else merged_logits(out, heads)
            metrics.update(logits, labels.to(device), task)
    return metrics.compute()
