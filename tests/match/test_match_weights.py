"""Git Re-Basin weight matching and MuDSC (weight similarity + mixed matching)."""

from __future__ import annotations

import pytest
import torch
from stats_nets import permuted_twin
from stats_nets import seq_mlp as mlp
from stats_nets import seq_mlp_graph as mlp_graph

from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.match import match_mudsc, match_permute, match_weights, match_zipit, weight_similarity


@pytest.mark.parametrize("num_copies", [1, 2])
def test_weight_matching_recovers_permuted_copies(num_copies):
    base = mlp(0)
    graph = mlp_graph(base)
    copies = [permuted_twin(base, graph, seed=s) for s in range(1, num_copies + 1)]
    x = torch.randn(5, 6, dtype=torch.float64)
    for c, _ in copies:
        assert torch.allclose(c(x), base(x))  # permuting keeps the function
    result = match_weights([base.state_dict()] + [c.state_dict() for c, _ in copies], graph)
    assert set(result) == {"h1", "h2"}
    for name in ("h1", "h2"):
        t = result[name]
        assert t.width == graph.space(name).size and t.num_models == num_copies + 1
        for i, (_, perms) in enumerate(copies, start=1):
            # model i's feature j is base feature perms[name][j]: it lands on merged feature perms[j]
            assert torch.equal(t.unmerge_block(i).argmax(1), perms[name])


def test_weight_matching_recovers_a_permuted_traced_resnet():
    from lightning_merge.models.resnet import ResNet20

    torch.manual_seed(0)
    model = ResNet20(width=1).double().eval()
    graph = trace_graph(model, torch.randn(1, 1, 28, 28, dtype=torch.float64))
    copy = ResNet20(width=1).double().eval()
    copy.load_state_dict(model.state_dict())
    perms = random_permutations(graph, seed=3)
    permute_model(copy, graph, perms)
    result = match_weights([model.state_dict(), copy.state_dict()], graph, max_iter=20)
    for space in graph.spaces:
        assert torch.equal(result[space.name].unmerge_block(1).argmax(1), perms[space.name]), space.name


def test_weight_matching_starts_right_on_a_squeeze_excitation_whose_second_linear_dominates():
    """The SE's fc2 produces the block's channels but consumes the squeeze features, matched later:
    read unpermuted, its slices are noise. Scaled up they outweighed the conv rows (EfficientNet-B3,
    relative output error 1.0); the forward start leaves them out until the squeeze is matched."""
    from torch import nn
    from torchvision.ops import SqueezeExcitation

    from lightning_merge.match.weight_matching import _forward_start

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        SqueezeExcitation(16, 4),
        nn.Conv2d(16, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).double()
    with torch.no_grad():
        model[3].fc2.weight.mul_(50.0)  # its slices now dominate the producer rows of the channels
    model.eval()
    graph = trace_graph(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    twin, perms = permuted_twin(model, graph, seed=4)
    start = _forward_start(model.state_dict(), twin.state_dict(), graph)
    for space in graph.spaces:  # model 0's feature k is the twin's feature j with perms[j] = k
        assert torch.equal(start[space.name], torch.argsort(perms[space.name])), space.name


def test_weight_matching_errors_name_the_culprit():
    base = mlp(0)
    graph = mlp_graph(base)
    other = {k: v for k, v in mlp(1).state_dict().items() if k != "2.bias"}
    with pytest.raises(KeyError, match=r"model 1 has no tensor '2.bias'"):
        match_weights([base.state_dict(), other], graph)
    wrong = dict(mlp(1).state_dict())
    wrong["4.weight"] = torch.zeros(3, 13)
    with pytest.raises(ValueError, match=r"'4.weight': model 1 has shape \(3, 13\)"):
        match_weights([base.state_dict(), wrong], graph)
    with pytest.raises(ValueError, match="max_iter"):
        match_weights([base.state_dict(), base.state_dict()], graph, max_iter=0)
    with pytest.raises(ValueError, match="at least 2 state dicts"):
        match_weights([base.state_dict()], graph)


def test_weight_similarity_is_exact_on_a_permuted_copy_once_other_axes_are_aligned():
    base = mlp(0)
    graph = mlp_graph(base)
    copy, perms = permuted_twin(base, graph, seed=5)
    sds = [base.state_dict(), copy.state_dict()]
    # producing rows alone are aligned already (their other axis is the fixed input)
    sim_out = weight_similarity(sds, graph, "h1", roles=("out",))
    assert torch.allclose(
        sim_out[torch.arange(10), 10 + torch.argsort(perms["h1"])], torch.ones(10, dtype=torch.float64)
    )
    # the consuming 2.weight also reads h2, which the copy permuted: align it, then cosine is 1
    to_base = {"h2": torch.argsort(perms["h2"])}
    sim = weight_similarity(sds, graph, "h1", perms=[{}, to_base])
    assert torch.allclose(
        sim[torch.arange(10), 10 + torch.argsort(perms["h1"])], torch.ones(10, dtype=torch.float64)
    )
    unaligned = weight_similarity(sds, graph, "h1")
    assert unaligned[torch.arange(10), 10 + torch.argsort(perms["h1"])].max() < 1 - 1e-6
    assert torch.allclose(sim.diagonal(), torch.ones(20, dtype=torch.float64))
    corr = weight_similarity(sds, graph, "h1", measure="correlation", perms=[{}, to_base])
    assert torch.allclose(corr, corr.T) and corr.max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="measure"):
        weight_similarity(sds, graph, "h1", measure="l2")
    with pytest.raises(KeyError, match="no merge point named 'h9'"):
        weight_similarity(sds, graph, "h9")


def _act_corr(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.corrcoef(torch.randn(2 * n, 80, generator=gen, dtype=torch.float64))
    return (c + c.T) / 2


def test_mudsc_lambda_endpoints_are_the_single_spaces():
    base = mlp(0)
    graph = mlp_graph(base)
    w = weight_similarity([base.state_dict(), mlp(1).state_dict()], graph, "h2")
    act = _act_corr(12, seed=1)
    kw = {"alpha": 0.3, "beta": 0.25, "target_width": 16}
    a1 = match_mudsc(act, w, 2, lam=1.0, **kw)
    assert torch.equal(a1.merge, match_zipit(act, 2, **kw).merge)
    a0 = match_mudsc(act, w, 2, lam=0.0, **kw)
    assert torch.equal(a0.merge, match_zipit(w, 2, **kw).merge)
    assert not torch.equal(a0.merge, a1.merge)
    p = match_mudsc(act, w, 2, lam=0.0, matcher="permute")
    assert torch.equal(p.unmerge, match_permute(w, 2).unmerge)
    mixed = match_mudsc(act, w, 2, lam=0.5, matcher="permute")
    assert torch.equal(mixed.unmerge, match_permute(0.5 * act + 0.5 * w, 2).unmerge)


@pytest.mark.parametrize("matcher", ["zipit", "permute"])
def test_mudsc_keeps_groups(matcher):
    base = mlp(0)
    graph = mlp_graph(base, group_size=4)
    w = weight_similarity([base.state_dict(), mlp(2).state_dict()], graph, "h2")
    act = _act_corr(12, seed=2)
    kw = {"alpha": 0.3, "beta": 0.5, "target_width": 18} if matcher == "zipit" else {}
    t = match_mudsc(act, w, 2, lam=0.5, matcher=matcher, group_size=4, **kw)
    per_group = t.width // 3
    for i in range(2):
        owner = t.unmerge_block(i).argmax(1)
        for grp in owner.view(3, 4):
            assert len(set((grp // per_group).tolist())) == 1


def test_mudsc_errors_name_the_culprit():
    act = _act_corr(6, seed=0)
    with pytest.raises(ValueError, match="lam"):
        match_mudsc(act, act, 2, lam=1.5)
    with pytest.raises(ValueError, match="matcher"):
        match_mudsc(act, act, 2, matcher="greedy")
    with pytest.raises(ValueError, match="same shape"):
        match_mudsc(act, _act_corr(4, seed=0), 2)
    with pytest.raises(ValueError, match="weight_sim.*square"):
        match_mudsc(act, act[:, :5], 2)
    with pytest.raises(ValueError, match="no ZipIt! options"):
        match_mudsc(act, act, 2, matcher="permute", alpha=0.3)
