"""VoVNet V1/V2 built from effops modules, with the classic layout's ``state_dict`` keys.

    model = effops.models.vovnet39()               # V1: FusedOSA blocks, FusedSequential stem
    model = effops.models.vovnet39(v2=True)        # V2: + eSE on the last block of each stage
    model.load_state_dict(classic_checkpoint)      # keys of the classic VoVNet code, unchanged

Each model is the classic definition (:mod:`effops.models.classic_vovnet`) with its
OSA modules replaced by :class:`~effops.FusedOSA` and its conv-BN-ReLU runs by fused
modules, sharing the same children under the same names, which is why a classic
checkpoint loads with ``strict=True``.
"""
from __future__ import annotations

from torch import nn

from .classic_vovnet import classic_vovnet


def _build(name: str, v2: bool, num_classes: int, depthwise: bool = False) -> nn.Module:
    from ..convert import optimize  # convert imports the nn modules, which import nothing from here

    model = optimize(classic_vovnet(name, num_classes, v2=v2, depthwise=depthwise), inplace=True)
    report = model.effops_report
    if report.skipped:  # every conv of the classic definition has a fused home; anything else is a bug
        raise RuntimeError(f"effops could not fuse parts of {name}:\n{report}")
    return model


def vovnet27_slim(v2: bool = False, num_classes: int = 1000) -> nn.Module:
    """VoVNet-27-slim (stage_ch 64/80/96/112, concat_ch 128/256/384/512, 1 block per stage)."""
    return _build("vovnet27_slim", v2, num_classes)


def vovnet39(v2: bool = False, num_classes: int = 1000) -> nn.Module:
    """VoVNet-39 (stage_ch 128/160/192/224, concat_ch 256/512/768/1024, blocks 1/1/2/2)."""
    return _build("vovnet39", v2, num_classes)


def vovnet57(v2: bool = False, num_classes: int = 1000) -> nn.Module:
    """VoVNet-57 (stage_ch 128/160/192/224, concat_ch 256/512/768/1024, blocks 1/1/4/3)."""
    return _build("vovnet57", v2, num_classes)
