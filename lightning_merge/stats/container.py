"""The statistics every data-driven method reads: one container keyed by statistic name.

Produced by the statistics pass (``lightning_merge.stats`` / the ``MergeStatistics`` callback),
saved and loaded by ``lightning_merge.stats.store``. What a value looks like, how it is saved and
checked is decided by the collector registered under its name (``lightning_merge.stats.registry``);
the container only holds the values. All sums are float64.

A statistic counts as gathered when its value is truthy: an empty value (no spaces, no models) is
the same as none, so ``"grams" in stats`` is what a method asks before merging.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class FeatureMoments:
    """count, Σf and Σffᵀ of the concatenated features f ∈ R^{N·n} of N models at one space."""

    count: torch.Tensor  # scalar float64
    total: torch.Tensor  # (N*n,) float64
    outer: torch.Tensor  # (N*n, N*n) float64
    num_models: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """E[ffᵀ] − μμᵀ (biased, like ``np.cov(bias=True)``)."""
        mu = self.mean
        return self.outer / self.count - torch.outer(mu, mu)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        """C / (σσᵀ); dead features (σ≈0) get σ=eps-floored so they correlate ~0, never NaN."""
        cov = self.covariance
        std = cov.diagonal().clamp_min(0).sqrt().clamp_min(eps)
        return cov / torch.outer(std, std)


@dataclass
class JointRows:
    """The joint input rows z = [x_1; …; x_N] themselves, (rows, N·d) float64: a wide Linear's or
    conv's (unfolded patches) statistic while its rows are at most its joint width (VGG-16's first
    classifier layer sees 2·25088 joint inputs: a 20 GB Gram, 0.8 GB of rows for 2000 images).
    Same sums as :class:`FeatureMoments` (Σ z zᵀ = ZᵀZ), which it never forms: the refit solves in
    sample space instead."""

    rows: torch.Tensor  # (n, N·d) float64
    num_models: int

    @property
    def count(self) -> torch.Tensor:
        return torch.tensor(float(self.rows.shape[0]), dtype=torch.float64, device=self.rows.device)

    @property
    def total(self) -> torch.Tensor:
        return self.rows.sum(0)


@dataclass
class GramStatistics:
    """``sums[i][layer]``: model i's Σ x xᵀ of the layer's augmented input rows; ``counts``: rows summed."""

    sums: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counts: list[dict[str, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sums)


@dataclass
class FisherStatistics:
    """``sums[i][param]``: model i's summed squared per-sample gradients; ``counts[i]``: its samples."""

    sums: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sums)


@dataclass
class KFACStatistics:
    """``factors[i][layer] = (A, G)``: model i's K-FAC factor sums; ``counts[i]``: its samples."""

    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.factors)


@dataclass
class Statistics:
    """Everything gathered for one set of N source models under one merge graph, by statistic name.

    ``stats["name"]`` is the value the collector registered as ``name`` produced. The built-in ones
    also have typed attributes (readable, assignable and mutable in place):

    * ``moments[space]``: feature moments per merge point (ZipIt!, Permute, MuDSC, PLeaS, REPAIR);
    * ``grams[i][module]``: model i's Gram matrix XᵀX of the inputs of Linear/Conv ``module``
      (conv: unfolded patches; a trailing constant-1 column when the layer has a bias), plus
      ``gram_counts[i][module]`` the number of rows summed (RegMean / MaTS);
    * ``fisher[i][param]``: model i's diagonal Fisher, summed squared gradients (divide by
      ``fisher_counts[i]``);
    * ``kfac[i][module]``: model i's K-FAC factors (A = Σ input outer products, G = Σ output-gradient
      outer products), with ``kfac_counts[i]``.
    """

    num_models: int
    graph_digest: str
    values: dict[str, Any] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.values.get(name))

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise KeyError(f"statistic {name!r} was not gathered; gathered: {self.names()}")
        return self.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a statistic name is a non-empty string without '/', got {name!r}")
        self.values[name] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """The gathered statistics, in the order they were added."""
        return [name for name in self.values if name in self]

    def _value(self, name: str, kind: type) -> Any:
        """The value of a built-in statistic, created empty (not yet gathered) on first access."""
        value = self.values.get(name)
        if value is None:
            value = self.values[name] = kind()
        if not isinstance(value, kind):
            raise TypeError(f"statistic {name!r} holds a {type(value).__name__}, expected {kind.__name__}")
        return value

    @property
    def moments(self) -> dict[str, FeatureMoments]:
        return self._value("moments", dict)

    @moments.setter
    def moments(self, value: dict[str, FeatureMoments]) -> None:
        self.values["moments"] = value

    @property
    def joint_inputs(self) -> dict[str, FeatureMoments | JointRows]:
        """Per layer, moments (or, for a wide layer with few rows, the rows) of the N sources' inputs
        side by side (PLeaS' published refit)."""
        return self._value("joint_inputs", dict)

    @joint_inputs.setter
    def joint_inputs(self, value: dict[str, FeatureMoments | JointRows]) -> None:
        self.values["joint_inputs"] = value

    @property
    def grams(self) -> list[dict[str, torch.Tensor]]:
        return self._value("grams", GramStatistics).sums

    @grams.setter
    def grams(self, value: list[dict[str, torch.Tensor]]) -> None:
        self._value("grams", GramStatistics).sums = value

    @property
    def gram_counts(self) -> list[dict[str, float]]:
        return self._value("grams", GramStatistics).counts

    @gram_counts.setter
    def gram_counts(self, value: list[dict[str, float]]) -> None:
        self._value("grams", GramStatistics).counts = value

    @property
    def fisher(self) -> list[dict[str, torch.Tensor]]:
        return self._value("fisher", FisherStatistics).sums

    @fisher.setter
    def fisher(self, value: list[dict[str, torch.Tensor]]) -> None:
        self._value("fisher", FisherStatistics).sums = value

    @property
    def fisher_counts(self) -> list[float]:
        return self._value("fisher", FisherStatistics).counts

    @fisher_counts.setter
    def fisher_counts(self, value: list[float]) -> None:
        self._value("fisher", FisherStatistics).counts = value

    @property
    def kfac(self) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return self._value("kfac", KFACStatistics).factors

    @kfac.setter
    def kfac(self, value: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self._value("kfac", KFACStatistics).factors = value

    @property
    def kfac_counts(self) -> list[float]:
        return self._value("kfac", KFACStatistics).counts

    @kfac_counts.setter
    def kfac_counts(self, value: list[float]) -> None:
        self._value("kfac", KFACStatistics).counts = value
