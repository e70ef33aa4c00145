r"""``python train.py task=autoencoder``: a KL-regularised autoencoder trained with Lightning.

Objective per example (x in the model range, D = its number of elements):

.. math:: L = \frac1D \sum_i \rho(x_i - \hat x_i) + \beta\,\frac{1}{D}\,
          \mathrm{KL}\big(q_φ(z|x)\,\|\,N(0, I)\big),\qquad \hat x = D_ψ(z),\ z \sim q_φ(z|x),

with ρ = |·| (``reconstruction: l1``) or (·)² (``l2``); both terms are per data dimension, so β
does not depend on the image size. The checkpoint (``kind: autoencoder``) records the latent scale:
the std of the posterior means of the training examples (up to ``scale_examples`` of them), and
its inverse ``scale_factor`` — the constant a latent diffusion multiplies latents by (Stable
Diffusion's 0.18215 is such a measured number). Reconstruction grids (originals above, decoded
posterior means below) go to ``<run>/reconstructions/``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..callbacks import eval_mode, find_ema
from ..plots import save_image_grid
from ..checkpoints import AUTOENCODER_KIND, CheckpointInfo
from ..config import AutoencoderConfig, TrainConfig, saved_train_config, to_plain
from ..fit import Task, fitter
from ..models.kl_autoencoder import KLAutoencoder, kl_to_standard_normal
from ..registry import TASKS
from .common import ClipFusedGradients, adamw_with_warmup, seeded, step_seed

log = logging.getLogger(__name__)
AutoencoderOptions = AutoencoderConfig  # ``cfg.autoencoder``: the schema section of this task


def autoencoder_network(opts: AutoencoderConfig, data_shape: Sequence[int]) -> KLAutoencoder:
    """The KL autoencoder ``opts`` describes, for images of ``data_shape``."""
    return KLAutoencoder(data_shape, opts.latent_channels, opts.ch, tuple(int(m) for m in opts.ch_mult),
                         opts.num_res_blocks, opts.dropout)


class AutoencoderModule(ClipFusedGradients, L.LightningModule):
    """Trains :class:`~sde_diffusion.models.kl_autoencoder.KLAutoencoder` (``self.net``) on ``cfg.data``.

    ``latent_std`` / ``scale_factor`` hold the latent scale once measured (every checkpoint
    measures it with the weights it stores).
    """

    def __init__(self, cfg: Union[TrainConfig, Mapping[str, Any]], data_shape: Sequence[int]) -> None:
        super().__init__()
        cfg = saved_train_config(cfg)  # a TrainConfig, or the dict a checkpoint stores
        self.save_hyperparameters({"cfg": to_plain(cfg), "data_shape": [int(s) for s in data_shape]})
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        self.options = cfg.autoencoder
        self.net = autoencoder_network(self.options, self.data_shape)
        self.seed = cfg.seed
        self.latent_std: Optional[float] = None

    @property
    def scale_factor(self) -> Optional[float]:
        """1/latent_std: multiplies latents to unit scale before a diffusion runs on them."""
        return None if self.latent_std is None else 1.0 / self.latent_std

    # ------------------------------------------------------------------ objective
    def losses(self, x: Tensor) -> Dict[str, Tensor]:
        """Per-example ``rec``, ``kl`` (both per data dimension) and ``loss`` = rec + β·kl, each ``[B]``."""
        x_hat, mean, logvar = self.net(x)
        diff = (x_hat - x).reshape(x.shape[0], -1)
        rec = diff.abs().mean(1) if self.options.reconstruction == "l1" else diff.pow(2).mean(1)
        kl = kl_to_standard_normal(mean, logvar) / diff.shape[1]
        return {"rec": rec, "kl": kl, "loss": rec + self.options.beta * kl}

    def _rank(self) -> int:
        return self.global_rank if self._trainer is not None else 0

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        with seeded(step_seed(self.seed, "autoencoder", self.global_step, batch_idx, self._rank()), x.device):
            terms = self.losses(x)
        loss = terms["loss"].mean()
        every = max(1, int(getattr(self._trainer, "log_every_n_steps", 1) or 1))
        if (self.global_step + 1) % every == 0:
            self.log_dict({f"train/{k}": v.mean() for k, v in terms.items()}, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        # Deterministic: the decoded posterior mean.
        x = batch[0]
        mean, logvar = self.net.encode(x)
        rec = (self.net.decode(mean) - x).abs().reshape(x.shape[0], -1).mean(1).mean()
        kl = (kl_to_standard_normal(mean, logvar) / x[0].numel()).mean()
        self.log_dict({"val/rec_l1": rec, "val/kl": kl}, prog_bar=True, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=x.shape[0])
        return rec

    # ------------------------------------------------------------------ latent scale
    @torch.no_grad()
    def measure_latent_std(self, batches: Any, net: Optional[KLAutoencoder] = None) -> float:
        """Std of all posterior-mean entries of up to ``scale_examples`` examples of ``batches``."""
        net = net or self.net
        ref = next(net.parameters())
        total = total_sq = 0.0
        count = 0
        with eval_mode(net):
            for batch in batches:
                x = batch[0][: self.options.scale_examples - count // net.latent_dim].to(device=ref.device, dtype=ref.dtype)
                if x.shape[0] == 0:
                    break
                mean, _ = net.encode(x)
                m = mean.double()
                total += float(m.sum())
                total_sq += float(m.pow(2).sum())
                count += m.numel()
                if count // net.latent_dim >= self.options.scale_examples:
                    break
        if count < 2:
            raise ValueError("measuring the latent scale needs at least one training example")
        mu = total / count
        return max(total_sq / count - mu * mu, 0.0) ** 0.5

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["kind"] = AUTOENCODER_KIND
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "eval_loader"):
            ema = find_ema(self.trainer)
            net = ema.averaged_module.net if ema is not None and ema.averaged_module is not None else self.net
            self.latent_std = self.measure_latent_std(dm.eval_loader("train"), net)
        checkpoint["latent"] = {"std": self.latent_std, "scale_factor": self.scale_factor,
                                "shape": list(self.net.latent_shape), "examples": self.options.scale_examples,
                                "statistic": "std of the posterior means of training examples"}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.latent_std = (checkpoint.get("latent") or {}).get("std")

    def configure_optimizers(self) -> Dict[str, Any]:
        return adamw_with_warmup(self.net.parameters(), self.cfg.optim, getattr(self, "profile", None))


class ReconstructionFigures(Callback):
    """Originals (top rows) and decoded posterior means (bottom rows) of ``num`` validation images,
    every ``every_n_steps`` steps and at the end: ``<out_dir>/step_XXXXXXX.png`` and ``latest.png`` (rank 0)."""

    def __init__(self, out_dir: Path, every_n_steps: int = 500, num: int = 16) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.num = int(num)
        self._last = -1

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if trainer.global_step != self._last:
            self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: "L.Trainer", pl_module: AutoencoderModule) -> Optional[Path]:
        self._last = trainer.global_step
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        x = next(iter(dm.eval_loader("val")))[0][: self.num].to(pl_module.device)
        with eval_mode(pl_module.net):
            mean, _ = pl_module.net.encode(x)
            x_hat = pl_module.net.decode(mean)
        both = torch.cat([x, x_hat.clamp(-1, 1)]).cpu()
        images = dm.inverse_scaler(both) if hasattr(dm, "inverse_scaler") else (both + 1) / 2
        l1 = float((x_hat - x).abs().mean())
        title = f"step {trainer.global_step}: originals above, reconstructions below (L1 {l1:.3f})"
        nrow = max(1, x.shape[0] // 2)
        path = save_image_grid(images, self.out_dir / f"step_{trainer.global_step:07d}.png", nrow=nrow, title=title)
        save_image_grid(images, self.out_dir / "latest.png", nrow=nrow, title=title)
        return path


def load_autoencoder(path: Union[str, Path], map_location: Any = "cpu") -> AutoencoderModule:
    """The :class:`AutoencoderModule` (eval mode) of a ``task=autoencoder`` run directory or checkpoint;
    same as ``checkpoints.load(path, kind="autoencoder")``."""
    from ..checkpoints import load

    return load(path, kind="autoencoder", map_location=map_location)


@TASKS.register("autoencoder")
class AutoencoderTask(Task):
    """The first stage of a latent score model (``python train.py task=autoencoder``)."""

    name = "autoencoder"

    def check_data(self, cfg: TrainConfig, datamodule: Any) -> None:
        if not getattr(datamodule, "is_image", False):
            raise ValueError(f"task=autoencoder needs image data (data=digits, cifar10 or folder); "
                             f"data={cfg.data.get('name')} is not")

    def check_resume(self, cfg: TrainConfig, saved: CheckpointInfo) -> None:
        if to_plain(saved.train_config.autoencoder) != to_plain(cfg.autoencoder):
            raise ValueError("the checkpoint's autoencoder options differ from the configured ones (autoencoder.*); "
                             "resume with the original settings or start a new run_dir")

    def build_module(self, cfg: TrainConfig, datamodule: Any, resumed: Optional[CheckpointInfo]) -> AutoencoderModule:
        return AutoencoderModule(cfg, datamodule.data_shape)  # size errors surface here

    def callbacks(self, cfg: TrainConfig, output_dir: Path) -> List[Any]:
        return [ReconstructionFigures(output_dir / "reconstructions", cfg.autoencoder.figures_every_n_steps)]

    def load_module(self, info: CheckpointInfo, map_location: Any = "cpu") -> AutoencoderModule:
        return AutoencoderModule.load_from_checkpoint(str(info.path), map_location=map_location, weights_only=False)


train_autoencoder = fitter(AutoencoderTask)  # train(cfg, output_dir=None, *, extra_callbacks=(), datamodule=None)


__all__ = ["AutoencoderOptions", "AutoencoderModule", "AutoencoderTask", "autoencoder_network", "ReconstructionFigures",
           "load_autoencoder", "train_autoencoder"]
