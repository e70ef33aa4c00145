"""Feature networks for image metrics: the 8×8 digits classifier (offline) and Inception (FID).

* :mod:`.digits_classifier` — a small CNN trained on the embedded digits; ``digits_fd`` (Fréchet
  distance in its penultimate-layer features) and ``classify``.
* :mod:`.inception` / :mod:`.fid` — the Inception-v3 feature network from a local file and the
  ``FID`` metric for real images.
* :mod:`.cache` — where trained or downloaded files are kept.

Submodules are imported on demand so that importing this package stays cheap.
"""
from .cache import cache_dir

__all__ = ["cache_dir"]
