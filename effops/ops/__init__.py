"""Functional ops. ``reference`` holds the pure-PyTorch specification of every op family."""
from . import reference
from .conv import conv_bn_act
from .osa import aggregate, osa_block
from .se import se_apply, se_gate
from .shuffle import channel_shuffle

__all__ = ["aggregate", "channel_shuffle", "conv_bn_act", "osa_block", "reference", "se_apply", "se_gate"]
