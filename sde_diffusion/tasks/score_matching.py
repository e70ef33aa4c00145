r"""Training a score network by denoising score matching, with Lightning.

:class:`ScoreDiffusion` owns the forward process ``sde``, the network ``net`` and the loss
(:func:`~sde_diffusion.losses.dsm_terms`, options from ``cfg.loss``); it optimises with AdamW and a
linear learning-rate warm-up. Gradient clipping (``trainer.gradient_clip_val``), mixed precision
(``trainer.precision``), devices and DDP are the Trainer's. The exponential moving average of the
weights is Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` (see :class:`EMA`);
checkpoints hold the EMA weights in ``state_dict``, the trained weights in
``current_model_state`` and the whole resolved config in ``hyper_parameters``, so a checkpoint
alone rebuilds the SDE, the network and the data shape::

    module = load_checkpoint("outputs/.../checkpoints/last.ckpt")   # net = trained, ema = EMA
    score_fn = module.score_fn(use_ema=True)                        # s(x, t) = −ε_θ(x, t)/σ(t)
    result = sample(module.sde, score_fn, (64, *module.data_shape), sampler="pc", steps=500)

:class:`ScoreTask` is what ``python train.py`` (``task=score``) fits with :func:`sde_diffusion.fit.fit`.

Reproducibility: every training step draws its times, noise, label dropout and network dropout
from a generator seeded by ``(cfg.seed, global_step, batch_idx, rank)``, so a resumed run repeats
the draws of an uninterrupted one and DDP processes draw independently.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from torch import Tensor, nn

from ..callbacks import find_ema
from ..checkpoints import CheckpointInfo
from ..config import TrainConfig, instantiate, saved_train_config, to_plain
from ..fit import Task, fitter
from ..losses import DSMTerms, dsm_terms, uniform_draws
from ..performance import channels_last_input
from ..registry import MODELS, SDES, TASKS
from ..score import ScoreModel
from .common import ClipFusedGradients, LatentSpace, adamw_with_warmup, seeded, step_seed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- the module
class ScoreDiffusion(LatentSpace, ClipFusedGradients, L.LightningModule):
    """DSM training of ``net`` for ``sde``, built from the composed config.

    Args:
        cfg: the training config (a :class:`~sde_diffusion.config.TrainConfig`, or the plain dict a
            checkpoint stores); stored as a plain dict in the checkpoint's hyper-parameters.
        data_shape: shape of one example, e.g. ``(1, 8, 8)`` (from the data module).
        num_classes: label count for a class-conditional network (``cfg.conditioning.class_labels``),
            else ``None``.

        latent: what a latent checkpoint recorded about its autoencoder (its ``weights_sha256`` is
            enforced); set when loading, not by hand.
        latent_path: load the autoencoder from here instead of ``cfg.latent`` (a moved run).

    Attributes: ``sde``, ``net`` (trained weights), ``ema`` (EMA weights or ``None``),
    ``prediction``, ``data_shape`` (the data's), ``model_shape`` (what the score model sees: the
    data's, or the latent shape with ``cfg.latent``), ``codec`` (the :class:`~sde_diffusion.latent.LatentCodec`
    or ``None``), ``cfg``.
    """

    def __init__(
        self,
        cfg: Union[TrainConfig, Mapping[str, Any]],
        data_shape: Sequence[int],
        num_classes: Optional[int] = None,
        latent: Optional[Mapping[str, Any]] = None,
        latent_path: Optional[str] = None,
        text: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        cfg = saved_train_config(cfg)  # a TrainConfig, or the dict a checkpoint stores
        hp = {"cfg": to_plain(cfg), "data_shape": [int(s) for s in data_shape], "num_classes": num_classes, "latent": None}
        if text is not None:  # only text models carry the key, so other checkpoints stay as they were
            hp["text"] = dict(text)
        self.save_hyperparameters(hp)
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        # Latent score model: the autoencoder stays outside the module tree (frozen, not in the
        # optimiser, the EMA or state_dict); the checkpoint records which one (weights digest).
        self.attach_codec(latent_path or cfg.latent, latent)
        self.sde = instantiate(cfg.sde, SDES, key="sde")
        encoder = self._text_encoder(cfg, text)
        extra = {"context_dim": encoder.dim} if encoder is not None else {}
        try:
            self.net = instantiate(cfg.model, MODELS, key="model", data_shape=self.model_shape, num_classes=num_classes,
                                   **extra)
        except (TypeError, ValueError) as err:
            if extra and "context_dim" in str(err):
                raise ValueError(f"conditioning.text needs a network with cross-attention (model=unet or a preset of it); "
                                 f"model={cfg.model.get('name')} takes no text context") from None
            raise
        self.__dict__["_hf_encoder"] = None
        if encoder is not None and encoder.kind == "tiny":
            # Inside the network: trained with it, averaged by the EMA and stored in its state dict.
            self.net.text_encoder = encoder
        elif encoder is not None:
            self.__dict__["_hf_encoder"] = encoder  # frozen and large: outside the module tree and the checkpoint
        if hasattr(self.net, "bind_sde"):  # networks fed the noise level σ(t) (NCSN++'s log σ input)
            self.net.bind_sde(self.sde)
        self.learn_sigma = bool(getattr(self.net, "learn_sigma", False))
        if self.learn_sigma:
            from ..sdes.discrete import check_variance_preserving

            check_variance_preserving(self.sde, "model.learn_sigma=true")
        self.loss_options = {**cfg.loss.options(), "learn_sigma": self.learn_sigma}
        self.prediction: str = cfg.loss.prediction
        self.label_dropout = float(cfg.conditioning.label_dropout)
        self.num_classes = num_classes
        self.seed = cfg.seed
        # An EMA network outside training (after load_checkpoint): kept out of the module tree so
        # that state_dict keys, parameter counts and the EMA callback's copy are not affected.
        self.__dict__["_ema_net"] = None
        self.__dict__["_ema_state"] = None

    # ------------------------------------------------------------------ EMA and score functions
    @property
    def ema(self) -> Optional[nn.Module]:
        """The EMA network (eval mode): the EMA callback's during ``fit``, or the checkpoint's."""
        cb = find_ema(self._trainer)
        if cb is not None and cb.averaged_module is not None:
            return cb.averaged_module.net.eval()
        if self.__dict__["_ema_net"] is None and self.__dict__["_ema_state"] is not None:
            ema_net = copy.deepcopy(self.net)
            ema_net.load_state_dict(self.__dict__["_ema_state"])
            self.__dict__["_ema_net"] = ema_net
            self.__dict__["_ema_state"] = None
        ema_net = self.__dict__["_ema_net"]
        if ema_net is not None:
            ref = next(self.net.parameters(), None)
            if ref is not None:
                ema_net.to(device=ref.device, dtype=ref.dtype)
            ema_net.eval()
        return ema_net

    # ------------------------------------------------------------------ text
    @staticmethod
    def _text_encoder(cfg: TrainConfig, record: Optional[Mapping[str, Any]]) -> Optional[nn.Module]:
        """The text encoder of ``cfg.conditioning.text`` (tiny: with the tokenizer ``record`` holds), or None."""
        tc = cfg.conditioning.text
        if not tc.enabled:
            return None
        from ..text import build_text_encoder

        if record is None:
            raise ValueError("a text model needs its tokenizer record (ScoreTask builds it from the training captions)")
        if record.get("encoder") != tc.encoder:
            raise ValueError(f"the checkpoint's text encoder is {record.get('encoder')!r} but the config says "
                             f"conditioning.text.encoder={tc.encoder}")
        enc = build_text_encoder(tc.encoder, tokenizer_state=record.get("tokenizer"), dim=tc.dim, layers=tc.layers,
                                 heads=tc.heads, name=tc.name, max_length=tc.max_length)
        if tc.encoder == "hf" and record.get("weights_sha256") not in (None, enc.digest):
            raise ValueError(f"the frozen text encoder {tc.name!r} found here has other weights (sha256 "
                             f"{enc.digest[:12]}…) than the one this model was trained with ({record['weights_sha256'][:12]}…); "
                             "use the same encoder files")
        return enc

    @property
    def has_text(self) -> bool:
        return "text" in self.hparams and self.hparams["text"] is not None

    def text_record(self) -> Optional[Dict[str, Any]]:
        """What the checkpoint records about the text encoder (kind, tokenizer, weights digest), or None."""
        return dict(self.hparams["text"]) if self.has_text else None

    def encode_prompts(self, prompts: Sequence[str], use_ema: bool = True) -> Dict[str, Tensor]:
        """``{"context": [B, L, d], "context_mask": [B, L]}`` for ``prompts`` ("" = no caption), from the encoder
        that goes with the chosen weights (the EMA copy of a tiny encoder with ``use_ema``)."""
        if not self.has_text:
            raise ValueError("this model was trained without text (conditioning.text.encoder=null): it takes no prompt; "
                             "train with data=digit_pairs conditioning.text.encoder=tiny, or use label= / no prompt")
        hf = self.__dict__.get("_hf_encoder")
        if hf is not None:
            ref = next(self.net.parameters())
            hf.to(ref.device)
            context, mask = hf.encode(list(prompts))
            context = context.to(ref.dtype)
        else:
            net = self.ema if use_ema and self.ema is not None else self.net
            context, mask = net.text_encoder.encode(list(prompts))
        return {"context": context, "context_mask": mask}

    def score_fn(self, use_ema: bool = True, **cond: Any) -> ScoreModel:
        """s_θ(x, t) as a callable ``(x [B, ...], t [B]) -> [B, ...]``; ``cond`` (e.g. ``y=labels``) goes to the net.

        With ``use_ema`` the EMA weights are used (falling back to the trained weights, with a
        warning, if the run had no EMA). Put the module in eval mode (``module.eval()``) before
        sampling with the trained weights, so that dropout is off.
        """
        net = self.net
        if use_ema:
            ema = self.ema
            if ema is None:
                warnings.warn("no EMA weights (ema.enabled was false?): using the trained weights", stacklevel=2)
            else:
                net = ema
        if self.has_text and "context" not in cond:
            # No prompt given: the empty prompt, i.e. the model's unconditional score.
            with torch.no_grad():
                cond = {**self.encode_prompts([""], use_ema=use_ema), **cond}
        return ScoreModel(net, self.sde, self.prediction, learn_sigma=self.learn_sigma, **cond)

    def _captions_cond(self, y: Optional[Tensor], part: slice, size: int, dropout: float,
                       generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """The text condition of a training batch: a caption per label from the data's grammar (or its stored
        captions), a share ``dropout`` replaced by the empty prompt, encoded."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        return self.encode_prompts(batch_captions(dm, y, part, size, dropout, generator), use_ema=False)

    # ------------------------------------------------------------------ loss
    def _labels(self, y: Optional[Tensor], dropout: float) -> Optional[Tensor]:
        """Labels for a conditional net, a share ``dropout`` replaced by the null label (for CFG)."""
        if self.num_classes is None or y is None:
            return None
        if dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def dsm_terms(self, x: Tensor, y: Optional[Tensor] = None, label_dropout: float = 0.0) -> DSMTerms:
        """Per-sample DSM terms of a batch with this module's loss options (text models: fixed captions, no dropout)."""
        cond = None
        if self.has_text:
            gen = torch.Generator().manual_seed(step_seed(self.seed, "val-captions", 0, 0, 0))
            cond = self._captions_cond(y, slice(0, x.shape[0]), x.shape[0], 0.0, gen)
        return dsm_terms(self.sde, self.net, x, y=self._labels(y, label_dropout), cond=cond, **self.loss_options)

    def _rank(self) -> int:
        return self.global_rank if self._trainer is not None else 0

    def _layout(self) -> Tuple[int, int, int]:
        """(processes, this process's rank, accumulated micro-batches per step)."""
        if self._trainer is None:
            return 1, 0, 1
        return int(self.trainer.world_size), int(self.trainer.global_rank), int(self.trainer.accumulate_grad_batches)

    def _model_input(self, x: Tensor) -> Tensor:
        """A data batch in the network's space, in NHWC memory when the profile asks for channels_last."""
        x = self.to_model_space(x)
        profile = getattr(self, "profile", None)
        return channels_last_input(x) if profile is not None and profile.channels_last else x

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Dict[str, Tensor]:
        x, y = self._model_input(batch[0]), (batch[1] if len(batch) > 1 else None)
        # The draws (label dropout, ε, t) are made for the whole global batch and this micro-batch
        # takes its slice, so any split among processes and accumulated micro-batches trains on the
        # same numbers as one process holding the whole batch.
        world, rank, accumulate = self._layout()
        a, b = batch_idx % accumulate, x.shape[0]
        size, start = b * world * accumulate, (rank * accumulate + a) * b
        part = slice(start, start + b)
        opts = self.loss_options
        with seeded(step_seed(self.seed, "train", self.global_step, batch_idx // accumulate, 0), x.device):
            cond = None
            if self.has_text:
                gen = torch.Generator().manual_seed(step_seed(self.seed, "captions", self.global_step,
                                                              batch_idx // accumulate, rank))
                cond = self._captions_cond(y, part, size, float(self.cfg.conditioning.text.dropout), gen)
            if self.num_classes is not None and y is not None and self.label_dropout > 0:
                drop = (torch.rand(size, device=y.device) < self.label_dropout)[part]
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            elif self.num_classes is None:
                y = None
            noise = torch.randn((size, *x.shape[1:]), device=x.device, dtype=x.dtype)[part]
            u_dtype = torch.float64 if opts["discrete_steps"] is not None else x.dtype
            u = uniform_draws(size, opts["stratified"], None, x.device, u_dtype)[part]
            terms = dsm_terms(self.sde, self.net, x, y=y, noise=noise, u=u, cond=cond, **opts)
        loss = terms.loss.mean()
        # Lightning writes step metrics every log_every_n_steps; a self.log call costs ~1 ms, which
        # is noticeable next to a small network's step, so only the steps that are written log.
        every = max(1, int(getattr(self._trainer, "log_every_n_steps", 1) or 1))
        if (self.global_step + 1) % every == 0:
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return {"loss": loss, "t": terms.t.detach(), "eps_mse": terms.eps_mse.detach()}

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        # The same times and noise at every evaluation, so that val/loss curves are comparable.
        x, y = self._model_input(batch[0]), (batch[1] if len(batch) > 1 else None)
        with seeded(step_seed(self.seed, "val", batch_idx, self._rank()), x.device):
            terms = self.dsm_terms(x, y, 0.0)
        loss = terms.loss.mean()
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Dict[str, Any]:
        return adamw_with_warmup(self.net.parameters(), self.cfg.optim, getattr(self, "profile", None))

    def on_fit_start(self) -> None:
        # After the EMA callback has copied the module (in setup): the training network and the EMA
        # network that draws the in-training samples are compiled each on their own. Module.compile
        # keeps parameter names, so checkpoints do not change.
        profile = getattr(self, "profile", None)
        if profile is None or not profile.compile:
            return
        ema = find_ema(self._trainer)
        nets = [self.net] + ([ema.averaged_module.net] if ema is not None and ema.averaged_module is not None else [])
        for net in nets:
            if not getattr(net, "_compiled_call_impl", None):
                net.compile()

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Outside fit (load_from_checkpoint), give `net` the trained weights and keep the EMA
        # weights for `ema`; during fit the EMA callback restores both itself.
        if self._trainer is not None or "current_model_state" not in checkpoint:
            return
        ema_state = checkpoint["state_dict"]
        checkpoint["state_dict"] = checkpoint["current_model_state"]
        self.__dict__["_ema_state"] = {k[len("net."):]: v for k, v in ema_state.items() if k.startswith("net.")}
        self.__dict__["_ema_net"] = None


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu", latent: Optional[str] = None) -> ScoreDiffusion:
    """The :class:`ScoreDiffusion` of a run directory or checkpoint, in eval mode (``net`` and ``ema``).

    A latent model loads its autoencoder from the recorded path, or from ``latent`` (a moved run);
    either must have the recorded weights. Same as ``checkpoints.load(path, kind="score")``.
    """
    from ..checkpoints import load

    return load(path, kind="score", map_location=map_location, latent=latent)


def batch_captions(dm: Any, y: Optional[Tensor], part: slice, size: int, dropout: float,
                   generator: Optional[torch.Generator] = None) -> List[str]:
    """The captions of a (micro-)batch: ``dm.captions(y)`` (the grammar's draw, or the stored caption), each
    replaced by the empty prompt with probability ``dropout``; the dropout draws are made for the whole global
    batch of ``size`` and sliced by ``part``, like the other training draws."""
    if y is None:
        raise ValueError("text conditioning needs captions: the batches carry no labels")
    if dm is None or not hasattr(dm, "captions"):
        raise ValueError("conditioning.text needs a captioned data set: data=digit_pairs, or data=folder with a "
                         "metadata.jsonl (file_name, text)")
    captions = dm.captions(y.cpu(), generator)
    if dropout > 0:
        drop = (torch.rand(size, device=y.device) < dropout)[part].cpu().tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
    return captions


def text_record_for(cfg: TrainConfig, datamodule: Any) -> Dict[str, Any]:
    """The text encoder's record for a new run: the tokenizer (a word vocabulary built from every caption the
    data set can give, or bytes) for ``tiny``; the model name for ``hf`` (its digest is added once loaded)."""
    from ..text import ByteTokenizer, WordTokenizer

    tc = cfg.conditioning.text
    if not getattr(datamodule, "has_captions", False):
        raise ValueError(f"conditioning.text.encoder={tc.encoder} needs a captioned data set: data=digit_pairs, or "
                         f"data=folder with a metadata.jsonl (file_name, text); data={cfg.data.get('name')} has none")
    if tc.encoder == "hf":
        from ..text import build_text_encoder

        return build_text_encoder("hf", name=tc.name, max_length=tc.max_length).record()
    tok = (WordTokenizer.from_captions(datamodule.caption_corpus(), tc.max_length, tc.unknown) if tc.tokenizer == "word"
           else ByteTokenizer(tc.max_length))
    return {"encoder": "tiny", "tokenizer": tok.state(), "dim": int(tc.dim)}


@TASKS.register("score")
class ScoreTask(Task):
    """Denoising score matching of a score network (``python train.py``, the default task)."""

    name = "score"
    draws_samples = True

    def check_data(self, cfg: TrainConfig, datamodule: Any) -> None:
        if cfg.conditioning.class_labels and getattr(datamodule, "num_classes", None) is None:
            raise ValueError("conditioning.class_labels=true needs a labelled data set (data module num_classes is None)")

    def build_module(self, cfg: TrainConfig, datamodule: Any, resumed: Optional[CheckpointInfo]) -> ScoreDiffusion:
        num_classes = getattr(datamodule, "num_classes", None) if cfg.conditioning.class_labels else None
        text = None
        if cfg.conditioning.text.enabled:
            text = resumed.hparams.get("text") if resumed is not None else None
            if text is None:
                text = text_record_for(cfg, datamodule)
        # A latent= autoencoder other than the resumed run's is refused here.
        return ScoreDiffusion(cfg, datamodule.data_shape, num_classes, latent=resumed.latent if resumed else None,
                              text=text)

    def load_module(self, info: CheckpointInfo, map_location: Any = "cpu", latent: Optional[str] = None) -> ScoreDiffusion:
        extra = {"latent_path": str(latent)} if latent else {}
        return ScoreDiffusion.load_from_checkpoint(str(info.path), map_location=map_location, weights_only=False, **extra)


train = fitter(ScoreTask)  # train(cfg, output_dir=None, *, extra_callbacks=(), datamodule=None)


__all__ = ["ScoreDiffusion", "ScoreTask", "load_checkpoint", "train"]
