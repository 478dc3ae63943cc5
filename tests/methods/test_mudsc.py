"""MuDSC as published: weight similarity through the neighbours' matching, coordinate descent, λ search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from stats_nets import permuted_twin
from stats_nets import seq_mlp as mlp
from stats_nets import seq_mlp_graph as mlp_graph
from torch import nn
from zipit_reference import zipit_reference

from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.match import match_zipit, weight_similarity
from lightning_merge.match._weights import axes_by_param, mapped_member_rows
from lightning_merge.match.mudsc import fusion_scores, match_scored, mudsc_descent, space_maps
from lightning_merge.match.permute import permutations_to_transform
from lightning_merge.methods import MuDSCMerge
from lightning_merge.stats.collect import collect_statistics


def act_corrs(models: list[nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """Activation correlation of the two hidden layers of MLPs on random inputs."""
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    feats: dict[str, list[torch.Tensor]] = {"h1": [], "h2": []}
    with torch.no_grad():
        for m in models:
            h1 = m[1](m[0](x))
            feats["h1"].append(h1)
            feats["h2"].append(m[3](m[2](h1)))
    out = {}
    for name, parts in feats.items():
        f = torch.cat(parts, 1)
        f = f - f.mean(0)
        cov = f.T @ f / len(f)
        std = cov.diagonal().sqrt().clamp_min(1e-8)  # dead ReLU features correlate 0, never NaN
        out[name] = cov / torch.outer(std, std)
    return out


# ------------------------------------------------------------------ weight similarity
def test_aligned_weight_similarity_equals_the_permutation_alignment_for_one_to_one_matches() -> None:
    base = mlp(0)
    graph = mlp_graph(base)
    twin, perms = permuted_twin(base, graph, seed=5)
    sds = [base.state_dict(), twin.state_dict()]
    to_base = {name: torch.argsort(p) for name, p in perms.items()}
    transforms = {
        name: permutations_to_transform([torch.arange(p.numel()), torch.argsort(p)], 2)
        for name, p in perms.items()
    }
    for name in ("h1", "h2"):
        by_transforms = weight_similarity(sds, graph, name, transforms=transforms)
        by_perms = weight_similarity(sds, graph, name, perms=[{}, to_base])
        assert torch.allclose(by_transforms, by_perms, atol=1e-12)
        n = graph.space(name).size
        true_pairs = by_transforms[torch.arange(n), n + to_base[name]]
        assert torch.allclose(true_pairs, torch.ones(n, dtype=torch.float64))
    # without aligning h2 the consuming slices of h1 disagree
    raw = weight_similarity(sds, graph, "h1")
    assert raw[torch.arange(10), 10 + to_base["h1"]].max() < 1 - 1e-6


def test_other_axes_go_through_n_times_merge_when_consumed_and_unmerge_when_produced() -> None:
    a, b = mlp(0), mlp(1)
    graph = mlp_graph(a)
    sds = [a.state_dict(), b.state_dict()]
    act = act_corrs([a, b])
    t1 = match_zipit(act["h1"], 2, alpha=0.5, beta=1.0, target_width=13)  # some features unmatched
    t2 = match_zipit(act["h2"], 2, alpha=0.5, beta=1.0, target_width=12)
    index = axes_by_param(graph)
    h1, h2 = graph.space("h1"), graph.space("h2")
    for i, sd in enumerate(sds):
        maps = {"h1": space_maps(t1, i), "h2": space_maps(t2, i)}
        w = sd["2.weight"]  # (12, 10): produces h2, consumes h1
        # as a member of h2 (axis 0) its axis 1 consumes h1: W · (N·M_i)ᵀ
        got = mapped_member_rows(sd, index, h2, h2.members[0], maps)
        assert torch.allclose(got, w @ (2 * t1.merge_block(i)).T, atol=1e-12)
        # as a member of h1 (axis 1) its axis 0 produces h2: rows of (U_iᵀ · W)ᵀ
        got = mapped_member_rows(sd, index, h1, h1.members[2], maps)
        assert torch.allclose(got, (t2.unmerge_block(i).T @ w).T, atol=1e-12)
        # the first layer's other axis is the input, which no merge point owns
        assert torch.equal(mapped_member_rows(sd, index, h1, h1.members[0], maps), sd["0.weight"])


def test_weight_similarity_rejects_conflicting_or_foreign_alignments() -> None:
    base = mlp(0)
    graph = mlp_graph(base)
    sds = [base.state_dict(), mlp(1).state_dict()]
    t = permutations_to_transform([torch.arange(12)] * 2, 2)
    with pytest.raises(ValueError, match="not both"):
        weight_similarity(sds, graph, "h1", perms=[{}, {}], transforms={"h2": t})
    with pytest.raises(ValueError, match=r"transforms\['h1'\] is for 2 models of width 12"):
        weight_similarity(sds, graph, "h2", transforms={"h1": t})


# ------------------------------------------------------------------ the matcher's score
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 1.0), (0.0, 0.0), (0.3, 0.125)])
def test_fusion_scores_are_the_scores_the_greedy_saw(alpha: float, beta: float) -> None:
    gen = torch.Generator().manual_seed(3)
    sim = torch.corrcoef(torch.randn(16, 30, generator=gen, dtype=torch.float64))
    sim = (sim + sim.T) / 2
    fusions, _ = zipit_reference(sim, 2, 8, alpha, beta)
    # oracle: similarities between the current clusters, kept as a dict of dicts
    cur = {k: {j: float(sim[k, j]) for j in range(16) if j != k} for k in range(16)}
    expected = []
    for lo, hi in fusions:
        expected.append(cur[lo][hi])
        for x in cur:
            if x not in (lo, hi):
                v = min(cur[lo][x], cur[hi][x]) * (alpha if alpha > 0 else 1.0)
                cur[lo][x] = cur[x][lo] = v
        del cur[hi]
        for x in cur:
            cur[x].pop(hi, None)
    assert fusion_scores(sim, fusions, alpha).tolist() == pytest.approx(expected, abs=1e-12)
    t, score = match_scored(sim, 2, alpha=alpha, beta=beta, target_width=8)
    assert torch.equal(t.merge, match_zipit(sim, 2, alpha=alpha, beta=beta, target_width=8).merge)
    assert score == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_permute_score_is_the_mean_matched_similarity() -> None:
    gen = torch.Generator().manual_seed(4)
    sim = torch.corrcoef(torch.randn(12, 30, generator=gen, dtype=torch.float64))
    t, score = match_scored(sim, 2, matcher="permute")
    partner = t.unmerge_block(1).argmax(0)
    assert score == pytest.approx(float(sim[torch.arange(6), 6 + partner].mean()), abs=1e-12)


# ------------------------------------------------------------------ coordinate descent
@pytest.mark.parametrize("matcher", ["zipit", "permute"])
def test_descent_recovers_a_permuted_mlp_and_stops_after_patience_rounds(matcher: str) -> None:
    base = mlp(0)
    graph = mlp_graph(base)
    twin, perms = permuted_twin(base, graph, seed=2)
    result = mudsc_descent(
        [base.state_dict(), twin.state_dict()], graph, act_corrs([base, twin]), matcher=matcher
    )
    for name, p in perms.items():
        assert torch.equal(result.transforms[name].unmerge_block(1).argmax(1), p)
    # once exact the matching no longer changes: five more rounds without gain end the run
    assert result.objective == max(result.history)
    assert result.rounds == result.history.index(result.objective) + 6
    assert result.history[-5:] == [result.objective] * 5


def test_descent_keeps_the_best_round_and_respects_max_rounds() -> None:
    a, b = mlp(0), mlp(1)
    graph = mlp_graph(a)
    sds, act = [a.state_dict(), b.state_dict()], act_corrs([a, b])
    result = mudsc_descent(sds, graph, act, lam=0.3)
    assert result.objective == max(result.history)
    assert 6 <= result.rounds <= 100
    # the rounds after the best one never beat it, and the run ends after five of them
    best_at = result.history.index(result.objective)
    assert result.rounds == best_at + 6 and all(h <= result.objective for h in result.history[best_at:])
    assert mudsc_descent(sds, graph, act, lam=0.3, max_rounds=1).rounds == 1
    # λ = 1 ignores the weights: the activation matching as ZipIt! makes it
    only_act = mudsc_descent(sds, graph, act, lam=1.0)
    assert torch.equal(only_act.transforms["h2"].merge, match_zipit(act["h2"], 2, alpha=0.5, beta=1.0).merge)


def test_descent_with_groups_keeps_them_whole() -> None:
    a, b = mlp(0), mlp(2)
    graph = mlp_graph(a, group_size=4)
    result = mudsc_descent([a.state_dict(), b.state_dict()], graph, act_corrs([a, b]), widths={"h2": 18})
    t = result.transforms["h2"]
    per_group = t.width // 3
    for i in range(2):
        owner = t.unmerge_block(i).argmax(1)
        for grp in owner.view(3, 4):
            assert len(set((grp // per_group).tolist())) == 1


def test_descent_errors_name_the_culprit() -> None:
    a = mlp(0)
    graph = mlp_graph(a)
    sds, act = [a.state_dict(), mlp(1).state_dict()], act_corrs([a, mlp(1)])
    with pytest.raises(KeyError, match=r"merge points \['h2'\]"):
        mudsc_descent(sds, graph, {"h1": act["h1"]})
    with pytest.raises(ValueError, match=r"act_corr\['h2'\].*expected N·n = 24"):
        mudsc_descent(sds, graph, {"h1": act["h1"], "h2": act["h1"]})
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        mudsc_descent(sds, graph, act, patience=0)
    with pytest.raises(ValueError, match="max_rounds"):
        mudsc_descent(sds, graph, act, max_rounds=1.5)
    with pytest.raises(ValueError, match="measure"):
        mudsc_descent(sds, graph, act, measure="l2")


# ------------------------------------------------------------------ exact recovery of a permuted copy
def _recovers(model: nn.Module, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    model = model.eval()
    graph = trace_graph(model, torch.randn(2, *shape, generator=gen))
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, seed=7))
    batches = [torch.randn(64, *shape, generator=gen) for _ in range(3)]
    stats = collect_statistics([model, twin], graph, batches, progress=False)
    method = MuDSCMerge()
    merged = method.merge([model, twin], graph=graph, stats=stats).model.eval()
    x = torch.randn(16, *shape, generator=gen)
    with torch.no_grad():
        ref = model(x)
        err = float((merged(x) - ref).norm() / ref.norm())
    assert err < 1e-5, f"relative error {err:.2e}"
    assert method.descend([model, twin], graph, stats, method.lam).rounds >= 6


def test_recovers_a_permuted_random_resnet20() -> None:
    from lightning_merge.models.resnet import ResNet20

    torch.manual_seed(0)
    _recovers(ResNet20(width=1), (1, 28, 28))


def test_recovers_a_permuted_random_torchvision_resnet18() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    _recovers(tv.models.resnet18(weights=None), (3, 32, 32))


def test_descent_similarity_from_stored_rows_and_grams_equals_a_fresh_one(random_pair: _Setup) -> None:
    """Members are kept as rows (few columns: BatchNorm vectors, 1×1 convs) or as Grams (many:
    3×3 convs); the mixed store gives the weight similarity computed from scratch, also on reuse."""
    from lightning_merge.match.mudsc import _Descent, gram_similarity

    setup = random_pair
    sds = [m.state_dict() for m in setup.models]
    rng = torch.Generator().manual_seed(3)
    current = {
        s.name: permutations_to_transform([torch.arange(s.size), torch.randperm(s.size, generator=rng)], 2)
        for s in setup.graph.spaces
    }
    descent = _Descent(sds, setup.graph, {}, solve=None)
    for _ in range(2):  # the second pass reads every part from the store
        for space in setup.graph.spaces:
            got = gram_similarity(descent.space_grams(space, current), "correlation")
            want = weight_similarity(sds, setup.graph, space.name, transforms=current)
            assert torch.allclose(got, want, atol=1e-12, rtol=0), space.name
    kinds = {isinstance(part, torch.Tensor) for _, part in descent.parts.values()}
    assert kinds == {True, False}  # both forms were exercised


def test_correlations_are_computed_when_read_and_missing_moments_are_named(
    random_pair: _Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_merge.methods.transform_base as tb
    from lightning_merge.methods.transform_base import Correlations, correlation

    names = [s.name for s in random_pair.graph.spaces]
    lazy = Correlations(random_pair.stats, names)
    computed: list[str] = []
    monkeypatch.setattr(
        tb, "correlation", lambda stats, space: computed.append(space) or correlation(stats, space)
    )
    assert list(lazy) == names and len(lazy) == len(names) and names[0] in lazy and "nowhere" not in lazy
    assert computed == []  # membership and iteration compute nothing
    assert torch.equal(lazy[names[1]], correlation(random_pair.stats, names[1])) and computed == [names[1]]
    monkeypatch.undo()
    for name in names:
        assert torch.equal(lazy[name], correlation(random_pair.stats, name))
    with pytest.raises(KeyError, match="no feature moments for merge point 'nowhere'"):
        Correlations(random_pair.stats, [*names, "nowhere"])


# ------------------------------------------------------------------ the method and its λ search
class _Setup:
    def __init__(self) -> None:
        from lightning_merge.models.resnet import ResNet20

        torch.manual_seed(1)
        self.models = [ResNet20(width=1).eval(), ResNet20(width=1).eval()]
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 1, 28, 28, generator=gen)
        self.graph = trace_graph(self.models[0], self.x[:2])
        batches = [torch.randn(64, 1, 28, 28, generator=gen) for _ in range(2)]
        self.stats = collect_statistics(self.models, self.graph, batches, progress=False)

    def merge(self, **kwargs: object) -> tuple[nn.Module, dict]:
        method = MuDSCMerge(**{"max_rounds": 2, **kwargs})  # the search, not the descent, is tested
        result = method.merge(self.models, graph=self.graph, stats=self.stats)
        return result.model, dict(result.diagnostics)


@pytest.fixture(scope="module")
def random_pair() -> _Setup:
    return _Setup()


def test_lambda_search_keeps_the_best_scoring_merge(random_pair: _Setup) -> None:
    seen: list[float] = []

    def score(model: nn.Module) -> float:  # a deterministic stand-in for validation accuracy
        with torch.no_grad():
            value = -float(model(random_pair.x).std())
        seen.append(value)
        return value

    grid = (0.2, 0.5, 0.8)
    merged, info = random_pair.merge(lam_search=True, lam_grid=grid, score=score)
    assert list(info["lam_scores"]) == list(grid) and list(info["lam_scores"].values()) == seen
    best = max(grid, key=lambda lam: info["lam_scores"][lam])
    assert info["lam"] == best
    plain, _ = random_pair.merge(lam=best)
    for k, v in plain.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k


def test_lambda_search_errors_name_the_culprit(random_pair: _Setup) -> None:
    with pytest.raises(ValueError, match="lam_search=True needs score"):
        random_pair.merge(lam_search=True, lam_grid=(0.5,))
    with pytest.raises(ValueError, match=r"score returned nan for the merge at lam=0.5"):
        random_pair.merge(lam_search=True, lam_grid=(0.5,), score=lambda m: math.nan)
    with pytest.raises(ValueError, match="every lam_grid value"):
        MuDSCMerge(lam_grid=(0.5, 1.5))
    with pytest.raises(ValueError, match="lam_grid must be a non-empty"):
        MuDSCMerge(lam_grid=())
    with pytest.raises(ValueError, match="score must be a callable"):
        MuDSCMerge(score=0.5)
