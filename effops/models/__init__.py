"""Model definitions: ``vovnet27_slim / vovnet39 / vovnet57`` (effops modules, V1 or ``v2=True``)
and the plain ``torch.nn`` classic definition they are tested against (``classic_vovnet``);
``resnet_rs(depth)``: ResNet-RS (torch.nn + effops' SqueezeExcite) with timm's ``resnetrs*`` keys."""
from .classic_vovnet import VOVNET_CONFIGS, VoVNet, classic_vovnet
from .resnet_rs import RESNET_RS_LAYERS, ResNetRS, resnet_rs
from .vovnet import vovnet27_slim, vovnet39, vovnet57

__all__ = ["RESNET_RS_LAYERS", "ResNetRS", "VOVNET_CONFIGS", "VoVNet", "classic_vovnet", "resnet_rs", "vovnet27_slim", "vovnet39", "vovnet57"]
