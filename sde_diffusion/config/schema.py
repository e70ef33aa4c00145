"""The typed configuration of ``train.py`` and ``sample.py``: every default of a run lives here.

Hydra composes ``conf/train.yaml`` (or ``conf/sample.yaml``) on top of :class:`TrainConfig`
(:class:`SampleConfig`), registered in Hydra's ConfigStore as ``train_schema`` (``sample_schema``),
so a misspelt key or a value of the wrong type fails at composition. The entry point then calls
:func:`~sde_diffusion.config.parse_train` once, which runs the cross-field checks in
``__post_init__``; below the entry points code receives these objects, never a dict.

The extension groups ``sde``, ``model``, ``data``, ``sampler`` and ``trainer`` stay open mappings
``{name: <registered name>, **options}`` or ``{_target_: pkg.mod.Class, **options}``: their
defaults live in the constructors of the classes they name (``conf/<group>/<name>.yaml`` lists
them for the command line and must agree, see ``tests/test_config.py``), and
:func:`~sde_diffusion.config.instantiate` builds them.

This module imports nothing heavy (no torch), so the entry points can register it cheaply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Choices checked here; the code that uses each value imports the same tuple.
WEIGHTINGS = ("sigma2", "g2", "importance", "p2")
PREDICTIONS = ("eps", "score", "x0", "v")
REDUCTIONS = ("mean", "sum")
TIME_INPUTS = ("i/N", "(i-1)/(N-1)")
LOGGERS = ("csv", "tensorboard")
RECONSTRUCTIONS = ("l1", "l2")
DTYPES = ("float32", "float64", "bfloat16")
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ODE_SOLVERS = ("dopri5", "scipy", "euler", "heun", "rk4")
LIKELIHOOD_SPLITS = ("val", "train", "reference")
LIKELIHOOD_METHODS = ("ode", "vlb")
INPAINT_METHODS = ("replace", "tweedie")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {key} {value!r}; choose one of: {', '.join(map(str, choices))}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _int_at_least(key: str, value: Any, minimum: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
             f"{key} must be an integer >= {minimum}, got {value!r}")


def _finite_at_least(key: str, value: Any, minimum: float) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= minimum,
             f"{key} must be a finite number >= {minimum}, got {value!r}")


# ================================================================================== training
@dataclass
class LossConfig:
    """Denoising score matching (:func:`~sde_diffusion.losses.dsm_terms`)."""

    weighting: str = "sigma2"        # sigma2 (eps-loss) | g2 (likelihood weighting) | importance (g2, t ~ g²/σ²) | p2
    prediction: str = "eps"          # eps | score | x0 | v: the network's target (the objective is the same)
    reduction: str = "mean"          # mean | sum over data dimensions (the batch is always averaged)
    stratified: bool = True          # low-discrepancy t across the batch
    eps: Optional[float] = None      # smallest training time (None: sde.eps)
    discrete_steps: Optional[int] = None  # N: DDPM's discrete-time loss (VP processes); None: continuous t
    time_input: str = "i/N"          # DDPM loss: network time of step i, i/N or (i-1)/(N-1) (times T)
    p2_k: float = 1.0                # p2 weighting sigma²/(k + SNR)^gamma (Choi et al. 2022)
    p2_gamma: float = 1.0
    hybrid_lambda: float = 0.001     # model.learn_sigma=true: L_simple + hybrid_lambda * L_vlb (Nichol & Dhariwal)
    hybrid_steps: int = 1000         # N of the chain L_vlb is taken on (continuous t; discrete_steps otherwise)

    def __post_init__(self) -> None:
        _choice("loss.weighting", self.weighting, WEIGHTINGS)
        _choice("loss.prediction", self.prediction, PREDICTIONS)
        _choice("loss.reduction", self.reduction, REDUCTIONS)
        _choice("loss.time_input", self.time_input, TIME_INPUTS)
        if self.discrete_steps is not None:
            _int_at_least("loss.discrete_steps", self.discrete_steps, 1)
        _require(float(self.p2_k) > 0 and float(self.p2_gamma) >= 0,
                 f"loss.p2_k must be positive and loss.p2_gamma non-negative, got {self.p2_k}, {self.p2_gamma}")
        _require(float(self.hybrid_lambda) >= 0, f"loss.hybrid_lambda must be non-negative, got {self.hybrid_lambda}")
        _int_at_least("loss.hybrid_steps", self.hybrid_steps, 1)
        if self.eps is not None:
            _require(float(self.eps) > 0, f"loss.eps must be positive (or null for sde.eps), got {self.eps}")

    def options(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~sde_diffusion.losses.dsm_terms`."""
        return {"weighting": self.weighting, "prediction": self.prediction, "eps": self.eps,
                "reduction": self.reduction, "stratified": self.stratified,
                "discrete_steps": self.discrete_steps, "time_input": self.time_input,
                "p2_k": float(self.p2_k), "p2_gamma": float(self.p2_gamma),
                "hybrid_lambda": float(self.hybrid_lambda), "hybrid_steps": int(self.hybrid_steps)}


@dataclass
class OptimConfig:
    """AdamW with a linear learning-rate warm-up; gradient clipping is ``trainer.gradient_clip_val``."""

    lr: float = 2.0e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000

    def __post_init__(self) -> None:
        _require(float(self.lr) > 0, f"optim.lr must be positive, got {self.lr}")
        _require(float(self.weight_decay) >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _int_at_least("optim.warmup_steps", self.warmup_steps, 0)
        _require(len(self.betas) == 2 and all(0 <= float(b) < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (samples and checkpoints use it).

    w_ema ← d·w_ema + (1 − d)·w after every ``update_every_n_steps`` optimiser steps, with d = decay,
    or with ``warmup`` d = min(decay, (1 + n)/(10 + n)) at the n-th update (score_sde's ramp).
    """

    enabled: bool = True
    decay: float = 0.9999
    update_every_n_steps: int = 1
    start_step: Optional[int] = None
    warmup: bool = False

    def __post_init__(self) -> None:
        if self.enabled:
            _require(0.0 <= float(self.decay) < 1.0, f"ema.decay must lie in [0, 1), got {self.decay}")
            _int_at_least("ema.update_every_n_steps", self.update_every_n_steps, 1)


@dataclass
class TextConfig:
    """Prompts through a text encoder and cross-attention (``model=unet``); a captioned data set
    (``data=digit_pairs``, or ``data=folder`` with a ``metadata.jsonl``)."""

    encoder: Optional[str] = None    # null: no text | tiny (trained with the model, offline) | hf (frozen CLIP / T5)
    dropout: float = 0.1             # share of captions replaced by the empty prompt (classifier-free guidance)
    tokenizer: str = "word"          # tiny: word (vocabulary of the training captions, stored in the checkpoint) | byte
    max_length: int = 16             # tokens read (with <bos>); longer prompts are cut, with a warning
    unknown: str = "error"           # word tokenizer, unknown words in a prompt: error (names them) | unk (<unk> token)
    dim: int = 64                    # tiny: width of the token embeddings (the context's d)
    layers: int = 2                  # tiny: transformer layers
    heads: int = 4                   # tiny: attention heads
    name: Optional[str] = None       # hf: a local directory or a model name already in the Hugging Face cache

    def __post_init__(self) -> None:
        if self.encoder is not None:
            _choice("conditioning.text.encoder", self.encoder, ("tiny", "hf"))
        _require(0.0 <= float(self.dropout) < 1.0, f"conditioning.text.dropout must lie in [0, 1), got {self.dropout}")
        _choice("conditioning.text.tokenizer", self.tokenizer, ("word", "byte"))
        _choice("conditioning.text.unknown", self.unknown, ("error", "unk"))
        _int_at_least("conditioning.text.max_length", self.max_length, 2)
        for key in ("dim", "layers", "heads"):
            _int_at_least(f"conditioning.text.{key}", getattr(self, key), 1)

    @property
    def enabled(self) -> bool:
        return self.encoder is not None


@dataclass
class ConditioningConfig:
    class_labels: bool = False       # train p(x | y) with the data set's labels
    label_dropout: float = 0.1       # share of labels replaced by the null label (classifier-free guidance)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        _require(0.0 <= float(self.label_dropout) < 1.0,
                 f"conditioning.label_dropout must lie in [0, 1), got {self.label_dropout}")
        _require(not (self.class_labels and self.text.enabled),
                 "conditioning.class_labels=true and conditioning.text.encoder together: condition on one of them")


@dataclass
class CheckpointCallbackConfig:
    every_n_steps: int = 5000        # step_XXXXXXX.ckpt (plus last.ckpt) every N steps; 0: only at the end
    save_top_k: int = -1             # -1 keeps every step checkpoint, k keeps the newest k
    last_every_minutes: Optional[float] = 10.0  # last.ckpt every so many minutes of training (None: off)
    last_every_n_steps: Optional[int] = None     # and/or every N steps (None: off)

    def __post_init__(self) -> None:
        _int_at_least("callbacks.checkpoint.every_n_steps", self.every_n_steps, 0)
        if self.last_every_minutes is not None:
            _require(float(self.last_every_minutes) > 0,
                     f"callbacks.checkpoint.last_every_minutes must be positive or null, got {self.last_every_minutes}")
        if self.last_every_n_steps is not None:
            _int_at_least("callbacks.checkpoint.last_every_n_steps", self.last_every_n_steps, 1)


@dataclass
class SamplesCallbackConfig:
    """<run_dir>/samples/step_XXXXXXX.png and latest.png, drawn with the EMA weights."""

    enabled: bool = True
    every_n_steps: int = 5000        # 0: only at the end
    num_samples: int = 64
    steps: Optional[int] = None      # sampler steps (None: the sampler config's)
    use_ema: bool = True
    max_seconds: Optional[float] = 120.0  # one figure's budget: over it, fewer samples (>= 4), then fewer steps (>= 10)

    def __post_init__(self) -> None:
        _int_at_least("callbacks.samples.every_n_steps", self.every_n_steps, 0)
        _int_at_least("callbacks.samples.num_samples", self.num_samples, 1)


@dataclass
class LossByTimeCallbackConfig:
    every_n_steps: int = 100         # 0: off
    num_buckets: int = 10

    def __post_init__(self) -> None:
        _int_at_least("callbacks.loss_by_t.every_n_steps", self.every_n_steps, 0)
        _int_at_least("callbacks.loss_by_t.num_buckets", self.num_buckets, 1)


@dataclass
class MetricsCallbackConfig:
    """Sample-quality metrics during training (EMA weights), logged and appended to <run_dir>/metrics.jsonl:
    digits-FD/IS/KID for the digits, FID/IS/KID when the Inception weights are present for other images,
    sliced W2 for vectors."""

    every_n_steps: int = 0           # 0: off
    num_samples: int = 256
    steps: Optional[int] = None      # sampler steps (None: the sample figures' steps)
    num_reference: Optional[int] = None  # real images for FID (None: the whole training set; statistics cached)
    fid_weights: Optional[str] = None    # Inception file (None: the default search; absent: FID skipped with a warning)

    def __post_init__(self) -> None:
        _int_at_least("callbacks.metrics.every_n_steps", self.every_n_steps, 0)
        _int_at_least("callbacks.metrics.num_samples", self.num_samples, 2)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointCallbackConfig = field(default_factory=CheckpointCallbackConfig)
    samples: SamplesCallbackConfig = field(default_factory=SamplesCallbackConfig)
    loss_by_t: LossByTimeCallbackConfig = field(default_factory=LossByTimeCallbackConfig)
    metrics: MetricsCallbackConfig = field(default_factory=MetricsCallbackConfig)
    progress_refresh_rate: int = 1
    extra: List[str] = field(default_factory=list)  # more Lightning callbacks by import path, e.g. my_pkg.probes:GradNorm


@dataclass
class ClassifierConfig:
    """``task=classifier``: a time-dependent classifier p(y | x_t, t) for classifier guidance."""

    model: Dict[str, Any] = field(default_factory=dict)  # overrides of the model group for the classifier network
    eps: Optional[float] = None      # smallest training time (None: sde.eps)
    stratified: bool = True
    label_smoothing: float = 0.0
    eval_buckets: int = 10           # t-buckets of the held-out accuracy table
    eval_repeats: int = 4            # noise draws per held-out example and bucket

    def __post_init__(self) -> None:
        if self.eps is not None:
            _require(float(self.eps) > 0, f"classifier.eps must be positive (or null for sde.eps), got {self.eps}")
        _require(0.0 <= float(self.label_smoothing) < 1.0,
                 f"classifier.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        _int_at_least("classifier.eval_buckets", self.eval_buckets, 1)
        _int_at_least("classifier.eval_repeats", self.eval_repeats, 1)


@dataclass
class AutoencoderConfig:
    """``task=autoencoder``: the KL autoencoder (f = 2^(len(ch_mult)−1)) and its objective."""

    latent_channels: int = 4
    ch: int = 16
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    dropout: float = 0.0
    beta: float = 1.0e-3             # weight of KL(q || N(0, I)) per data dimension
    reconstruction: str = "l1"       # l1 | l2
    scale_examples: int = 2048       # training examples that measure the latent scale
    figures_every_n_steps: int = 500

    def __post_init__(self) -> None:
        _choice("autoencoder.reconstruction", self.reconstruction, RECONSTRUCTIONS)
        _require(float(self.beta) >= 0, f"autoencoder.beta must be >= 0, got {self.beta}")
        _int_at_least("autoencoder.scale_examples", self.scale_examples, 2)


@dataclass
class PerfConfig:
    """Speed switches of training (``perf.*``), the GPU profile.

    Each is true, false, or null = auto: on when the run trains on a CUDA device (``trainer=gpu``,
    or ``trainer=auto`` with a GPU present), off otherwise, so that a CPU run computes exactly what
    it always did. :func:`~sde_diffusion.performance.resolve_profile` turns them into one
    :class:`~sde_diffusion.performance.Profile` per run; ``trainer.precision`` (null: bf16-mixed on
    a GPU with bfloat16, else 32-true) and the top-level ``compile`` follow the same rule.
    """

    tf32: Optional[bool] = None            # TF32 tensor cores for float32 matmuls and convolutions
    channels_last: Optional[bool] = None   # NHWC memory format for image networks (weights and inputs)
    fused_adamw: Optional[bool] = None     # AdamW's fused single-kernel step
    cudnn_benchmark: Optional[bool] = None  # cuDNN autotuning (pays off with fixed shapes)
    static_shapes: Optional[bool] = None   # drop the last incomplete batch, so compiled graphs see one shape (auto: with compile)
    loader_workers: Optional[int] = None   # DataLoader workers (auto: cores per device, at most 8, on CUDA; the data group's on CPU)

    def __post_init__(self) -> None:
        for key in ("tf32", "channels_last", "fused_adamw", "cudnn_benchmark", "static_shapes"):
            value = getattr(self, key)
            _require(value is None or isinstance(value, bool), f"perf.{key} must be true, false or null (auto), got {value!r}")
        if self.loader_workers is not None:
            _int_at_least("perf.loader_workers", self.loader_workers, 0)


@dataclass
class TrainConfig:
    """``python train.py``: what to train (``task``), on what, and how.

    Example::

        cfg = parse_train({"sde": {"name": "vp"}, "data": {"name": "toy2d", "dataset": "moons"},
                           "model": {"name": "mlp"}, "trainer": {"max_steps": 100}})
        cfg.loss.weighting, cfg.optim.lr        # 'sigma2', 0.0002
    """

    # Extension groups: {name: <registered>, ...} or {_target_: pkg.mod.Class, ...} (conf/<group>/).
    sde: Dict[str, Any] = field(default_factory=lambda: {"name": "vp", "_target_": None})
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "unet", "_target_": None})
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "digits", "_target_": None})
    trainer: Dict[str, Any] = field(default_factory=dict)   # Lightning Trainer arguments (+ name, num_threads)
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "euler_maruyama", "_target_": None})  # in-training figures
    task: Dict[str, Any] = field(default_factory=lambda: {"name": "score", "_target_": None})  # TASKS: score | classifier | autoencoder
    seed: int = 0                    # model initialisation and every training draw
    run_dir: Optional[str] = None    # output directory; give it explicitly to be able to resume
    resume: bool = False             # continue from <run_dir>/checkpoints/last.ckpt if it exists
    ckpt_path: Optional[str] = None  # a .ckpt file to continue from, or `last`
    latent: Optional[str] = None     # an autoencoder run: train on its scaled latents (LSGM / latent diffusion)
    compile: Optional[bool] = None   # torch.compile the network and its EMA copy (null: on CUDA; checkpoints unchanged)
    perf: PerfConfig = field(default_factory=PerfConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    logger: Any = "csv"              # csv | tensorboard | a list of them | null
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def __post_init__(self) -> None:
        for key in ("sde", "model", "data", "task"):
            node = getattr(self, key)
            _require(isinstance(node, dict) and (node.get("name") or node.get("_target_")),
                     f"config group {key!r} needs a name (choose one with {key}=<name>, conf/{key}/) "
                     f"or a _target_ (a class of your own: {key}._target_=my_pkg.module.Class)")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed must be an integer, got {self.seed!r}")
        for name in self.loggers:
            _choice("logger", name, LOGGERS)
        threads = self.trainer.get("num_threads")
        _require(threads in (None, "auto") or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1),
                 f"trainer.num_threads must be an integer >= 1, auto or null, got {threads!r}")
        _require(self.compile is None or isinstance(self.compile, bool), f"compile must be true, false or null (auto), got {self.compile!r}")
        if self.loss.discrete_steps is not None:
            sde_name = self.sde.get("name")
            _require(sde_name not in ("subvp", "ve"),
                     f"loss.discrete_steps (the DDPM loss) needs a variance-preserving process (sde=vp or cosine_vp), "
                     f"got sde={sde_name}")
        if self.model.get("learn_sigma"):
            sde_name = self.sde.get("name")
            _require(sde_name not in ("subvp", "ve"),
                     f"model.learn_sigma=true learns the variance of DDPM's discrete chain, which needs a "
                     f"variance-preserving process (sde=vp or cosine_vp), got sde={sde_name}")
            _require(self.loss.prediction == "eps",
                     f"model.learn_sigma=true needs loss.prediction=eps (the hybrid loss is on the noise prediction), "
                     f"got loss.prediction={self.loss.prediction}")

    @property
    def num_threads(self) -> Any:
        """torch's intra-op CPU threads (``trainer.num_threads``): a count, ``auto`` (1 on the CPU,
        the cores per device on CUDA) or None (torch's default)."""
        value = self.trainer.get("num_threads")
        return value if value in (None, "auto") else int(value)

    @property
    def progress_bar(self) -> bool:
        """``trainer.enable_progress_bar`` (Lightning's default: on)."""
        return bool(self.trainer.get("enable_progress_bar", True))

    @property
    def figure_steps(self) -> int:
        """Sampler steps of the in-training figures: ``callbacks.samples.steps``, else the sampler's ``steps``."""
        steps = self.callbacks.samples.steps if self.callbacks.samples.steps is not None else self.sampler.get("steps")
        if steps is None:
            raise ValueError("the in-training figures need a step count: set callbacks.samples.steps (or sampler.steps)")
        return int(steps)

    @property
    def task_name(self) -> str:
        """The registered name, or the import path, of the training task."""
        return str(self.task.get("_target_") or self.task.get("name"))

    @property
    def loggers(self) -> List[str]:
        """The logger names (``logger`` may be a name, a list of names, or null)."""
        if self.logger in (None, False):
            return []
        return [str(self.logger)] if isinstance(self.logger, str) else [str(n) for n in self.logger]


# ================================================================================== sampling
@dataclass
class GuidanceConfig:
    scale: float = 0.0               # classifier-free guidance w: (1 + w) eps(x, y) − w eps(x, null) (conditional models)
    classifier: Optional[str] = None  # classifier guidance: a `train.py task=classifier` run or .ckpt (same SDE and data shape)
    classifier_scale: float = 1.0    # w_c >= 0: score + w_c ∇x log p(label | x_t, t); with a conditional model it is
                                     # added to the classifier-free guided score (both guidances at once)

    def __post_init__(self) -> None:
        _finite_at_least("guidance.scale", self.scale, 0.0)
        _finite_at_least("guidance.classifier_scale", self.classifier_scale, 0.0)
        if self.classifier is not None and str(self.classifier).strip() in ("", "None"):
            self.classifier = None
        _require(self.classifier is not None or self.classifier_scale == 1.0,
                 f"guidance.classifier_scale={self.classifier_scale:g} has no effect without guidance.classifier="
                 "<classifier run or .ckpt> (for classifier-free guidance use guidance.scale)")


@dataclass
class InpaintConfig:
    """``task=inpaint|colorize``: how the observed part conditions the samples."""

    method: str = "replace"          # replace (projection after every step) | tweedie (conditional score)
    fixed_noise: bool = False        # replace: one noise draw for the whole run (deterministic with ODE samplers)
    obs_std: float = 1.0e-3          # tweedie: observation noise std
    mask_ratio: float = 0.5          # mask=random: share of pixels to generate

    def __post_init__(self) -> None:
        _choice("inpaint.method", self.method, INPAINT_METHODS)
        _require(isinstance(self.obs_std, (int, float)) and float(self.obs_std) > 0,
                 f"inpaint.obs_std must be positive, got {self.obs_std!r}")


@dataclass
class LikelihoodConfig:
    """``mode=likelihood``: −log p(x) through the probability-flow ODE (:func:`~sde_diffusion.likelihood.log_likelihood`)."""

    split: str = "val"               # val | train (held-out / training examples) | reference (vector data only)
    divergence: str = "auto"         # auto (exact trace for D <= 16, else hutchinson) | exact | hutchinson
    noise: str = "rademacher"        # hutchinson probes: rademacher | gaussian
    n_probes: int = 2                # hutchinson probes per example (>= 2: the estimator's standard error is reported)
    solver: str = "dopri5"           # dopri5 | scipy | euler | heun | rk4
    rtol: float = 1.0e-5
    atol: float = 1.0e-5
    steps: int = 100                 # fixed-step solvers only
    eps: Optional[float] = None      # start time (None: sde.eps)
    method: str = "ode"              # ode (exact NLL, probability-flow ODE) | vlb (DDPM's bound, with the ODE NLL next to it)
    # method=vlb (sde_diffusion/vlb.py; VP processes):
    variance: str = "beta"           # reverse variance sigma_i^2: beta | beta_tilde | learned (model.learn_sigma=true)
    beta_schedule: str = "auto"      # auto (ddpm if trained with loss.discrete_steps, else sde) | sde | ddpm | linear | cosine
    train_steps: Optional[int] = None  # N of the chain (None: the run's loss.discrete_steps, else 1000)
    vlb_steps: Optional[int] = None  # respace the chain to this many steps (None: N)
    terms: Optional[int] = None      # None: every step (N NFE per batch); K: K importance-sampled steps per example
    decoder: str = "auto"            # auto (discretized for images) | discretized | gaussian (vector data, nats)
    with_ode: bool = True            # also the probability-flow NLL of the same examples, in the same report

    def __post_init__(self) -> None:
        _choice("likelihood.method", self.method, LIKELIHOOD_METHODS)
        _choice("likelihood.variance", self.variance, ("beta", "beta_tilde", "learned"))
        _choice("likelihood.beta_schedule", self.beta_schedule, ("auto", "sde", "ddpm", "linear", "cosine"))
        _choice("likelihood.decoder", self.decoder, ("auto", "discretized", "gaussian"))
        for key in ("train_steps", "vlb_steps", "terms"):
            if getattr(self, key) is not None:
                _int_at_least(f"likelihood.{key}", getattr(self, key), 1)
        _choice("likelihood.split", self.split, LIKELIHOOD_SPLITS)
        _choice("likelihood.divergence", self.divergence, DIVERGENCES)
        _choice("likelihood.noise", self.noise, PROBES)
        _choice("likelihood.solver", self.solver, ODE_SOLVERS)
        _int_at_least("likelihood.n_probes", self.n_probes, 1)
        _int_at_least("likelihood.steps", self.steps, 1)
        _require(float(self.rtol) > 0 and float(self.atol) > 0,
                 f"likelihood.rtol and likelihood.atol must be positive, got {self.rtol}, {self.atol}")
        if self.eps is not None:
            _require(float(self.eps) > 0, f"likelihood.eps must be positive (or null for sde.eps), got {self.eps}")

    def vlb_options(self) -> Dict[str, Any]:
        """The bound's settings (method=vlb), as recorded in the report."""
        return {"variance": self.variance, "beta_schedule": self.beta_schedule, "train_steps": self.train_steps,
                "vlb_steps": self.vlb_steps, "terms": self.terms, "decoder": self.decoder, "with_ode": bool(self.with_ode)}

    def options(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~sde_diffusion.likelihood.log_likelihood` (all but ``split``)."""
        return {"divergence": self.divergence, "noise": self.noise, "n_probes": int(self.n_probes),
                "solver": self.solver, "rtol": float(self.rtol), "atol": float(self.atol), "steps": int(self.steps),
                "eps": None if self.eps is None else float(self.eps)}


@dataclass
class MetricsConfig:
    """``mode=metrics``: sample, then compare with real data (vectors: SW and MMD; digits: digits-FD; images: FID)."""

    num_reference: Optional[int] = None  # real examples to compare with (None: images: the whole training set, as
                                     # the paper's FID; vectors: n)
    projections: int = 256           # sliced Wasserstein directions
    mmd_max: int = 2000              # MMD uses at most this many points per side (O(N²) memory)
    fid_weights: Optional[str] = None  # Inception TorchScript file for FID (None: the default search, evaluation/inception.py)
    stats_cache: Optional[str] = None  # where real-data feature statistics are cached (None: <cache>/reference_stats)

    def __post_init__(self) -> None:
        if self.num_reference is not None:
            _int_at_least("metrics.num_reference", self.num_reference, 1)
        _int_at_least("metrics.projections", self.projections, 1)
        _int_at_least("metrics.mmd_max", self.mmd_max, 2)


@dataclass
class PlotsConfig:
    """``mode=plots``: every figure of a run, in ``<run dir>/plots``."""

    num_samples: int = 64            # samples in the sample figure (vectors: 2000 at least)
    trajectories: int = 64           # particles in the 2-D trajectory figure
    steps: int = 100                 # steps of the reverse SDE (euler_maruyama) and PF ODE (ode_heun) paths
    strip: int = 8                   # time points in the denoising strip

    def __post_init__(self) -> None:
        for key in ("num_samples", "trajectories", "steps", "strip"):
            _int_at_least(f"plots.{key}", getattr(self, key), 1)


#: the keys of a sampler group node that are not constructor options of the sampler
SAMPLER_GROUP_KEYS = ("name", "_target_", "steps")
#: sampler steps when neither ``steps`` nor the sampler group gives any
DEFAULT_SAMPLER_STEPS = 1000


@dataclass
class SampleConfig:
    """``python sample.py``: sample from, and evaluate, a trained model.

    The SDE, network and data set come from the checkpoint; ``sde``/``model``/``data`` given here
    are checks against it (a value that differs from the checkpoint's is an error naming both;
    ``data.*`` keys such as ``data.root`` override). ``task`` is a plain value (``task=inpaint``),
    not train.py's config group ``conf/task/``.

    Example::

        cfg = parse_sample({"ckpt": "outputs/train/digits_vp/<date>", "sampler": {"name": "pc", "steps": 500}})
        cfg.sampler_name, cfg.sampler_steps, cfg.sampler_options   # 'pc', 500, {}
    """

    mode: str = "sample"             # sample | likelihood | metrics | plots (MODES)
    task: str = "sample"             # sample | inpaint | colorize (SAMPLE_TASKS)
    # The sampler: {name: <registered>, steps: <int>, **options}; name auto = the measured default for
    # a trained network, the SDE and the NFE budget `steps` (conf/sampler/<name>.yaml).
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "auto", "_target_": None})
    sde: Optional[Dict[str, Any]] = None     # a check: every key given must equal the checkpoint's
    model: Optional[Dict[str, Any]] = None   # a check (only when named on the command line: a data group brings one)
    data: Optional[Dict[str, Any]] = None    # the name is a check; other keys (data.root) override the checkpoint's
    trainer: Optional[Dict[str, Any]] = None  # None: this process on `device`; cpu | gpu | ddp: Lightning Fabric
    ckpt: Optional[str] = None       # a .ckpt or a training run directory (its checkpoints/last.ckpt);
                                     # None: the newest finished score-model run under runs_root
    latent: Optional[str] = None     # latent models: load the autoencoder from here instead of the recorded path
                                     # (it must have the recorded weights)
    runs_root: str = "outputs/train"  # where `python train.py` writes its runs (searched when ckpt is None)
    out: Optional[str] = None        # output directory; None: <run dir>/samples/<task>-<sampler>-<steps>steps-seed<seed>-<hash>
                                     # (likelihood: <run dir>/likelihood/<...>, plots: <run dir>/plots)
    n: int = 64                      # number of samples (likelihood: number of data examples)
    batch_size: int = 64
    steps: Optional[int] = None      # sampler steps; None: the sampler group's `steps`
    # The time grid: null = the sampler's rule; fit = fitted to this model once (stored in <run>/schedules,
    # keyed by sampler, options, steps and weights; reused after); or the path of a stored grid (JSON).
    schedule: Optional[str] = None
    # The fit's objective: null = the default for a trained network (samplers.fitted.DEFAULT_OBJECTIVES: curvature);
    # curvature | whitened (equidistributed local error of a teacher path, Euclidean / in the density's Hessian
    # norm) | path (dynamic programming against that path) | samples (the grid and level whose samples come
    # closest in distribution to the sampler's own at many steps).
    schedule_objective: Optional[str] = None
    seed: int = 0                    # batch b draws from a generator seeded by f(seed, b): same seed, same samples
    ema: bool = True                 # the EMA weights (falls back to the trained weights, with a warning, if none)
    device: str = "auto"             # auto | cpu | cuda | cuda:<k> (ignored when trainer is set)
    dtype: str = "float32"           # float32 | float64 | bfloat16 (sampling only: the network under bf16 autocast,
                                     # the sampler's state in float32)
    compile: bool = False            # torch.compile the network (batches padded to one shape, so it compiles once)
    # Clamp the denoiser's x0 estimate to the data range at every step (static thresholding):
    # auto = with a deterministic default sampler on pixel-space image models; never for vectors or
    # latents (unbounded); true: with any sampler | false.
    clip_denoised: Any = "auto"
    progress: bool = True            # progress bar on stderr
    resume: bool = True              # reuse finished batches of an identical earlier run; false: start over
    figures: bool = True             # samples.png (grid or scatter) and triptych.png
    keep_shards: bool = True         # keep shards/ after the merge (needed to extend or resume later)
    # Text models (conditioning.text): one prompt for all n samples, or a file of prompts (one a line, n samples
    # each); guidance.scale is the classifier-free weight against negative_prompt ("" = no caption).
    prompt: Optional[str] = None
    prompts: Optional[str] = None
    negative_prompt: str = ""
    # mode=metrics: null = the checkpoint ckpt names; all = every saved checkpoint of its run (step_*.ckpt and
    # last.ckpt), resumably, with the best reported (the paper's checkpoint sweep)
    checkpoints: Optional[str] = None
    label: Optional[int] = None      # class of every sample (conditional models: None = 0, 1, ..., K-1, 0, ...;
                                     # required with guidance.classifier)
    mask: str = "center"             # inpaint: region to generate: left | right | top | bottom | center | random,
                                     # or a .npy file holding the mask itself (1 = observed, 0 = generate)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)

    def __post_init__(self) -> None:
        _int_at_least("n", self.n, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        if self.steps is not None:
            _int_at_least("steps", self.steps, 1)
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed must be an integer, got {self.seed!r}")
        _choice("dtype", self.dtype, DTYPES)
        _require(not (self.prompt is not None and self.prompts is not None),
                 "give prompt=<text> or prompts=<file>, not both")
        if self.checkpoints is not None:
            _require(self.checkpoints == "all" and self.mode == "metrics",
                     f"checkpoints={self.checkpoints!r}: only checkpoints=all (every saved checkpoint of the run) with "
                     "mode=metrics is known; leave it null otherwise")
        if self.schedule_objective is not None:
            from ..samplers.fitted import OBJECTIVES

            _choice("schedule_objective", self.schedule_objective, OBJECTIVES)
        if self.schedule is not None:
            _require(isinstance(self.schedule, str) and bool(self.schedule.strip()),
                     f"schedule must be fit, the path of a stored grid, or null; got {self.schedule!r}")
        _require(isinstance(self.clip_denoised, bool) or self.clip_denoised == "auto",
                 f"clip_denoised must be auto, true or false, got {self.clip_denoised!r}")
        if self.label is not None:
            _require(isinstance(self.label, int) and not isinstance(self.label, bool) and self.label >= 0,
                     f"label must be a class index >= 0 or null, got {self.label!r}")
        _require(isinstance(self.sampler, dict) and bool(self.sampler.get("name") or self.sampler.get("_target_")),
                 "no sampler: choose one with sampler=<name> (conf/sampler/)")
        _int_at_least("sampler.steps", self.sampler_steps, 1)
        for key in ("ckpt", "latent", "out"):
            value = getattr(self, key)
            if value is not None and str(value).strip() in ("", "None"):
                setattr(self, key, None)

    @property
    def sampler_name(self) -> str:
        """The sampler the group names: its ``_target_`` import path, else its registered name (``auto``: the default rule)."""
        return str(self.sampler.get("_target_") or self.sampler.get("name"))

    @property
    def sampler_steps(self) -> int:
        """``steps`` if given, else the sampler group's ``steps``, else 1000."""
        if self.steps is not None:
            return self.steps
        steps = self.sampler.get("steps")
        return DEFAULT_SAMPLER_STEPS if steps is None else steps

    @property
    def sampler_options(self) -> Dict[str, Any]:
        """The sampler's constructor options: the group without ``name``, ``_target_`` and ``steps``."""
        return {k: v for k, v in self.sampler.items() if k not in SAMPLER_GROUP_KEYS}


__all__ = [
    "TrainConfig", "SampleConfig", "LossConfig", "OptimConfig", "EmaConfig", "ConditioningConfig",
    "CallbacksConfig", "CheckpointCallbackConfig", "MetricsCallbackConfig", "TextConfig", "SamplesCallbackConfig", "LossByTimeCallbackConfig",
    "ClassifierConfig", "AutoencoderConfig", "PerfConfig", "GuidanceConfig", "InpaintConfig", "LikelihoodConfig",
    "MetricsConfig", "PlotsConfig", "WEIGHTINGS", "PREDICTIONS", "REDUCTIONS", "TIME_INPUTS", "LOGGERS",
]
