"""Drop-in ``nn.Module`` replacements backed by effops' fused ops."""
from .conv_bn_act import FusedConvBNAct
from .osa import EffectiveSE, FusedOSA
from .sequential import FusedSequential

__all__ = ["EffectiveSE", "FusedConvBNAct", "FusedOSA", "FusedSequential"]
