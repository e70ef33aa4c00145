"""Every registered sampler, at its defaults, on draws from the random exact-score problem family
(``GaussianMixture.random_family``): finite samples at every step count ≥ 1, on every process."""
from __future__ import annotations

import pytest
import torch

from sde_diffusion import CosineVPSDE, GaussianMixture, SubVPSDE, VESDE, VPSDE, sample
from sde_diffusion.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILY_SEEDS = (0, 1, 3)  # D = 221 (3 modes), 3 (7 modes), 2 (9 modes)


def test_family_spans_what_it_states() -> None:
    draws = [GaussianMixture.random_family(s) for s in range(200)]
    dims = [g.dim for g in draws]
    assert min(dims) == 2 and 200 <= max(dims) <= 256
    ratios = [float(g.weights.max() / g.weights.min()) for g in draws]
    assert max(ratios) <= 50 and max(ratios) > 30
    scales = torch.cat([g.eigvals.sqrt().flatten() for g in draws])
    assert float(scales.max() / scales.min()) > 100  # per-mode scales 1:100, times the anisotropy
    assert all(not torch.allclose(g.covs[0], torch.diag(torch.diagonal(g.covs[0]))) for g in draws[:5])  # full
    again = GaussianMixture.random_family(7)
    assert torch.equal(again.means, draws[7].means) and torch.equal(again.covs, draws[7].covs)


@pytest.mark.parametrize("seed", FAMILY_SEEDS)
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine_vp"])
def test_every_sampler_is_finite_at_every_step_count(seed: int, sde_name: str) -> None:
    gm = GaussianMixture.random_family(seed)
    sde = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=gm.diameter()), "cosine_vp": CosineVPSDE()}[sde_name]
    score_fn = gm.score_fn(sde)
    for name in SAMPLERS.names():
        for steps in (1, 2, 5):
            out = sample(sde, score_fn, (16, gm.dim), sampler=name, steps=steps, generator=torch.Generator().manual_seed(steps))
            assert out.samples.shape == (16, gm.dim)
            assert torch.isfinite(out.samples).all(), (name, steps)
            assert out.nfe >= 1
