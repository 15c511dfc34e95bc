"""Model definitions: ``vovnet27_slim / vovnet39 / vovnet57`` (effops modules, V1 or ``v2=True``)
and the plain ``torch.nn`` classic definition they are tested against (``classic_vovnet``)."""
from .classic_vovnet import VOVNET_CONFIGS, VoVNet, classic_vovnet
from .vovnet import vovnet27_slim, vovnet39, vovnet57

__all__ = ["VOVNET_CONFIGS", "VoVNet", "classic_vovnet", "vovnet27_slim", "vovnet39", "vovnet57"]
