"""Drop-in ``nn.Module`` replacements backed by effops' fused ops."""
from .conv_bn_act import FusedConvBNAct
from .osa import EffectiveSE, FusedOSA
from .sequential import FusedSequential
from .shuffle import ChannelShuffle

__all__ = ["ChannelShuffle", "EffectiveSE", "FusedConvBNAct", "FusedOSA", "FusedSequential"]
