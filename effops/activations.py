"""The activations every fused epilogue supports, in one table.

An activation is named by a string (``"relu"``, ``"gelu_tanh"``, ...) plus one
float parameter (only LeakyReLU's negative slope uses it). The same name drives
the Triton epilogue (a ``tl.constexpr`` string), the reference path and the
converter, so a new activation is added here once.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = (
    "identity",
    "relu",
    "relu6",
    "leaky_relu",
    "hardswish",
    "hardsigmoid",
    "silu",
    "sigmoid",
    "gelu",
    "gelu_tanh",
)

# timm defines its own activation classes (memory-efficient and scripted
# variants); they compute the same functions as the torch.nn ones, so the
# converter recognises them by class name when they come from timm.
_TIMM_NAMES = {
    "Swish": "silu",
    "SwishMe": "silu",
    "SiLU": "silu",
    "HardSwish": "hardswish",
    "HardSwishMe": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "HardSigmoidMe": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
}


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    return act


def activation_of(module: Optional[nn.Module]) -> Optional[Tuple[str, float]]:
    """``(name, param)`` for a supported activation module, ``None`` otherwise.

    ``None`` as the module means "no activation" (``("identity", 0.0)``).
    """
    if module is None or type(module) is nn.Identity:
        return ("identity", 0.0)
    t = type(module)
    if t is nn.ReLU:
        return ("relu", 0.0)
    if t is nn.ReLU6:
        return ("relu6", 0.0)
    if t is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if t is nn.Hardswish:
        return ("hardswish", 0.0)
    if t is nn.Hardsigmoid:
        return ("hardsigmoid", 0.0)
    if t is nn.SiLU:
        return ("silu", 0.0)
    if t is nn.Sigmoid:
        return ("sigmoid", 0.0)
    if t is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu", 0.0)
    if t.__module__.startswith("timm.") and t.__name__ in _TIMM_NAMES:
        if t.__name__ in ("GELU", "GELUTanh") and getattr(module, "approximate", None) not in (None, "none", "tanh"):
            return None
        return (_TIMM_NAMES[t.__name__], 0.0)
    return None


def make_activation(act: str, param: float = 0.0) -> nn.Module:
    """The ``torch.nn`` module computing ``act`` (used by modules built from scratch)."""
    check_activation(act)
    return {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "leaky_relu": lambda: nn.LeakyReLU(param),
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    }[act]()


def apply_activation(x: Tensor, act: str, param: float = 0.0) -> Tensor:
    """Reference: the activation applied with torch.nn.functional."""
    if act == "identity":
        return x
    if act == "relu":
        return F.relu(x)
    if act == "relu6":
        return F.relu6(x)
    if act == "leaky_relu":
        return F.leaky_relu(x, param)
    if act == "hardswish":
        return F.hardswish(x)
    if act == "hardsigmoid":
        return F.hardsigmoid(x)
    if act == "silu":
        return F.silu(x)
    if act == "sigmoid":
        return torch.sigmoid(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(check_activation(act))


def activation_grad(pre: Tensor, grad: Tensor, act: str, param: float = 0.0) -> Tensor:
    """d act(pre) / d pre * grad, matching PyTorch's own derivative conventions
    (ReLU's derivative at 0 is 0; hardswish/hardsigmoid use PyTorch's boundary choices)."""
    if act == "identity":
        return grad
    if act == "relu":
        return grad * (pre > 0)
    if act == "relu6":
        return grad * ((pre > 0) & (pre < 6))
    if act == "leaky_relu":
        return torch.where(pre > 0, grad, grad * param)
    if act == "hardsigmoid":
        return grad * ((pre > -3) & (pre < 3)) / 6.0
    if act == "hardswish":
        # torch: x <= -3 -> 0; x < 3 -> (2x + 3) / 6; else 1
        d = torch.where(pre <= -3, torch.zeros_like(pre), torch.where(pre < 3, (2 * pre + 3) / 6.0, torch.ones_like(pre)))
        return grad * d
    if act == "sigmoid":
        s = torch.sigmoid(pre)
        return grad * s * (1 - s)
    if act == "silu":
        s = torch.sigmoid(pre)
        return grad * s * (1 + pre * (1 - s))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)
        return grad * (cdf + pre * pdf)
    if act == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        inner = k * (pre + 0.044715 * pre**3)
        t = torch.tanh(inner)
        d = 0.5 * (1 + t) + 0.5 * pre * (1 - t * t) * k * (1 + 3 * 0.044715 * pre * pre)
        return grad * d
    raise ValueError(check_activation(act))
