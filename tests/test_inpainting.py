"""Inpainting / imputation against the analytic conditional of Gaussian data."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, GaussianMixture, sample
from sde_diffusion.inpainting import ReplacementInpainting, TweedieConditionalScore, colour_transform

N = 4000


def gaussian_3d() -> GaussianMixture:
    cov = torch.tensor([[1.0, 0.7, 0.3], [0.7, 1.2, -0.4], [0.3, -0.4, 0.8]], dtype=torch.float64)
    return GaussianMixture([1.0], [[0.5, -1.0, 0.2]], cov[None])


def analytic_conditional(gm: GaussianMixture, obs: torch.Tensor, mask: torch.Tensor):
    """Mean and covariance of the unknown coordinates given the known ones (Schur complement)."""
    mu, S = gm.means[0], gm.covs[0]
    o, u = mask.bool(), ~mask.bool()
    Soo, Suo, Suu = S[o][:, o], S[u][:, o], S[u][:, u]
    mean = mu[u] + Suo @ torch.linalg.solve(Soo, obs[o] - mu[o])
    cov = Suu - Suo @ torch.linalg.solve(Soo, Suo.T)
    return mean, cov


def check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, slack: float = 0.02) -> None:
    n = x.shape[0]
    var = torch.diagonal(cov)
    assert torch.all((x.mean(0) - mean).abs() < 5 * torch.sqrt(var / n) + slack), (x.mean(0), mean)
    assert torch.all((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1)) + slack), (x.var(0), var)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=6.0)], ids=["vp", "ve"])
def test_tweedie_conditioning_samples_the_exact_conditional(sde):
    gm = gaussian_3d()
    obs = torch.tensor([1.5, 0.0, -0.3], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    cond = TweedieConditionalScore(sde, gm.score_fn(sde), obs, mask)
    g = torch.Generator().manual_seed(0)
    out = sample(sde, cond, (N, 3), "euler_maruyama", steps=500, generator=g, eps=1e-4, dtype=torch.float64)
    x = cond.project(out.samples)
    assert torch.equal(x[:, mask.bool()], obs[mask.bool()].expand(N, 2))
    # before projection the observed coordinates were already pinned to y within a small tolerance
    assert (out.samples[:, mask.bool()] - obs[mask.bool()]).abs().max() < 0.05
    mean, cov = analytic_conditional(gm, obs, mask)
    check_moments(x[:, ~mask.bool()], mean, cov)


def test_tweedie_conditioning_through_the_probability_flow_ode():
    """The conditional score plugged into a deterministic sampler gives the same conditional."""
    from sde_diffusion.samplers import SAMPLERS

    ode = next((n for n in ("ode_rk4", "ode_heun", "dpm_solver", "ddim") if n in SAMPLERS), None)
    if ode is None:
        pytest.skip("no deterministic sampler registered")
    sde = VPSDE()
    gm = gaussian_3d()
    obs = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    cond = TweedieConditionalScore(sde, gm.score_fn(sde), obs, mask)
    g = torch.Generator().manual_seed(1)
    out = sample(sde, cond, (N, 3), ode, steps=100, generator=g, eps=1e-4, dtype=torch.float64)
    x = cond.project(out.samples)
    mean, cov = analytic_conditional(gm, obs, mask)
    check_moments(x[:, ~mask.bool()], mean, cov, slack=0.03)


@pytest.mark.parametrize("fixed_noise", [False, True])
def test_replacement_reproduces_known_coordinates_and_independent_unknowns(fixed_noise):
    # Block-independent Gaussian: the conditional of the unknown block is its marginal, which the
    # replacement method reproduces exactly (its bias only appears through correlations).
    sde = VPSDE()
    cov = torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.8, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)
    gm = GaussianMixture([1.0], [[1.0, -1.0, 2.0]], cov[None])
    obs = torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64)
    mask = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    hook = ReplacementInpainting(sde, obs, mask, generator=g, fixed_noise=fixed_noise)
    x_T = hook.start(sde.prior_sample((N, 3), generator=g, dtype=torch.float64))
    out = sample(
        sde, gm.score_fn(sde), (N, 3), "euler_maruyama", steps=400, generator=g, x_T=x_T, hook=hook,
        eps=1e-3, denoise=True, dtype=torch.float64,
    )
    x = out.samples
    assert torch.equal(x[:, 2], torch.full((N,), 2.5, dtype=torch.float64))
    check_moments(x[:, :2], gm.means[0, :2], cov[:2, :2])


def test_colourisation_transform_is_orthonormal_with_grey_first_row():
    w = colour_transform(dtype=torch.float64)
    torch.testing.assert_close(w @ w.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(w[0], torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64))


def test_colourisation_keeps_the_grey_channel():
    sde = VESDE(sigma_min=0.01, sigma_max=3.0)
    w = colour_transform(dtype=torch.float64)
    B, H = 64, 4
    grey = torch.rand(B, 1, H, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    observed = torch.cat([grey, torch.zeros(B, 2, H, H, dtype=torch.float64)], 1)  # in W-basis
    mask = torch.zeros(3, H, H, dtype=torch.float64)
    mask[0] = 1
    hook = ReplacementInpainting(sde, observed, mask, transform=w, generator=torch.Generator().manual_seed(4))
    score = lambda x, t: -x / (1 + sde.marginal_std(t)[:, None, None, None] ** 2)  # noqa: E731
    out = sample(sde, score, (B, 3, H, H), "euler_maruyama", steps=50, hook=hook, denoise=True,
                 eps=1e-3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grey_out = torch.einsum("c,bchw->bhw", w[0], out.samples)
    torch.testing.assert_close(grey_out, grey[:, 0], rtol=1e-10, atol=1e-10)


def test_inpainting_bad_mask():
    sde = VPSDE()
    gm = gaussian_3d()
    obs = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mask shape"):
        ReplacementInpainting(sde, obs, torch.ones(2))
    with pytest.raises(ValueError, match="0 .*1"):
        TweedieConditionalScore(sde, gm.score_fn(sde), obs, torch.tensor([0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match="observes nothing"):
        TweedieConditionalScore(sde, gm.score_fn(sde), obs, torch.zeros(3))
    with pytest.raises(ValueError, match="orthogonal"):
        ReplacementInpainting(sde, torch.zeros(3, 2, 2), torch.ones(3, 2, 2), transform=torch.ones(3, 3))
