r"""Time-dependent ("noisy") classifiers p_φ(y | x_t, t) for classifier guidance.

A classifier is trained by cross-entropy on data perturbed by the forward SDE,

.. math:: \min_\phi\ \mathbb E_{t \sim U(\epsilon, T)}\, \mathbb E_{(x_0, y)}\, \mathbb E_{z \sim N(0, I)}
          \big[-\log p_\phi(y \mid x_t, t)\big], \qquad x_t = m(t)\, x_0 + \sigma(t)\, z,

so that it approximates the posterior p_t(y | x_t) of every noise level. Its gradient
∇_x log p_φ(y | x_t, t) turns an unconditional score into a conditional one
(:class:`~sde_diffusion.guidance.ClassifierGuidance`).

Networks (registry ``CLASSIFIERS``, keyed like ``MODELS`` so that a classifier is built from the
same ``model`` config group as the score network of the run):

* ``"mlp"`` — :class:`MLPClassifier`: the residual MLP of the score network (time embedding added
  in every block) with a linear head, for vectors ``[B, D]``;
* ``"unet"`` — :class:`UNetEncoderClassifier`: the down path and middle of the DDPM++ U-Net (the
  same residual/attention blocks and time embedding), then GroupNorm → SiLU → global average
  pooling → linear head, for images ``[B, C, H, W]`` (the classifier of Dhariwal & Nichol 2021
  with mean instead of attention pooling).

Every network maps ``(x [B, *data_shape], t [B]) -> logits [B, num_classes]``.
:class:`NoisyClassifier` (a LightningModule) wraps one with the SDE, scales the input by
c_in(t) = 1/√(m(t)² + σ(t)²) (the standard deviation of x_t for unit-variance data: 1 for VP,
≈ 1/σ(t) for VE, so one network sees inputs of order one at every t), and trains it.

Training from the command line (the ``task`` config group selects this module)::

    python train.py task=classifier data=digits                 # U-Net encoder on 8×8 digits
    python train.py task=classifier data=gmm model=mlp          # residual MLP on a 2-D mixture
    python train.py task=classifier latent=<autoencoder run> data=digits data.size=32  # on latents

and in Python::

    result = fit("classifier", cfg, "outputs/clf")              # cfg: a TrainConfig (task=classifier)
    clf = load("outputs/clf", kind="classifier")                # run dir or .ckpt; eval mode
    guided = ClassifierGuidance(score_fn, clf, y=3, scale=1.0)  # clf(x, t) -> logits [B, C]

A checkpoint stores the whole config (``sde``, ``data``, ``model``, ``classifier``), the data shape
and the class count, so :func:`load_classifier` needs nothing else. The held-out accuracy per
t-bucket (:func:`accuracy_by_time`) is logged during validation (``val/acc_t/<lo>-<hi>``) and
written at the end of training to ``<run dir>/accuracy_by_t.json``.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..callbacks import find_ema
from ..checkpoints import CLASSIFIER_KIND as CHECKPOINT_KIND
from ..checkpoints import CheckpointInfo
from ..config import ClassifierConfig, TrainConfig, instantiate, saved_train_config, to_plain
from ..fit import FitResult, Task, fitter
from ..io import write_json
from ..losses import uniform_draws
from ..models.time_classifier import CLASSIFIERS, TimeClassifier
from ..registry import SDES, TASKS
from ..sdes.sde import SDE, broadcast_to_x
from .common import ClipFusedGradients, LatentSpace, adamw_with_warmup, seeded, step_seed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- config
ClassifierOptions = ClassifierConfig  # ``cfg.classifier``: the schema section of this task


def classifier_network_config(cfg: TrainConfig) -> Tuple[str, Dict[str, Any]]:
    """``(name, kwargs)`` of the classifier network: the ``model`` group merged with ``classifier.model``."""
    kwargs = {k: v for k, v in to_plain(cfg.model).items() if k not in ("name", "_target_")}
    overrides = dict(to_plain(cfg.classifier.model))
    name = str(overrides.pop("name", cfg.model.get("name")))
    kwargs = {**kwargs, **overrides}
    # A score network's output option: a classifier has no variance to learn.
    if kwargs.pop("learn_sigma", False):
        raise ValueError("model.learn_sigma=true is an option of the score network (a learned variance); a classifier "
                         "has none: drop it for task=classifier")
    # Text options of the score network: where its cross-attention would sit; a noisy classifier reads no prompt.
    for key in ("cross_attention", "pooled_context", "cross_attention_position"):
        kwargs.pop(key, None)
    return name, kwargs


def build_classifier_network(cfg: TrainConfig, data_shape: Sequence[int], num_classes: int) -> TimeClassifier:
    """The classifier network of ``cfg`` for ``data_shape`` and ``num_classes`` (ValueError on bad options)."""
    name, kwargs = classifier_network_config(cfg)
    factory = CLASSIFIERS.get(name)  # unknown names: ValueError listing the choices
    try:
        return factory(data_shape=tuple(int(s) for s in data_shape), num_classes=num_classes, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", "data_shape", "num_classes")]
        raise ValueError(f"bad option for classifier {name!r}: {err}; accepted options: {', '.join(params)}") from None


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class BucketAccuracy:
    """Held-out accuracy for t ~ U(t_lo, t_hi): ``correct / count``."""

    t_lo: float
    t_hi: float
    accuracy: float
    count: int


def bucket_edges(t_min: float, T: float, num_buckets: int) -> List[float]:
    """``num_buckets + 1`` equally spaced edges of [t_min, T]."""
    return [t_min + (T - t_min) * i / num_buckets for i in range(num_buckets + 1)]


@torch.no_grad()
def accuracy_by_time(
    classifier: nn.Module,
    sde: SDE,
    batches: Iterable[Sequence[Tensor]],
    num_buckets: int = 10,
    t_min: Optional[float] = None,
    repeats: int = 1,
    generator: Optional[torch.Generator] = None,
) -> List[BucketAccuracy]:
    """Accuracy of ``classifier(x_t, t)`` on labelled clean data, per t-bucket of [t_min, T].

    For every example ``(x_0, y)`` of ``batches``, every bucket [t_lo, t_hi) and ``repeats`` draws:
    t ~ U(t_lo, t_hi), x_t = sde.perturb(x_0, t, z); correct when argmax logits = y. ``t_min``
    defaults to ``sde.eps``; the classifier's device and dtype are used.
    """
    t_min = float(sde.eps if t_min is None else t_min)
    edges = bucket_edges(t_min, float(sde.T), num_buckets)
    ref = next(classifier.parameters())
    correct = torch.zeros(num_buckets, dtype=torch.float64)
    count = torch.zeros(num_buckets, dtype=torch.float64)
    for batch in batches:
        x0 = batch[0].to(device=ref.device, dtype=ref.dtype)
        y = batch[1].to(ref.device)
        B = x0.shape[0]
        for b in range(num_buckets):
            for _ in range(repeats):
                u = torch.rand(B, generator=generator, device=ref.device, dtype=torch.float64)
                t = (edges[b] + (edges[b + 1] - edges[b]) * u).to(ref.dtype)
                z = torch.randn(x0.shape, generator=generator, device=ref.device, dtype=ref.dtype)
                pred = classifier(sde.perturb(x0, t, z), t).argmax(dim=-1)
                correct[b] += float((pred == y).sum())
                count[b] += B
    if float(count.sum()) == 0:
        raise ValueError("accuracy_by_time got no data (empty batches)")
    return [
        BucketAccuracy(edges[b], edges[b + 1], float(correct[b] / count[b]), int(count[b]))
        for b in range(num_buckets)
    ]


def format_accuracy_table(rows: Sequence[BucketAccuracy]) -> str:
    """A plain-text table ``t-bucket | accuracy`` (one line per bucket)."""
    lines = ["t bucket           accuracy"]
    lines += [f"[{r.t_lo:.3f}, {r.t_hi:.3f})   {r.accuracy:.4f}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the module
class NoisyClassifier(LatentSpace, ClipFusedGradients, L.LightningModule):
    """Cross-entropy training of a time-dependent classifier on forward-perturbed data.

    ``forward(x [B, *model_shape], t [B] or scalar) -> logits [B, num_classes]`` computes
    ``net(c_in(t)·x, t)`` with c_in(t) = 1/√(m(t)² + σ(t)²), so the module plugs into
    :class:`~sde_diffusion.guidance.ClassifierGuidance` directly. ``model_shape`` is the data's
    shape, or with ``cfg.latent`` the autoencoder's latent shape: a latent classifier perturbs and
    classifies u = c·μ(x), the space a latent score model samples (and refuses any other autoencoder,
    by its weights digest, like the score model).

    Args:
        cfg: the composed training config (``sde``, ``data``, ``model``, ``classifier``, ``optim``,
            ``seed``); stored resolved in the checkpoint.
        data_shape: shape of one example.
        num_classes: number of labels of the data set (≥ 2).
        latent: what a latent checkpoint recorded about its autoencoder (enforced); set when loading.
        latent_path: load the autoencoder from here instead of ``cfg.latent`` (a moved run).

    Attributes: ``sde``, ``net``, ``num_classes``, ``data_shape``, ``model_shape``, ``codec``,
    ``options`` (:class:`ClassifierOptions`).
    """

    def __init__(
        self,
        cfg: Union[TrainConfig, Mapping[str, Any]],
        data_shape: Sequence[int],
        num_classes: int,
        latent: Optional[Mapping[str, Any]] = None,
        latent_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        cfg = saved_train_config(cfg)  # a TrainConfig, or the dict a checkpoint stores
        self.save_hyperparameters(
            {"cfg": to_plain(cfg), "data_shape": [int(s) for s in data_shape], "num_classes": int(num_classes), "latent": None}
        )
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = int(num_classes)
        self.options = cfg.classifier
        # A latent classifier (cfg.latent): trained on the scaled latents a latent score model
        # samples, so that its gradient is taken where that score lives. The autoencoder is frozen
        # and kept out of the module tree, exactly as in ScoreDiffusion.
        self.attach_codec(latent_path or cfg.latent, latent)
        self.sde = instantiate(cfg.sde, SDES, key="sde")
        self.net = build_classifier_network(cfg, self.model_shape, self.num_classes)
        self.t_min = float(self.sde.eps if self.options.eps is None else self.options.eps)
        if not self.t_min < self.sde.T:
            raise ValueError(f"classifier.eps={self.t_min} must be below the SDE's T={self.sde.T}")
        self.seed = cfg.seed
        self.edges = bucket_edges(self.t_min, float(self.sde.T), self.options.eval_buckets)
        self.bucket_names = [f"val/acc_t/{self.edges[i]:.2f}-{self.edges[i + 1]:.2f}" for i in range(len(self.edges) - 1)]

    # ------------------------------------------------------------------ inference
    def input_scale(self, t: Tensor) -> Tensor:
        """c_in(t) = 1/√(m(t)² + σ(t)²): ``[B]``."""
        return torch.rsqrt(self.sde.mean_coeff(t) ** 2 + self.sde.marginal_std(t) ** 2)

    def forward(self, x: Tensor, t: Union[Tensor, float]) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.net(x * broadcast_to_x(self.input_scale(t), x), t)

    def log_prob(self, x: Tensor, t: Union[Tensor, float]) -> Tensor:
        """log p_φ(y | x, t) for every class: ``[B, num_classes]``."""
        return torch.log_softmax(self(x, t), dim=-1)

    # ------------------------------------------------------------------ training
    def sample_times(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """t ~ U(t_min, T) (stratified if configured): ``[n]``."""
        u = uniform_draws(n, self.options.stratified, None, device, torch.float64)
        return (self.t_min + (self.sde.T - self.t_min) * u).to(dtype)

    def perturbed_logits(self, x0: Tensor, t: Tensor) -> Tensor:
        """Logits on x_t = m(t)·x0 + σ(t)·z, z ~ N(0, I) from the global generator."""
        z = torch.randn_like(x0)
        return self(self.sde.perturb(x0, t, z), t)

    def _rank(self) -> int:
        return self.global_rank if self._trainer is not None else 0

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = self.to_model_space(batch[0]), batch[1]
        with seeded(step_seed(self.seed, "classifier", self.global_step, batch_idx, self._rank()), x.device):
            t = self.sample_times(x.shape[0], x.device, x.dtype)
            logits = self.perturbed_logits(x, t)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        # Every example is scored once per t-bucket, with the same draws at every validation.
        x, y = self.to_model_space(batch[0]), batch[1]
        B = x.shape[0]
        losses, accs = [], []
        with seeded(step_seed(self.seed, "classifier-val", batch_idx, self._rank()), x.device):
            for b, name in enumerate(self.bucket_names):
                u = torch.rand(B, device=x.device, dtype=torch.float64)
                t = (self.edges[b] + (self.edges[b + 1] - self.edges[b]) * u).to(x.dtype)
                logits = self.perturbed_logits(x, t)
                losses.append(F.cross_entropy(logits, y))
                accs.append((logits.argmax(-1) == y).float().mean())
                self.log(name, accs[-1], on_step=False, on_epoch=True, sync_dist=True, batch_size=B)
        # Averages over equal buckets = averages over t ~ U(t_min, T).
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=B)
        self.log("val/acc", torch.stack(accs).mean(), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=B)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Tells checkpoint readers (load_classifier, sample.py) that this is not a score model.
        checkpoint["kind"] = CHECKPOINT_KIND

    def configure_optimizers(self) -> Dict[str, Any]:
        return adamw_with_warmup(self.net.parameters(), self.cfg.optim, getattr(self, "profile", None))


# ---------------------------------------------------------------------------------- the task
def load_classifier(path: Union[str, Path], map_location: Any = "cpu", latent: Optional[str] = None) -> NoisyClassifier:
    """The :class:`NoisyClassifier` (eval mode) of a run directory or checkpoint; same as
    ``checkpoints.load(path, kind="classifier")``. If the run kept an EMA of the weights, the
    checkpoint's (and so the returned) weights are the EMA's. A latent classifier loads its
    autoencoder from the recorded path, or from ``latent`` (a moved copy of the same one)."""
    from ..checkpoints import load

    return load(path, kind="classifier", map_location=map_location, latent=latent)


@TASKS.register("classifier")
class ClassifierTask(Task):
    """A time-dependent classifier for classifier guidance (``python train.py task=classifier``).

    After fitting, the held-out accuracy per t-bucket is logged and written to
    ``<run dir>/accuracy_by_t.json``; the result carries ``classifier`` (what the last checkpoint
    holds: the EMA copy when the run kept one) and ``accuracy``.
    """

    name = "classifier"

    def check_data(self, cfg: TrainConfig, datamodule: Any) -> None:
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is None or num_classes < 2:
            raise ValueError(
                f"task=classifier needs a labelled data set with >= 2 classes; data={cfg.data.get('name')} "
                f"has num_classes={num_classes} (use e.g. data=digits, data=gmm or data=moons)"
            )

    def check_resume(self, cfg: TrainConfig, saved: CheckpointInfo) -> None:
        super().check_resume(cfg, saved)
        if classifier_network_config(cfg) != classifier_network_config(saved.train_config):
            raise ValueError("the checkpoint's classifier network differs from the configured one (classifier.model)")

    def build_module(self, cfg: TrainConfig, datamodule: Any, resumed: Optional[CheckpointInfo]) -> NoisyClassifier:
        # A latent= autoencoder other than the resumed run's is refused here.
        return NoisyClassifier(cfg, datamodule.data_shape, int(datamodule.num_classes),
                               latent=resumed.latent if resumed else None)

    def load_module(self, info: CheckpointInfo, map_location: Any = "cpu", latent: Optional[str] = None) -> NoisyClassifier:
        extra = {"latent_path": str(latent)} if latent else {}
        return NoisyClassifier.load_from_checkpoint(str(info.path), map_location=map_location, weights_only=False, **extra)

    def after_fit(self, cfg: TrainConfig, result: FitResult) -> None:
        module, trainer, out = result.module, result.trainer, result.output_dir
        ema = find_ema(trainer)
        final: NoisyClassifier = ema.averaged_module if ema is not None and ema.averaged_module is not None else module
        final.eval()
        opts = module.options
        device = next(final.parameters()).device
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        held_out = ((module.to_model_space(b[0].to(device)), b[1]) for b in result.datamodule.val_dataloader())
        rows = accuracy_by_time(final, final.sde, held_out, opts.eval_buckets, module.t_min, opts.eval_repeats, gen)
        if trainer.is_global_zero:
            write_json(out / "accuracy_by_t.json", {"global_step": trainer.global_step, "buckets": [asdict(r) for r in rows]})
            log.info("held-out accuracy per t-bucket:\n%s", format_accuracy_table(rows))
        result.extras.update(classifier=final, accuracy=rows)


train_classifier = fitter(ClassifierTask)  # train(cfg, output_dir=None, *, extra_callbacks=(), datamodule=None)


__all__ = [
    "ClassifierOptions",
    "ClassifierTask",
    "classifier_network_config",
    "build_classifier_network",
    "BucketAccuracy",
    "bucket_edges",
    "accuracy_by_time",
    "format_accuracy_table",
    "NoisyClassifier",
    "load_classifier",
    "train_classifier",
]
