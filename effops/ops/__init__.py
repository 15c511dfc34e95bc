"""Functional ops. ``reference`` holds the pure-PyTorch specification of every op family."""
from . import reference
from .conv import conv_bn_act
from .osa import aggregate, osa_block

__all__ = ["aggregate", "conv_bn_act", "osa_block", "reference"]
