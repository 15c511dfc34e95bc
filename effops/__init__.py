"""effops: fused kernels for efficient CNN backbones (Triton on GPUs, a native C++ backend on
CPUs), behind drop-in modules.

    import effops
    fast = effops.optimize(model.eval())      # swaps fused modules in, keeps weights
    print(fast.effops_report)                 # what was swapped / skipped and why

Importing effops does no GPU work and compiles nothing; kernels are compiled
(and autotuned on CUDA) on first use, and the native CPU extension is built (about a
minute, once per torch version) by the first CPU op that runs it.
"""
from .convert import OptimizeReport, optimize
from .diagnostics import info
from .dispatch import BackendUnavailable, use_backend
from .nn import (ChannelShuffle, EffectiveSE, FusedClassifierHead, FusedConvBNAct, FusedGhostModule, FusedOSA,
                 FusedOSAStages, FusedRepVGGBlock, FusedSequential, FusedShuffleV2Block, Linear, MaxPool2d, SqueezeExcite)
from .ops import channel_shuffle, se_apply, se_gate
from .views import ChannelView
from . import dispatch, models, native, ops, tuning


def refresh() -> None:
    """Make every fused module re-derive what it derived from its parameters (BN scales and biases,
    cuDNN's folded weights, the native CPU backend's BN-folded prepacked weights, merged RepVGG
    and ghost convs). Needed only after a write PyTorch
    does not count as a change: ``param.data.mul_(...)``, writes through numpy or DLPack, and a
    child module written straight into ``_modules`` or removed with ``del``. In-place ops,
    optimizer steps, ``param.data = t`` and replaced modules are seen without it."""
    from .nn.common import clear_derived_caches, structure_changed
    from .ops.conv import clear_vendor_folds

    native.refresh()
    clear_derived_caches()
    clear_vendor_folds()
    structure_changed()

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ChannelShuffle",
    "ChannelView",
    "EffectiveSE",
    "FusedClassifierHead",
    "FusedConvBNAct",
    "FusedGhostModule",
    "FusedOSA",
    "FusedOSAStages",
    "FusedRepVGGBlock",
    "FusedSequential",
    "FusedShuffleV2Block",
    "Linear",
    "MaxPool2d",
    "OptimizeReport",
    "SqueezeExcite",
    "channel_shuffle",
    "info",
    "models",
    "ops",
    "optimize",
    "refresh",
    "se_apply",
    "se_gate",
    "tuning",
    "use_backend",
]
