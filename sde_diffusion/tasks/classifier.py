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

    result = train_classifier(cfg, "outputs/clf")               # cfg composed from conf/train.yaml
    clf = load_classifier("outputs/clf")                        # run dir or .ckpt; eval mode
    guided = ClassifierGuidance(score_fn, clf, y=3, scale=1.0)  # clf(x, t) -> logits [B, C]

A checkpoint stores the whole config (``sde``, ``data``, ``model``, ``classifier``), the data shape
and the class count, so :func:`load_classifier` needs nothing else. The held-out accuracy per
t-bucket (:func:`accuracy_by_time`) is logged during validation (``val/acc_t/<lo>-<hi>``) and
written at the end of training to ``<run dir>/accuracy_by_t.json``.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..callbacks import build_callbacks, build_loggers, find_ema
from ..checkpoints import CLASSIFIER_KIND as CHECKPOINT_KIND
from ..checkpoints import mark_finished, resolve_checkpoint_path
from ..config import build_sde, check_config, check_resume_compatible, group, resolve_checkpoint, to_container
from ..losses import uniform_draws
from ..models.classifier import CLASSIFIERS, TimeClassifier
from ..sdes.base import SDE, broadcast_to_x
from .base import (
    NO_SCORE_CALLBACKS,
    FitResult,
    LatentSpace,
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


# ---------------------------------------------------------------------------------- config
@dataclass
class ClassifierOptions:
    """``cfg.classifier``: what is trained and how it is evaluated.

    Attributes:
        model: overrides of the ``model`` group for the classifier network (e.g. ``{ch: 16}``);
            the network is ``CLASSIFIERS[name]`` with the merged kwargs.
        eps: smallest training time (``None``: ``sde.eps``); t ~ U(eps, T).
        stratified: low-discrepancy draw of the batch's times.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        eval_buckets: number of equal t-buckets of [eps, T] for the held-out accuracy.
        eval_repeats: noise draws per held-out example and bucket in the final accuracy table.
    """

    model: Dict[str, Any] = field(default_factory=dict)
    eps: Optional[float] = None
    stratified: bool = True
    label_smoothing: float = 0.0
    eval_buckets: int = 10
    eval_repeats: int = 4

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ClassifierOptions":
        node = to_container(cfg.get("classifier") or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"unknown classifier option(s) {unknown}; accepted: {', '.join(sorted(known))}")
        opts = cls(**node)
        opts.model = dict(opts.model or {})
        if opts.eps is not None and not float(opts.eps) > 0:
            raise ValueError(f"classifier.eps must be positive (or null for sde.eps), got {opts.eps}")
        if not 0.0 <= float(opts.label_smoothing) < 1.0:
            raise ValueError(f"classifier.label_smoothing must lie in [0, 1), got {opts.label_smoothing}")
        for key in ("eval_buckets", "eval_repeats"):
            v = getattr(opts, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"classifier.{key} must be an integer >= 1, got {v!r}")
        return opts


def classifier_network_config(cfg: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(name, kwargs)`` of the classifier network: the ``model`` group merged with ``classifier.model``."""
    name, kwargs = group(cfg, "model")
    overrides = dict(ClassifierOptions.from_config(cfg).model)
    name = str(overrides.pop("name", name))
    return name, {**kwargs, **overrides}


def build_classifier_network(cfg: Mapping[str, Any], data_shape: Sequence[int], num_classes: int) -> TimeClassifier:
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
class NoisyClassifier(LatentSpace, L.LightningModule):
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
        cfg: Mapping[str, Any],
        data_shape: Sequence[int],
        num_classes: int,
        latent: Optional[Mapping[str, Any]] = None,
        latent_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        cfg = to_container(cfg)
        self.save_hyperparameters(
            {"cfg": cfg, "data_shape": [int(s) for s in data_shape], "num_classes": int(num_classes), "latent": None}
        )
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = int(num_classes)
        self.options = ClassifierOptions.from_config(cfg)
        # A latent classifier (cfg.latent): trained on the scaled latents a latent score model
        # samples, so that its gradient is taken where that score lives. The autoencoder is frozen
        # and kept out of the module tree, exactly as in ScoreDiffusion.
        self.attach_codec(latent_path or cfg.get("latent"), latent)
        self.sde = build_sde(cfg)
        self.net = build_classifier_network(cfg, self.model_shape, self.num_classes)
        self.t_min = float(self.sde.eps if self.options.eps is None else self.options.eps)
        if not self.t_min < self.sde.T:
            raise ValueError(f"classifier.eps={self.t_min} must be below the SDE's T={self.sde.T}")
        self.seed = int(cfg.get("seed", 0))
        self.optim_cfg = optimizer_settings(cfg, default_lr=1e-3)
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
        return adamw_with_warmup(self.net.parameters(), self.optim_cfg)


# ---------------------------------------------------------------------------------- checkpoints
def load_classifier(path: Union[str, Path], map_location: Any = "cpu", latent: Optional[str] = None) -> NoisyClassifier:
    """Rebuild a :class:`NoisyClassifier` (eval mode) from a checkpoint file or a run directory.

    A run directory means its ``checkpoints/last.ckpt``. If the run kept an EMA of the weights,
    the checkpoint's (and so the returned) weights are the EMA's. A latent classifier loads its
    autoencoder from the recorded path, or from ``latent`` (a moved copy of the same one).
    """
    file = resolve_checkpoint_path(path)
    ckpt = torch.load(str(file), map_location=map_location, weights_only=False)
    if not isinstance(ckpt, Mapping) or ckpt.get("kind") != CHECKPOINT_KIND:
        score_model = isinstance(ckpt, Mapping) and "cfg" in (ckpt.get("hyper_parameters") or {})
        what = "a score-model checkpoint, not a noisy-classifier checkpoint" if score_model else "not a noisy-classifier checkpoint"
        raise ValueError(
            f"{file} is {what} (train a classifier with `python train.py task=classifier ...`); "
            "score-model checkpoints load with sde_diffusion.training.load_checkpoint (sample.py: ckpt=)"
        )
    hp = ckpt["hyper_parameters"]
    module = NoisyClassifier(hp["cfg"], hp["data_shape"], hp["num_classes"], latent=hp.get("latent"), latent_path=latent)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


# ---------------------------------------------------------------------------------- fitting
@dataclass
class ClassifierFitResult(FitResult):
    """What :func:`train_classifier` leaves behind; ``classifier`` is what the last checkpoint holds
    (the EMA copy when the run kept one, else ``module``), in eval mode; ``accuracy`` its
    held-out accuracy per t-bucket."""

    classifier: Optional[NoisyClassifier] = None
    accuracy: List[BucketAccuracy] = field(default_factory=list)


def train_classifier(
    cfg: Any,
    output_dir: Optional[Union[str, Path]] = None,
    *,
    extra_callbacks: Sequence[Any] = (),
    datamodule: Any = None,
) -> ClassifierFitResult:
    """Check ``cfg``, build data, classifier and Trainer, fit, and report held-out accuracy per t-bucket.

    Mirrors :func:`sde_diffusion.training.train`: the same output directory rules (argument, Hydra's
    run directory, ``cfg.run_dir``), checkpoints (``<out>/checkpoints``, ``last.ckpt``), loggers,
    EMA, resume (``resume`` / ``ckpt_path``) and Trainer options. Sample figures and the per-t
    DSM loss do not apply and are switched off. Afterwards the held-out accuracy per t-bucket is
    logged and written to ``<out>/accuracy_by_t.json``.

    Raises ValueError before the Trainer starts for a bad config or an unlabelled data set.
    """
    from ..config import build_datamodule

    out = output_dir_for(cfg, output_dir)
    plain = merge_config(to_container(with_run_dir(cfg, out)), NO_SCORE_CALLBACKS)
    plain["task"] = "classifier"
    check_config(plain)
    ClassifierOptions.from_config(plain)
    ckpt_path = resolve_checkpoint(plain, out)
    saved_latent = None
    if ckpt_path is not None:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        if saved.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{ckpt_path} is not a noisy-classifier checkpoint; it cannot be continued with task=classifier")
        saved_cfg = saved.get("hyper_parameters", {}).get("cfg", {})
        check_resume_compatible(plain, saved_cfg)
        if classifier_network_config(plain) != classifier_network_config(saved_cfg):
            raise ValueError("the checkpoint's classifier network differs from the configured one (classifier.model)")
        saved_latent = saved.get("hyper_parameters", {}).get("latent")
        del saved
    L.seed_everything(int(plain.get("seed", 0)), workers=True, verbose=False)
    dm = datamodule if datamodule is not None else build_datamodule(plain)
    num_classes = getattr(dm, "num_classes", None)
    if num_classes is None or num_classes < 2:
        raise ValueError(
            f"task=classifier needs a labelled data set with >= 2 classes; data={group(plain, 'data')[0]} "
            f"has num_classes={num_classes} (use e.g. data=digits, data=gmm or data=moons)"
        )
    # Network shape errors, and a latent= autoencoder other than the resumed run's, surface here.
    module = NoisyClassifier(plain, dm.data_shape, int(num_classes), latent=saved_latent)
    dm.setup("fit")
    out.mkdir(parents=True, exist_ok=True)
    callbacks = build_callbacks(plain, out) + list(extra_callbacks)
    trainer = build_trainer(plain, out, callbacks, build_loggers(plain, out))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    ema = find_ema(trainer)
    final: NoisyClassifier = ema.averaged_module if ema is not None and ema.averaged_module is not None else module
    final.eval()
    opts = module.options
    device = next(final.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(plain.get("seed", 0)) + 1)
    held_out = ((module.to_model_space(b[0].to(device)), b[1]) for b in dm.val_dataloader())
    rows = accuracy_by_time(final, final.sde, held_out, opts.eval_buckets, module.t_min, opts.eval_repeats, gen)
    if trainer.is_global_zero:
        _write_json(out / "accuracy_by_t.json", {"global_step": trainer.global_step, "buckets": [asdict(r) for r in rows]})
        log.info("held-out accuracy per t-bucket:\n%s", format_accuracy_table(rows))
        if not trainer.interrupted:
            mark_finished(out, "classifier", trainer.global_step)
    return ClassifierFitResult(module=module, trainer=trainer, datamodule=dm, output_dir=out, classifier=final, accuracy=rows)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


train_task = train_classifier  # what `python train.py task=<this module>` runs (jobs.train_tasks.run_training)


__all__ = [
    "train_task",
    "ClassifierOptions",
    "classifier_network_config",
    "build_classifier_network",
    "BucketAccuracy",
    "bucket_edges",
    "accuracy_by_time",
    "format_accuracy_table",
    "NoisyClassifier",
    "load_classifier",
    "ClassifierFitResult",
    "train_classifier",
]
