"""`make demo` (python -m sde_diffusion.demo) at a handful of steps: it writes its pictures and can be re-run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sde_diffusion.demo import main


def test_demo_writes_pictures_and_reruns_in_the_same_directory(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--digits-steps", "2", "--toy-steps", "2", "--sample-steps", "3", "--quiet"]
    for _ in range(2):  # the second run starts afresh instead of refusing the first run's checkpoints
        assert main(args) == 0
        for name in ("digits_samples.png", "digits_data.png", "toy_scatter.png"):
            img = np.asarray(Image.open(tmp_path / name))
            assert img.ndim == 3 and min(img.shape[:2]) > 50, name
            assert img.std() > 0, f"{name} is blank"
        ckpts = sorted(p.name for p in (tmp_path / "digits_run" / "checkpoints").glob("*.ckpt"))
        assert ckpts == ["last.ckpt", "step_0000001.ckpt", "step_0000002.ckpt"]  # every 2 // 2 steps, no -v1 copies


def test_demo_rejects_an_unknown_sampler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--sampler", "nope"])
    assert "unknown sampler 'nope'; choose one of:" in capsys.readouterr().err
