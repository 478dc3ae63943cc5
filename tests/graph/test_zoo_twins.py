"""Twin recovery on one small torchvision model per family: merging a model with a channel-permuted
copy of itself gives the model back for every matching method (the full zoo: benchmarks/zoo_coverage.py).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

tv = pytest.importorskip("torchvision")
from torchvision.models import convnext as tv_convnext  # noqa: E402

_SPEC = importlib.util.spec_from_file_location(
    "zoo_coverage", Path(__file__).parents[2] / "benchmarks/zoo_coverage.py"
)
zoo = importlib.util.module_from_spec(_SPEC)
sys.modules["zoo_coverage"] = zoo
_SPEC.loader.exec_module(zoo)


def _convnext() -> nn.Module:
    cfg = tv_convnext.CNBlockConfig
    return tv.models.ConvNeXt([cfg(16, 32, 1), cfg(32, None, 1)], stochastic_depth_prob=0.1, num_classes=10)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
    "mobilenet": lambda: tv.models.MobileNetV2(width_mult=0.25, num_classes=10),
    "efficientnet": lambda: tv.models.efficientnet_b0(num_classes=10),
    "convnext": _convnext,
    "regnet": lambda: tv.models.regnet_y_400mf(num_classes=10),
    "densenet": lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16),
    "vit": lambda: tv.models.VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=10),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_twin_recovery(family: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result, info = zoo.twin_recovery(model, x, list(zoo.METHODS))
    assert info["equivalence"] < 1e-10
    assert result == dict.fromkeys(zoo.METHODS, "ok"), result


def test_shufflenet_is_refused_naming_the_op_and_node() -> None:
    from lightning_merge.graph import UnsupportedOpError, trace_graph

    with pytest.raises(UnsupportedOpError, match=r"Tensor\.view at fx node 'view'") as err:
        trace_graph(tv.models.shufflenet_v2_x0_5().eval(), torch.randn(2, 3, 32, 32))
    assert err.value.node == "view"
