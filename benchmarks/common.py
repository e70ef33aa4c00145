r"""Shared pieces of the benchmarks: timing, the k-diffusion bridge, tables and RESULTS.md.

The test problems, their exact scores and the sample-quality metrics are the library's:
:mod:`sde_diffusion.testing` (problem families, :class:`~sde_diffusion.testing.Truth` and the
metrics with their noise floors) and :class:`sde_diffusion.toy.GaussianMixture` (exact perturbed
densities and scores). What is here only serves the benchmark scripts:

* :func:`best_time` — the least disturbed of a few timed calls;
* :func:`load_kdiffusion_sampling`, :class:`EDMDenoiser`, :func:`sigma_tilde_range` — k-diffusion's
  samplers fed an exact score, in EDM's coordinates (σ̃ = σ/m, x̃ = x/m);
* :func:`fmt`, :func:`md_table`, :func:`write_results_section` — the tables of RESULTS.md;
* :func:`set_malloc` — steadier timings of large temporaries (glibc).
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sde_diffusion.sdes.sde import SDE

# ----------------------------------------------------------------------------------- timing


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Minimum wall time in seconds of ``repeats`` calls (the least disturbed by other load)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------------- k-diffusion


def load_kdiffusion_sampling() -> Tuple[Optional[types.ModuleType], str]:
    """k-diffusion's ``sampling`` module, or (None, reason).

    Tries the normal import first. The package ``__init__`` imports torchvision, which does not
    import beside the local torch wheel, and ``k_diffusion/utils.py`` does too; ``sampling.py``
    itself only needs ``utils.append_dims``. So, failing the normal import, the installed
    ``sampling.py`` is loaded by file path under an empty package whose ``utils`` provides just
    that function (its own needs: scipy, torchsde, tqdm; torchdiffeq is replaced by a stub that
    raises on use when it is not installed, as only k-diffusion's log_likelihood calls it).
    """
    try:
        from k_diffusion import sampling  # type: ignore

        return sampling, "k_diffusion (full import)"
    except Exception as err:  # noqa: BLE001 - any import failure means: try the file route
        first_error = f"{type(err).__name__}: {err}"
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (make peers)"
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    path = pkg_dir / "sampling.py"
    if not path.exists():
        return None, f"k-diffusion installed without sampling.py at {pkg_dir}"
    for mod in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[mod]
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        # sampling.py imports torchdiffeq.odeint at module level but only its log_likelihood uses it.
        stub = types.ModuleType("torchdiffeq")

        def odeint(*args, **kwargs):
            raise ImportError("torchdiffeq is not installed (pip install torchdiffeq)")

        stub.odeint = odeint
        sys.modules["torchdiffeq"] = stub
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(pkg_dir)]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: Tensor, target_dims: int) -> Tensor:
        extra = target_dims - x.ndim
        if extra < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * extra]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    try:
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules["k_diffusion.sampling"] = module
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:  # noqa: BLE001
        return None, f"k-diffusion sampling.py failed to load ({type(err).__name__}: {err}); full import: {first_error}"
    return module, "k_diffusion/sampling.py (file import; package __init__ failed: " + first_error.split("\n")[0][:80] + ")"


class EDMDenoiser:
    r"""The exact denoiser in EDM's coordinates for k-diffusion: D(x̃, σ̃) = x̂_0.

    With σ̃ = σ(t)/m(t) and x̃ = x/m(t), find t from the log-SNR λ = −2 log σ̃
    (``sde.t_from_log_snr``), evaluate the score at x = m x̃ and return Tweedie's
    x̂_0 = (x + σ² s(x, t))/m. ``nfe`` counts calls. σ̃ shared by the batch is inverted once.
    """

    def __init__(self, sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.sde = sde
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        sig = sigma.to(torch.float64)
        shared = sig.dim() == 0 or bool((sig == sig.reshape(-1)[0]).all())
        s0 = sig.reshape(-1)[0] if shared else sig
        t64 = self.sde.t_from_log_snr(-2 * torch.log(s0))
        m, s = self.sde.mean_coeff(t64), self.sde.marginal_std(t64)
        B = x.shape[0]
        t = (t64.expand(B) if shared else t64).to(x.dtype)
        if shared:
            m_x, s_x = float(m), float(s)
        else:
            shape = (B,) + (1,) * (x.dim() - 1)
            m_x, s_x = m.to(x.dtype).view(shape), s.to(x.dtype).view(shape)
        xt = m_x * x
        return (xt + s_x**2 * self.score_fn(xt, t)) / m_x


def sigma_tilde_range(sde: SDE) -> Tuple[float, float]:
    """(σ̃(eps), σ̃(T)) with σ̃ = σ/m: the noise-level range k-diffusion's schedule should span."""
    ts = torch.tensor([sde.eps, sde.T], dtype=torch.float64)
    st = sde.marginal_std(ts) / sde.mean_coeff(ts)
    return float(st[0]), float(st[1])


def fmt(v: float, digits: int = 3) -> str:
    """Compact number for tables: 3 significant digits, ∞/nan spelled out."""
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if a < 1 else f"{v:.{max(digits - 1 - int(math.floor(math.log10(a))), 0)}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


__all__ = [
    "best_time",
    "load_kdiffusion_sampling",
    "EDMDenoiser",
    "sigma_tilde_range",
    "fmt",
    "md_table",
    "write_results_section",
    "set_malloc",
]


# ---------------------------------------------------------------------------------- plumbing
def write_results_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the ``heading`` (e.g. ``## Samplers``) section of RESULTS.md with
    ``section``, leaving every other section alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        new = text.rstrip() + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new)


def set_malloc() -> None:
    """Keep freed heap memory for reuse: otherwise every large temporary is a fresh mmap whose
    page faults cost more than the arithmetic and depend on what ran before, which skews a
    comparison of two loops (glibc only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass
