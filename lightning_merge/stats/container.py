"""The statistics every data-driven method reads, as one plain container.

Produced by the statistics pass (``lightning_merge.stats`` / the ``MergeStatistics`` callback),
saved and loaded by ``lightning_merge.stats.store``. All sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class Statistics:
    """Everything gathered for one set of N source models under one merge graph.

    * ``moments[space]``: feature moments per merge point (ZipIt!, Permute, MuDSC, PLeaS, REPAIR);
    * ``grams[i][module]``: model i's Gram matrix XᵀX of the inputs of Linear/Conv ``module``
      (conv: unfolded patches; a trailing constant-1 column when the layer has a bias), plus
      ``gram_counts[i][module]`` the number of rows summed (RegMean / MaTS);
    * ``fisher[i][param]``: model i's diagonal Fisher, summed squared gradients (divide by
      ``fisher_counts[i]``);
    * ``kfac[i][module]``: model i's K-FAC factors (A = Σ input outer products, G = Σ output-gradient
      outer products), with ``kfac_counts[i]``;
    * ``joint_inputs[module]``: moments of the N models' inputs to Linear/Conv ``module`` side by side,
      z = [x_1; …; x_N] (conv: unfolded patches, every position a row; PLeaS from statistics).
    """

    num_models: int
    graph_digest: str
    moments: dict[str, FeatureMoments] = field(default_factory=dict)
    grams: list[dict[str, torch.Tensor]] = field(default_factory=list)
    gram_counts: list[dict[str, float]] = field(default_factory=list)
    fisher: list[dict[str, torch.Tensor]] = field(default_factory=list)
    fisher_counts: list[float] = field(default_factory=list)
    kfac: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    kfac_counts: list[float] = field(default_factory=list)
    joint_inputs: dict[str, FeatureMoments] = field(default_factory=dict)
