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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..callbacks import build_callbacks, build_loggers, eval_mode, find_ema, save_image_grid
from ..checkpoints import AUTOENCODER_KIND, mark_finished, resolve_checkpoint_path
from ..config import check_config, resolve_checkpoint, to_container
from ..models.autoencoder import KLAutoencoder, kl_to_standard_normal
from .base import (
    NO_SCORE_CALLBACKS,
    FitResult,
    adamw_with_warmup,
    build_trainer,
    merge_config,
    optimizer_settings,
    output_dir_for,
    seeded,
    step_seed,
    with_run_dir,
)

log = logging.getLogger(__name__)
RECONSTRUCTIONS = ("l1", "l2")


@dataclass(frozen=True)
class AutoencoderOptions:
    """``cfg.autoencoder``: the network (latent channels c, ch, ch_mult → f = 2^(len−1), blocks,
    dropout) and the objective (β, reconstruction), plus how many training examples set the scale."""

    latent_channels: int = 4
    ch: int = 32
    ch_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    beta: float = 1e-3
    reconstruction: str = "l1"
    scale_examples: int = 2048
    figures_every_n_steps: int = 500

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "AutoencoderOptions":
        node = dict(to_container(cfg.get("autoencoder") or {}))
        unknown = sorted(set(node) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown autoencoder option(s) {unknown}; accepted: {', '.join(cls.__dataclass_fields__)}")
        if "ch_mult" in node:
            node["ch_mult"] = tuple(int(m) for m in node["ch_mult"])
        opts = cls(**node)
        if opts.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown autoencoder.reconstruction {opts.reconstruction!r}; choose one of: {', '.join(RECONSTRUCTIONS)}")
        if not opts.beta >= 0:
            raise ValueError(f"autoencoder.beta must be >= 0, got {opts.beta}")
        if opts.scale_examples < 2:
            raise ValueError(f"autoencoder.scale_examples must be >= 2, got {opts.scale_examples}")
        return opts

    def network(self, data_shape: Sequence[int]) -> KLAutoencoder:
        return KLAutoencoder(data_shape, self.latent_channels, self.ch, self.ch_mult, self.num_res_blocks, self.dropout)


class AutoencoderTask(L.LightningModule):
    """Trains :class:`~sde_diffusion.models.autoencoder.KLAutoencoder` (``self.net``) on ``cfg.data``.

    ``latent_std`` / ``scale_factor`` hold the latent scale once measured (every checkpoint
    measures it with the weights it stores).
    """

    def __init__(self, cfg: Mapping[str, Any], data_shape: Sequence[int]) -> None:
        super().__init__()
        cfg = to_container(cfg)
        self.save_hyperparameters({"cfg": cfg, "data_shape": [int(s) for s in data_shape]})
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        self.options = AutoencoderOptions.from_config(cfg)
        self.net = self.options.network(self.data_shape)
        self.seed = int(cfg.get("seed", 0))
        self.optim_cfg = optimizer_settings(cfg, default_lr=1e-3)
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
        return adamw_with_warmup(self.net.parameters(), self.optim_cfg)


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
    def write(self, trainer: "L.Trainer", pl_module: AutoencoderTask) -> Optional[Path]:
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


def load_autoencoder(path: Union[str, Path], map_location: Any = "cpu") -> AutoencoderTask:
    """An :class:`AutoencoderTask` (eval mode) from a ``task=autoencoder`` run directory or checkpoint."""
    file = resolve_checkpoint_path(path)
    ckpt = torch.load(str(file), map_location=map_location, weights_only=False)
    if not isinstance(ckpt, Mapping) or ckpt.get("kind") != AUTOENCODER_KIND:
        raise ValueError(f"{file} is not an autoencoder checkpoint (train one with `python train.py task=autoencoder`)")
    hp = ckpt["hyper_parameters"]
    module = AutoencoderTask(hp["cfg"], hp["data_shape"])
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.eval()


def train_autoencoder(
    cfg: Any,
    output_dir: Optional[Union[str, Path]] = None,
    *,
    extra_callbacks: Sequence[Any] = (),
    datamodule: Any = None,
) -> FitResult:
    """Check ``cfg``, build data, autoencoder and Trainer, and fit (resume with ``resume``/``ckpt_path``).

    The same output directory rules, checkpoints, loggers, EMA and Trainer options as
    :func:`sde_diffusion.training.train`; sample figures and the per-t loss do not apply.
    """
    from ..config import build_datamodule

    out = output_dir_for(cfg, output_dir)
    plain = merge_config(to_container(with_run_dir(cfg, out)), NO_SCORE_CALLBACKS)
    plain["task"] = "autoencoder"
    check_config(plain)
    opts = AutoencoderOptions.from_config(plain)
    ckpt_path = resolve_checkpoint(plain, out)
    if ckpt_path is not None:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        if saved.get("kind") != AUTOENCODER_KIND:
            raise ValueError(f"{ckpt_path} is not an autoencoder checkpoint; it cannot be continued with task=autoencoder")
        saved_cfg = saved.get("hyper_parameters", {}).get("cfg", {})
        if asdict(AutoencoderOptions.from_config(saved_cfg)) != asdict(opts):
            raise ValueError("the checkpoint's autoencoder options differ from the configured ones (autoencoder.*); "
                             "resume with the original settings or start a new run_dir")
        del saved
    L.seed_everything(int(plain.get("seed", 0)), workers=True, verbose=False)
    dm = datamodule if datamodule is not None else build_datamodule(plain)
    if not getattr(dm, "is_image", False):
        raise ValueError(f"task=autoencoder needs image data (data=digits, cifar10 or folder); data={plain['data']['name']} is not")
    module = AutoencoderTask(plain, dm.data_shape)  # size errors surface here
    dm.setup("fit")
    out.mkdir(parents=True, exist_ok=True)
    callbacks: List[Any] = build_callbacks(plain, out) + [ReconstructionFigures(out / "reconstructions", opts.figures_every_n_steps)]
    trainer = build_trainer(plain, out, callbacks + list(extra_callbacks), build_loggers(plain, out))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.is_global_zero and not trainer.interrupted:
        mark_finished(out, "autoencoder", trainer.global_step)
    return FitResult(module=module, trainer=trainer, datamodule=dm, output_dir=out)


train_task = train_autoencoder  # what `python train.py task=<this module>` runs (jobs.train_tasks.run_training)


__all__ = ["train_task", "AutoencoderOptions", "AutoencoderTask", "ReconstructionFigures", "load_autoencoder", "train_autoencoder"]
