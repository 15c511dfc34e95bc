"""Functional ops. ``reference`` holds the pure-PyTorch specification of every op family."""
from . import reference
from .conv import conv_bn_act

__all__ = ["conv_bn_act", "reference"]
