"""GaussianMixture: exact perturbed densities and scores against independent computations.

Truths: autograd of the log-density, torch.distributions' MultivariateNormal mixture with
covariance m²Σ_k + σ²I, a direct per-component computation with the full covariance matrices,
the moment formulas of a mixture, and Monte-Carlo with standard errors.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from sde_diffusion import testing
from sde_diffusion.sdes import CosineVPSDE, LinearSDE, SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture

F64 = torch.float64
pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]


class _OUSDE(LinearSDE):
    """Ornstein–Uhlenbeck with a time-varying rate, defined only by f and g."""

    def f(self, t):
        return -(1.0 + torch.sin(4 * t))

    def g(self, t):
        return torch.sqrt(2.0 * (1.0 + torch.sin(4 * t)))


SDE_BUILDERS = {
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=10.0),
    "cosine_vp": CosineVPSDE,
    "linear": _OUSDE,
}


def _times(sde, B: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample times covering [eps, T], including both ends and a small time."""
    t = sde.eps + (sde.T - sde.eps) * torch.rand(B, generator=gen, dtype=F64)
    t[0], t[1], t[2] = sde.eps, 1e-3, sde.T
    return t


def _points(gm: GaussianMixture, sde, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Points drawn near p_t, plus one far from every mode (tests the logsumexp)."""
    x0 = gm.sample(t.shape[0], generator=gen)
    x = sde.perturb(x0, t, torch.randn(x0.shape, generator=gen, dtype=F64))
    x[3] = 40.0
    return x


def _reference_mixture(gm: GaussianMixture, m: torch.Tensor, s: torch.Tensor) -> MixtureSameFamily:
    """The mixture at per-sample (m, σ) built directly by torch.distributions: batch [B]."""
    D = gm.dim
    loc = m[:, None, None] * gm.means[None]  # [B, K, D]
    cov = m[:, None, None, None] ** 2 * gm.covs[None] + s[:, None, None, None] ** 2 * torch.eye(D, dtype=F64)
    comps = MultivariateNormal(loc, covariance_matrix=cov)
    return MixtureSameFamily(Categorical(probs=gm.weights.expand(m.shape[0], -1)), comps)


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("name", list(SDE_BUILDERS))
def test_score_is_gradient_of_log_prob_t(name: str, dim: int, make_gen) -> None:
    sde = SDE_BUILDERS[name]()
    gen = make_gen(dim)
    gm = GaussianMixture.random(dim, k=3, seed=dim, std_range=(0.2, 1.5))
    t = _times(sde, 64, gen)
    x = _points(gm, sde, t, gen).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob_t(x, t, sde).sum(), x)
    score = gm.score(x.detach(), t, sde)
    assert score.shape == x.shape and torch.isfinite(score).all()
    torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("name", list(SDE_BUILDERS))
def test_log_prob_t_matches_torch_distributions(name: str, dim: int, make_gen) -> None:
    sde = SDE_BUILDERS[name]()
    gen = make_gen(10 + dim)
    gm = GaussianMixture.random(dim, k=3, seed=dim)
    t = _times(sde, 32, gen)
    x = _points(gm, sde, t, gen)
    ref = _reference_mixture(gm, sde.mean_coeff(t), sde.marginal_std(t))
    torch.testing.assert_close(gm.log_prob_t(x, t, sde), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    # scalar t means the same time for every sample
    t0 = torch.full((32,), 0.3, dtype=F64)
    torch.testing.assert_close(gm.log_prob_t(x, 0.3, sde), gm.log_prob_t(x, t0, sde))


@pytest.mark.parametrize("dim", [2, 5])
def test_posterior_t_matches_bayes_rule(dim: int, make_gen) -> None:
    sde = VPSDE()
    gen = make_gen(3)
    gm = GaussianMixture.random(dim, k=4, seed=1)
    t = _times(sde, 16, gen)
    x = _points(gm, sde, t, gen)
    m, s = sde.mean_coeff(t), sde.marginal_std(t)
    ref = _reference_mixture(gm, m, s)
    x_k = x[:, None, :].expand(-1, gm.num_components, -1)
    log_joint = torch.log(gm.weights) + ref.component_distribution.log_prob(x_k)  # [B, K]
    post = gm.posterior_t(x, t, sde)
    torch.testing.assert_close(post, torch.softmax(log_joint, 1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(post.sum(1), torch.ones(16, dtype=F64))


def _direct_score_and_log_prob(gm: GaussianMixture, x: torch.Tensor, m: torch.Tensor, s: torch.Tensor):
    """Component by component with the full covariance C_k = m²Σ_k + σ²I (no eigenbasis, no
    batched products): log N_k from a Cholesky factor, the score −Σ_k p(k|x) C_k⁻¹(x − mμ_k).
    Returns (score [B, D], log p_t [B], p(k | x) [B, K])."""
    D, K = gm.dim, gm.num_components
    logn, comp = [], []
    for k in range(K):
        C = m[:, None, None] ** 2 * gm.covs[k] + s[:, None, None] ** 2 * torch.eye(D, dtype=F64)  # [B, D, D]
        L = torch.linalg.cholesky(C)
        d = x - m[:, None] * gm.means[k]
        z = torch.cholesky_solve(d[:, :, None], L)[:, :, 0]  # C⁻¹ d
        half_logdet = torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
        logn.append(-0.5 * (d * z).sum(1) - half_logdet - 0.5 * D * math.log(2 * math.pi))
        comp.append(-z)
    logits = torch.log(gm.weights) + torch.stack(logn, 1)  # [B, K]
    r = torch.softmax(logits, 1)
    return (r[:, :, None] * torch.stack(comp, 1)).sum(1), torch.logsumexp(logits, 1), r


@pytest.mark.parametrize("dim,k", [(2, 3), (4, 5), (9, 2)])
@pytest.mark.parametrize("name", list(SDE_BUILDERS))
def test_score_and_log_prob_match_a_direct_per_component_computation(name: str, dim: int, k: int, make_gen) -> None:
    """The eigenbasis evaluation (all rotations in one matrix product) against the textbook formula,
    to 1e-10 in float64, for per-sample times, one shared time and a scalar time."""
    sde = SDE_BUILDERS[name]()
    gen = make_gen(100 + dim)
    gm = GaussianMixture.random(dim, k=k, seed=dim + k, std_range=(0.1, 2.0))
    t = _times(sde, 40, gen)
    x = _points(gm, sde, t, gen)
    for tt in (t, torch.full((40,), 0.37, dtype=F64), 0.37):
        tv = torch.as_tensor(tt, dtype=F64).expand(40)
        ref_score, ref_lp, ref_post = _direct_score_and_log_prob(gm, x, sde.mean_coeff(tv), sde.marginal_std(tv))
        torch.testing.assert_close(gm.score(x, tt, sde), ref_score, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gm.log_prob_t(x, tt, sde), ref_lp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gm.posterior_t(x, tt, sde), ref_post, rtol=1e-10, atol=1e-12)


def test_one_shared_time_and_per_sample_times_agree(make_gen) -> None:
    """A batch whose times are all equal takes the shared-time path; one differing entry takes the
    per-sample path; both give the same values (to rounding)."""
    sde = VPSDE()
    gm = GaussianMixture.random(6, k=4, seed=3)
    x = _points(gm, sde, torch.full((32,), 0.5, dtype=F64), make_gen(2))
    t = torch.full((32,), 0.5, dtype=F64)
    t_mixed = t.clone()
    t_mixed[-1] = 0.25
    shared, mixed = gm.score(x, t, sde), gm.score(x, t_mixed, sde)
    torch.testing.assert_close(mixed[:-1], shared[:-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[-1:], gm.score(x[-1:], 0.25, sde), rtol=1e-12, atol=1e-12)


def test_float32_arithmetic_is_close_to_float64(make_gen) -> None:
    """compute_dtype=None runs in x's own dtype: float32 results within float32 rounding."""
    sde = VPSDE()
    gm = GaussianMixture.random(8, k=5, seed=11)
    gen = make_gen(4)
    t = _times(sde, 64, gen)
    x = _points(gm, sde, t, gen)[4:]
    t = t[4:]
    x32, t32 = x.float(), t.float()
    fast = gm.score(x32, t32, sde, compute_dtype=None)
    exact = gm.score(x32, t32, sde)
    assert fast.dtype == exact.dtype == torch.float32
    assert float((fast - exact).norm() / exact.norm()) < 1e-4
    torch.testing.assert_close(gm.log_prob_t(x32, t32, sde, compute_dtype=None), gm.log_prob_t(x32, t32, sde), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gm.score_fn(sde, compute_dtype=None)(x32, t32), fast)


def test_score_is_differentiable(make_gen) -> None:
    """Autograd through the score (likelihoods take its divergence): ∂s/∂x is the Hessian of
    log p_t, a symmetric matrix, and the values equal those of a call without gradients."""
    sde = SubVPSDE()
    gm = GaussianMixture.random(3, k=3, seed=6)
    x = torch.randn(3, dtype=F64, generator=make_gen(5))
    t = torch.tensor([0.4], dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda v: gm.score(v[None], t, sde)[0], x)
    hess = torch.autograd.functional.hessian(lambda v: gm.log_prob_t(v[None], t, sde)[0], x)
    torch.testing.assert_close(jac, hess, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(jac, jac.T, rtol=1e-9, atol=1e-9)
    xr = x[None].clone().requires_grad_(True)
    torch.testing.assert_close(gm.score(xr, t, sde).detach(), gm.score(x[None], t, sde), rtol=0, atol=0)


def test_the_library_mixture_carries_no_benchmark_code() -> None:
    # Problem families and benchmark metrics live in sde_diffusion.testing, not on the mixture.
    assert not hasattr(GaussianMixture, "random_family") and not hasattr(GaussianMixture, "whitened_moment_kl")
    gm = testing.random_family(5)
    x = gm.sample(200, generator=torch.Generator().manual_seed(0))
    assert testing.whitened_moment_kl(gm, x) >= 0


def test_log_prob_is_the_data_density() -> None:
    gm = GaussianMixture.random(3, k=3, seed=5)
    x = gm.sample(50, generator=torch.Generator().manual_seed(0))
    one, zero = torch.ones(50, dtype=F64), torch.zeros(50, dtype=F64)
    torch.testing.assert_close(gm.log_prob(x), _reference_mixture(gm, one, zero).log_prob(x), rtol=1e-10, atol=1e-10)
    # The exact VE kernel has m = 1, σ(0) = 0: p_0 is the data density.
    torch.testing.assert_close(gm.log_prob_t(x, 0.0, VESDE()), gm.log_prob(x), rtol=1e-12, atol=1e-12)


def test_mean_and_covariance_formulas() -> None:
    gm = GaussianMixture.random(4, k=5, seed=2)
    w, mu, S = gm.weights, gm.means, gm.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (S + mu[:, :, None] * mu[:, None, :])).sum(0)  # E[x xᵀ]
    torch.testing.assert_close(gm.mean(), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.covariance(), second - torch.outer(mean, mean), rtol=1e-10, atol=1e-10)


def test_sample_moments_within_monte_carlo_tolerance(gen) -> None:
    gm = GaussianMixture.random(3, k=4, seed=4)
    n = 40_000
    x, labels = gm.sample(n, generator=gen, return_labels=True)
    assert x.shape == (n, 3) and labels.shape == (n,) and x.dtype == F64
    # component frequencies: binomial standard error √(w(1−w)/n)
    freq = torch.bincount(labels, minlength=gm.num_components).to(F64) / n
    w = gm.weights
    assert ((freq - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n)).all()
    mean, cov = gm.mean(), gm.covariance()
    assert ((x.mean(0) - mean).abs() <= 5 * torch.sqrt(torch.diagonal(cov) / n)).all()
    # SE of a covariance entry from the sample's own fourth moments (the mixture is not Gaussian)
    c = x - mean
    prod = c[:, :, None] * c[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    assert ((torch.cov(x.T) - cov).abs() <= 5 * se_cov).all()
    # Within one component, samples have that component's mean and covariance.
    k = int(torch.argmax(w))
    xk = x[labels == k]
    ck = gm.covs[k]
    assert ((xk.mean(0) - gm.means[k]).abs() <= 5 * torch.sqrt(torch.diagonal(ck) / xk.shape[0])).all()


def test_sample_is_reproducible_and_typed() -> None:
    gm = GaussianMixture.ring(k=6, radius=3.0, std=0.2)
    a = gm.sample(100, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    b = gm.sample(100, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_ring_and_component() -> None:
    gm = GaussianMixture.ring(k=8, radius=4.0, std=0.3)
    assert gm.num_components == 8 and gm.dim == 2
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((8,), 4.0, dtype=F64))
    torch.testing.assert_close(gm.means[2], torch.tensor([0.0, 4.0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(gm.weights, torch.full((8,), 1 / 8, dtype=F64))
    torch.testing.assert_close(gm.covs, 0.09 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    torch.testing.assert_close(gm.mean(), torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
    c = gm.component(3)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = MultivariateNormal(gm.means[3], gm.covs[3]).log_prob(x)
    torch.testing.assert_close(c.log_prob(x), ref, rtol=1e-12, atol=1e-12)


def test_diagonal_and_isotropic_covariances() -> None:
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    full = GaussianMixture([1, 3], means, torch.diag_embed(torch.tensor([[0.5, 2.0], [1.0, 1.0]])))
    diag = GaussianMixture([1, 3], means, [[0.5, 2.0], [1.0, 1.0]])
    iso = GaussianMixture([1, 3], means, [0.7, 0.7])
    torch.testing.assert_close(full.covs, diag.covs)
    torch.testing.assert_close(iso.covs, 0.7 * torch.eye(2, dtype=F64).expand(2, 2, 2))
    torch.testing.assert_close(full.weights, torch.tensor([0.25, 0.75], dtype=F64))


def test_score_fn_wraps_score(make_gen) -> None:
    sde = VPSDE()
    gm = GaussianMixture.ring()
    x = torch.randn(7, 2, dtype=F64, generator=make_gen(1))
    t = torch.linspace(0.01, 1.0, 7, dtype=F64)
    torch.testing.assert_close(gm.score_fn(sde)(x, t), gm.score(x, t, sde))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    sde = VPSDE()
    gm = GaussianMixture.ring()
    x = torch.ones(3, 2, dtype=dtype)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)
    assert gm.score(x, t, sde).dtype == dtype
    assert gm.log_prob_t(x, t, sde).dtype == dtype
    assert gm.log_prob(x).dtype == dtype
    assert gm.score_fn(sde)(x, t).dtype == dtype
    assert gm.sample(4, dtype=dtype).dtype == dtype


# --------------------------------------------------------------------------- bad input
def test_non_positive_definite_covariance_raises() -> None:
    bad = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]])  # eigenvalues 3, −1
    with pytest.raises(ValueError, match=r"component\(s\) \[1\] is not positive-definite"):
        GaussianMixture([1, 1], torch.zeros(2, 2), bad)
    with pytest.raises(ValueError, match="not positive-definite"):
        GaussianMixture([1], torch.zeros(1, 2), [[1.0, 0.0]])  # zero variance


def test_non_symmetric_covariance_raises() -> None:
    with pytest.raises(ValueError, match="covariances must be symmetric"):
        GaussianMixture([1], torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="covariances must be symmetric"):
        GaussianMixture([1], torch.zeros(1, 2), torch.tensor([[[1.0, 0.3], [0.3 + 1e-6, 1.0]]], dtype=F64))


def test_float32_covariance_with_rounding_asymmetry_is_accepted() -> None:
    """Q Λ Qᵀ computed in float32 is symmetric only to rounding; it is accepted and symmetrised."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    cov = q @ torch.diag(torch.rand(5, generator=gen) + 0.1) @ q.T
    assert not torch.equal(cov, cov.T)
    gm = GaussianMixture([1], torch.zeros(1, 5), cov[None])
    assert torch.equal(gm.covs, gm.covs.transpose(1, 2))
    torch.testing.assert_close(gm.covs[0], cov.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "weights,means,covs,match",
    [
        ([1, 1], torch.zeros(2, 2, 1), [1.0, 1.0], "means must have shape"),
        ([1, 1, 1], torch.zeros(2, 2), [1.0, 1.0], "weights has 3 entries"),
        ([1, -1], torch.zeros(2, 2), [1.0, 1.0], "non-negative"),
        ([0, 0], torch.zeros(2, 2), [1.0, 1.0], "not all zero"),
        ([1, 1], torch.zeros(2, 2), torch.ones(3, 2, 2), "covs must have shape"),
    ],
)
def test_bad_construction_raises(weights, means, covs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, covs)


def test_bad_query_raises() -> None:
    gm = GaussianMixture.ring()
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        gm.score(torch.zeros(4, 3), 0.5, sde)
    with pytest.raises(ValueError, match="batch mismatch"):
        gm.score(torch.zeros(4, 2), torch.full((3,), 0.5), sde)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            gm.log_prob_t(torch.zeros(2, 2), torch.tensor([0.5, bad]), sde)
