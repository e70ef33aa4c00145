"""A process defined outside the package, as a user would: selected with ``sde._target_=custom_processes.ConstantBetaSDE``."""
import torch

from sde_diffusion import LinearSDE


class ConstantBetaSDE(LinearSDE):
    """dx = −½β x dt + √β dw with a constant β: m(t) = e^{−βt/2}, σ(t)² = 1 − e^{−βt}."""

    def __init__(self, beta: float = 5.0, **kw) -> None:
        super().__init__(**kw)
        self.beta = float(beta)

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta * torch.ones_like(t)

    def g(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta ** 0.5 * torch.ones_like(t)


from sde_diffusion.tasks.score_matching import ScoreTask  # noqa: E402


class MarkedScoreTask(ScoreTask):
    """The score task plus one thing of the user's own after fitting: ``task._target_=custom_processes.MarkedScoreTask``."""

    def __init__(self, marker: str = "user-task") -> None:
        self.marker = marker

    def after_fit(self, cfg, result) -> None:
        (result.output_dir / "marker.txt").write_text(f"{self.marker} {result.trainer.global_step}")


from sde_diffusion.samplers.predictors import EulerMaruyama  # noqa: E402


class HalfEulerMaruyama(EulerMaruyama):
    """A sampler of the user's own (not registered): Euler–Maruyama with an extra option."""

    def __init__(self, scale: float = 1.0, **end) -> None:
        super().__init__(**end)
        self.scale = float(scale)
