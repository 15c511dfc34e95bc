"""VoVNet V1 in its classic layout, in plain ``torch.nn`` (no effops modules).

Built from the facts in the project's MODELS.md (Lee et al. 2019): a stem of
three 3×3 conv-BN-ReLU, four stages of One-Shot-Aggregation modules, global
average pool and a linear classifier. Module names follow the classic
definition (``stem.stem_1/conv``, ``stage2.OSA2_1.layers.0.OSA2_1_0/conv``,
``...concat.OSA2_1_concat/norm``), so its ``state_dict`` has the classic keys
and the converter is exercised on ``OrderedDict``-built Sequentials.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
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


class OSAModule(nn.Module):
    """``layer_per_block`` 3×3 conv-BN-ReLU in sequence, concat of the input and
    every output, 1×1 conv-BN-ReLU aggregation, optional identity residual."""

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, layer_per_block: int, name: str, identity: bool = False):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        ch = in_ch
        for i in range(layer_per_block):
            self.layers.append(nn.Sequential(OrderedDict(conv_bn_relu(ch, stage_ch, name, i))))
            ch = stage_ch
        self.concat = nn.Sequential(OrderedDict(conv_bn_relu(in_ch + layer_per_block * stage_ch, concat_ch, name, "concat", 1)))

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.concat(torch.cat(outputs, dim=1))
        return y + x if self.identity else y


class VoVNet(nn.Module):
    def __init__(self, stage_ch: Sequence[int], concat_ch: Sequence[int], blocks: Sequence[int],
                 layer_per_block: int = 5, num_classes: int = 1000):
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
                stage.add_module(f"OSA{num}_{b + 1}", OSAModule(in_ch if b == 0 else cc, sc, cc, layer_per_block,
                                                               f"OSA{num}_{b + 1}", identity=b > 0))
            in_ch = cc
            self.add_module(f"stage{num}", stage)
            self.stage_names.append(f"stage{num}")
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def classic_vovnet(name: str = "vovnet27_slim", num_classes: int = 1000) -> VoVNet:
    """``classic_vovnet("vovnet27_slim" | "vovnet39" | "vovnet57")``."""
    if name not in VOVNET_CONFIGS:
        raise ValueError(f"unknown VoVNet {name!r}; expected one of {', '.join(VOVNET_CONFIGS)}")
    return VoVNet(*VOVNET_CONFIGS[name], num_classes=num_classes)
