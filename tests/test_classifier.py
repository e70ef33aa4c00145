"""Time-dependent classifiers: networks, config, training against the exact mixture posterior, guidance."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest
import torch

import numpy as np

from sde_diffusion import sample
from sde_diffusion.config import parse_sample, parse_train, to_plain
from sde_diffusion.fit import fit
from sde_diffusion.models.time_classifier import MLPClassifier, UNetEncoderClassifier
from sde_diffusion.tasks.classifier import (
    CHECKPOINT_KIND,
    ClassifierTask,
    NoisyClassifier,
    build_classifier_network,
    load_classifier,
    train_classifier,
)
from sde_diffusion.guidance import ClassifierGuidance
from sde_diffusion.jobs import run
from sde_diffusion.jobs.model import load_model
from sde_diffusion.jobs.shards import batch_seed
from sde_diffusion.tasks.score_matching import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

QUIET = [
    "logger=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Small networks run fastest on one thread when the cores are shared."""


def compose_config(name: str, overrides: List[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=overrides)


def compose(overrides: List[str]) -> Any:
    """conf/train.yaml with ``task=classifier`` (a choice of its ``task`` group)."""
    return compose_config("train", ["task=classifier", *overrides])


# ---------------------------------------------------------------------------------- networks
NETS = {
    # zero_init=False: residual branches that start at zero would hide the time input.
    "mlp": lambda: MLPClassifier((2,), 5, hidden=32, num_blocks=2, time_dim=16, zero_init=False),
    "unet": lambda: UNetEncoderClassifier(
        (1, 8, 8), 10, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, zero_init=False
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(NETS))
def test_networks_give_per_sample_logits(kind: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = NETS[kind]().to(dtype).eval()
    B = 6
    x = torch.randn(B, *net.data_shape, dtype=dtype)
    t = torch.linspace(0.05, 0.95, B, dtype=dtype)
    with torch.no_grad():
        logits = net(x, t)
        assert logits.shape == (B, net.num_classes) and logits.dtype == dtype
        # No mixing across the batch: each row equals the network applied to that example alone.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for i in (0, B - 1):
            torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1]), logits[i : i + 1], rtol=tol, atol=tol)
        # A scalar t is one time for the whole batch.
        torch.testing.assert_close(net(x, 0.3), net(x, torch.full((B,), 0.3, dtype=dtype)), rtol=0, atol=0)
        # The time enters: other times, other logits.
        assert (net(x, 0.9) - net(x, 0.1)).abs().max() > 1e-4


def test_networks_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        MLPClassifier((2,), 1)
    with pytest.raises(ValueError, match=r"data_shape \(D,\)"):
        MLPClassifier((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"not divisible by 2\*\*\(len\(ch_mult\)-1\) = 4"):
        UNetEncoderClassifier((1, 6, 6), 10, ch=8, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNetEncoderClassifier((1, 8, 8), 10, ch=8, ch_mult=(1, 2), attn_resolutions=(2,))
    net = NETS["mlp"]()
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[3\]"):
        net(torch.zeros(3, 2), torch.zeros(4))


def test_input_scale_is_the_inverse_std_of_x_t() -> None:
    # c_in(t) = 1/sqrt(m² + σ²): exactly 1 for VP (m² + σ² = ᾱ + 1 − ᾱ); → 1/σ_max at T for VE.
    cfg = compose(["data=gmm", "model=mlp"])
    base = {key: to_plain(cfg[key]) for key in ("data", "model", "classifier")}
    t = torch.tensor([1e-3, 0.3, 0.7, 1.0], dtype=torch.float64)
    vp = NoisyClassifier({**base, "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}}, (2,), 8).double()
    torch.testing.assert_close(vp.input_scale(t), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    ve = NoisyClassifier({**base, "sde": {"name": "ve", "sigma_min": 0.01, "sigma_max": 50.0}}, (2,), 8).double()
    assert ve.input_scale(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(1 / math.sqrt(1 + 50.0**2), rel=1e-3)


# ---------------------------------------------------------------------------------- config
def test_config_builds_the_encoder_of_the_model_group() -> None:
    cfg = compose(["data=digits"])
    assert cfg.task.name == "classifier"
    assert ClassifierTask.draws_samples is False and cfg.ema.enabled is False
    net = build_classifier_network(parse_train(cfg), (1, 8, 8), 10)
    assert isinstance(net, UNetEncoderClassifier) and net.conv_in.out_channels == cfg.model.ch
    small = build_classifier_network(parse_train(compose(["data=digits", "+classifier.model.ch=8"])), (1, 8, 8), 10)
    assert small.conv_in.out_channels == 8
    mlp = build_classifier_network(parse_train(compose(["data=gmm", "model=mlp"])), (2,), 8)
    assert isinstance(mlp, MLPClassifier) and mlp.head.out_features == 8
    with pytest.raises(ValueError, match="foo"):  # the schema refuses unknown keys
        parse_train(compose(["+classifier.foo=1"]))
    with pytest.raises(ValueError, match="bad option for classifier 'unet'"):
        build_classifier_network(parse_train(compose(["data=digits", "+classifier.model.width=3"])), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="classifier.eval_buckets"):
        parse_train(compose(["classifier.eval_buckets=0"]))


# ---------------------------------------------------------------------------------- train.py tasks
TINY_MOONS = QUIET + [
    "data=moons", "data.n=256", "data.batch_size=64", "model=mlp", "model.hidden=16", "model.num_blocks=1",
    "trainer.max_steps=2", "callbacks.checkpoint.every_n_steps=0",
]


def test_train_task_group_dispatches_score_and_classifier(tmp_path: Path) -> None:
    # `python train.py` (no task) trains the score network; `task=classifier` needs no `+`.
    score_cfg = compose_config("train", TINY_MOONS + ["callbacks.samples.enabled=false", "trainer.limit_val_batches=0"])
    assert score_cfg.task.name == "score"
    score = fit(None, score_cfg, tmp_path / "score")
    assert "accuracy" not in score.extras and score.trainer.global_step == 2
    assert "kind" not in torch.load(score.last_checkpoint, map_location="cpu", weights_only=False)

    clf_cfg = compose(TINY_MOONS + ["trainer.val_check_interval=2", "classifier.eval_buckets=2", "classifier.eval_repeats=1"])
    assert clf_cfg.task.name == "classifier" and clf_cfg.optim.lr == 1.0e-3  # conf/task/classifier.yaml applied
    clf = fit(None, clf_cfg, tmp_path / "clf")
    assert isinstance(clf.classifier, NoisyClassifier) and clf.trainer.global_step == 2
    assert torch.load(clf.last_checkpoint, map_location="cpu", weights_only=False)["kind"] == CHECKPOINT_KIND
    assert len(json.loads((tmp_path / "clf" / "accuracy_by_t.json").read_text())["buckets"]) == 2
    # the score trainer itself refuses a classifier config instead of fitting a score model with it
    with pytest.raises(ValueError, match=r"fits task=score but the config says task=classifier.*fit\(None, cfg\)"):
        train(clf_cfg, tmp_path / "clf2")


@pytest.mark.parametrize("task", ["sample", "inpaint", "colorize"])
def test_train_refuses_sampling_tasks(task: str) -> None:
    with pytest.raises(ValueError, match=rf"cannot run task={task}: choose one of autoencoder, classifier, score.*python sample\.py"):
        parse_train({**to_plain(compose_config("train", ["run_dir=x"])), "task": task})
    assert parse_train(compose_config("train", ["run_dir=x"])).task_name == "score"


def test_train_py_refuses_a_sampling_task(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "task=sample", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "error: train.py cannot run task=sample: choose one of autoencoder, classifier, score" in proc.stderr, proc.stderr[-2000:]
    assert "python sample.py" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unlabelled_data_fails_before_training(tmp_path: Path) -> None:
    cfg = compose(QUIET + ["data=swiss_roll", "data.n=256", "model=mlp", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match="labelled data set"):
        train_classifier(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_continues_and_checks_the_network(tmp_path: Path) -> None:
    over = QUIET + [
        "data=moons", "data.n=512", "data.batch_size=128", "model=mlp", "model.hidden=16", "model.num_blocks=1",
        "callbacks.checkpoint.every_n_steps=4", "trainer.val_check_interval=4", "classifier.eval_buckets=2",
        "classifier.eval_repeats=1",
    ]
    first = train_classifier(compose(over + ["trainer.max_steps=4"]), tmp_path)
    assert first.trainer.global_step == 4
    again = train_classifier(compose(over + ["trainer.max_steps=8", "resume=true"]), tmp_path)
    assert again.trainer.global_step == 8
    with pytest.raises(ValueError, match="classifier network differs"):
        train_classifier(compose(over + ["trainer.max_steps=12", "resume=true", "+classifier.model.hidden=32"]), tmp_path)


def test_image_classifier_trains_logs_per_t_accuracy_and_guides(tmp_path: Path) -> None:
    over = QUIET + [
        "data=digits", "+classifier.model.ch=8", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1", "classifier.eval_buckets=3", "classifier.eval_repeats=1",
        "callbacks.checkpoint.every_n_steps=0",
    ]
    res = train_classifier(compose(over), tmp_path)
    assert res.trainer.global_step == 4
    names = {k for k in res.trainer.callback_metrics if k.startswith("val/acc_t/")}
    assert names == {"val/acc_t/0.00-0.33", "val/acc_t/0.33-0.67", "val/acc_t/0.67-1.00"}
    assert len(res.accuracy) == 3 and sum(r.count for r in res.accuracy) == 3 * len(res.datamodule.val_set)

    clf = load_classifier(res.last_checkpoint).double()
    assert isinstance(clf.net, UNetEncoderClassifier) and clf.net.conv_in.out_channels == 8
    # With a zero score the guided score is w·∇_x log p_φ(y | x, t): compare with central differences.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    guided = ClassifierGuidance(lambda x, t: torch.zeros_like(x), clf, y=y, scale=2.0)(x, t)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        lp = lambda z: clf.log_prob(z, t).gather(1, y[:, None]).squeeze(1)  # noqa: E731
        fd = (lp(x + h * v) - lp(x - h * v)) / (2 * h)
    torch.testing.assert_close((guided * v).flatten(1).sum(1), 2.0 * fd, rtol=1e-5, atol=1e-7)


def test_load_classifier_rejects_other_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "score.ckpt"
    torch.save({"hyper_parameters": {"cfg": {}, "data_shape": [2], "num_classes": None}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a noisy-classifier checkpoint"):
        load_classifier(path)


# ---------------------------------------------------------------------------------- a labelled 2-D mixture
# Eight components on a ring with overlapping tails (raw std 0.8, neighbours 3.1 apart): the Bayes
# accuracy at t ≈ 0 is ≈ 0.94, and the posterior flattens to the prior over t ∈ [0, 0.5].
GMM = [
    "data=gmm", "data.noise=0.8", "data.n=50000", "data.n_val=2000", "data.batch_size=1024", "model=mlp",
    "model.hidden=64", "model.num_blocks=2", "optim.lr=3e-3", "optim.warmup_steps=50", "trainer.max_steps=500",
    "trainer.val_check_interval=500", "classifier.eval_buckets=5", "callbacks.checkpoint.every_n_steps=0",
]
N_EVAL = 4000


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield train_classifier(compose(QUIET + GMM), tmp_path_factory.mktemp("gmm_classifier"))
    finally:
        torch.set_num_threads(old)


def perturbed_eval_set(run: Any, t: float, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    x0, y = run.datamodule.toy.sample(N_EVAL, g)
    tt = torch.full((N_EVAL,), t)
    return run.classifier.sde.perturb(x0, tt, torch.randn(x0.shape, generator=g)), tt, y


@pytest.mark.parametrize("t", [0.01, 0.05, 0.1, 0.2, 0.3, 0.5])
def test_predicted_posterior_matches_the_exact_one(gmm_run: Any, t: float) -> None:
    clf, gm = gmm_run.classifier, gmm_run.datamodule.mixture
    xt, tt, _ = perturbed_eval_set(gmm_run, t, seed=11)
    with torch.no_grad():
        p = torch.softmax(clf(xt, tt), dim=-1).double()
    q = gm.posterior_t(xt, tt, clf.sde)
    tv = 0.5 * (p - q).abs().sum(1).mean().item()
    prior_tv = 0.5 * (gm.weights[None] - q).abs().sum(1).mean().item()  # predicting the class weights
    # Measured TV ≤ 0.07 at every t; the prior is 0.84 … 0.16 away.
    assert tv < 0.1, (t, tv, prior_tv)
    assert tv < 0.6 * prior_tv, (t, tv, prior_tv)


@pytest.mark.parametrize("t", [0.01, 0.05])
def test_accuracy_at_small_t_is_near_bayes(gmm_run: Any, t: float) -> None:
    clf, gm = gmm_run.classifier, gmm_run.datamodule.mixture
    xt, tt, y = perturbed_eval_set(gmm_run, t, seed=12)
    with torch.no_grad():
        acc = (clf(xt, tt).argmax(1) == y).double().mean().item()
    bayes = (gm.posterior_t(xt, tt, clf.sde).argmax(1) == y).double().mean().item()
    # Same points for both, so the gap has little sampling noise (measured gap ≤ 0.008).
    assert bayes > 0.85 and acc >= bayes - 0.02, (acc, bayes)


def test_run_writes_accuracy_by_t_and_a_loadable_checkpoint(gmm_run: Any) -> None:
    out = gmm_run.output_dir
    table = json.loads((out / "accuracy_by_t.json").read_text())["buckets"]
    assert len(table) == 5 and table[0]["t_lo"] == pytest.approx(gmm_run.classifier.t_min)
    assert table[-1]["t_hi"] == pytest.approx(gmm_run.classifier.sde.T)
    accs = [row["accuracy"] for row in table]
    # High at small t (measured 0.75 over [0, 0.2)), falling to chance (1/8; ± 4 standard errors
    # of the 8000 draws, measured 0.128) at large t.
    assert accs[0] > 0.65 and all(a >= b - 0.01 for a, b in zip(accs, accs[1:])), accs
    assert abs(accs[-1] - 1 / 8) < 4 * math.sqrt(1 / 8 * 7 / 8 / table[-1]["count"]) + 0.01, accs

    loaded = load_classifier(out)  # a run directory: its checkpoints/last.ckpt
    assert loaded.num_classes == 8 and loaded.data_shape == (2,) and not loaded.training
    assert loaded.cfg.model["hidden"] == 64 and loaded.cfg.data["dataset"] == "gmm"
    x, t = torch.randn(16, 2), torch.rand(16)
    with torch.no_grad():
        ref = gmm_run.classifier(x, t)
        torch.testing.assert_close(loaded(x, t), ref, rtol=0, atol=0)
        as64 = copy.deepcopy(loaded).double()(x.double(), t.double())
    assert as64.dtype == torch.float64
    torch.testing.assert_close(as64, ref.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [0, 3])
def test_classifier_guidance_samples_the_requested_component(gmm_run: Any, k: int) -> None:
    clf, gm = gmm_run.classifier, gmm_run.datamodule.mixture
    sde = clf.sde
    n = 2000
    fractions = {}
    for w in (0.0, 1.0):
        guided = ClassifierGuidance(gm.score_fn(sde), clf, y=k, scale=w)
        x = sample(sde, guided, (n, 2), "euler_maruyama", steps=100, generator=torch.Generator().manual_seed(k), eps=1e-3).samples
        post = gm.posterior_t(x, torch.full((n,), sde.eps), sde)
        fractions[w] = (post.argmax(1) == k).double().mean().item()
    # w = 0: the unconditional model, so the share of component k is its weight 1/8 (± 4 s.e.);
    # w = 1: the conditional, whose exact share is the Bayes accuracy of class k (≈ 0.94).
    assert abs(fractions[0.0] - 1 / 8) < 4 * math.sqrt(1 / 8 * 7 / 8 / n), fractions
    assert fractions[1.0] > 0.8, fractions


# ---------------------------------------------------------------------------------- sample.py guidance.classifier
@pytest.fixture(scope="module")
def gmm_score_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A score model of the classifier's mixture (same SDE), 200 steps of a small MLP: ~4 s."""
    out = tmp_path_factory.mktemp("gmm_score")
    over = QUIET + [
        "data=gmm", "data.noise=0.8", "data.n=4096", "data.batch_size=256", "model=mlp", "model.hidden=32",
        "model.num_blocks=1", "trainer.max_steps=200", "optim.warmup_steps=0", "optim.lr=3e-3", "ema.enabled=false",
        "callbacks.samples.enabled=false", "callbacks.loss_by_t.every_n_steps=0", "trainer.limit_val_batches=0",
        "callbacks.checkpoint.every_n_steps=0",
    ]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(None, compose_config("train", over), out)
    finally:
        torch.set_num_threads(old)
    return out


def guided_cfg(score: Path, *overrides: str) -> Any:
    return compose_config("sample", [f"ckpt={score}", "progress=false", "figures=false", "ema=false", "sampler=euler_maruyama",
                                     *overrides])


def test_sample_py_classifier_guidance_steers_towards_the_label(gmm_run: Any, gmm_score_run: Path, tmp_path: Path) -> None:
    gm, sde, n, k = gmm_run.datamodule.mixture, gmm_run.classifier.sde, 1000, 3
    clf_dir = gmm_run.output_dir
    fractions = {}
    for w in (0.0, 3.0):
        out = tmp_path / f"w{w}"
        cfg = guided_cfg(gmm_score_run, f"guidance.classifier={clf_dir}", f"guidance.classifier_scale={w}", f"label={k}",
                         "steps=50", f"n={n}", f"batch_size={n}", f"out={out}")
        report = run(cfg)
        z = np.load(out / "samples.npz")
        np.testing.assert_array_equal(z["labels"], np.full(n, k))
        x = torch.as_tensor(z["samples"]).double()
        post = gm.posterior_t(x, torch.full((n,), sde.eps, dtype=torch.float64), sde)
        fractions[w] = (post.argmax(1) == k).double().mean().item()
        assert report["guidance"]["classifier"]["scale"] == w and report["guidance"]["classifier"]["num_classes"] == 8
    # The samples are exactly sample() with the wrapped score and the batch's generator.
    model = load_model(gmm_score_run, device="cpu")
    options = parse_sample(cfg).sampler_options
    guided = ClassifierGuidance(model.score_model(use_ema=False), load_classifier(clf_dir), y=k, scale=3.0)
    with torch.no_grad():
        ref = sample(sde, guided, (n, 2), "euler_maruyama", steps=50, generator=torch.Generator().manual_seed(batch_seed(0, "sample", 0)),
                     **options).samples
    np.testing.assert_array_equal(z["samples"], ref.numpy())
    # w = 0: the unconditional model puts ≈ 1/8 of its samples on component k (measured 0.15, the
    # model is imperfect); w = 3 concentrates them there (measured 0.996; the exact conditional
    # gives the Bayes accuracy ≈ 0.94 at w = 1). The gap is far beyond 4 standard errors (≈ 0.05).
    se = math.sqrt(sum(f * (1 - f) for f in fractions.values()) / n)
    assert fractions[0.0] < 0.25 and fractions[3.0] > 0.85, fractions
    assert fractions[3.0] - fractions[0.0] > 4 * se, fractions


def _edited_checkpoint(src: Path, dst: Path, edit: Any) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_sample_py_rejects_mismatched_or_swapped_checkpoints(gmm_run: Any, gmm_score_run: Path, tmp_path: Path) -> None:
    clf_ckpt = gmm_run.output_dir / "checkpoints" / "last.ckpt"
    score_ckpt = gmm_score_run / "checkpoints" / "last.ckpt"
    base = ["steps=1", "n=2", "batch_size=2", f"out={tmp_path / 'out'}"]
    other_sde = _edited_checkpoint(clf_ckpt, tmp_path / "ve.ckpt",
                                   lambda c: c["hyper_parameters"]["cfg"]["sde"].update(beta_max=10.0))
    with pytest.raises(ValueError, match=r"trained with sde=.*sde\.beta_max: classifier 10\.0, score model 20\.0"):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={other_sde}", "label=1", *base))
    other_shape = _edited_checkpoint(clf_ckpt, tmp_path / "shape.ckpt",
                                     lambda c: c["hyper_parameters"].update(data_shape=[3]))
    with pytest.raises(ValueError, match=r"takes data of shape \(3,\) but the score model .* generates \(2,\)"):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={other_shape}", "label=1", *base))
    with pytest.raises(ValueError, match="guidance.classifier needs label="):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={clf_ckpt}", *base))
    with pytest.raises(ValueError, match=r"label=8 is out of range: the classifier has 8 classes"):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={clf_ckpt}", "label=8", *base))
    with pytest.raises(ValueError, match="guidance.classifier_scale must be a finite number >= 0"):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={clf_ckpt}", "label=1", "guidance.classifier_scale=-1", *base))
    with pytest.raises(ValueError, match="guidance.classifier_scale=2 has no effect without guidance.classifier"):
        run(guided_cfg(gmm_score_run, "guidance.classifier_scale=2", *base))
    # The two kinds of checkpoint swapped.
    with pytest.raises(ValueError, match=r"is a noisy-classifier checkpoint .*not a score model.*guidance\.classifier="):
        run(guided_cfg(clf_ckpt, *base))
    with pytest.raises(ValueError, match=r"guidance.classifier=.*is a score-model checkpoint .*, not a noisy-classifier checkpoint"):
        run(guided_cfg(gmm_score_run, f"guidance.classifier={score_ckpt}", "label=1", *base))
    with pytest.raises(ValueError, match=r"is a score-model checkpoint \(.*\), not a noisy-classifier checkpoint"):
        load_classifier(score_ckpt)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- digits (slow)
@pytest.mark.slow
def test_digits_classifier_accuracy_by_t(tmp_path: Path) -> None:
    # `python train.py task=classifier data=digits` at half its length (several minutes on a CPU).
    res = train_classifier(compose(QUIET + ["data=digits", "trainer.max_steps=1500"]), tmp_path)
    accs = [r.accuracy for r in res.accuracy]
    # Measured at 3000 steps: 0.986, 0.965, 0.815, 0.542, 0.393, 0.219, 0.156, 0.135, 0.117, 0.113.
    assert accs[0] > 0.95 and accs[1] > 0.9, accs
    assert accs[-1] < 0.1 + 4 * math.sqrt(0.09 / res.accuracy[-1].count) + 0.03, accs
