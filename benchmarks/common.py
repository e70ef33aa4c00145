r"""Shared pieces of the benchmarks: test problems with exact ground truth, fast exact mixture
scores, sample-quality metrics with their noise floors, timing, and an optional k-diffusion bridge.

Ground truth. For p_0 = Σ_k w_k N(μ_k, Σ_k) and a linear SDE with kernel N(m x_0, σ² I), the
marginal p_t = Σ_k w_k N(m μ_k, m²Σ_k + σ² I) is known in closed form (DESIGN.md §3), so a sampler
fed the exact score can be judged against p_0 itself. :class:`MixtureEvaluator` evaluates that
score as two GEMMs over all components (the library's :meth:`GaussianMixture.score` is exact but
~10× slower in 64-D); :func:`check_evaluator` asserts both agree.

Metrics (samples ``x [n, D]`` against the true mixture):

(a) :func:`moment_kl` — assign samples to components by their posterior r_ik = p(k | x_i) under
    p_0, then  KL(w ‖ ŵ) + Σ_k w_k KL(N(μ̂_k, Σ̂_k) ‖ N(μ_k, Σ_k))  with ŵ_k = mean_i r_ik and
    (μ̂_k, Σ̂_k) the r-weighted moments. For true samples these responsibility-weighted estimates
    are unbiased even where components overlap (E[r_k(x) x] = w_k μ_k), and over-concentrated
    samples are penalised by the log-det term, which → ∞ as Σ̂_k collapses.
(b) :func:`sliced_w2` — sliced Wasserstein-2 against a fixed true reference set of the same size.
(c) :func:`excess_cross_entropy` — E_x[−log p_0(x)] − H(p_0). Not a divergence: it is negative
    for samples that sit too close to the modes, so it is reported beside (a), never alone.

Each metric has a noise floor: its value for fresh true samples of the same size (mean ± std over
a few independent draws), see :class:`Truth`.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sde_diffusion import GaussianMixture, SubVPSDE, VESDE, VPSDE
from sde_diffusion.sdes.base import SDE

# ----------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A target mixture, its sample sizes and the VE σ_max suited to it (≈ its diameter)."""

    name: str
    description: str
    mixture: GaussianMixture
    n_full: int
    n_quick: int
    ve_sigma_max: float


def grid_mixture(side: int = 5, spacing: float = 2.5, std: float = 0.25, weight_ratio: float = 20.0) -> GaussianMixture:
    """``side²`` isotropic 2-D modes on a centred square lattice; weights grow geometrically along
    the row-major order so that the heaviest mode is ``weight_ratio`` times the lightest."""
    k = side * side
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(k, 2)
    means = spacing * (ij.to(torch.float64) - (side - 1) / 2)
    weights = torch.exp(torch.linspace(0.0, math.log(weight_ratio), k, dtype=torch.float64))
    # A fixed shuffle so that heavy and light modes are neighbours, not sorted by position.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(7))
    return GaussianMixture(weights[perm], means, torch.full((k,), std**2, dtype=torch.float64))


def make_problems() -> Dict[str, Problem]:
    """The benchmark problems, in reporting order."""
    return {
        "ring8": Problem(
            "ring8", "2-D, 8 equal isotropic modes on a circle of radius 4, std 0.3",
            GaussianMixture.ring(k=8, radius=4.0, std=0.3), 5000, 1000, 10.0,
        ),
        "grid25": Problem(
            "grid25", "2-D, 5×5 lattice (spacing 2.5, std 0.25), weights spanning 1:20",
            grid_mixture(), 5000, 1000, 15.0,
        ),
        "gmm16": Problem(
            "gmm16", "16-D, 10 full-covariance modes, stds 0.1–1 (GaussianMixture.random seed 1)",
            GaussianMixture.random(16, 10, seed=1, mean_scale=3.0, std_range=(0.1, 1.0)), 5000, 1000, 30.0,
        ),
        "gmm64": Problem(
            "gmm64", "64-D, 8 full-covariance modes, stds 0.02–2 (GaussianMixture.random seed 2)",
            GaussianMixture.random(64, 8, seed=2, mean_scale=3.0, std_range=(0.02, 2.0)), 3000, 1500, 50.0,
        ),
    }


SDE_NAMES = ("vp", "subvp", "ve")


def make_sde(name: str, problem: Problem) -> SDE:
    """VP and sub-VP with the library defaults; VE with σ_max = the problem's diameter."""
    if name == "vp":
        return VPSDE()
    if name == "subvp":
        return SubVPSDE()
    if name == "ve":
        return VESDE(sigma_min=0.01, sigma_max=problem.ve_sigma_max)
    raise ValueError(f"unknown SDE {name!r}; choose one of: {', '.join(SDE_NAMES)}")


# ----------------------------------------------------------------------------------- exact score


class MixtureEvaluator:
    r"""Exact per-component log-densities, posterior and score of a mixture pushed through an SDE.

    With Σ_k = U_k diag(λ_k) U_kᵀ and y_k = U_kᵀ(x − m μ_k), the marginal component k at time t
    has variance v_k = m²λ_k + σ² in its eigenbasis, so

        log N_k(x) = −½ (Σ_d y_kd²/v_kd + Σ_d log v_kd + D log 2π),
        s(x, t) = −Σ_k r_k(x) U_k (y_k / v_k),   r_k ∝ w_k N_k(x).

    All U_kᵀx for all k is one GEMM ``x [B, D] @ [D, K·D]`` and the back-rotation another, which
    is what makes it fast. Computes in the dtype of ``x`` (float32 or float64).
    """

    def __init__(self, mixture: GaussianMixture, sde: Optional[SDE] = None) -> None:
        self.mixture = mixture
        self.sde = sde
        K, D = mixture.num_components, mixture.dim
        U = mixture.eigvecs  # [K, D, D], columns are eigenvectors
        self.K, self.D = K, D
        self._f64 = {
            "proj": U.permute(1, 0, 2).reshape(D, K * D).contiguous(),  # x @ proj = [x U_1 | … | x U_K]
            "back": U.permute(0, 2, 1).reshape(K * D, D).contiguous(),  # [.. y_k ..] @ back = Σ_k y_k U_kᵀ
            "mu_rot": torch.einsum("kd,kde->ke", mixture.means, U),  # μ_kᵀ U_k
            "lam": mixture.eigvals,
            "logw": torch.log(mixture.weights),
        }
        self._cache: Dict[Tuple[torch.dtype, torch.device], Dict[str, Tensor]] = {}

    def _consts(self, like: Tensor) -> Dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in self._f64.items()}
        return self._cache[key]

    def _coeffs(self, x: Tensor, t: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(m, σ) as 0-dim tensors when t is shared by the batch, else as [B, 1, 1]."""
        if t is None or self.sde is None:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            return one, torch.zeros_like(one)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 1 and bool((t == t[0]).all()):
            t = t[0]
        m, s = self.sde.mean_coeff(t).to(x.dtype), self.sde.marginal_std(t).to(x.dtype)
        if t.dim() == 1:
            m, s = m[:, None, None], s[:, None, None]
        return m, s

    def terms(self, x: Tensor, t: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(log w_k + log N_k(x) ``[B, K]``, whitened residuals y_k/v_k ``[B, K, D]``)."""
        if x.dim() != 2 or x.shape[1] != self.D:
            raise ValueError(f"x must have shape [B, {self.D}], got {tuple(x.shape)}")
        c = self._consts(x)
        m, s = self._coeffs(x, t)
        K, D = self.K, self.D
        if m.dim() == 0:
            # Shared time: the mean shift rides along in the GEMM as a bias (one pass over [B, K·D]).
            y = torch.addmm((-m * c["mu_rot"]).reshape(1, K * D), x, c["proj"]).view(-1, K, D)
        else:
            y = (x @ c["proj"]).view(-1, K, D) - m * c["mu_rot"]
        var = m * m * c["lam"] + s * s
        white = y / var
        quad = y.mul_(white).sum(-1)  # y is not needed any more: reuse its memory
        logdet = torch.log(var).sum(-1)
        logn = -0.5 * (quad + logdet + D * math.log(2 * math.pi))
        return c["logw"] + logn, white

    def log_prob(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:
        """log p_t(x) ``[B]`` (p_0 when t is None)."""
        return torch.logsumexp(self.terms(x, t)[0], dim=1)

    def posterior(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:
        """p(k | x) under p_t: ``[B, K]``."""
        return torch.softmax(self.terms(x, t)[0], dim=1)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """∇_x log p_t(x) ``[B, D]``."""
        logits, white = self.terms(x, t)
        r = torch.softmax(logits, dim=1)
        return -(white.mul_(r[:, :, None]).reshape(-1, self.K * self.D) @ self._consts(x)["back"])

    __call__ = score


def check_evaluator(problem: Problem, sde: SDE, n: int = 64, seed: int = 0) -> float:
    """Max relative deviation of :class:`MixtureEvaluator` from the library's exact score (float64)
    over a few times; raises AssertionError above 1e-9."""
    gen = torch.Generator().manual_seed(seed)
    ev = MixtureEvaluator(problem.mixture, sde)
    worst = 0.0
    for frac in (0.0, 0.01, 0.3, 1.0):
        t = sde.eps + frac * (sde.T - sde.eps)
        x0 = problem.mixture.sample(n, generator=gen)
        xt = sde.perturb(x0, torch.full((n,), t, dtype=torch.float64), torch.randn(x0.shape, generator=gen, dtype=torch.float64))
        tb = torch.full((n,), t, dtype=torch.float64)
        ref = problem.mixture.score(xt, tb, sde)
        got = ev.score(xt, tb)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
        lp = problem.mixture.log_prob_t(xt, tb, sde)
        worst = max(worst, float((ev.log_prob(xt, tb) - lp).abs().max() / lp.abs().max()))
    assert worst < 1e-9, f"fast mixture score deviates from GaussianMixture.score by {worst:g} on {problem.name}"
    return worst


def marginal_sample(mixture: GaussianMixture, sde: SDE, n: int, t: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Exact draw from p_t: m(t) x_0 + σ(t) z with x_0 ~ p_0 (float64 arithmetic, cast to ``dtype``)."""
    x0 = mixture.sample(n, generator=generator)
    z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    return (sde.mean_coeff(tt) * x0 + sde.marginal_std(tt) * z).to(dtype)


# ----------------------------------------------------------------------------------- metrics


def gaussian_kl(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, evals_b: Tensor, evecs_b: Tensor) -> Tensor:
    r"""KL(N(μ_a, Σ_a) ‖ N(μ_b, Σ_b)) with Σ_b = U diag(λ) Uᵀ given by its eigendecomposition:

        ½ [tr(Σ_b⁻¹Σ_a) + (μ_b − μ_a)ᵀ Σ_b⁻¹ (μ_b − μ_a) − D + log det Σ_b − log det Σ_a].

    A singular Σ_a (fewer samples than dimensions) has its eigenvalues floored at 1e-12·min λ,
    which gives a large but finite value. Float64 scalars.
    """
    D = mu_a.shape[0]
    ev_a = torch.linalg.eigvalsh(0.5 * (cov_a + cov_a.T)).clamp_min(1e-12 * float(evals_b.min()))
    rot = evecs_b.T @ cov_a @ evecs_b
    tr = (torch.diagonal(rot) / evals_b).sum()
    d = evecs_b.T @ (mu_b - mu_a)
    maha = (d * d / evals_b).sum()
    return 0.5 * (tr + maha - D + torch.log(evals_b).sum() - torch.log(ev_a).sum())


def moment_kl(x: Tensor, ev: MixtureEvaluator, parts: bool = False):
    r"""Metric (a): KL(w ‖ ŵ) + Σ_k w_k KL(N(μ̂_k, Σ̂_k) ‖ N(μ_k, Σ_k)) in nats (see module doc).

    ŵ is floored at 0.5/n so that a missing mode costs w_k log(2 n w_k), not ∞. Non-finite samples
    give ∞. With ``parts=True`` returns (total, weight term, Gaussian term).
    """
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        inf = math.inf
        return (inf, inf, inf) if parts else inf
    gm = ev.mixture
    n = x.shape[0]
    r = ev.posterior(x)  # [n, K]
    nk = r.sum(0)
    w_hat = (nk / n).clamp_min(0.5 / n)
    w = gm.weights
    weight_kl = float((w * torch.log(w / w_hat)).sum())
    gauss = 0.0
    for k in range(gm.num_components):
        if float(nk[k]) <= 1e-9:
            # No mass at all: the fitted Gaussian is undefined; charge the largest finite penalty.
            cov_k = torch.eye(gm.dim, dtype=torch.float64) * 1e-12 * float(gm.eigvals[k].min())
            mu_k = x.mean(0)
        else:
            rk = r[:, k] / nk[k]
            mu_k = rk @ x
            xc = x - mu_k
            cov_k = (xc * rk[:, None]).T @ xc
        gauss += float(w[k]) * float(gaussian_kl(mu_k, cov_k, gm.means[k], gm.eigvals[k], gm.eigvecs[k]))
    total = weight_kl + gauss
    return (total, weight_kl, gauss) if parts else total


def projections(dim: int, num: int = 256, seed: int = 0) -> Tensor:
    """``[dim, num]`` unit directions, uniform on the sphere, float64."""
    p = torch.randn(dim, num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p / p.norm(dim=0, keepdim=True)


def reference_quantiles(ref: Tensor, proj: Tensor, n: int, chunk: int = 32) -> Tensor:
    r"""Quantiles at levels (i + ½)/n, i < n, of each projection θᵀref: ``[n, L]`` float64.

    Taken from a reference set much larger than n, they stand in for the true projected quantiles
    F_θ⁻¹((i + ½)/n) with little noise of their own (linear interpolation between order statistics).
    """
    N = ref.shape[0]
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n * N - 0.5
    lo = pos.floor().clamp(0, N - 1).long()
    hi = (lo + 1).clamp(max=N - 1)
    frac = (pos - lo.to(torch.float64)).clamp(0, 1)[:, None]
    cols = []
    for j in range(0, proj.shape[1], chunk):
        srt = torch.sort(ref.to(torch.float64) @ proj[:, j : j + chunk], dim=0).values
        cols.append(srt[lo] * (1 - frac) + srt[hi] * frac)
    return torch.cat(cols, dim=1)


def sliced_w2(x: Tensor, ref_quantiles: Tensor, proj: Tensor) -> float:
    r"""Metric (b): SW₂ = sqrt(mean_θ W₂²(θᵀx, θᵀp)), the 1-D W₂ of n samples being the RMS
    difference between their sorted projections and the reference quantiles at (i + ½)/n
    (``ref_quantiles [n, L]`` from :func:`reference_quantiles`)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    if x.shape[0] != ref_quantiles.shape[0]:
        raise ValueError(f"sliced_w2 needs {ref_quantiles.shape[0]} samples (the reference size), got {x.shape[0]}")
    xs = torch.sort(x @ proj, dim=0).values
    return float(((xs - ref_quantiles) ** 2).mean().sqrt())


def excess_cross_entropy(x: Tensor, ev: MixtureEvaluator, entropy: float) -> float:
    """Metric (c): mean(−log p_0(x)) − H(p_0), nats (can be negative: see module doc)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    return float(-ev.log_prob(x).mean()) - entropy


def entropy_mc(ev: MixtureEvaluator, n: int = 200_000, seed: int = 12345, chunk: int = 20_000) -> Tuple[float, float]:
    """H(p_0) = E[−log p_0] by Monte Carlo: (estimate, standard error)."""
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for start in range(0, n, chunk):
        x = ev.mixture.sample(min(chunk, n - start), generator=gen)
        vals.append(-ev.log_prob(x))
    v = torch.cat(vals)
    return float(v.mean()), float(v.std() / math.sqrt(n))


METRICS = ("mkl", "sw2", "xent")
METRIC_LABELS = {
    "mkl": "(a) moment KL [nats]",
    "sw2": "(b) sliced W2",
    "xent": "(c) excess cross-entropy [nats]",
}


@dataclass
class Truth:
    """Everything needed to score samples of one problem at one sample size ``n``.

    Attributes:
        floor: metric → (mean, std) over ``repeats`` fresh true sample sets of size n.
    """

    problem: Problem
    n: int
    evaluator: MixtureEvaluator
    proj: Tensor
    ref_quantiles: Tensor
    entropy: float
    entropy_se: float
    floor: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, problem: Problem, n: int, repeats: int = 10, seed: int = 1000, entropy_n: int = 100_000, ref_factor: int = 20
    ) -> "Truth":
        """Reference quantiles from ``ref_factor·n`` true samples, H(p_0) from ``entropy_n`` samples,
        floors from ``repeats`` further true sets of size n (all seeds fixed)."""
        ev = MixtureEvaluator(problem.mixture)
        proj = projections(problem.mixture.dim, seed=seed)
        ref = problem.mixture.sample(ref_factor * n, generator=torch.Generator().manual_seed(seed + 1))
        quant = reference_quantiles(ref, proj, n)
        del ref
        h, h_se = entropy_mc(ev, n=entropy_n, seed=seed + 2)
        truth = cls(problem, n, ev, proj, quant, h, h_se)
        runs: Dict[str, List[float]] = {k: [] for k in METRICS}
        for r in range(repeats):
            x = problem.mixture.sample(n, generator=torch.Generator().manual_seed(seed + 10 + r))
            for k, v in truth.evaluate(x).items():
                runs[k].append(v)
        truth.floor = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in runs.items()}
        return truth

    def evaluate(self, x: Tensor) -> Dict[str, float]:
        """All three metrics of samples ``x [n, D]``."""
        x = x.detach().to("cpu", torch.float64)
        return {
            "mkl": moment_kl(x, self.evaluator),
            "sw2": sliced_w2(x, self.ref_quantiles, self.proj),
            "xent": excess_cross_entropy(x, self.evaluator, self.entropy),
        }


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
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq)"
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
    "Problem",
    "make_problems",
    "grid_mixture",
    "SDE_NAMES",
    "make_sde",
    "MixtureEvaluator",
    "check_evaluator",
    "marginal_sample",
    "gaussian_kl",
    "moment_kl",
    "projections",
    "reference_quantiles",
    "sliced_w2",
    "excess_cross_entropy",
    "entropy_mc",
    "METRICS",
    "METRIC_LABELS",
    "Truth",
    "best_time",
    "load_kdiffusion_sampling",
    "EDMDenoiser",
    "sigma_tilde_range",
    "fmt",
    "md_table",
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
