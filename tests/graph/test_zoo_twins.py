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
from torchvision.models import efficientnet as tv_efficientnet  # noqa: E402
from torchvision.models import regnet as tv_regnet  # noqa: E402

_SPEC = importlib.util.spec_from_file_location(
    "zoo_coverage", Path(__file__).parents[2] / "benchmarks/zoo_coverage.py"
)
zoo = importlib.util.module_from_spec(_SPEC)
sys.modules["zoo_coverage"] = zoo
_SPEC.loader.exec_module(zoo)


def _resnet() -> nn.Module:
    """torchvision's ResNet code (BasicBlock, downsampling shortcuts) at widths 16–128 (from 64–512)."""
    model = tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.inplanes = 16
    model.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(16)
    for k, width in enumerate((16, 32, 64, 128)):
        setattr(model, f"layer{k + 1}", model._make_layer(tv.models.resnet.BasicBlock, width, 1, 1 + (k > 0)))
    model.fc = nn.Linear(128, 10)
    return model


def _convnext() -> nn.Module:
    cfg = tv_convnext.CNBlockConfig
    return tv.models.ConvNeXt([cfg(16, 32, 1), cfg(32, None, 1)], stochastic_depth_prob=0.1, num_classes=10)


def _efficientnet() -> nn.Module:
    """B0's blocks (MBConv with squeeze-excitation, SiLU, stochastic depth) at 1/4 width and depth."""
    setting, last = tv_efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return tv.models.EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=10)


def _regnet() -> nn.Module:
    """RegNetY blocks (grouped 3×3 convs, squeeze-excitation) over four narrow stages."""
    params = tv_regnet.BlockParams.from_init_params(
        depth=5, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25
    )
    return tv.models.RegNet(params, num_classes=10)


def _shufflenet() -> nn.Module:
    """ShuffleNetV2 blocks (channel split, channel shuffle) with one block per stage."""
    return tv.models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10)


def _swin(v2: bool = False) -> nn.Module:
    """Two stages of two blocks (plain and shifted windows of 2×2 tokens), patch merging between."""
    sw = tv.models.swin_transformer
    kw = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2} if v2 else {}
    return sw.SwinTransformer(
        [4, 4], 16, [2, 2], [2, 4], [2, 2], stochastic_depth_prob=0.1, num_classes=10, **kw
    )


#: one small model per family; the zoo's own sizes are the benchmark's (benchmarks/zoo_coverage.py)
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet": _resnet,
    "mobilenet": lambda: tv.models.MobileNetV2(width_mult=0.25, num_classes=10),
    "efficientnet": _efficientnet,
    "convnext": _convnext,
    "regnet": _regnet,
    "densenet": lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16),
    "shufflenet": _shufflenet,
    "swin": _swin,
    "swin_v2": lambda: _swin(v2=True),
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


def test_shufflenet_channel_shuffle_fixes_the_spaces_it_interleaves() -> None:
    """The shuffle's inputs (each block's concatenated branches) stay fixed; the spaces inside the
    branches and the stem/last convolutions' are still merge points."""
    from lightning_merge.graph import trace_graph

    model = _shufflenet().eval()
    graph = trace_graph(model, torch.randn(2, 3, 32, 32))
    names = {s.name for s in graph.spaces}
    assert "conv1.0" in names and "conv5.0" in names
    assert {"stage2.0.branch2.0", "stage3.0.branch2.0", "stage4.0.branch2.0"} <= names
    for stage in ("stage2", "stage3", "stage4"):  # the last conv of each branch feeds the shuffle
        assert f"{stage}.0.branch1.2" not in names and f"{stage}.0.branch2.5" not in names
