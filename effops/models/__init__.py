"""Reference model definitions (plain ``torch.nn``) used by the main job, tests and benchmarks."""
from .classic_vovnet import VOVNET_CONFIGS, VoVNet, classic_vovnet

__all__ = ["VOVNET_CONFIGS", "VoVNet", "classic_vovnet"]
