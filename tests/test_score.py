"""Parameterisations (ε, score, x̂0, v) and the network wrapper, against the kernel and Tweedie.

Truths: the defining relations x_t = m x0 + σ ε and v = m ε − σ x0, the kernel score −ε/σ, and the
analytic Gaussian posterior mean E[x0 | x_t] = μ + mΣ(m²Σ + σ²I)⁻¹(x_t − mμ).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sde_diffusion.score import (
    PREDICTIONS,
    CountingScore,
    ScoreModel,
    counting,
    eps_from_x0,
    eps_to_score,
    prediction_to_score,
    score_from_x0,
    score_to_eps,
    target_for,
    v_from_eps_x0,
    x0_eps_from_v,
    x0_from_eps,
    x0_from_score,
)
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture

F64 = torch.float64
pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]


def _setup(gen: torch.Generator, per_sample: bool):
    """Image-shaped x0 and noise [B, C, H, W]; (m, σ) per sample [B] or Python floats."""
    B = 6
    x0 = torch.randn(B, 2, 3, 3, generator=gen, dtype=F64)
    eps = torch.randn(B, 2, 3, 3, generator=gen, dtype=F64)
    if per_sample:
        # VE-like (m = 1, σ up to 30) and VP-like pairs: m² + σ² ≠ 1 in general.
        m = torch.tensor([1.0, 1.0, 0.9, 0.3, 0.05, 0.7], dtype=F64)
        s = torch.tensor([0.01, 30.0, 0.4359, 0.95, 0.9987, 2.0], dtype=F64)
        xt = m[:, None, None, None] * x0 + s[:, None, None, None] * eps
    else:
        m, s = 0.8, 0.6
        xt = m * x0 + s * eps
    return x0, eps, xt, m, s


@pytest.mark.parametrize("per_sample", [True, False])
def test_conversions_are_mutually_inverse(per_sample: bool, gen) -> None:
    x0, eps, xt, m, s = _setup(gen, per_sample)
    sb = s[:, None, None, None] if per_sample else s
    kernel_score = -eps / sb  # ∇ log N(xt; m x0, σ²I)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    close(eps_to_score(eps, s), kernel_score)
    close(score_to_eps(kernel_score, s), eps)
    close(x0_from_eps(xt, eps, m, s), x0)
    close(eps_from_x0(xt, x0, m, s), eps)
    close(x0_from_score(xt, kernel_score, m, s), x0)
    close(score_from_x0(xt, x0, m, s), kernel_score)
    v = v_from_eps_x0(eps, x0, m, s)
    mb = m[:, None, None, None] if per_sample else m
    close(v, mb * eps - sb * x0)
    x0_back, eps_back = x0_eps_from_v(xt, v, m, s)
    close(x0_back, x0)
    close(eps_back, eps)
    # round trips through every representation
    close(score_to_eps(eps_to_score(eps, s), s), eps)
    close(x0_from_eps(xt, eps_from_x0(xt, x0, m, s), m, s), x0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_each_target_converts_to_the_kernel_score(prediction: str, per_sample: bool, gen) -> None:
    """A network that outputs its regression target exactly gives the kernel score −ε/σ."""
    x0, eps, xt, m, s = _setup(gen, per_sample)
    sb = s[:, None, None, None] if per_sample else s
    target = target_for(prediction, x0, eps, m, s)
    score = prediction_to_score(target, xt, m, s, prediction)
    torch.testing.assert_close(score, -eps / sb, rtol=1e-9, atol=1e-10)


def test_unknown_prediction_raises() -> None:
    x = torch.zeros(2, 3)
    for call in (
        lambda: prediction_to_score(x, x, 1.0, 1.0, "noise"),
        lambda: target_for("noise", x, x, 1.0, 1.0),
        lambda: ScoreModel(nn.Identity(), VPSDE(), prediction="noise"),
    ):
        with pytest.raises(ValueError, match="unknown prediction 'noise'; choose one of: eps, score, x0, v"):
            call()


class _ToyNet(nn.Module):
    """net(x, t, y) = w·x·(1 + t) + y (y broadcast per sample), with one learnable weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, x, t, y=None):
        out = self.w * x * (1 + t[:, None])
        if y is not None:
            out = out + y[:, None].to(x.dtype)
        return out


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0), SubVPSDE()], ids=["vp", "ve", "subvp"])
def test_score_model_eps_is_minus_net_over_sigma(sde, gen) -> None:
    net = _ToyNet()
    model = ScoreModel(net, sde)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    t = torch.tensor([0.01, 0.2, 0.6, 1.0], dtype=F64)
    with torch.no_grad():
        out = model(x, t)
        ref = -net(x, t) / sde.marginal_std(t)[:, None]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        # a scalar t is broadcast over the batch
        torch.testing.assert_close(model(x, 0.3), model(x, torch.full((4,), 0.3, dtype=F64)))
        # conditioning given at construction and overridden per call reaches the network
        y = torch.tensor([1, 2, 3, 4])
        cond = ScoreModel(net, sde, y=y)
        torch.testing.assert_close(cond(x, t), -net(x, t, y=y) / sde.marginal_std(t)[:, None])
        torch.testing.assert_close(cond(x, t, y=2 * y), -net(x, t, y=2 * y) / sde.marginal_std(t)[:, None])
    # the network's parameters belong to the module (so optimisers and EMA see them)
    assert any(p is net.w for p in model.parameters())


def test_score_model_x0_and_v_predictions(gen) -> None:
    sde = VPSDE()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    net = _ToyNet()
    m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
    with torch.no_grad():
        pred = net(x, t)
        torch.testing.assert_close(ScoreModel(net, sde, "x0")(x, t), -(x - m * pred) / s**2)
        torch.testing.assert_close(ScoreModel(net, sde, "score")(x, t), pred)
        eps_v = (s * x + m * pred) / (m**2 + s**2)
        torch.testing.assert_close(ScoreModel(net, sde, "v")(x, t), -eps_v / s)


def test_counting_score_counts_calls() -> None:
    calls = []
    fn = counting(lambda x, t: calls.append(1) or -x)
    assert isinstance(fn, CountingScore) and fn.nfe == 0
    x = torch.ones(2, 2)
    for _ in range(3):
        torch.testing.assert_close(fn(x, torch.zeros(2)), -x)
    assert fn.nfe == 3 and len(calls) == 3


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_max=10.0)], ids=["vp", "subvp", "ve"])
def test_tweedie_with_exact_score_is_posterior_mean(sde, gen) -> None:
    """For x0 ~ N(μ, Σ): x̂0 = (x_t + σ² s)/m = μ + mΣ(m²Σ + σ²I)⁻¹(x_t − mμ)."""
    mu = torch.tensor([0.7, -1.2, 0.4], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=F64))
    cov = q @ torch.diag(torch.tensor([0.1, 0.8, 2.5], dtype=F64)) @ q.T
    gm = GaussianMixture(torch.ones(1), mu[None], cov[None])
    t = torch.tensor([1e-3, 0.05, 0.3, 0.7, 1.0], dtype=F64)
    xt = 2 * torch.randn(5, 3, generator=gen, dtype=F64)
    m, s = sde.mean_coeff(t), sde.marginal_std(t)
    x0_hat = x0_from_score(xt, gm.score(xt, t, sde), m, s)
    eye = torch.eye(3, dtype=F64)
    for b in range(5):
        gain = m[b] * cov @ torch.linalg.inv(m[b] ** 2 * cov + s[b] ** 2 * eye)
        ref = mu + gain @ (xt[b] - m[b] * mu)
        torch.testing.assert_close(x0_hat[b], ref, rtol=1e-10, atol=1e-10)


def test_tweedie_for_a_mixture_is_responsibility_weighted(gen) -> None:
    """E[x0 | x_t] = Σ_k p(k | x_t) E_k[x0 | x_t] for a mixture."""
    sde = VPSDE()
    gm = GaussianMixture.random(2, k=3, seed=8)
    t = torch.tensor([0.05, 0.4, 0.8], dtype=F64)
    xt = torch.randn(3, 2, generator=gen, dtype=F64)
    m, s = sde.mean_coeff(t), sde.marginal_std(t)
    x0_hat = x0_from_score(xt, gm.score(xt, t, sde), m, s)
    r = gm.posterior_t(xt, t, sde)
    eye = torch.eye(2, dtype=F64)
    for b in range(3):
        ref = torch.zeros(2, dtype=F64)
        for k in range(3):
            S, mu = gm.covs[k], gm.means[k]
            ref += r[b, k] * (mu + m[b] * S @ torch.linalg.solve(m[b] ** 2 * S + s[b] ** 2 * eye, xt[b] - m[b] * mu))
        torch.testing.assert_close(x0_hat[b], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    x = torch.ones(2, 3, dtype=dtype)
    m = torch.tensor([0.9, 0.5], dtype=dtype)
    s = torch.tensor([0.3, 0.8], dtype=dtype)
    outs = [
        eps_to_score(x, s),
        score_to_eps(x, s),
        x0_from_eps(x, x, m, s),
        eps_from_x0(x, x, m, s),
        x0_from_score(x, x, m, s),
        score_from_x0(x, x, m, s),
        v_from_eps_x0(x, x, m, s),
        *x0_eps_from_v(x, x, m, s),
        *(prediction_to_score(x, x, m, s, p) for p in PREDICTIONS),
        *(target_for(p, x, x, m, s) for p in PREDICTIONS),
        ScoreModel(lambda xx, tt: xx * tt[:, None], VPSDE())(x, torch.tensor([0.2, 0.7], dtype=dtype)),
    ]
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]


def test_data_range_clip_clamps_the_denoiser_and_nothing_else() -> None:
    from sde_diffusion.score import DataRangeClip, x0_from_score
    from sde_diffusion.sdes import VPSDE

    sde = VPSDE()
    t = torch.full((6,), 0.3, dtype=torch.float64)
    m, s = sde.mean_coeff(t), sde.marginal_std(t)
    x0_true = torch.tensor([[-3.0], [-1.0], [-0.2], [0.4], [1.0], [2.5]], dtype=torch.float64)
    x = m[:, None] * 0.5 + torch.zeros(6, 1, dtype=torch.float64)

    def score(x_, t_):  # a score whose denoiser returns x0_true exactly
        return (m[:, None] * x0_true - x_) / s[:, None] ** 2

    clipped = DataRangeClip(score, sde, -1.0, 1.0)(x, t)
    x0 = x0_from_score(x, clipped, m, s)
    torch.testing.assert_close(x0, x0_true.clamp(-1, 1), rtol=0, atol=1e-12)
    inside = (x0_true.abs() <= 1).squeeze(1)
    assert torch.equal(clipped[inside], score(x, t)[inside])  # untouched inside the range
    with pytest.raises(ValueError, match="lo < hi"):
        DataRangeClip(score, sde, 1.0, 1.0)
