"""SpaceTransform from a hard assignment: M, U and their blocks formed on demand, equal to the
dense matrices the assignment defines; bad assignments named."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.match.transform import SpaceTransform, from_assignment


def _dense(assign: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U[k, assign[k]] = 1; M = (U / column counts)ᵀ: the reference, built independently."""
    u = torch.zeros(assign.numel(), width, dtype=torch.float64)
    u[torch.arange(assign.numel()), assign] = 1.0
    return (u / u.sum(0)).T, u


def test_assignment_transform_equals_its_dense_matrices_bitwise() -> None:
    gen = torch.Generator().manual_seed(0)
    width, n, num = 7, 5, 3  # 15 source features onto 7 merged ones, some fused three ways
    assign = torch.cat([torch.arange(width), torch.randint(0, width, (num * n - width,), generator=gen)])
    assign = assign[torch.randperm(num * n, generator=gen)]
    t = from_assignment(assign, width, num)
    m, u = _dense(assign, width)
    assert (t.width, t.source_width, t.num_models) == (width, n, num)
    assert torch.equal(t.merge, m) and torch.equal(t.unmerge, u)
    for i in range(num):
        assert torch.equal(t.merge_block(i), m[:, i * n : (i + 1) * n])
        assert torch.equal(t.unmerge_block(i), u[i * n : (i + 1) * n])
    assert torch.equal(t.assignment, assign)


def test_dense_transform_keeps_what_it_was_given() -> None:
    m, u = _dense(torch.tensor([0, 1, 1, 0]), 2)
    t = SpaceTransform(m, u, 2)
    assert t.merge is m and t.unmerge is u and t.assignment is None and t.width == 2
    assert torch.equal(t.merge_block(1), m[:, 2:])


@pytest.mark.parametrize(
    ("assign", "width", "match"),
    [
        (torch.tensor([0, 1, 1, 3]), 3, r"must lie in \[0, 3\), got 0..3"),
        (torch.tensor([0, 0, 2, 2]), 3, r"merged features \[1\] receive no source feature"),
        (torch.tensor([[0, 1], [1, 0]]), 2, "1-d long tensor"),
        (torch.tensor([0, 1, 0]), 2, "not divisible by 2 models"),
    ],
)
def test_bad_assignments_are_named(assign: torch.Tensor, width: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_assignment(assign, width, 2)


def test_either_dense_matrices_or_an_assignment() -> None:
    with pytest.raises(ValueError, match="either dense merge and unmerge, or an assignment"):
        SpaceTransform(torch.eye(2, dtype=torch.float64), None, 1)
    with pytest.raises(ValueError, match="either dense merge and unmerge, or an assignment"):
        SpaceTransform(num_models=1, assignment=torch.tensor([0, 1]))


def test_an_assignment_merges_weights_as_its_dense_matrices_do() -> None:
    """The index-add path of ``merge_state_dicts`` (one entry per column) against the dense bmm path,
    on an MLP and a flattened conv axis (inner positions), with fused and kept-apart features."""
    from lightning_merge.apply.weights import merge_state_dicts
    from tests.stats_nets import ConvNet, conv_graph, make_models

    models = make_models(ConvNet, n=2)
    graph = conv_graph(models[0])
    sparse = {
        "c1": from_assignment(torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]), 4, 2),
        "c2": from_assignment(torch.tensor([0, 1, 2, 3, 4, 5, 2, 6, 0, 7, 8, 1]), 9, 2),
    }
    dense = {k: SpaceTransform(t.merge, t.unmerge, num_models=2) for k, t in sparse.items()}
    assert sparse["c2"].columns("out") is not None and dense["c2"].columns("out") is None
    sds = [m.state_dict() for m in models]
    got, want = merge_state_dicts(sds, graph, sparse), merge_state_dicts(sds, graph, dense)
    assert got["fc.weight"].shape == (5, 9 * 36)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-6, atol=1e-7)
