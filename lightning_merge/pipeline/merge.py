"""Stages 4–5 of a merge: run the method, then the post-merge passes (REPAIR, BatchNorm reset); and
the same treatment for the references the merge is compared with (:func:`treat_references`).

Both read the calibration data through :mod:`lightning_merge.dataflow` (whole batches per rank, sums
added once), so every rank computes the same merged weights; :func:`agree_across_ranks` checks that
and falls back to rank 0's weights if a rank drifted.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.partial import PartialZipModel
from lightning_merge.apply.repair import repair_rescale
from lightning_merge.dataflow import Ranks
from lightning_merge.evaluation import MergeScores, Scoring, Treat, check_scoring_models, evaluate_model
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.pipeline.prepare import PreparedSources
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.store import model_fingerprint

log = logging.getLogger(__name__)

Repair = bool | Literal["reset", "rescale"]


def check_repair(repair: Any, method: MergeMethod | None) -> None:
    """``repair`` must be one of the documented values, and ``"rescale"`` needs a matching method."""
    if repair not in (True, False, "reset", "rescale"):
        raise ValueError(f"repair must be True, False, 'reset' or 'rescale', got {repair!r}")
    if repair == "rescale" and method is not None and not method.has_transforms:
        raise ValueError(
            f"repair='rescale' needs a matching method's transforms; method {method.name!r} has none "
            "(use repair='reset')"
        )


@torch.no_grad()
def run_method(
    method: MergeMethod,
    sources: PreparedSources,
    stats: Statistics | None,
    calibration: Iterable[Any],
    ranks: Ranks | None = None,
) -> MergeResult:
    """The method's merge of the sources (on the sources' device)."""
    if method.requires:
        method.check_stats(stats)
    kwargs: dict[str, Any] = {"graph": sources.graph, "stats": stats}
    if sources.base is not None:
        kwargs["base"] = sources.base
    if method.needs_data:
        kwargs["data"] = calibration
    return method.merge(list(sources.models), **kwargs)


def search_score(
    criterion: str,
    task_data: Any,
    prepared: PreparedSources,
    calibration: Iterable[Any],
    repair: Repair,
    *,
    scoring: Scoring = "logits",
    max_batches: int | None = None,
    ranks: Ranks | None = None,
) -> Callable[[nn.Module], float]:
    """A hyperparameter search's score of a candidate merge (MuDSC's λ search), as the paper picks λ:
    the candidate gets the merge's BatchNorm reset on ``calibration`` (any true ``repair``), then its
    accuracy on the tasks' *training* split (``task_data.task_train_dataloader(t)``, ``max_batches``
    batches per task in a fixed seeded order, ``None``: all): ``criterion`` "joint" (over all classes)
    or "task_avg" (the mean per-task accuracy). Every rank scores the same batches, so every rank
    picks the same value."""
    if criterion not in ("joint", "task_avg"):
        raise ValueError(f"search criterion must be 'joint' or 'task_avg', got {criterion!r}")
    if not hasattr(task_data, "task_train_dataloader"):
        raise ValueError(
            f"the search scores on the tasks' training data, but {type(task_data).__name__} has no "
            "task_train_dataloader(task); give the method an explicit score= callable"
        )
    tasks = [list(t) for t in task_data.tasks]
    loaders = [
        list(itertools.islice(_seeded(task_data.task_train_dataloader(t)), max_batches))
        for t in range(len(tasks))
    ]

    @torch.no_grad()
    def score(model: nn.Module) -> float:
        if repair:
            reset_batchnorm(model, calibration, ranks=ranks)
        acc = evaluate_model(model.eval(), loaders, tasks, prepared.heads, scoring=scoring)
        if criterion == "joint":
            return acc["joint_acc"]
        per_task = [acc[f"task{t}_acc"] for t in range(len(tasks)) if f"task{t}_acc" in acc]
        return sum(per_task) / len(per_task)

    return score


def _seeded(loader: Iterable[Any]) -> Iterable[Any]:
    """A DataLoader's data in a fixed shuffled order (seed 0): every call and every rank scores the
    same training images, drawn from every class; other iterables as they are."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    gen = torch.Generator().manual_seed(0)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, generator=gen)


def with_search_score(
    method: MergeMethod,
    task_data: Any,
    prepared: PreparedSources,
    calibration: Iterable[Any],
    repair: Repair,
    scoring: Scoring = "logits",
    ranks: Ranks | None = None,
) -> MergeMethod:
    """``method``, or for a method that searches a hyperparameter (``lam_search``) without its own
    ``score``, a copy whose ``score`` is :func:`search_score` with the method's ``search_criterion``
    and ``search_batches`` (MuDSC's λ search run as its paper does; the caller's method is unchanged)."""
    if not getattr(method, "lam_search", False) or getattr(method, "score", None) is not None:
        return method
    searching = copy.copy(method)
    searching.score = search_score(  # type: ignore[attr-defined]
        method.search_criterion,  # type: ignore[attr-defined]
        task_data,
        prepared,
        calibration,
        repair,
        scoring=scoring,
        max_batches=method.search_batches,  # type: ignore[attr-defined]
        ranks=ranks,
    )
    return searching


@torch.no_grad()
def post_merge(
    result: MergeResult,
    sources: PreparedSources,
    calibration: Iterable[Any],
    repair: Repair,
    ranks: Ranks | None = None,
) -> nn.Module:
    """REPAIR (``repair="rescale"``) and the BatchNorm reset (any true ``repair``) over the calibration
    data; returns the merged model in eval mode without gradients."""
    merged = result.model
    if repair == "rescale":
        if result.transforms is None:
            raise ValueError("repair='rescale' needs the method's transforms; the merge returned none")
        trunk = merged.trunk if isinstance(merged, PartialZipModel) else merged
        repair_rescale(
            trunk, list(sources.models), sources.graph, result.transforms, calibration, ranks=ranks
        )
    if repair:
        reset_batchnorm(merged, calibration, ranks=ranks)
    return merged.eval().requires_grad_(False)


@torch.no_grad()
def treat_references(
    models: Sequence[nn.Module], calibration: Iterable[Any], repair: Repair, ranks: Ranks | None = None
) -> list[nn.Module]:
    """Copies of ``models`` given the treatment :func:`post_merge` gives the merge, for equal comparison.

    Any true ``repair`` resets the merge's BatchNorm statistics on ``calibration``; each copy gets the
    same reset on the same data (REPAIR's rescaling matches a merge to its sources, so a source's
    treatment is the reset alone). ``repair=False``: untouched copies. The sources themselves are never
    modified (the merge reads them). Copies are in eval mode without gradients.
    """
    if not models:
        raise ValueError("treat_references needs at least one model")
    check_repair(repair, None)
    copies = [copy.deepcopy(m) for m in models]
    if repair:
        for copied in copies:
            reset_batchnorm(copied, calibration, ranks=ranks)
    return [c.eval().requires_grad_(False) for c in copies]


@dataclass(frozen=True)
class ReferenceOptions:
    """What a merge is compared with: ``MergeModule``'s ``evaluate_sources``, ``evaluate_ensemble``,
    ``treated_references`` and ``scoring`` (checked here, so a bad value fails at construction)."""

    sources: bool = True
    ensemble: bool = True
    treat: Treat = "ensemble"
    scoring: Scoring = "logits"

    def __post_init__(self) -> None:
        MergeScores.check_options(self.treat, self.scoring)

    def of(
        self,
        sources: PreparedSources,
        merged: nn.Module,
        tasks: Sequence[Sequence[int]],
        calibration: Iterable[Any],
        repair: Repair,
        ranks: Ranks | None = None,
        already_reset: Sequence[nn.Module] | None = None,
    ) -> tuple[MergeScores, list[nn.Module]]:
        """The metrics, and the treated copies of the sources they need (none when ``repair`` is false:
        the merge got no treatment, so the treated references would be the untreated ones).

        ``already_reset``: the sources with their BatchNorm statistics reset on ``calibration`` (what
        a method with ``reset_sources`` read); that is exactly the treatment, so they are used as the
        treated references instead of resetting fresh copies a second time."""
        check_scoring_models(self.scoring, merged, sources.models, sources.heads)
        treat = self.treat if repair else "none"
        scores = MergeScores.of_options(
            sources.heads, tasks, self.sources, self.ensemble, treat=treat, scoring=self.scoring
        )
        if not scores.needs_treated:
            return scores, []
        if already_reset is not None:
            if len(already_reset) != len(sources.models):
                raise ValueError(f"{len(already_reset)} reset sources for {len(sources.models)} sources")
            return scores, list(already_reset)
        return scores, treat_references(sources.models, calibration, repair, ranks)


def agree_across_ranks(merged: nn.Module, strategy: Any) -> bool:
    """Make every rank hold rank 0's merged weights (digests compared; broadcast only if they differ).

    ``strategy`` is a Lightning strategy (``broadcast``, ``reduce_boolean_decision``). Returns True
    when the ranks already agreed.
    """
    if int(strategy.world_size) == 1:
        return True
    mine = model_fingerprint(merged)
    if strategy.reduce_boolean_decision(mine == strategy.broadcast(mine, src=0), all=True):
        return True
    log.warning("merged weights differ across ranks; using rank 0's")
    state = strategy.broadcast({k: v.cpu() for k, v in merged.state_dict().items()}, src=0)
    merged.load_state_dict(state)
    return False
