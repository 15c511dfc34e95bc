"""VoVNet V1/V2 in the classic layout, in plain ``torch.nn`` (no effops modules).

Built from the facts in the project's MODELS.md (Lee et al. 2019; VoVNetV2 from
CenterMask, Lee & Park 2020): a stem of three 3×3 conv-BN-ReLU, four stages of
One-Shot-Aggregation modules, global average pool and a linear classifier.
Module names follow the classic definition (``stem.stem_1/conv``,
``stage2.OSA2_1.layers.0.OSA2_1_0/conv``, ``...concat.OSA2_1_concat/norm``,
``...ese.fc``), so its ``state_dict`` has the classic keys. It is the reference
the effops models and converter are tested against.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# stage_ch per stage / concat_ch per stage / OSA blocks per stage
VOVNET_CONFIGS = {
    "vovnet27_slim": ([64, 80, 96, 112], [128, 256, 384, 512], [1, 1, 1, 1]),
    "vovnet39": ([128, 160, 192, 224], [256, 512, 768, 1024], [1, 1, 2, 2]),
    "vovnet57": ([128, 160, 192, 224], [256, 512, 768, 1024], [1, 1, 4, 3]),
}


def conv_bn_relu(in_ch: int, out_ch: int, name: str, postfix, kernel_size: int = 3, stride: int = 1) -> List[Tuple[str, nn.Module]]:
    """``[(f"{name}_{postfix}/conv", Conv2d), (".../norm", BatchNorm2d), (".../relu", ReLU)]``."""
    return [
        (f"{name}_{postfix}/conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False)),
        (f"{name}_{postfix}/norm", nn.BatchNorm2d(out_ch)),
        (f"{name}_{postfix}/relu", nn.ReLU(inplace=True)),
    ]


def dw_conv_bn_relu(in_ch: int, out_ch: int, name: str, postfix) -> List[Tuple[str, nn.Module]]:
    """Depthwise-separable: 3×3 depthwise conv (no BN) → 1×1 conv-BN-ReLU, classic names."""
    return [
        (f"{name}_{postfix}/dw_conv3x3", nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False)),
        (f"{name}_{postfix}/pw_conv1x1", nn.Conv2d(in_ch, out_ch, 1, bias=False)),
        (f"{name}_{postfix}/pw_norm", nn.BatchNorm2d(out_ch)),
        (f"{name}_{postfix}/pw_relu", nn.ReLU(inplace=True)),
    ]


class Hsigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class eSEModule(nn.Module):  # noqa: N801 - the classic class name, which the converter recognises
    """Effective squeeze-excitation: ``x * hsigmoid(fc(avg_pool(x)))``, ``fc`` a 1×1 conv with bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, padding=0)
        self.hsigmoid = Hsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.hsigmoid(self.fc(self.avg_pool(x)))


class OSAModule(nn.Module):
    """``layer_per_block`` 3×3 conv-BN-ReLU in sequence, concat of the input and
    every output, 1×1 conv-BN-ReLU aggregation, optional eSE, optional identity residual.
    ``depthwise``: each layer is dw3×3 → 1×1 conv-BN-ReLU, after a 1×1 reduction
    conv when ``in_ch != stage_ch``."""

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, layer_per_block: int, name: str,
                 identity: bool = False, ese: bool = False, depthwise: bool = False):
        super().__init__()
        self.identity = identity
        self.depthwise = depthwise
        self.isReduced = depthwise and in_ch != stage_ch
        ch = in_ch
        if self.isReduced:
            self.conv_reduction = nn.Sequential(OrderedDict(conv_bn_relu(in_ch, stage_ch, f"{name}_reduction", "0", 1)))
            ch = stage_ch
        self.layers = nn.ModuleList()
        for i in range(layer_per_block):
            make = dw_conv_bn_relu if depthwise else conv_bn_relu
            self.layers.append(nn.Sequential(OrderedDict(make(ch, stage_ch, name, i))))
            ch = stage_ch
        self.concat = nn.Sequential(OrderedDict(conv_bn_relu(in_ch + layer_per_block * stage_ch, concat_ch, name, "concat", 1)))
        if ese:
            self.ese = eSEModule(concat_ch)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        y = self.conv_reduction(x) if self.isReduced else x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.concat(torch.cat(outputs, dim=1))
        if hasattr(self, "ese"):
            y = self.ese(y)
        return y + x if self.identity else y


class VoVNet(nn.Module):
    """``v2=True``: VoVNetV2 as in CenterMask's reference code and timm's ``ese_vovnet*b``:
    eSE on the last OSA module of each stage (identity on every module after the first
    of a stage, as in V1)."""

    def __init__(self, stage_ch: Sequence[int], concat_ch: Sequence[int], blocks: Sequence[int],
                 layer_per_block: int = 5, num_classes: int = 1000, v2: bool = False, depthwise: bool = False):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(
            conv_bn_relu(3, 64, "stem", "1", stride=2)
            + conv_bn_relu(64, 64, "stem", "2")
            + conv_bn_relu(64, 128, "stem", "3", stride=2)
        ))
        in_ch = 128
        self.stage_names = []
        for i, (sc, cc, nb) in enumerate(zip(stage_ch, concat_ch, blocks)):
            num = i + 2
            stage = nn.Sequential()
            if num != 2:
                stage.add_module("Pooling", nn.MaxPool2d(3, stride=2, ceil_mode=True))
            for b in range(nb):
                stage.add_module(f"OSA{num}_{b + 1}", OSAModule(
                    in_ch if b == 0 else cc, sc, cc, layer_per_block, f"OSA{num}_{b + 1}", identity=b > 0,
                    ese=v2 and b == nb - 1, depthwise=depthwise))
            in_ch = cc
            self.add_module(f"stage{num}", stage)
            self.stage_names.append(f"stage{num}")
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def classic_vovnet(name: str = "vovnet27_slim", num_classes: int = 1000, v2: bool = False,
                   depthwise: bool = False) -> VoVNet:
    """``classic_vovnet("vovnet27_slim" | "vovnet39" | "vovnet57", v2=False)`` in plain torch.nn."""
    if name not in VOVNET_CONFIGS:
        raise ValueError(f"unknown VoVNet {name!r}; expected one of {', '.join(VOVNET_CONFIGS)}")
    return VoVNet(*VOVNET_CONFIGS[name], num_classes=num_classes, v2=v2, depthwise=depthwise)
