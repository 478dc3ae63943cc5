"""Accuracy of a merge on disjoint tasks: per task (over its own classes) and joint (over all classes).

Models trained on different tasks speak different label spaces. Everything here first maps a
model's output to *global scores* (``batch × num_classes``, ``-inf`` for classes the model cannot
score), then:

* **joint accuracy**: argmax over all classes, on the test images of every task;
* **task-t accuracy**: argmax over task t's classes only, on task t's test images.

Two scoring rules (``Scoring``):

* ``"logits"``: the raw logits; several heads (the ensemble, a partial zip, concatenated linear heads)
  are compared by their own-class logits side by side;
* ``"per_head_softmax"``: ZipIt!'s rule (``evaluate_cliphead_alltasks``): an embedding head scores
  ``100 × cos(z, class embedding)``; several heads are each softmaxed over their own classes and the
  prediction is the most probable class over all heads, ranked by an exact float64 log-softmax
  (:func:`per_head_log_softmax`), never by a float32 softmax that saturates at 1.0 and ties.

The references the papers report: each source alone, and the *ensemble* (each source's own head over
its own classes; the width-N concatenation without fusion, :class:`SideBySide`, scores identically). A
reference can also be scored after the merge's own treatment (``_reset``: copies of the sources with
the same BatchNorm reset, :func:`lightning_merge.pipeline.merge.treat_references`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------- scoring rules
#: ZipIt!'s temperature of the cosine scores (CLIP's logit scale): ``100 × cos(z, class embedding)``.
COSINE_SCALE = 100.0

Scoring = Literal["logits", "per_head_softmax"]
SCORINGS: tuple[str, ...] = ("logits", "per_head_softmax")
#: Tag in the metric names of each rule (``<model>/<tag>joint_acc``): a logged number names its rule.
SCORING_TAGS: dict[str, str] = {"logits": "", "per_head_softmax": "phs_"}


def check_scoring(scoring: object) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {scoring!r}")


def per_head_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    """log-softmax of each row over its finite entries (``-inf`` entries stay ``-inf``), in float64.

    Written ``log p_j = (x_j - x_top) - log1p(Σ_{k≠top} exp(x_k - x_top))``: the top entry's
    log-probability keeps its tiny distance from 0 (``-exp(-margin)``) where ``torch.log_softmax``
    (``log(1 + tiny)``) and a float32 softmax round it to exactly 0 / 1.0. Two heads therefore tie only
    when both put more than ~700 nats between their top class and every other one (a cosine × 100
    score spans at most 200).
    """
    x = scores.to(torch.float64)
    top = x.argmax(-1, keepdim=True)
    shifted = x - x.gather(-1, top)
    rest = torch.logsumexp(shifted.scatter(-1, top, float("-inf")), -1, keepdim=True)
    return shifted - torch.log1p(torch.exp(rest))


def cosine_forward(model: nn.Module, inputs: torch.Tensor, scale: float = COSINE_SCALE) -> Any:
    """``model(inputs)`` with every class-embedding head's logits replaced by ZipIt!'s cosine scores.

    ``scale × cos(z, e_c)``: the head's embedding ``z`` (the input of its ``ClassEmbedding``) and every
    class embedding ``e_c`` L2-normalised. The plain logits ``z·e_c`` cannot give this: the class
    embeddings are orthonormal rows in a wider space, so ``‖z‖ ≥ ‖logits‖`` with equality only when ``z``
    lies in their span, and ``‖z‖`` is needed. Models without a ``ClassEmbedding`` run unchanged.
    """
    from lightning_merge.models.heads import ClassEmbedding

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        z = F.normalize(args[0], dim=-1)
        return scale * (z @ F.normalize(module.weight, dim=-1).T)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ClassEmbedding)]
    try:
        return model(inputs)
    finally:
        for h in handles:
            h.remove()


def has_class_embedding(model: nn.Module) -> bool:
    from lightning_merge.models.heads import ClassEmbedding

    return any(isinstance(m, ClassEmbedding) for m in model.modules())


def check_per_head_softmax(models: Sequence[nn.Module], heads: Sequence[SourceHead]) -> None:
    """The cosine rule needs each embedding head's normalised embedding: a ``ClassEmbedding`` module."""
    for i, (model, head) in enumerate(zip(models, heads, strict=True)):
        if head.kind == "embedding" and not has_class_embedding(model):
            raise ValueError(
                f"scoring='per_head_softmax' needs the embedding of source {i}'s embedding head (its "
                f"ClassEmbedding module's input); source {i} has none: use scoring='logits'"
            )


def combine(global_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint scores of several heads: the best score any of them gives each class."""
    if not global_logits:
        raise ValueError("combine needs at least one logits tensor")
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in global_logits])
    return torch.stack([g.to(dtype) for g in global_logits]).amax(0)


def ensemble_scores(
    outputs: Sequence[torch.Tensor], heads: Sequence[SourceHead], scoring: Scoring = "logits"
) -> torch.Tensor:
    """Global scores of N per-source heads (the ensemble, a partial zip's tuple, concatenated heads).

    ``"logits"``: each head's own-class logits, argmax over all (the concatenated heads).
    ``"per_head_softmax"`` (ZipIt!'s ``evaluate_cliphead_alltasks`` for multi-head models): each head's
    scores (cosine × 100 for embedding heads: run the model through :func:`cosine_forward`) softmaxed
    over its own classes; the prediction is the most probable class over all heads.
    """
    if len(outputs) != len(heads):
        raise ValueError(f"got {len(outputs)} outputs for {len(heads)} source heads")
    own = [h.to_global(o, own_only=True) for o, h in zip(outputs, heads, strict=True)]
    if scoring == "per_head_softmax":
        own = [per_head_log_softmax(g) for g in own]
    return combine(own)


def ensemble_logits(outputs: Sequence[torch.Tensor], heads: Sequence[SourceHead]) -> torch.Tensor:
    """The concatenated own-class heads of N outputs (the raw-logit rule of :func:`ensemble_scores`)."""
    return ensemble_scores(outputs, heads, "logits")


def head_outputs(
    output: torch.Tensor | Sequence[torch.Tensor], heads: Sequence[SourceHead]
) -> list[torch.Tensor] | None:
    """A merged model's output split into the sources' heads, or ``None`` for one shared head.

    * a tuple/list of N tensors (partial zip: one head per source) → those tensors;
    * a tensor with ``num_classes`` columns when the sources have embedding heads → ``None``;
    * a tensor with one linear head's columns when every source has that head (one task) → ``None``;
    * a tensor whose columns are the sources' linear heads side by side → the N column blocks.
    """
    if isinstance(output, (tuple, list)):
        return list(output)
    num_classes = heads[0].num_classes
    width = output.shape[-1]
    if all(h.kind == "embedding" for h in heads) and width == num_classes:
        return None
    if all(h == heads[0] for h in heads) and width == heads[0].width:
        return None
    widths = [h.width for h in heads]
    if all(h.kind == "linear" for h in heads) and width == sum(widths):
        return list(output.split(widths, dim=-1))
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


def merged_scores(
    output: torch.Tensor | Sequence[torch.Tensor], heads: Sequence[SourceHead], scoring: Scoring = "logits"
) -> torch.Tensor:
    """Global scores of a merged model: per-source heads by :func:`ensemble_scores`; one shared head by
    its own scores (an embedding head over all classes; ZipIt! applies no softmax to a single head, it
    would not change the argmax)."""
    parts = head_outputs(output, heads)
    return heads[0].to_global(output) if parts is None else ensemble_scores(parts, heads, scoring)


def merged_logits(output: torch.Tensor | Sequence[torch.Tensor], heads: Sequence[SourceHead]) -> torch.Tensor:
    """Global logits of a merged model's output (the raw-logit rule of :func:`merged_scores`)."""
    return merged_scores(output, heads, "logits")


def predict_within(global_logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Global class ids of the argmax restricted to ``classes`` (per-task prediction)."""
    idx = torch.as_tensor(list(classes), device=global_logits.device)
    return idx[global_logits.index_select(-1, idx).argmax(-1)]


class SideBySide(nn.Module):
    """The width-N concatenation without fusion: every source on the same input, one output per source.

    Scored as one model it is the ensemble (:func:`merged_scores` of a tuple is :func:`ensemble_scores`),
    under either rule and for either head kind: with embedding heads each source keeps its own head over
    its own classes, as in the ensemble; with linear heads the concatenated heads are the ensemble's. It
    is the upper reference a merge of cost ≤ N sources is compared with; its cost is N sources'.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) < 1:
            raise ValueError("SideBySide needs at least one model")
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in self.models)


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


#: Model-name suffix of a reference that received the merge's post-merge treatment (BatchNorm reset).
TREATED = "_reset"

#: Which references are also scored after the merge's treatment: none, the ensemble, sources + ensemble.
Treat = Literal["none", "ensemble", "all"]
TREATS: tuple[str, ...] = ("none", "ensemble", "all")


class MergeScores(nn.Module):
    """Accuracies of a merge and of its references on every task, under one scoring rule.

    One :class:`TaskAccuracies` per scored model, keyed ``merged``, ``source<i>``, ``ensemble`` and, for
    references given the merge's treatment (copies of the sources with the same BatchNorm reset),
    ``source<i>_reset``, ``ensemble_reset``. :meth:`compute` returns ``<model>/<tag><metric>`` with the
    rule's tag (:data:`SCORING_TAGS`: none for logits, ``phs_`` for the per-head softmax).
    """

    def __init__(
        self,
        heads: Sequence[SourceHead],
        tasks: Sequence[Sequence[int]],
        *,
        sources: bool = True,
        ensemble: bool = True,
        treated_sources: bool = False,
        treated_ensemble: bool = False,
        scoring: Scoring = "logits",
    ) -> None:
        super().__init__()
        check_scoring(scoring)
        self.heads, self.scoring = list(heads), scoring
        per_source = {f"source{i}": h.covered() for i, h in enumerate(heads)}
        joint = frozenset().union(*[h.covered(own_only=True) for h in heads])
        covered = {"merged": frozenset().union(*[h.covered() for h in heads])}
        for suffix, with_sources, with_ensemble in [
            ("", sources, ensemble),
            (TREATED, treated_sources, treated_ensemble),
        ]:
            covered |= {f"{k}{suffix}": c for k, c in per_source.items()} if with_sources else {}
            covered |= {f"ensemble{suffix}": joint} if with_ensemble else {}
        num_classes = heads[0].num_classes
        self.models = nn.ModuleDict({k: TaskAccuracies(tasks, num_classes, c) for k, c in covered.items()})
        self.wants = {"": (sources, ensemble), TREATED: (treated_sources, treated_ensemble)}

    @staticmethod
    def check_options(treat: object, scoring: object) -> None:
        """Clear errors for the options :meth:`of_options` takes."""
        if treat not in TREATS:
            raise ValueError(f"treated_references must be one of {list(TREATS)}, got {treat!r}")
        check_scoring(scoring)

    @classmethod
    def of_options(
        cls,
        heads: Sequence[SourceHead],
        tasks: Sequence[Sequence[int]],
        sources: bool,
        ensemble: bool,
        *,
        treat: Treat = "ensemble",
        scoring: Scoring = "logits",
    ) -> MergeScores:
        """The scores ``MergeModule``'s options ask for: treated references only among the scored ones."""
        cls.check_options(treat, scoring)
        treated_sources, treated_ensemble = sources and treat == "all", ensemble and treat != "none"
        return cls(
            heads, tasks, sources=sources, ensemble=ensemble, scoring=scoring,
            treated_sources=treated_sources, treated_ensemble=treated_ensemble,
        )  # fmt: skip

    @property
    def needs_sources(self) -> bool:
        """Whether :meth:`update` needs the sources' outputs."""
        return any(self.wants[""])

    @property
    def needs_treated(self) -> bool:
        """Whether :meth:`update` needs the treated sources' outputs."""
        return any(self.wants[TREATED])

    def update(
        self,
        merged: torch.Tensor | Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor] | None,
        labels: torch.Tensor,
        task: int,
        treated: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """One batch of task ``task``: the merge's output and (when needed) every source's and every
        treated source's (cosine scores for embedding heads under ``per_head_softmax``)."""
        self.models["merged"].update(merged_scores(merged, self.heads, self.scoring), labels, task)
        for suffix, outs in [("", outputs), (TREATED, treated)]:
            with_sources, with_ensemble = self.wants[suffix]
            if not (with_sources or with_ensemble):
                continue
            if outs is None:
                which = "treated sources" if suffix else "sources"
                raise ValueError(f"scoring the {which} or their ensemble needs the {which}' outputs")
            if with_sources:
                for i, (out, head) in enumerate(zip(outs, self.heads, strict=True)):
                    self.models[f"source{i}{suffix}"].update(head.to_global(out), labels, task)
            if with_ensemble:
                scores = ensemble_scores(outs, self.heads, self.scoring)
                self.models[f"ensemble{suffix}"].update(scores, labels, task)

    def forward_models(self, model: nn.Module, inputs: torch.Tensor) -> Any:
        """``model(inputs)`` as this rule reads it (cosine scores for class-embedding heads)."""
        return cosine_forward(model, inputs) if self.scoring == "per_head_softmax" else model(inputs)

    def score_batch(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        treated: Sequence[nn.Module],
        batch: Any,
        task: int,
    ) -> None:
        """Run the merge and the references it needs on one ``(images, labels)`` batch and update."""
        images, labels = batch[0], batch[1]
        outputs = [self.forward_models(m, images) for m in sources] if self.needs_sources else None
        treated_out = [self.forward_models(m, images) for m in treated] if self.needs_treated else None
        self.update(self.forward_models(merged, images), outputs, labels, task, treated_out)

    def compute(self) -> dict[str, float]:
        """``{"<model>/<tag>joint_acc": .., "<model>/<tag>task<t>_acc": ..}`` over every rank's samples."""
        tag = SCORING_TAGS[self.scoring]
        return {f"{n}/{tag}{k}": v for n, metric in self.models.items() for k, v in metric.compute().items()}

    def reset(self) -> None:
        for metric in self.models.values():
            metric.reset()


def check_scoring_models(
    scoring: Scoring, merged: nn.Module, sources: Sequence[nn.Module], heads: Sequence[SourceHead]
) -> None:
    """Under ``per_head_softmax`` every embedding head (sources and merge) must expose its embedding."""
    check_scoring(scoring)
    if scoring != "per_head_softmax":
        return
    check_per_head_softmax(sources, heads)
    if all(h.kind == "embedding" for h in heads) and not has_class_embedding(merged):
        raise ValueError(
            "scoring='per_head_softmax' needs the merged model's embedding (a ClassEmbedding module); "
            f"the merged {type(merged).__name__} has none: use scoring='logits'"
        )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loaders: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    tasks: Sequence[Sequence[int]],
    heads: Sequence[SourceHead],
    *,
    as_source: int | None = None,
    scoring: Scoring = "logits",
) -> dict[str, float]:
    """Accuracies of a plain model over task loaders, outside any Trainer (e.g. a reloaded export).

    ``as_source=i`` scores the model as source i (its own head); otherwise as a merged model (a
    :class:`SideBySide` of the sources scores as the ensemble).
    """
    check_scoring(scoring)
    device = model_device(model)
    model.eval()
    covered = (
        heads[as_source].covered()
        if as_source is not None
        else frozenset().union(*[h.covered(own_only=isinstance(model, SideBySide)) for h in heads])
    )
    metrics = TaskAccuracies(tasks, heads[0].num_classes, covered).to(device)
    for task, loader in enumerate(loaders):
        for images, labels in loader:
            x = images.to(device)
            out = cosine_forward(model, x) if scoring == "per_head_softmax" else model(x)
            scores = (
                heads[as_source].to_global(out)
                if as_source is not None
                else merged_scores(out, heads, scoring)
            )
            metrics.update(scores, labels.to(device), task)
    return metrics.compute()
