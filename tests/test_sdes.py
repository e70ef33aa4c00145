"""The forward processes against independent truths.

Truths used here: closed forms written out again below with numpy (not the library's code), the
kernel's defining ODEs d log m/dt = f and dσ²/dt = 2fσ² + g², quadrature of σ² = ∫ m(t)²/m(s)² g²,
Monte-Carlo simulation of the forward SDE with torchsde, and the exact moment recursions of the
integrators used on a Gaussian data set.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple

import numpy as np
import pytest
import torch
import torchsde
from scipy.integrate import quad

from sde_diffusion.ode import odeint_dopri5, odeint_fixed
from sde_diffusion.sdes import SDE, SDES, CosineVPSDE, LinearSDE, SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture

F64 = torch.float64
pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]


# --------------------------------------------------------------------------- user-defined processes
class WigglyVPSDE(LinearSDE):
    """VP-type process with a non-monotone β(t) = 2 + 1.5 sin(8t): f = −β/2, g = √β."""

    def f(self, t):
        return -0.5 * (2.0 + 1.5 * torch.sin(8 * t))

    def g(self, t):
        return torch.sqrt(2.0 + 1.5 * torch.sin(8 * t))


class SignChangingSDE(LinearSDE):
    """f changes sign and is unrelated to g: f(t) = 0.8 cos(5t) − 0.5, g(t) = 0.4 + t."""

    def f(self, t):
        return 0.8 * torch.cos(5 * t) - 0.5

    def g(self, t):
        return 0.4 + t


class ConstantBetaSDE(LinearSDE):
    """Constant β = 3: f = −3/2, g = √3 (Ornstein–Uhlenbeck)."""

    def f(self, t):
        return torch.full_like(t, -1.5)

    def g(self, t):
        return torch.full_like(t, math.sqrt(3.0))


# --------------------------------------------------------------------------- independent closed forms
class Ref(NamedTuple):
    """Reference coefficients as numpy functions of t: f, g², m and σ²."""

    f: Callable[[np.ndarray], np.ndarray]
    g2: Callable[[np.ndarray], np.ndarray]
    m: Callable[[np.ndarray], np.ndarray]
    var: Callable[[np.ndarray], np.ndarray]


def ref_vp(bmin: float = 0.1, bmax: float = 20.0) -> Ref:
    beta = lambda t: bmin + t * (bmax - bmin)
    log_ab = lambda t: -(bmin * t + 0.5 * t**2 * (bmax - bmin))
    return Ref(lambda t: -0.5 * beta(t), beta, lambda t: np.exp(0.5 * log_ab(t)), lambda t: 1 - np.exp(log_ab(t)))


def ref_subvp(bmin: float = 0.1, bmax: float = 20.0) -> Ref:
    beta = lambda t: bmin + t * (bmax - bmin)
    ab = lambda t: np.exp(-(bmin * t + 0.5 * t**2 * (bmax - bmin)))
    return Ref(lambda t: -0.5 * beta(t), lambda t: beta(t) * (1 - ab(t) ** 2), lambda t: np.sqrt(ab(t)),
               lambda t: (1 - ab(t)) ** 2)


def ref_ve(smin: float, smax: float) -> Ref:
    r = smax / smin
    return Ref(lambda t: 0 * t, lambda t: smin**2 * r ** (2 * t) * 2 * np.log(r), lambda t: 1 + 0 * t,
               lambda t: smin**2 * (r ** (2 * t) - 1))


def ref_ve_blurred(smin: float, smax: float) -> Ref:
    """VE with the reference code's σ(t) = σ_v(t) (data already blurred by σ_min at t = 0)."""
    r = smax / smin
    return ref_ve(smin, smax)._replace(var=lambda t: smin**2 * r ** (2 * t))


def ref_cosine(s: float = 0.008) -> Ref:
    phi = lambda t: (t + s) / (1 + s) * np.pi / 2
    ab = lambda t: np.cos(phi(t)) ** 2 / np.cos(phi(0.0)) ** 2
    beta = lambda t: np.pi / (1 + s) * np.tan(phi(t))
    return Ref(lambda t: -0.5 * beta(t), beta, lambda t: np.sqrt(ab(t)), lambda t: 1 - ab(t))


def ref_wiggly() -> Ref:
    B = lambda t: 2 * t + 1.5 * (1 - np.cos(8 * t)) / 8  # ∫_0^t β
    beta = lambda t: 2 + 1.5 * np.sin(8 * t)
    return Ref(lambda t: -0.5 * beta(t), beta, lambda t: np.exp(-0.5 * B(t)), lambda t: 1 - np.exp(-B(t)))


def ref_constant() -> Ref:
    return Ref(lambda t: -1.5 + 0 * t, lambda t: 3 + 0 * t, lambda t: np.exp(-1.5 * t), lambda t: 1 - np.exp(-3 * t))


def ref_sign_changing() -> Ref:
    L = lambda t: 0.8 * np.sin(5 * t) / 5 - 0.5 * t  # ∫_0^t f
    g2 = lambda s: (0.4 + s) ** 2

    def var(t):
        out = [np.exp(2 * L(tt)) * quad(lambda s: g2(s) * np.exp(-2 * L(s)), 0, tt, epsabs=0, epsrel=1e-13)[0]
               for tt in np.atleast_1d(t)]
        return np.asarray(out).reshape(np.shape(t))

    return Ref(lambda t: 0.8 * np.cos(5 * t) - 0.5, g2, lambda t: np.exp(L(t)), var)


CASES: Dict[str, tuple] = {
    "vp": (lambda: VPSDE(), ref_vp()),
    "vp_custom": (lambda: VPSDE(beta_min=0.5, beta_max=7.0), ref_vp(0.5, 7.0)),
    "subvp": (lambda: SubVPSDE(), ref_subvp()),
    "ve": (lambda: VESDE(sigma_min=0.01, sigma_max=5.0), ref_ve(0.01, 5.0)),
    "ve_blurred": (lambda: VESDE(sigma_min=0.05, sigma_max=5.0, exact_kernel=False), ref_ve_blurred(0.05, 5.0)),
    "cosine_vp": (lambda: CosineVPSDE(), ref_cosine()),
    "linear_wiggly": (lambda: WigglyVPSDE(), ref_wiggly()),
    "linear_constant": (lambda: ConstantBetaSDE(), ref_constant()),
    "linear_sign_changing": (lambda: SignChangingSDE(), ref_sign_changing()),
}


def _times(sde: SDE) -> torch.Tensor:
    return torch.tensor([1e-6, 1e-4, 0.01, 0.1, 0.37, 0.73, 0.99 * sde.T, sde.T], dtype=F64)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("name", list(CASES))
def test_coefficients_match_reference_formulas(name: str) -> None:
    build, ref = CASES[name]
    sde = build()
    t = _times(sde)
    tn = t.numpy()
    np.testing.assert_allclose(sde.drift_coeff(t).numpy(), ref.f(tn), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sde.diffusion(t).numpy() ** 2, ref.g2(tn), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sde.mean_coeff(t).numpy(), ref.m(tn), rtol=1e-7, atol=0)
    # σ itself, not only σ², so that a sign error in σ is caught.
    np.testing.assert_allclose(sde.marginal_std(t).numpy(), np.sqrt(ref.var(tn)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_solves_its_moment_odes(name: str) -> None:
    """d log m/dt = f(t) and dσ²/dt = 2 f(t) σ² + g(t)² (the ODEs that define the kernel)."""
    sde = CASES[name][0]()
    t = torch.tensor([0.01, 0.1, 0.37, 0.73, 0.95 * sde.T], dtype=F64, requires_grad=True)
    # "+ 0·t" keeps constant coefficients (VE's m = 1) in the autograd graph.
    log_m = torch.log(sde.mean_coeff(t)) + 0 * t
    var = sde.marginal_std(t) ** 2
    (dlogm,) = torch.autograd.grad(log_m.sum(), t)
    (dvar,) = torch.autograd.grad(var.sum(), t)
    with torch.no_grad():
        f, g2 = sde.drift_coeff(t), sde.diffusion(t) ** 2
        torch.testing.assert_close(dlogm, f, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dvar, 2 * f * var + g2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "vp_custom", "subvp", "ve", "cosine_vp"])
def test_linear_sde_with_same_f_g_reproduces_closed_forms(name: str) -> None:
    """A LinearSDE given only a built-in's f and g computes the same m and σ (float64, 1e-6)."""
    sde = CASES[name][0]()

    class Twin(LinearSDE):
        def f(self, t):
            return sde.f(t)

        def g(self, t):
            return sde.g(t)

    twin = Twin(T=sde.T)
    t = _times(sde)
    torch.testing.assert_close(twin.mean_coeff(t), sde.mean_coeff(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(twin.marginal_std(t), sde.marginal_std(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(twin.marginal_std(torch.zeros(1, dtype=F64)), torch.zeros(1, dtype=F64))


# --------------------------------------------------------------------------- kernel vs simulation
class _SequentialBrownian(torchsde.BaseBrownian):
    """Brownian increments for a fixed-step solver that asks for consecutive, disjoint intervals.

    Each query [ta, tb] gets a fresh N(0, (tb − ta) I) draw from a seeded generator: for disjoint
    intervals that is exactly Brownian motion (and avoids BrownianInterval's per-query reseeding).
    """

    def __init__(self, shape: tuple, dtype: torch.dtype, generator: torch.Generator) -> None:
        self._shape, self._dtype, self._gen = tuple(shape), dtype, generator

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise NotImplementedError("only increments W(tb) − W(ta) are provided")
        return torch.randn(self._shape, generator=self._gen, dtype=self._dtype) * math.sqrt(float(tb - ta))

    def __repr__(self) -> str:
        return f"_SequentialBrownian(shape={self._shape})"

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def shape(self):
        return torch.Size(self._shape)

    @property
    def levy_area_approximation(self):
        return "none"


class _TorchsdeForward(torch.nn.Module):
    """The forward process as a torchsde Itô SDE with diagonal noise, through the public API."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: SDE) -> None:
        super().__init__()
        self.sde = sde

    def f(self, t, y):
        return self.sde.drift(y, t)

    def g(self, t, y):
        return self.sde.diffusion(t).expand_as(y)


def _euler_moments(sde: SDE, x0: torch.Tensor, t_out: torch.Tensor, h: float):
    """Exact mean and variance of Euler–Maruyama with step h for dx = f x dt + g dw from x0.

    mean_{n+1} = (1 + f_n h) mean_n,  var_{n+1} = (1 + f_n h)² var_n + g_n² h.
    """
    n_out = torch.round(t_out / h).long()
    grid = torch.arange(int(n_out.max()), dtype=F64) * h
    a = 1 + sde.drift_coeff(grid) * h
    q = sde.diffusion(grid) ** 2 * h
    P = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(a, 0)])  # P_n = ∏_{j<n} a_j
    # var_N = Σ_{k<N} q_k (P_N / P_{k+1})²
    S = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(q / P[1:] ** 2, 0)])
    mean = P[n_out][:, None] * x0
    var = (P[n_out] ** 2 * S[n_out])[:, None].expand_as(mean)
    return mean, var


SIM_CASES = ["vp", "subvp", "ve", "cosine_vp", "linear_sign_changing"]


@pytest.mark.parametrize("name", SIM_CASES)
def test_kernel_matches_torchsde_simulation(name: str, make_gen) -> None:
    """Sample mean/variance of simulated paths at several t equal m(t)·x0 and σ(t)².

    Tolerance = 5 standard errors (mean: σ/√n, variance: σ²√(2/(n−1))) + the Euler–Maruyama bias,
    estimated by Richardson extrapolation of the exact Euler moment recursion:
    bias(h) ≈ k/(k−1)·|M(h) − M(h/k)| for a first-order scheme, times 1.5 to cover the O(h²) rest.
    """
    sde = CASES[name][0]()
    h, n, k = 1e-3, 10_000, 16
    x0 = torch.tensor([1.5, -2.0], dtype=F64)
    t_end = 1.0 if sde.T >= 1.0 else 0.95
    t_out = torch.tensor([0.1, 0.3, 0.6, t_end], dtype=F64)
    ts = torch.cat([torch.zeros(1, dtype=F64), t_out])
    y0 = x0.expand(n, 2).contiguous()
    bm = _SequentialBrownian((n, 2), F64, make_gen(1234))
    with torch.no_grad():
        ys = torchsde.sdeint(_TorchsdeForward(sde), y0, ts, bm=bm, method="euler", dt=h)[1:]  # [4, n, 2]
    mean_hat, var_hat = ys.mean(1), ys.var(1)

    m, s = sde.mean_coeff(t_out), sde.marginal_std(t_out)
    mean_true = m[:, None] * x0
    var_true = (s**2)[:, None].expand_as(mean_true)
    se_mean = torch.sqrt(var_true / n)
    se_var = var_true * math.sqrt(2 / (n - 1))

    mean_h, var_h = _euler_moments(sde, x0, t_out, h)
    mean_hk, var_hk = _euler_moments(sde, x0, t_out, h / k)
    bias_mean = 1.5 * k / (k - 1) * (mean_h - mean_hk).abs()
    bias_var = 1.5 * k / (k - 1) * (var_h - var_hk).abs()
    # The step is fine enough for the test to be decided mostly by the sample, not the solver.
    assert (bias_mean <= 3 * se_mean).all() and (bias_var <= 3 * se_var).all()

    err_mean, err_var = (mean_hat - mean_true).abs(), (var_hat - var_true).abs()
    assert (err_mean <= 5 * se_mean + bias_mean).all(), f"mean error {err_mean} vs SE {se_mean}"
    assert (err_var <= 5 * se_var + bias_var).all(), f"variance error {err_var} vs SE {se_var}"


# --------------------------------------------------------------------------- VP's discrete form
def test_vp_discrete_betas_formula() -> None:
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    N = 50
    betas = sde.discrete_betas(N)
    i = torch.arange(1, N + 1, dtype=F64)
    assert betas.shape == (N,) and betas.dtype == F64
    torch.testing.assert_close(betas, (0.1 + i / N * 19.9) / N, rtol=1e-14, atol=0)


# β_max·T/N must stay below 1 at N = 10 for the discrete chain to make sense.
@pytest.mark.parametrize("beta_max,T", [(5.0, 1.0), (2.0, 2.0)])
def test_vp_discrete_product_converges_at_rate_one_over_n(beta_max: float, T: float) -> None:
    """∏(1 − β_i) → ᾱ(T) = exp(−∫_0^T β) with relative error ∝ 1/N."""
    sde = VPSDE(beta_min=0.1, beta_max=beta_max, T=T)
    alpha_bar_T = math.exp(-(0.1 * T + 0.5 * T**2 * (beta_max - 0.1)))
    Ns = np.array([10, 100, 1000, 10000])
    errs = np.array([abs(float(torch.prod(1 - sde.discrete_betas(int(N)))) / alpha_bar_T - 1) for N in Ns])
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope + 1) < 0.1, f"slope {slope}, errors {errs}"
    assert errs[-1] < 1e-2


# --------------------------------------------------------------------------- end points, any rounding
def _end_times(sde: SDE, dtype: torch.dtype) -> torch.Tensor:
    """t = 0, the smallest positive numbers of the dtype, eps, sampling_eps and T (where rounding bites)."""
    tiny = torch.finfo(dtype).tiny
    vals = [0.0, tiny, 1e3 * tiny, sde.eps, sde.sampling_eps, 0.5 * sde.T, sde.T]
    return torch.tensor(vals, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_quantities_finite_and_in_domain_at_end_points(name: str, dtype: torch.dtype) -> None:
    """m ∈ (0, ∞), σ ≥ 0, σ(0) = 0 for exact kernels, f and g finite, log-SNR finite for t > 0.

    Each one must hold by construction (not by the luck of one rounding): e.g. ᾱ(0) computed as
    a difference of two logs is one ulp above 1 on some CPUs, and σ(0) = √(1 − ᾱ) is NaN there.
    """
    build, ref = CASES[name]
    sde = build()
    t = _end_times(sde, dtype)
    m, sig = sde.mean_coeff(t), sde.marginal_std(t)
    f, g = sde.drift_coeff(t), sde.diffusion(t)
    for q in (m, sig, f, g):
        assert torch.isfinite(q).all(), (name, q)
    assert (m > 0).all() and (sig >= 0).all() and (g >= 0).all()
    assert m[0] == 1.0
    exact = not (isinstance(sde, VESDE) and not sde.exact_kernel)
    if exact:
        assert sig[0] == 0.0
    # Against the independent formulas at a tolerance no one-ulp difference can break.
    t64 = t.to(F64).numpy()
    np.testing.assert_allclose(m.to(F64).numpy(), ref.m(t64), rtol=1e-5 if dtype == torch.float32 else 1e-9)
    # (σ² against the reference's 1 − e^{…}, which itself cancels to 0 below t ≈ 1e-16: an absolute floor.)
    fin = torch.finfo(dtype).eps
    np.testing.assert_allclose(sig.to(F64).numpy() ** 2, ref.var(t64), rtol=100 * fin, atol=4 * fin * float(ref.var(t64).max()))
    pos = t > 0
    lam = sde.log_snr(t[pos])
    assert torch.isfinite(lam).all() and (lam[1:] <= lam[:-1]).all()
    # The inverse log-SNR lands in [0, T], at a time whose log-SNR is the one asked for.
    ok = t[pos] >= sde.eps
    back = sde.t_from_log_snr(lam[ok].to(F64))
    assert torch.isfinite(back).all() and (back >= 0).all() and (back <= sde.T).all()
    # (float32 rounds T itself, where dλ/dt is steep: a looser bound there.)
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(sde.log_snr(back), lam[ok].to(F64), rtol=tol, atol=tol)
    # One-step kernels out of and into the end points.
    a, b = sde.transition_coeffs(t[:-1], t[1:])
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and (b >= 0).all()


@pytest.mark.parametrize("name", ["vp", "subvp", "cosine_vp"])
def test_vp_family_log_alpha_bar_is_zero_at_zero_and_never_positive(name: str) -> None:
    sde = CASES[name][0]()
    for dtype in (torch.float32, F64):
        t = torch.cat([torch.zeros(1, dtype=dtype), torch.logspace(-40, 0, 200, dtype=F64).to(dtype) * sde.T])
        lab = sde.log_alpha_bar(t)
        assert lab[0] == 0.0
        assert (lab <= 0).all() and torch.isfinite(lab).all()


# --------------------------------------------------------------------------- transition kernel
ALL_CASES = list(CASES)


@pytest.mark.parametrize("name", ALL_CASES)
def test_transition_coeffs_against_marginals(name: str) -> None:
    sde = CASES[name][0]()
    T = sde.T
    s = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.2 * T], dtype=F64)
    t = torch.tensor([0.2, 0.4, 0.9 * T, 0.5, T], dtype=F64)
    a, b = sde.transition_coeffs(s, t)
    m_s, m_t = sde.mean_coeff(s), sde.mean_coeff(t)
    sig_s, sig_t = sde.marginal_std(s), sde.marginal_std(t)
    torch.testing.assert_close(a, m_t / m_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(b**2, sig_t**2 - a**2 * sig_s**2, rtol=1e-9, atol=1e-12)
    assert b[3] == 0 and a[3] == 1  # zero-length step
    if sde.marginal_std(0.0) == 0:
        torch.testing.assert_close(b[0], sig_t[0], rtol=1e-12, atol=0)  # from t = 0 the kernel is the marginal


@pytest.mark.parametrize("name", ALL_CASES)
def test_transition_coeffs_compose(name: str) -> None:
    """Kernel s→u then u→t equals s→t: a_st = a_su a_ut, b_st² = a_ut² b_su² + b_ut²."""
    sde = CASES[name][0]()
    T = sde.T
    s = torch.tensor([0.0, 0.05, 0.3, 0.6], dtype=F64)
    u = torch.tensor([0.2, 0.1, 0.5, 0.61], dtype=F64)
    t = torch.tensor([0.7, 0.8, 0.95 * T, T], dtype=F64)
    a_su, b_su = sde.transition_coeffs(s, u)
    a_ut, b_ut = sde.transition_coeffs(u, t)
    a_st, b_st = sde.transition_coeffs(s, t)
    torch.testing.assert_close(a_su * a_ut, a_st, rtol=1e-12, atol=0)
    torch.testing.assert_close(a_ut**2 * b_su**2 + b_ut**2, b_st**2, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ALL_CASES)
def test_transition_coeffs_small_step_matches_sde(name: str) -> None:
    """For dt → 0: a = 1 + f dt + O(dt²), b² = g² dt (1 + O(dt)) — the SDE itself."""
    sde = CASES[name][0]()
    t = torch.tensor([0.05, 0.4, 0.8 * sde.T], dtype=F64)
    dt = 1e-7
    a, b = sde.transition_coeffs(t - dt, t)
    f, g = sde.drift_coeff(t), sde.diffusion(t)
    torch.testing.assert_close((a - 1) / dt, f, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b**2 / dt, g**2, rtol=1e-4, atol=0)


def test_discretize_vp_huge_step_is_finite_and_exact() -> None:
    sde = VPSDE()
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    t = torch.tensor([1.0, 0.5], dtype=F64)
    beta_i = sde.beta(t) * 1.0  # one step of size dt = 1: β/N with N = 1
    assert torch.isnan(torch.sqrt(1 - beta_i)).all()  # the DDPM form has no meaning here
    f, G = sde.discretize(x, t, 1.0)
    assert torch.isfinite(f).all() and torch.isfinite(G).all()
    m, sig = sde.mean_coeff(t), sde.marginal_std(t)  # the step starts at s = max(t − 1, 0) = 0
    torch.testing.assert_close(f, (m[:, None] - 1) * x, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(G, sig, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["vp", "cosine_vp", "linear_wiggly"])
def test_discretize_variance_preserving(name: str) -> None:
    """For VP processes the step x ← a x + b z keeps unit variance: a² + b² = 1; and at t = 0 it is finite."""
    sde = CASES[name][0]()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.001, 0.5, sde.T], dtype=F64)
    f, G = sde.discretize(x, t, 0.01)
    a = 1 + f / x
    assert torch.isfinite(G).all()
    torch.testing.assert_close(a**2 + G[:, None] ** 2, torch.ones_like(a), rtol=1e-10, atol=1e-10)


def test_discretize_matches_ddpm_for_many_steps() -> None:
    """With dt = 1/N the exact step agrees with DDPM's x ← √(1 − β_i) x + √β_i z.

    The exact step has a² = e^{−I}, b² = 1 − e^{−I} with I = ∫_{t−dt}^t β = β_i − ½dt²β' (β linear);
    so |a² − (1 − β_i)| and |b² − β_i| are both ≤ ½dt²β' + ½β_i² (+ O(β_i³)).
    """
    sde = VPSDE()
    N = 1000
    dt = 1.0 / N
    betas = sde.discrete_betas(N)
    t = torch.arange(1, N + 1, dtype=F64) * dt
    x = torch.ones(N, 1, dtype=F64)
    f, G = sde.discretize(x, t, dt)
    bound = 0.5 * dt**2 * (sde.beta_max - sde.beta_min) + 0.5 * betas**2 + betas**3
    assert ((1 + f[:, 0]) ** 2 - (1 - betas)).abs().le(bound).all()
    assert (G**2 - betas).abs().le(bound).all()


# --------------------------------------------------------------------------- kernel, prior, SNR
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine_vp", "linear_sign_changing"])
def test_perturb_and_kernel_score(name: str, gen) -> None:
    build, ref = CASES[name]
    sde = build()
    x0 = torch.randn(5, 3, dtype=F64, generator=gen)
    noise = torch.randn(5, 3, dtype=F64, generator=gen)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, sde.T], dtype=F64)
    m = torch.as_tensor(ref.m(t.numpy()))[:, None]
    s = torch.as_tensor(np.sqrt(ref.var(t.numpy())))[:, None]
    xt = sde.perturb(x0, t, noise)
    torch.testing.assert_close(xt, m * x0 + s * noise, rtol=1e-6, atol=1e-9)
    # ∇ log N(xt; m x0, σ² I) = −(xt − m x0)/σ² = −noise/σ
    torch.testing.assert_close(sde.kernel_score(xt, x0, t), -noise / s, rtol=1e-6, atol=1e-9)
    # scalar t broadcasts over the batch
    torch.testing.assert_close(sde.perturb(x0, 0.5, noise), sde.perturb(x0, torch.full((5,), 0.5, dtype=F64), noise))


@pytest.mark.parametrize(
    "build,std",
    [(VPSDE, 1.0), (SubVPSDE, 1.0), (CosineVPSDE, 1.0), (lambda: VESDE(sigma_max=7.0), 7.0),
     (lambda: ConstantBetaSDE(prior_std=2.5), 2.5)],
    ids=["vp", "subvp", "cosine_vp", "ve", "linear"],
)
def test_prior(build, std: float, gen) -> None:
    sde = build()
    assert sde.prior_std == pytest.approx(std, rel=1e-12)
    z = sde.prior_sample((20_000, 2), generator=gen, dtype=F64)
    assert z.shape == (20_000, 2) and z.dtype == F64
    n = z.numel()
    assert abs(float(z.mean())) < 5 * std / math.sqrt(n)
    assert abs(float(z.var()) - std**2) < 5 * std**2 * math.sqrt(2 / (n - 1))
    zz = z[:7]
    ref = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(std, dtype=F64)).log_prob(zz).sum(1)
    torch.testing.assert_close(sde.prior_logp(zz), ref, rtol=1e-12, atol=1e-12)


def test_linear_sde_default_prior_std_is_marginal_std_at_T() -> None:
    """Default prior std = √(m(T)² + σ(T)²): the marginal std at T for unit-variance data."""
    ref = ref_sign_changing()
    assert SignChangingSDE().prior_std == pytest.approx(math.sqrt(ref.m(1.0) ** 2 + ref.var(1.0)), rel=1e-9)


@pytest.mark.parametrize("name", ALL_CASES)
def test_log_snr_and_inverse(name: str) -> None:
    build, ref = CASES[name]
    sde = build()
    t = torch.tensor([1e-3, 0.01, 0.1, 0.37, 0.73, 0.99 * sde.T], dtype=F64)
    lam = sde.log_snr(t)
    tn = t.numpy()
    np.testing.assert_allclose(lam.numpy(), np.log(ref.m(tn) ** 2 / ref.var(tn)), rtol=1e-6, atol=1e-8)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ALL_CASES)
def test_kernel_at_log_snr(name: str) -> None:
    """(t, m, σ) at a log-SNR (closed forms for VP and sub-VP, generic otherwise) match the kernel."""
    build, _ = CASES[name]
    sde = build()
    t = torch.tensor([1e-3, 0.01, 0.1, 0.37, 0.73, 0.99 * sde.T], dtype=F64)
    tt, m, s = sde.kernel_at_log_snr(sde.log_snr(t))
    assert tt.dtype == m.dtype == s.dtype == F64
    torch.testing.assert_close(tt, t, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(m, sde.mean_coeff(t), rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(s, sde.marginal_std(t), rtol=1e-7, atol=1e-12)


# --------------------------------------------------------------------------- reverse SDE / PF ODE formulas
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine_vp", "linear_sign_changing"])
def test_reverse_and_probability_flow_drifts(name: str, gen) -> None:
    """reverse drift = f x − g² s, diffusion = g; probability flow = f x − ½ g² s (Song et al. 2021)."""
    build, ref = CASES[name]
    sde = build()
    x = torch.randn(4, 2, dtype=F64, generator=gen)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9 * sde.T], dtype=F64)

    def score_fn(xx, tt):
        return -(xx - torch.tensor([1.0, -0.5], dtype=F64)) * (1 + tt[:, None])

    f = torch.as_tensor(ref.f(t.numpy()))[:, None]
    g2 = torch.as_tensor(ref.g2(t.numpy()))[:, None]
    s = score_fn(x, t)
    rev = sde.reverse(score_fn)
    torch.testing.assert_close(rev.drift(x, t), f * x - g2 * s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rev.diffusion(t) ** 2, g2[:, 0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sde.probability_flow(score_fn)(x, t), f * x - 0.5 * g2 * s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.drift(x, t), f * x, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- sampling with the exact score
_DATA_MEAN = torch.tensor([0.6, -0.4, 0.3], dtype=F64)


def _data_cov() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(3)))
    return q @ torch.diag(torch.tensor([0.25, 0.6, 1.2], dtype=F64)) @ q.T


REVERSE_CASES = {
    "vp": (lambda: VPSDE(), ref_vp(), 1.0),
    "subvp": (lambda: SubVPSDE(), ref_subvp(), 1.0),
    # σ_max ≈ 4× the largest data distance scale: the prior N(0, σ_max² I) is then close to p_T.
    "ve": (lambda: VESDE(sigma_min=0.01, sigma_max=20.0), ref_ve(0.01, 20.0), 20.0),
}


def _gaussian_score_matrix(ref: Ref, t: float, cov: torch.Tensor):
    """Exact score of N(mμ, m²Σ + σ²I) written as −A (x − m μ): returns (A, m)."""
    m = float(ref.m(np.float64(t)))
    var = float(ref.var(np.float64(t)))
    A = torch.linalg.inv(m**2 * cov + var * torch.eye(cov.shape[0], dtype=F64))
    return A, m


def _predicted_moments(ref: Ref, ts: torch.Tensor, prior_std: float, scheme: str):
    """Mean and covariance that the scheme must produce from N(0, prior_std² I) with the exact score.

    The data are Gaussian, so the score is affine and each step maps moments exactly:
    Euler–Maruyama x ← M x + c + g√h z gives mean ← M mean + c, cov ← M cov Mᵀ + g² h I;
    RK4 on the affine ODE x' = F(t) x + c(t) is an affine map, applied to mean and to I.
    These use the reference formulas only (no library code).
    """
    cov0 = _data_cov()
    D = cov0.shape[0]
    eye = torch.eye(D, dtype=F64)
    mean = torch.zeros(D, dtype=F64)
    cov = prior_std**2 * eye
    for i in range(ts.numel() - 1):
        t, tn = float(ts[i]), float(ts[i + 1])
        h = tn - t  # negative: time runs backwards
        if scheme == "em":
            A, m = _gaussian_score_matrix(ref, t, cov0)
            f, g2 = float(ref.f(np.float64(t))), float(ref.g2(np.float64(t)))
            # forward-time drift f x − g² s = f x + g² A (x − m μ); the step backwards is x + h·drift
            M = eye + h * (f * eye + g2 * A)
            c = -h * g2 * (A @ (m * _DATA_MEAN))
            mean = M @ mean + c
            cov = M @ cov @ M.T + g2 * (-h) * eye
        else:

            def rhs(y, tt, affine):
                A, m = _gaussian_score_matrix(ref, tt, cov0)
                f, g2 = float(ref.f(np.float64(tt))), float(ref.g2(np.float64(tt)))
                F = f * eye + 0.5 * g2 * A
                out = F @ y
                if affine:
                    out = out - 0.5 * g2 * (A @ (m * _DATA_MEAN))
                return out

            def rk4(y, affine):
                k1 = rhs(y, t, affine)
                k2 = rhs(y + 0.5 * h * k1, t + 0.5 * h, affine)
                k3 = rhs(y + 0.5 * h * k2, t + 0.5 * h, affine)
                k4 = rhs(y + h * k3, tn, affine)
                return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

            Phi = rk4(eye, affine=False)
            mean = rk4(mean, affine=True)
            cov = Phi @ cov @ Phi.T
    return mean, cov


def _assert_moments(x: torch.Tensor, pred_mean, pred_cov, ref: Ref, t_end: float) -> None:
    """Sample moments vs the data's p_{t_end} (MC tolerance + the scheme's computed bias) and vs the prediction."""
    n = x.shape[0]
    cov0 = _data_cov()
    m = float(ref.m(np.float64(t_end)))
    var = float(ref.var(np.float64(t_end)))
    true_mean = m * _DATA_MEAN
    true_cov = m**2 * cov0 + var * torch.eye(3, dtype=F64)
    d = torch.diagonal(true_cov)
    se_mean = torch.sqrt(d / n)
    se_cov = torch.sqrt((d[:, None] * d[None, :] + true_cov**2) / (n - 1))
    bias_mean, bias_cov = (pred_mean - true_mean).abs(), (pred_cov - true_cov).abs()
    # The test set-up keeps the scheme's bias (steps, prior mismatch) well below the tolerance.
    assert (bias_mean <= 2 * se_mean).all() and (bias_cov <= 2 * se_cov).all(), (bias_mean, bias_cov)
    mean_hat, cov_hat = x.mean(0), torch.cov(x.T)
    assert ((mean_hat - true_mean).abs() <= 5 * se_mean + bias_mean).all(), (mean_hat, true_mean)
    assert ((cov_hat - true_cov).abs() <= 5 * se_cov + bias_cov).all(), (cov_hat, true_cov)
    assert ((mean_hat - pred_mean).abs() <= 5 * se_mean).all()
    assert ((cov_hat - pred_cov).abs() <= 5 * se_cov).all()


@pytest.mark.parametrize("name", list(REVERSE_CASES))
def test_reverse_sde_with_exact_score_recovers_data(name: str, make_gen) -> None:
    build, ref, prior_std = REVERSE_CASES[name]
    sde = build()
    gm = GaussianMixture(torch.ones(1), _DATA_MEAN[None], _data_cov()[None])
    rev = sde.reverse(gm.score_fn(sde))
    n, N = 4000, 500
    gen = make_gen(7)
    ts = torch.linspace(sde.T, sde.eps, N + 1, dtype=F64)
    x = sde.prior_sample((n, 3), generator=gen, dtype=F64)
    for i in range(N):
        t, h = ts[i].expand(n), float(ts[i] - ts[i + 1])
        z = torch.randn(n, 3, generator=gen, dtype=F64)
        x = x - rev.drift(x, t) * h + rev.diffusion(t)[:, None] * math.sqrt(h) * z
    pred_mean, pred_cov = _predicted_moments(ref, ts, prior_std, "em")
    _assert_moments(x, pred_mean, pred_cov, ref, sde.eps)


@pytest.mark.parametrize("name", list(REVERSE_CASES))
def test_probability_flow_with_exact_score_recovers_data(name: str, make_gen) -> None:
    build, ref, prior_std = REVERSE_CASES[name]
    sde = build()
    gm = GaussianMixture(torch.ones(1), _DATA_MEAN[None], _data_cov()[None])
    drift = sde.probability_flow(gm.score_fn(sde))
    n, N = 4000, 50
    ts = torch.linspace(sde.T, sde.eps, N + 1, dtype=F64)
    z = sde.prior_sample((n, 3), generator=make_gen(11), dtype=F64)
    x = odeint_fixed(drift, z, ts, method="rk4").y
    pred_mean, pred_cov = _predicted_moments(ref, ts, prior_std, "rk4")
    _assert_moments(x, pred_mean, pred_cov, ref, sde.eps)
    # The adaptive solver lands on the same deterministic map.
    x5 = odeint_dopri5(drift, z[:200], sde.T, sde.eps, rtol=1e-7, atol=1e-7).y
    torch.testing.assert_close(x5, x[:200], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine_vp", "linear_constant"])
def test_bad_times_raise(name: str) -> None:
    sde = CASES[name][0]()
    x = torch.zeros(3, 2)
    for bad in (-0.1, sde.T + 0.01, float("nan")):
        tt = torch.tensor([0.5, bad, 0.2])
        for call in (
            lambda: sde.mean_coeff(tt),
            lambda: sde.marginal_std(tt),
            lambda: sde.drift_coeff(tt),
            lambda: sde.diffusion(tt),
            lambda: sde.drift(x, tt),
            lambda: sde.perturb(x, tt, x),
            lambda: sde.kernel_score(x, x, tt),
            lambda: sde.log_snr(tt),
            lambda: sde.transition_coeffs(torch.zeros(3), tt),
            lambda: sde.probability_flow(lambda a, b: a)(x, tt),
            lambda: sde.reverse(lambda a, b: a).drift(x, tt),
            lambda: sde.mean_coeff(bad),
        ):
            with pytest.raises(ValueError, match=r"t must lie in \[0, T="):
                call()
    with pytest.raises(ValueError, match="scalar or a 1-D"):
        sde.mean_coeff(torch.zeros(2, 2))


def test_batch_mismatch_raises() -> None:
    sde = VPSDE()
    x, t = torch.zeros(4, 2), torch.full((3,), 0.5)
    for call in (
        lambda: sde.drift(x, t),
        lambda: sde.perturb(x, t, x),
        lambda: sde.kernel_score(x, x, t),
        lambda: sde.discretize(x, t, 0.1),
        lambda: sde.probability_flow(lambda a, b: a)(x, t),
        lambda: sde.reverse(lambda a, b: a).drift(x, t),
    ):
        with pytest.raises(ValueError, match="batch mismatch"):
            call()
    with pytest.raises(ValueError, match="noise shape"):
        sde.perturb(x, 0.5, torch.zeros(4, 3))


def test_transition_coeffs_backwards_raises() -> None:
    with pytest.raises(ValueError, match="t_from <= t_to"):
        VPSDE().transition_coeffs(0.5, 0.2)
    with pytest.raises(ValueError, match="t_from <= t_to"):
        VPSDE().discretize(torch.zeros(2, 1), 0.5, -0.1)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_min must not exceed beta_max"),
        (lambda: VPSDE(beta_min=0.0), "beta_min must be positive"),
        (lambda: SubVPSDE(beta_min=2.0, beta_max=1.0), "beta_min must not exceed beta_max"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min must be positive"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min must be positive"),
        (lambda: VESDE(sigma_min=5.0, sigma_max=5.0), "sigma_min must be smaller than sigma_max"),
        (lambda: VESDE(sigma_min=10.0, sigma_max=5.0), "sigma_min must be smaller than sigma_max"),
        (lambda: CosineVPSDE(T=1.0), "T must be < 1"),
        (lambda: VPSDE(T=0.0), "T must be positive"),
        (lambda: VPSDE(eps=1.0), "eps must lie in"),
        (lambda: ConstantBetaSDE(prior_std=0.0), "prior_std must be positive"),
        (lambda: VPSDE().discrete_betas(0), "N must be at least 1"),
    ],
)
def test_bad_construction_raises(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_linear_sde_with_zero_diffusion_raises() -> None:
    class Degenerate(LinearSDE):
        def f(self, t):
            return torch.zeros_like(t)

        def g(self, t):
            return torch.zeros_like(t)

    with pytest.raises(ValueError, match="g\\(t\\)² must be positive"):
        Degenerate().marginal_std(0.5)


def test_registry_builds_and_lists_choices() -> None:
    assert set(SDES.names()) == {"vp", "subvp", "ve", "cosine_vp"}
    sde = SDES.build("vp", beta_min=0.2, beta_max=10.0)
    assert isinstance(sde, VPSDE) and sde.beta_max == 10.0
    assert isinstance(SDES.build("ve", sigma_max=3.0), VESDE)
    with pytest.raises(ValueError, match="unknown sde 'nope'; choose one of: cosine_vp, subvp, ve, vp"):
        SDES.build("nope")


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine_vp", "linear_sign_changing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(name: str, dtype: torch.dtype) -> None:
    sde = CASES[name][0]()
    t = torch.tensor([0.1, 0.5, 0.9 * sde.T], dtype=dtype)
    x = torch.ones(3, 2, dtype=dtype)
    score_fn = lambda xx, tt: -xx
    outs = {
        "drift_coeff": sde.drift_coeff(t),
        "diffusion": sde.diffusion(t),
        "mean_coeff": sde.mean_coeff(t),
        "marginal_std": sde.marginal_std(t),
        "drift": sde.drift(x, t),
        "perturb": sde.perturb(x, t, x),
        "kernel_score": sde.kernel_score(x, x, t),
        "prior_sample": sde.prior_sample((3, 2), dtype=dtype),
        "prior_logp": sde.prior_logp(x),
        "log_snr": sde.log_snr(t),
        "t_from_log_snr": sde.t_from_log_snr(sde.log_snr(t)),
        "reverse.drift": sde.reverse(score_fn).drift(x, t),
        "reverse.diffusion": sde.reverse(score_fn).diffusion(t),
        "probability_flow": sde.probability_flow(score_fn)(x, t),
        "transition_coeffs.a": sde.transition_coeffs(t * 0.5, t)[0],
        "transition_coeffs.b": sde.transition_coeffs(t * 0.5, t)[1],
        "discretize.f": sde.discretize(x, t, 0.01)[0],
        "discretize.G": sde.discretize(x, t, 0.01)[1],
    }
    wrong = {k: v.dtype for k, v in outs.items() if v.dtype != dtype}
    assert not wrong, wrong
    assert all(torch.isfinite(v).all() for v in outs.values())


def test_python_float_time_follows_default_dtype(float64) -> None:
    sde = VPSDE()
    assert sde.mean_coeff(0.5).dtype == float64
    assert sde.transition_coeffs(0.2, 0.5)[1].dtype == float64
    x = torch.ones(2, 2, dtype=torch.float32)
    assert sde.drift(x, 0.5).dtype == torch.float32  # a float time takes the dtype of x
