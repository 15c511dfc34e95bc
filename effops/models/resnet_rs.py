"""ResNet-RS (Bello et al. 2021, "Revisiting ResNets") in ``torch.nn``, with timm's
``resnetrs{depth}`` ``state_dict`` keys.

    model = effops.models.resnet_rs(50)                    # torch.nn modules + effops' SqueezeExcite
    model.load_state_dict(timm_resnetrs50.state_dict())    # strict: the same keys and shapes
    fast = effops.optimize(model.eval())                   # conv+BN+ReLU, SE + shortcut + ReLU fused

Every module is a ``torch.nn`` module except the SE, which is effops'
:class:`~effops.nn.se.SqueezeExcite` built with timm's ``SEModule`` layout (children ``fc1``,
``act``, ``fc2``, ``gate``): in ``train()`` it runs exactly those children, in ``eval()`` its
fused gate ops, and the converter fuses it with the shortcut add and ReLU that follow it.

The layout (MODELS.md, checked against timm's ``resnetrs*``: ``stem_type='deep'``,
``stem_width=32``, ``replace_stem_pool=True``, ``avg_down=True``, SE with ``rd_ratio=0.25``):

* stem: 3×3 s2 conv 3→32-BN-ReLU, 3×3 conv 32→32-BN-ReLU, 3×3 conv 32→64 (``conv1.0`` …
  ``conv1.6``), then ``bn1`` and ``act1``; the stem max-pool is replaced by a 3×3 s2 conv
  64→64-BN-ReLU (``maxpool.0`` / ``maxpool.1``, named as in timm);
* four stages (``layer1`` … ``layer4``) of bottlenecks with ``planes`` 64 / 128 / 256 / 512,
  stride 1 / 2 / 2 / 2 on the 3×3 conv of each stage's first block;
* bottleneck: 1×1 conv-BN-ReLU → 3×3 conv-BN-ReLU → 1×1 conv-BN (4·planes) → SE → add the
  shortcut → ReLU; the shortcut of a stage's first block is ResNet-D's
  ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` → 1×1 conv-BN
  (no pool in ``layer1``, whose stride is 1);
* SE: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, reduced to ``0.25 × 4·planes`` channels
  (timm's ``make_divisible(0.25 * channels, 8)``, i.e. ``planes``), both 1×1 convs with bias.
  The ratio applies to the SE's own input (the block's output), as in timm and the checkpoints
  it ports; 0.25 of the *block's* input would give ``layer1.0`` 16 channels instead of 64;
* global average pool → ``fc``. BatchNorm eps 1e-5.

Depths (blocks per stage): 50 (3, 4, 6, 3), 101 (3, 4, 23, 3), 152 (3, 8, 36, 3),
200 (3, 24, 36, 3), 270 (4, 29, 53, 4), 350 (4, 36, 72, 4), 420 (4, 44, 87, 4).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.se import SqueezeExcite

RESNET_RS_LAYERS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
}


def _make_divisible(v: float, divisor: int = 8) -> int:
    """timm's ``make_divisible(v, divisor, round_limit=0.)``: round to the nearest multiple."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class Bottleneck(nn.Module):
    """ResNet-RS bottleneck: ``act3(se(bn3(conv3(act2(bn2(conv2(act1(bn1(conv1(x)))))))) + shortcut)``,
    stride on ``conv2``, ``shortcut = downsample(x)`` (ResNet-D: avg-pool → 1×1 conv → BN) or ``x``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, se_ratio: float = 0.25):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, _make_divisible(out_ch * se_ratio), act="relu", gate="sigmoid")
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_ch != out_ch:
            # Index 0 is the pool slot in timm's downsample_avg (nn.Identity at stride 1), so the
            # conv and BN keep their keys ``downsample.1`` / ``downsample.2``.
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = x + shortcut
        return self.act3(x)


class ResNetRS(nn.Module):
    """ResNet-RS with blocks per stage ``layers`` (see :data:`RESNET_RS_LAYERS`)."""

    def __init__(self, layers, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        stem_width, in_ch = 32, 64
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, in_ch, 3, stride=1, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.act1 = nn.ReLU(inplace=True)
        # "maxpool" is timm's name for the slot; in ResNet-RS it holds a strided conv.
        self.maxpool = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
        )
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_ch, planes, stride if b == 0 else 1))
                in_ch = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # The last BN of each residual branch starts at zero (the block starts as its shortcut).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.global_pool(self.forward_features(x)), 1)
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


def resnet_rs(depth: int, num_classes: int = 1000, *, in_chans: int = 3, drop_rate: float = 0.0) -> ResNetRS:
    """ResNet-RS-``depth`` (50, 101, 152, 200, 270, 350 or 420) in ``torch.nn``, with the
    ``state_dict`` keys of timm's ``resnetrs{depth}`` (``drop_rate``: dropout before ``fc``).
    ``effops.optimize(model)`` converts it."""
    if depth not in RESNET_RS_LAYERS:
        raise ValueError(f"unknown ResNet-RS depth {depth!r}; expected one of {', '.join(map(str, RESNET_RS_LAYERS))}")
    return ResNetRS(RESNET_RS_LAYERS[depth], num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
