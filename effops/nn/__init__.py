"""Drop-in ``nn.Module`` replacements backed by effops' fused ops.

Importing this package registers the whole-block rules :func:`effops.optimize` uses
(squeeze-excite, ShuffleNetV2 unit, ghost module, RepVGG block, timm classifier head; see
``effops.nn.common.BlockRule``).
"""
from .conv_bn_act import FusedConvBNAct
from .se import SqueezeExcite
from .osa import EffectiveSE, FusedOSA, FusedOSAStages
from .sequential import FusedSequential
from .linear import Linear
from .pool import MaxPool2d
from .shuffle import ChannelShuffle
from .shufflenet import FusedShuffleV2Block
from .ghost import FusedGhostModule
from .repvgg import FusedRepVGGBlock
from .head import FusedClassifierHead

__all__ = ["ChannelShuffle", "EffectiveSE", "FusedClassifierHead", "FusedConvBNAct", "FusedGhostModule", "FusedOSA",
           "FusedOSAStages", "FusedRepVGGBlock", "FusedSequential", "FusedShuffleV2Block", "Linear", "MaxPool2d",
           "SqueezeExcite"]
