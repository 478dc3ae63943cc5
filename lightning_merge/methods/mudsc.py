"""MuDSC: match on λ·(activation correlation) + (1 − λ)·(weight similarity), by coordinate descent.

The weight similarity reads each weight's other axes through the neighbouring merge points' current
matching, so the matching is repeated until it stops improving (:func:`mudsc_descent`). Groups
(attention heads, GroupNorm groups; ``Space.group_size``) are matched as units.

Defaults are the official homogeneous-task scripts' (zju-vipa/training_free_model_merging): the
zip-based variant runs ZipIt! with α = 0.5, β = 1 to the source width on every merge point (no
partial zip), weight similarity is the Pearson correlation, at most 100 rounds, stopping after 5
without improvement.

λ search (``lam_search=True``): the paper picks λ from 0.1, 0.2, …, 0.9 by the merged model's
accuracy on the tasks' *training* data (the official script merges once per value, resets the
merged BatchNorm statistics on the training set, evaluates on the training split and records the
joint and per-task-average accuracy). Here every value of ``lam_grid`` is merged and handed to
``score`` — a callable that rates a merged model, higher is better (and that does its own
BatchNorm reset when it wants one); the best value (the first on ties) is kept, recorded in the
result's diagnostics (``lam``, ``lam_scores``). ``MergeModule`` (and so the YAML configs) supplies
``score`` when none is given: each candidate gets the merge's BatchNorm reset on the calibration
data (when ``repair`` is on), then its accuracy on the tasks' *training* split
(``task_train_dataloader``, ``search_batches`` batches of each task in a fixed seeded order;
``None``: all) is the score: ``search_criterion="joint"`` (default: accuracy over all classes, the
paper's headline) or ``"task_avg"`` (mean per-task accuracy); see
:func:`lightning_merge.pipeline.merge.search_score`. The paper scores on the whole training set; 20
batches of 128 per task (the default) keep nine merges affordable.
Note that λ here weights the activation side; the official ``fix_rate`` weights the weight side, so
their λ is 1 − ours (the grid is symmetric).

``reset_sources`` (default True, as the official scripts: ``reset_bn_stats`` of every base model on
the training loader before matching): ``MergeModule`` resets the sources' BatchNorm statistics on
the calibration data before gathering the correlations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._checks import check_unit_interval
from lightning_merge.match.mudsc import (
    DescentResult,
    check_descent,
    check_matcher,
    check_measure,
    mudsc_descent,
)
from lightning_merge.match.zip import check_alpha_beta
from lightning_merge.methods.base import MergeResult
from lightning_merge.methods.transform_base import (
    Correlations,
    TransformMethod,
    Transforms,
    check_ratio,
)
from lightning_merge.methods.zipit import check_flag, resolve_widths
from lightning_merge.stats.container import Statistics

PAPER_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SEARCH_CRITERIA = ("joint", "task_avg")
Score = Callable[[nn.Module], float]


class MuDSCMerge(TransformMethod):
    """``lam`` weights activation vs. weight similarity; ``matcher`` is "zipit" (with ``alpha``,
    ``beta``, ``width``/``widths`` as in ZipIt!) or "permute"; ``measure`` the weight similarity;
    ``max_rounds``/``patience``/``seed`` the coordinate descent; ``lam_search`` with ``lam_grid``
    and ``score`` (or, in ``MergeModule``, ``search_criterion`` on ``search_batches`` training
    batches per task) the λ search; ``reset_sources`` the sources' BatchNorm reset (module docstring)."""

    name = "mudsc"

    requires = frozenset({"moments"})

    def __init__(
        self,
        *,
        lam: float = 0.5,
        lam_search: bool = False,
        lam_grid: Sequence[float] = PAPER_LAMBDAS,
        score: Score | None = None,
        matcher: Literal["zipit", "permute"] = "zipit",
        alpha: float = 0.5,
        beta: float = 1.0,
        width: float = 1.0,
        widths: dict[str, int] | None = None,
        measure: Literal["cosine", "correlation"] = "correlation",
        max_rounds: int = 100,
        patience: int = 5,
        seed: int = 0,
        stop_at: str | float | None = None,
        search_criterion: Literal["joint", "task_avg"] = "joint",
        search_batches: int | None = 20,
        reset_sources: bool = True,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_unit_interval(lam, "lam")
        check_matcher(matcher)
        check_measure(measure)
        check_alpha_beta(alpha, beta)
        check_ratio(width, "width")
        check_descent(max_rounds, patience, seed)
        if matcher == "permute" and (width != 1.0 or widths):
            raise ValueError("matcher='permute' merges to the source width: leave width=1 and widths unset")
        if not isinstance(lam_search, bool):
            raise ValueError(f"lam_search must be True or False, got {lam_search!r}")
        if isinstance(lam_grid, (str, bytes)) or not isinstance(lam_grid, Sequence) or not lam_grid:
            raise ValueError(f"lam_grid must be a non-empty sequence of numbers in [0, 1], got {lam_grid!r}")
        for value in lam_grid:
            check_unit_interval(value, "every lam_grid value")
        if score is not None and not callable(score):
            raise ValueError(f"score must be a callable rating a merged model, got {type(score).__name__}")
        self.lam, self.lam_search, self.lam_grid, self.score = float(lam), lam_search, tuple(lam_grid), score
        self.matcher, self.measure = matcher, measure
        self.alpha, self.beta, self.width, self.widths = float(alpha), float(beta), float(width), widths
        self.max_rounds, self.patience, self.seed = max_rounds, patience, seed
        if search_criterion not in SEARCH_CRITERIA:
            raise ValueError(f"search_criterion must be one of {SEARCH_CRITERIA}, got {search_criterion!r}")
        if search_batches is not None and (
            isinstance(search_batches, bool) or not isinstance(search_batches, int) or search_batches < 1
        ):
            raise ValueError(f"search_batches must be a positive integer or None, got {search_batches!r}")
        self.search_criterion, self.search_batches = search_criterion, search_batches
        self.reset_sources = check_flag(reset_sources, "reset_sources")

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        return self.descend(sources, graph, stats, self.lam).transforms

    def descend(
        self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None, lam: float
    ) -> DescentResult:
        """The coordinate descent at ``lam`` from the activation-only matching."""
        widths = (
            resolve_widths(graph, len(sources), self.width, self.widths) if self.matcher == "zipit" else None
        )
        return mudsc_descent(
            [s.state_dict() for s in sources],
            graph,
            Correlations(stats, [s.name for s in graph.spaces]),
            lam=lam,
            matcher=self.matcher,
            widths=widths,
            alpha=self.alpha,
            beta=self.beta,
            measure=self.measure,
            max_rounds=self.max_rounds,
            patience=self.patience,
            seed=self.seed,
        )

    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None,
        stats: Statistics | None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> MergeResult:
        """One merge at ``lam``, or with ``lam_search`` one per ``lam_grid`` value, keeping the best."""
        if not self.lam_search:
            return super().merge(sources, graph=graph, stats=stats, base=base, data=data)
        if self.score is None:
            raise ValueError(
                "lam_search=True needs score: a callable rating a merged model, higher is better "
                "(the paper: accuracy on the tasks' training data); pass score= or set method.score"
            )
        scores: dict[float, float] = {}
        best: tuple[float, MergeResult] | None = None
        for lam in self.lam_grid:
            at_lam = copy.copy(self)
            at_lam.lam, at_lam.lam_search = lam, False
            candidate = at_lam.merge(sources, graph=graph, stats=stats, base=base, data=data)
            value = self.score(copy.deepcopy(candidate.model))  # the kept model owes nothing to score
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"score returned {value!r} for the merge at lam={lam}; it must be a finite number"
                )
            scores[lam] = float(value)
            if best is None or value > scores[best[0]]:
                best = (lam, candidate)
        assert best is not None
        lam, result = best
        return replace(result, diagnostics={**result.diagnostics, "lam": lam, "lam_scores": scores})
