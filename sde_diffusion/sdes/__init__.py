"""Forward noise processes. ``SDES`` is the registry mirrored by ``conf/sde/``."""
from ..registry import SDES
from .sde import SDE, ReverseSDE, ScoreFn, broadcast_to_x
from .linear import LinearSDE
from .ve import VESDE
from .vp import CosineVPSDE, SubVPSDE, VPSDE


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
