"""Training with Lightning and Hydra: learning, exact resume, DDP, config validation, checkpoints."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Sampler

from sde_diffusion.callbacks import tensorboard_available
from sde_diffusion.config import instantiate, to_plain
from sde_diffusion.metrics import sliced_wasserstein
from sde_diffusion.registry import DATASETS
from sde_diffusion.samplers import sample
from sde_diffusion.tasks.common import LinearWarmup
from sde_diffusion.tasks.score_matching import load_checkpoint, train

from ddp_probe import _digest, state_vector
from helpers import CONF, ROOT
from helpers import QUIET_TRAINING as QUIET


def compose(overrides: List[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: List[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------- learning
def test_toy_run_lowers_the_loss_and_samples_approach_the_data(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = compose(
        [
            "data=gmm", "data.n=20000", "data.batch_size=256", "model=mlp", "model.hidden=64",
            "trainer.max_steps=400", "optim.lr=3e-3", "optim.warmup_steps=20", "ema.decay=0.98", "logger=csv",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.log_every_n_steps=10", "callbacks.checkpoint.every_n_steps=200",
            "callbacks.samples.every_n_steps=200", "callbacks.samples.num_samples=200",
            "callbacks.samples.steps=20", "callbacks.loss_by_t.every_n_steps=100",
        ]
    )
    rec = LossRecorder()
    res = train(cfg, tmp_path, extra_callbacks=[rec])
    module = res.module
    assert res.trainer.global_step == 400 and len(rec.losses) == 400
    first, last = sum(rec.losses[:50]) / 50, sum(rec.losses[-50:]) / 50
    assert last < 0.8 * first, (first, last)

    # Samples from the EMA weights are much closer to the data than the prior is (sliced W1,
    # which a rare stray sample of a briefly trained model cannot dominate).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = sample(module.sde, module.score_fn(use_ema=True), (2000, 2), sampler="euler_maruyama", steps=100, generator=gen).samples
    ref = res.datamodule.reference(2000)
    prior = module.sde.prior_sample((2000, 2), generator=gen)

    def sw(a: torch.Tensor) -> float:
        return sliced_wasserstein(a, ref, p=1, generator=torch.Generator().manual_seed(1))

    sw_model, sw_prior = sw(x), sw(prior)
    sw_floor = sw(res.datamodule.reference(2000, torch.Generator().manual_seed(9)))  # two true samples: ≈0.04
    assert sw_model < 0.6 * sw_prior, (sw_model, sw_prior, sw_floor)

    # Figures, per-t losses and the warm-up were written.
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["latest.png", "step_0000200.png", "step_0000400.png"]
    assert (tmp_path / "samples" / "latest.png").read_bytes() == (tmp_path / "samples" / "step_0000400.png").read_bytes()
    rows = list(csv.DictReader(open(next((tmp_path / "logs").glob("version_*/metrics.csv")))))
    bucket_cols = [c for c in rows[0] if c.startswith("loss_by_t/")]
    assert len(bucket_cols) == 10
    lrs = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    assert lrs[min(lrs)] == pytest.approx(3e-3 * LinearWarmup(20)(min(lrs)), rel=1e-6)

    # A checkpoint alone rebuilds the SDE, the network, the data shape and both weight sets.
    loaded = load_checkpoint(res.last_checkpoint)
    assert type(loaded.sde) is type(module.sde) and loaded.data_shape == (2,)
    for a, b in zip(loaded.net.state_dict().values(), module.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(loaded.ema.state_dict().values(), module.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(loaded.ema.parameters(), loaded.net.parameters()))
    xt, t = torch.randn(5, 2), torch.full((5,), 0.5)
    torch.testing.assert_close(loaded.score_fn()(xt, t), module.score_fn()(xt, t))


# ---------------------------------------------------------------------------------- resume
class EpochSeededSampler(Sampler):
    """Shuffles with seed (seed, epoch) and exposes set_epoch, which Lightning calls each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def resumable_datamodule(cfg: Any) -> Any:
    """The configured toy data module with a per-epoch seeded shuffle.

    The stock loader draws its permutations from one generator created with the loader, so after
    a restart epoch k would be shuffled like epoch 0; seeding by epoch isolates what this test
    checks (model, optimiser, EMA, loop state) from the data order.
    """
    from sde_diffusion.data.datamodule import BatchCollate

    dm = instantiate(to_plain(cfg.data), DATASETS, key="data")
    loader = dm.train_dataloader()
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    if not any(hasattr(s, "set_epoch") for s in samplers):

        def train_dataloader() -> DataLoader:
            ds = dm.train_set
            return DataLoader(ds, batch_size=dm.batch_size, sampler=EpochSeededSampler(len(ds), dm.seed),
                              collate_fn=BatchCollate(dm._transform(True)))

        dm.train_dataloader = train_dataloader
    return dm


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def test_resume_continues_exactly(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    over = QUIET + [
        "data=moons", "data.n=1024", "data.batch_size=128", "model=mlp", "model.hidden=32",
        "model.dropout=0.1", "ema.decay=0.9", "optim.warmup_steps=5", "callbacks.checkpoint.every_n_steps=8",
        "trainer.max_steps=32",
    ]
    # 1024 points / 128 = 8 steps per epoch; the crash at step 20 leaves last.ckpt at step 16.
    cfg = compose(over)
    train(cfg, tmp_path / "a", datamodule=resumable_datamodule(cfg))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "b", datamodule=resumable_datamodule(cfg), extra_callbacks=[Crash(20)])
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 16
    counter = StepCounter()
    cfg_resume = compose(over + ["resume=true"])
    res = train(cfg_resume, tmp_path / "b", datamodule=resumable_datamodule(cfg_resume), extra_callbacks=[counter])
    assert counter.steps == 16 and res.trainer.global_step == 32

    A = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    B = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert A["global_step"] == B["global_step"] == 32
    for key in ("state_dict", "current_model_state"):  # EMA weights, trained weights
        assert A[key].keys() == B[key].keys()
        for name in A[key]:
            torch.testing.assert_close(A[key][name], B[key][name], rtol=0, atol=1e-6)
    assert any((A["state_dict"][k] - A["current_model_state"][k]).abs().max() > 1e-4 for k in A["state_dict"])
    torch.testing.assert_close(A["averaging_state"], B["averaging_state"])
    oa, ob = A["optimizer_states"][0], B["optimizer_states"][0]
    for i in oa["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa["state"][i][k], ob["state"][i][k], rtol=0, atol=1e-6)
    assert A["lr_schedulers"][0]["last_epoch"] == B["lr_schedulers"][0]["last_epoch"] == 32


def test_resume_refuses_a_different_model_or_a_used_directory(tmp_path: Path) -> None:
    over = QUIET + ["data=moons", "data.n=256", "data.batch_size=128", "model=mlp", "model.hidden=16", "trainer.max_steps=2"]
    train(compose(over), tmp_path)
    with pytest.raises(ValueError, match="model"):
        train(compose(over + ["model.hidden=32", "resume=true", "trainer.max_steps=4"]), tmp_path)
    # A fresh start over an earlier run's checkpoints would mix two runs in one directory.
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=true"):
        train(compose(over), tmp_path, extra_callbacks=[ForbidFit()])
    with pytest.raises(ValueError, match="ckpt_path=last but"):
        train(compose(over + ["ckpt_path=last"]), tmp_path / "elsewhere", extra_callbacks=[ForbidFit()])


# ---------------------------------------------------------------------------------- precision
def test_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    rec = LossRecorder()
    cfg = compose(QUIET + ["data=moons", "data.n=512", "model=mlp", "model.hidden=32", "trainer.max_steps=3",
                           "trainer.precision=bf16-mixed"])
    res = train(cfg, tmp_path, extra_callbacks=[rec])
    assert res.trainer.precision == "bf16-mixed"
    assert len(rec.losses) == 3 and all(math.isfinite(v) for v in rec.losses)
    assert next(res.module.net.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """`train.py trainer=ddp trainer.devices=2` on the CPU (gloo), and what DDP must guarantee.

    Each rank sees its own examples; after every step the replicas hold bit-identical parameters
    (averaged gradients, same optimiser); rank 0 alone writes the checkpoints, figure and marker;
    the checkpoint resumes on a single process at the same global step.
    """
    run = tmp_path / "ddp"
    common = [
        "data=moons", "data.n=2048", "data.batch_size=128", "model=mlp", "model.hidden=32",
        "callbacks.checkpoint.every_n_steps=3", "callbacks.loss_by_t.every_n_steps=3", f"run_dir={run}",
        "callbacks.samples.every_n_steps=0", "callbacks.samples.num_samples=64", "callbacks.samples.steps=5",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.extra=[ddp_probe:DDPProbe]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_steps=6", *common]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "All distributed processes registered. Starting with 2 processes" in proc.stderr + proc.stdout

    ranks = [json.loads((run / "probe" / f"rank{r}_from0.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in ranks] == [2, 2] and [p["end_step"] for p in ranks] == [6, 6]
    # data.batch_size is the global batch: 64 examples on each of the two ranks, and at every
    # step their batches share no example.
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert len(b0) == len(b1) == 64 and not set(b0) & set(b1)
    # The parameters stayed identical across ranks, and training moved them.
    assert ranks[0]["params_sha"] == ranks[1]["params_sha"]
    assert ranks[0]["start_sha"] == ranks[1]["start_sha"] != ranks[0]["params_sha"]
    # Rank 0 alone wrote: one file per checkpoint (no per-rank or versioned copies), one figure, one marker.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000003.ckpt", "step_0000006.ckpt"]
    assert json.loads((run / "batch_layout.json").read_text()) == {"batch": 128, "world_size": 2, "micro": 64, "accumulate": 1}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["cfg"]["trainer"]["strategy"] == "ddp"
    # The checkpoint holds those very weights (the trained ones; the EMA is stored beside them).
    assert _digest(state_vector(ckpt["current_model_state"])) == ranks[0]["params_sha"]
    assert (run / "samples" / "latest.png").stat().st_size > 1000
    assert json.loads((run / "finished.json").read_text())["global_step"] == 6

    # Resume the DDP checkpoint on one process: it continues at step 6 and runs to 8.
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=cpu", "trainer.max_steps=8", "resume=true", *common]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((run / "probe" / "rank0_from6.json").read_text())
    assert one["world_size"] == 1 and one["start_step"] == 6 and one["end_step"] == 8 and len(one["batches"]) == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8


# ---------------------------------------------------------------------------------- validation
class ForbidFit(Callback):
    def setup(self, trainer, pl_module, stage) -> None:  # pragma: no cover - must not be reached
        raise AssertionError("training started despite a bad config")


@pytest.mark.parametrize(
    "override, message",
    [
        ("sde.name=foo", r"unknown sde 'foo'; choose one of: cosine_vp, subvp, ve, vp"),
        ("data.name=foo", r"unknown data 'foo'; choose one of: .*digits"),
        ("model.name=foo", r"unknown model 'foo'; choose one of: .*unet"),
        ("sampler.name=foo", r"unknown sampler 'foo'"),
        ("model.ch_mult=[1,2,2,2,2]", r"not divisible by 2\*\*\(len\(ch_mult\)-1\) = 16"),
        ("loss.weighting=foo", r"loss.weighting 'foo'"),
        ("loss.discrete_steps=1000", r"needs a variance-preserving process \(sde=vp or cosine_vp\)"),
        ("ema.decay=1.5", r"ema.decay"),
        ("sde.beta_min=-1", r"beta_min must be positive"),
        ("+sde.gamma=2", r"bad option for sde 'vp'"),
    ],
)
def test_bad_config_fails_before_training(tmp_path: Path, override: str, message: str) -> None:
    over = QUIET + ["trainer.max_steps=1", override]
    if override == "loss.discrete_steps=1000":
        over.append("sde=ve")
    with pytest.raises(ValueError, match=message):
        train(compose(over), tmp_path, extra_callbacks=[ForbidFit()])
    assert not (tmp_path / "checkpoints").exists()


def test_missing_cifar_archive_fails_before_training(tmp_path: Path) -> None:
    cfg = compose(QUIET + ["data=cifar10", f"data.root={tmp_path / 'nothing'}", "model=unet_small", "model.attn_resolutions=[]", "trainer.max_steps=1"])
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        train(cfg, tmp_path, extra_callbacks=[ForbidFit()])


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_missing_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(compose(QUIET + ["logger=tensorboard"]), tmp_path, extra_callbacks=[ForbidFit()])


def test_cli_reports_a_bad_image_size(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), "model.ch_mult=[1,2,2,2,2]", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: image size 8x8 is not divisible" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_configs_compose() -> None:
    default = to_plain(compose(["run_dir=unused"]))
    assert default["data"]["name"] == "digits" and default["model"]["name"] == "unet"
    assert default["trainer"]["accelerator"] == "auto"  # the GPU when present, else the CPU
    paper = compose(["sde=vp", "data=cifar10", "model=ddpmpp_cifar10", "trainer=gpu"])
    expect = {
        ("data", "batch_size"): 128, ("optim", "lr"): 2e-4, ("optim", "warmup_steps"): 5000,
        ("trainer", "gradient_clip_val"): 1.0, ("ema", "decay"): 0.9999, ("trainer", "max_steps"): 1300001,
        ("model", "ch"): 128, ("sde", "beta_max"): 20.0,
    }
    for (a, b), v in expect.items():
        assert paper[a][b] == v, (a, b)
    preset = compose(["experiment=cifar10_vp"])
    for key in ("sde", "data", "model", "trainer", "optim", "ema"):
        assert to_plain(preset[key]) == to_plain(paper[key])
    for sde in ("vp", "subvp", "ve", "cosine_vp"):
        assert compose([f"sde={sde}"]).sde.name == sde


@pytest.mark.slow
def test_compile_switch_keeps_checkpoint_keys(tmp_path: Path) -> None:
    rec = LossRecorder()
    cfg = compose(QUIET + ["data=moons", "data.n=512", "model=mlp", "model.hidden=32", "trainer.max_steps=4", "compile=true"])
    res = train(cfg, tmp_path, extra_callbacks=[rec])
    assert getattr(res.module.net, "_compiled_call_impl", None) is not None
    assert len(rec.losses) == 4 and all(math.isfinite(v) for v in rec.losses)
    state = torch.load(res.last_checkpoint, map_location="cpu", weights_only=False)["current_model_state"]
    assert set(state) == {f"net.{k}" for k in res.module.net.state_dict()}


# ---------------------------------------------------------------------------------- figure budget
class _Clocked:
    """A stand-in LightningModule whose score costs ``per_sample`` seconds per sample on a fake clock."""

    def __init__(self, clock: list, per_sample: float) -> None:
        from sde_diffusion.sdes import VPSDE

        self.net = torch.nn.Linear(1, 1)
        self.ema = None
        self.sde = VPSDE()
        self.data_shape = self.model_shape = (3, 4, 4)
        self.calls: list = []

        def score(x, t):
            self.calls.append(x.shape[0])
            clock[0] += per_sample * x.shape[0]
            return torch.zeros_like(x)

        self.score_fn = lambda use_ema=False: score


@pytest.mark.parametrize(
    "budget, want",
    [
        (None, (64, 1000)),   # no budget: as configured
        (100.0, (64, 1000)),  # 64 x 1000 x 1 ms = 64 s fits
        (8.0, (8, 1000)),     # fewer samples first ...
        (2.0, (4, 500)),      # ... down to 4, then fewer steps
        (0.001, (4, 10)),     # never below 4 samples x 10 steps
    ],
)
def test_sample_figure_fits_its_time_budget(monkeypatch, tmp_path: Path, budget, want) -> None:
    from sde_diffusion import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    module = _Clocked(clock, per_sample=1e-3)
    cb = callbacks.SampleFigures(tmp_path, num_samples=64, steps=1000, max_seconds=budget)
    if budget is not None and want != (64, 1000):
        with pytest.warns(UserWarning, match=r"64 samples x 1000 steps would take about 64 s"):
            got = cb.within_budget(module)
    else:
        got = cb.within_budget(module)
    assert got == want
    assert module.calls == ([] if budget is None else [64])  # one timed evaluation at the figure's batch
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        callbacks.SampleFigures(tmp_path, max_seconds=0)


# ---------------------------------------------------------------------------------- the card's commands
def test_card_command_without_cifar_archive_says_where_to_put_it(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "sde=vp", "data=cifar10", f"data.root={root}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "cifar-10-python.tar.gz" in proc.stderr and str(root.resolve()) in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_card_commands_train_cifar10_from_an_archive_then_sample(tmp_path: Path) -> None:
    """`python train.py sde=vp data=cifar10` (the paper's 62M-parameter DDPM++) on a CIFAR-format
    archive written here, then `python sample.py sampler=pc` on what it wrote (~3 min on 2 cores)."""
    from sde_diffusion.data import cifar10 as cifar
    from helpers import write_cifar_archive

    data = tmp_path / "data"
    data.mkdir()
    write_cifar_archive(data / cifar.ARCHIVE_NAME, n_per_batch=4)
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "sde=vp", "data=cifar10", f"data.root={data}", "trainer.max_steps=2",
         "data.batch_size=2", "callbacks.samples.max_seconds=5", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "cifar10_vp").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False, mmap=True)
    assert ckpt["global_step"] == 2 and tuple(ckpt["hyper_parameters"]["data_shape"]) == (3, 32, 32)
    assert ckpt["hyper_parameters"]["cfg"]["model"]["ch"] == 128  # the data set brought DDPM++ cont.
    assert sum(v.numel() for v in ckpt["current_model_state"].values()) > 60_000_000
    del ckpt
    assert (run / "samples" / "latest.png").stat().st_size > 1000
    assert "drawing 4 samples" in proc.stderr  # the figure kept to its time budget

    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "sampler=pc", "steps=2", "n=2", "batch_size=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(f"ckpt: {Path('outputs/train/cifar10_vp') / run.name}")
    (out,) = (run / "samples").glob("sample-pc-*")
    assert {"samples.npz", "samples.png", "run.json"} <= {p.name for p in out.iterdir()}
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (2, 32, 32, 3) and z["samples"].dtype == np.uint8


@pytest.mark.slow
def test_ncsnpp_command_trains_on_a_cifar_archive_then_samples(tmp_path: Path) -> None:
    """`python train.py sde=ve model=ncsnpp_cifar10 data=cifar10 data.root=<archive dir>` (the paper's 62.8M-parameter
    NCSN++ cont.) for two steps, then `python sample.py sampler=pc` on what it wrote (~1.5 min on 2 cores)."""
    from sde_diffusion.data import cifar10 as cifar
    from helpers import write_cifar_archive

    data = tmp_path / "data"
    data.mkdir()
    write_cifar_archive(data / cifar.ARCHIVE_NAME, n_per_batch=4)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "sde=ve", "model=ncsnpp_cifar10", "data=cifar10", f"data.root={data}",
         "trainer.max_steps=2", "data.batch_size=2", "callbacks.samples.max_seconds=5", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "cifar10_ve").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False, mmap=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["cfg"]["model"]["name"] == "ncsnpp"
    assert sum(v.numel() for k, v in ckpt["current_model_state"].items() if not k.endswith("freqs")) == 62_758_787
    del ckpt
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sampler=pc", "steps=2", "n=2", "batch_size=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (run / "samples").glob("sample-pc-*")
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (2, 32, 32, 3) and z["samples"].dtype == np.uint8


# ---------------------------------------------------------------------------------- EMA ramp
def test_ema_warmup_follows_the_reference_ramp() -> None:
    # score_sde's EMA: d_n = min(decay, (1 + n)/(10 + n)) at the n-th average. Replayed by hand in
    # float64 on a random weight sequence and compared with the callback's update function.
    from torch.optim.swa_utils import AveragedModel

    from sde_diffusion.callbacks import ema_decay_at, ema_update_fn

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    avg = AveragedModel(model, multi_avg_fn=ema_update_fn(0.9999, warmup=True), use_buffers=True)
    ref = None
    for n in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        avg.update_parameters(model)
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        if ref is None:
            ref = w.clone()  # the first update copies
        else:
            d = min(0.9999, (1 + n) / (10 + n))
            ref = d * ref + (1 - d) * w
    got = torch.cat([p.detach().flatten() for p in avg.module.parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert ema_decay_at(0.9999, 1, True) == pytest.approx(2 / 11) and ema_decay_at(0.9999, 10**6, True) == 0.9999
    assert ema_decay_at(0.999, 1, False) == 0.999
    assert compose(["data=cifar10", "run_dir=unused"]).ema.warmup is True   # the paper's recipe ramps
    assert compose(["run_dir=unused"]).ema.warmup is False                  # the digits recipe does not


# ---------------------------------------------------------------------------------- preemption
# SIGUSR1 takes the same handler as SIGTERM: it runs with `make test-all` (slow), SIGTERM in `make test`.
@pytest.mark.parametrize("signame", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_ends_bit_identical(tmp_path: Path, signame: str) -> None:
    # 512 moons in batches of 64: 8 batches per epoch; the signal arrives at step 11, in epoch 1.
    # The resumed run must train on the same batches with the same draws as an uninterrupted one.
    common = [sys.executable, str(ROOT / "train.py"), "data=moons", "data.n=512", "data.batch_size=64",
              "model.hidden=16", "trainer.max_steps=20", "trainer.enable_progress_bar=false",
              "callbacks.samples.enabled=false", "trainer.val_check_interval=1000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "SIGNAL_AT_STEP": "11", "SIGNAL_NAME": signame}

    def train(run: Path, *extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(common + [f"run_dir={run}", *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    train(tmp_path / "full")
    cut = tmp_path / "cut"
    proc = train(cut, "callbacks.extra=[signal_probe:SignalAtStep]")
    assert f"{signame}: saved" in proc.stdout and "resume=true" in proc.stdout
    assert not (cut / "finished.json").exists()
    saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 11
    train(cut, "resume=true")
    assert json.loads((cut / "finished.json").read_text())["global_step"] == 20
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key in ("state_dict", "current_model_state"):  # EMA and trained weights
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(b["optimizer_states"][0]["state"][0]["exp_avg"])


def test_last_checkpoint_on_a_clock_and_every_n_steps(tmp_path: Path) -> None:
    from sde_diffusion.preemption import AtomicCheckpointIO

    cfg = compose(QUIET + ["data=moons", "data.n=512", "model=mlp", "model.hidden=16", "trainer.max_steps=6",
                           "callbacks.checkpoint.every_n_steps=0", "callbacks.checkpoint.last_every_n_steps=4",
                           "callbacks.checkpoint.last_every_minutes=0.0001"])

    class LastStep(Callback):
        steps: List[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            last = tmp_path / "checkpoints" / "last.ckpt"
            if last.is_file():
                LastStep.steps.append(torch.load(last, map_location="cpu", weights_only=False)["global_step"])

    res = train(cfg, tmp_path, extra_callbacks=[LastStep()])
    assert isinstance(res.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # the clock (6 ms) writes last.ckpt after nearly every step; without it only step 4 would
    assert len(set(LastStep.steps)) >= 4, LastStep.steps
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # nothing half-written left behind
    with pytest.raises(ValueError, match="last_every_minutes must be positive"):
        train(compose(QUIET + ["callbacks.checkpoint.last_every_minutes=0"]), tmp_path / "x")


# ---------------------------------------------------------------------------------- the global batch
def test_the_global_batch_trains_alike_on_one_process_with_accumulation_and_on_two(tmp_path: Path) -> None:
    # data.batch_size is the batch of one optimiser step whatever holds it: one process, one process
    # accumulating 4 micro-batches, or 2 DDP processes accumulating 2 each. After 3 steps the
    # weights agree up to float rounding (a network without dropout: its draws are per process).
    # optim.eps=1 makes Adam's step ≈ lr·g/(|g| + 1), smooth in g: with the default eps its first
    # steps are ≈ lr·sign(g), which rounding flips wherever a gradient entry is ≈ 0.
    common = [sys.executable, str(ROOT / "train.py"), "data=moons", "data.n=512", "data.batch_size=64",
              "model.hidden=16", "trainer.max_steps=3", "optim.warmup_steps=0", "optim.lr=0.1", "optim.eps=1.0",
              "trainer.enable_progress_bar=false", "callbacks.samples.enabled=false", "ema.enabled=false",
              "trainer.val_check_interval=1000", "loss.stratified=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def weights(name: str, *extra: str) -> torch.Tensor:
        run = tmp_path / name
        proc = subprocess.run(common + [f"run_dir={run}", *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return state_vector(ckpt["state_dict"]), json.loads((run / "batch_layout.json").read_text())

    one, layout1 = weights("one")
    acc, layout_acc = weights("acc", "data.batch_per_device=16")
    ddp, layout_ddp = weights("ddp", "data.batch_per_device=16", "trainer=ddp", "trainer.accelerator=cpu",
                              "trainer.devices=2")
    other, _ = weights("other_seed", "seed=1")
    assert layout1 == {"batch": 64, "world_size": 1, "micro": 64, "accumulate": 1}
    assert layout_acc == {"batch": 64, "world_size": 1, "micro": 16, "accumulate": 4}
    assert layout_ddp == {"batch": 64, "world_size": 2, "micro": 16, "accumulate": 2}
    moved = (one - state_vector(torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", map_location="cpu",
                                           weights_only=False)["state_dict"])).abs().max()
    assert moved == 0
    torch.testing.assert_close(acc, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp, one, rtol=1e-5, atol=1e-6)
    assert (other - one).abs().max() > 1e-3  # the tolerance separates a different run


def test_batch_layout_refuses_sizes_that_do_not_divide() -> None:
    from sde_diffusion.data.toy2d import Toy2DDataModule

    dm = Toy2DDataModule(dataset="moons", n=256, batch_size=96, batch_per_device=40)
    assert (dm.batch_layout(1).micro, dm.batch_layout(1).accumulate) == (32, 3)   # 96 = 3 x 32 <= 40
    assert (dm.batch_layout(2).micro, dm.batch_layout(2).accumulate) == (24, 2)   # 48 per process = 2 x 24
    with pytest.raises(ValueError, match="must be divisible by the 5 processes"):
        dm.batch_layout(5)
    with pytest.raises(ValueError, match="accumulate_grad_batches is derived from the global batch"):
        train(compose(QUIET + ["+trainer.accumulate_grad_batches=2"]), Path("/nonexistent/never"))
