"""Forward noise processes. ``SDES`` is the registry mirrored by ``conf/sde/``."""
from ..registry import Registry
from .base import SDE, ReverseSDE, ScoreFn, broadcast_to_x
from .linear import LinearSDE
from .ve import VESDE
from .vp import CosineVPSDE, SubVPSDE, VPSDE

SDES: Registry = Registry("sde")
SDES.register("vp")(VPSDE)
SDES.register("subvp")(SubVPSDE)
SDES.register("ve")(VESDE)
SDES.register("cosine_vp")(CosineVPSDE)

__all__ = [
    "SDE",
    "ReverseSDE",
    "ScoreFn",
    "LinearSDE",
    "VPSDE",
    "SubVPSDE",
    "CosineVPSDE",
    "VESDE",
    "SDES",
    "broadcast_to_x",
]
