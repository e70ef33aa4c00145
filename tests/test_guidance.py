"""Guidance wrappers against exact conditional scores of a labelled Gaussian mixture."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, GaussianMixture, sample
from sde_diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance

N = 4000


def mixture() -> GaussianMixture:
    # Three labelled classes = the three components.
    return GaussianMixture(
        [0.5, 0.3, 0.2],
        [[-3.0, 0.0], [2.0, 2.0], [2.0, -2.5]],
        [[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]], [[0.4, 0.0], [0.0, 0.2]]],
    )


def conditional_score(gm: GaussianMixture, sde):
    """Exact s(x, t, y) = score of component y; y == K means unconditional (null label)."""
    comps = [gm.component(k) for k in range(gm.num_components)]

    def fn(x, t, y):
        out = gm.score(x, t, sde)
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        for k, comp in enumerate(comps):
            sel = y == k
            if sel.any():
                out[sel] = comp.score(x[sel], t[sel], sde)
        return out

    return fn


def moments_ok(x: torch.Tensor, comp: GaussianMixture) -> None:
    x = x.double()
    n = x.shape[0]
    mu, cov = comp.means[0], comp.covs[0]
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert torch.all((x.mean(0) - mu).abs() < 5 * se_mean + 0.02), (x.mean(0), mu)
    # var of a sample variance ≈ 2σ⁴/(n−1)
    se_var = torch.diagonal(cov) * math.sqrt(2 / (n - 1))
    assert torch.all((x.var(0) - torch.diagonal(cov)).abs() < 5 * se_var + 0.02), (x.var(0), cov)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=8.0)], ids=["vp", "ve"])
def test_classifier_free_guidance_w0_samples_the_conditional(sde):
    gm = mixture()
    cfg = ClassifierFreeGuidance(conditional_score(gm, sde), y=1, scale=0.0, null_label=3)
    g = torch.Generator().manual_seed(0)
    out = sample(sde, cfg, (N, 2), "euler_maruyama", steps=400, generator=g, eps=1e-3, dtype=torch.float64)
    moments_ok(out.samples, gm.component(1))


def test_classifier_free_guidance_formula_and_one_batched_call():
    gm = mixture()
    sde = VPSDE()
    base = conditional_score(gm, sde)
    calls = []

    def counted(x, t, y):
        calls.append(x.shape[0])
        return base(x, t, y)

    x = gm.sample(16, generator=torch.Generator().manual_seed(1))
    t = torch.full((16,), 0.3, dtype=torch.float64)
    w = 2.5
    y = torch.tensor([0, 1, 2, 0] * 4)
    got = ClassifierFreeGuidance(counted, y=y, scale=w, null_label=3)(x, t)
    assert calls == [32]  # one call on the concatenated batch
    expect = (1 + w) * base(x, t, y) - w * gm.score(x, t, sde)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=8.0)], ids=["vp", "ve"])
def test_classifier_guidance_with_exact_posterior_w1_samples_the_conditional(sde):
    gm = mixture()
    # log p_t(y | x) up to a constant: its log-softmax is the exact posterior.
    classifier = lambda x, t: torch.log(gm.posterior_t(x, t, sde))  # noqa: E731
    guided = ClassifierGuidance(gm.score_fn(sde), classifier, y=2, scale=1.0)
    g = torch.Generator().manual_seed(2)
    out = sample(sde, guided, (N, 2), "euler_maruyama", steps=400, generator=g, eps=1e-3, dtype=torch.float64)
    moments_ok(out.samples, gm.component(2))


def test_classifier_guidance_gradient_matches_component_score():
    gm = mixture()
    sde = VPSDE()
    classifier = lambda x, t: torch.log(gm.posterior_t(x, t, sde))  # noqa: E731
    guided = ClassifierGuidance(gm.score_fn(sde), classifier, y=0, scale=1.0)
    x = gm.sample(32, generator=torch.Generator().manual_seed(3))
    t = torch.full((32,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(guided(x, t), gm.component(0).score(x, t, sde), rtol=1e-8, atol=1e-8)


def test_guidance_rejects_bad_input():
    gm = mixture()
    sde = VPSDE()
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(conditional_score(gm, sde), y=0, scale=-1.0, null_label=3)
    with pytest.raises(ValueError, match="scale"):
        ClassifierGuidance(gm.score_fn(sde), lambda x, t: x, y=0, scale=-0.5)
    cfg = ClassifierFreeGuidance(conditional_score(gm, sde), y=torch.tensor([0, 1]), scale=1.0, null_label=3)
    with pytest.raises(ValueError, match="labels"):
        cfg(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64))
