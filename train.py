"""Train a score-based model, a noisy classifier or an autoencoder:
``python train.py [task=score|classifier|autoencoder] [group=choice ...] [key=value ...]``
(the schema: sde_diffusion/config/schema.py; the groups: conf/)."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sde_diffusion.config import register_configs

register_configs()


def refuse_a_sampling_task(argv: list) -> None:
    """``task=inpaint`` belongs to sample.py; say so before Hydra reports a missing ``conf/task/inpaint.yaml``."""
    for arg in argv:
        name = arg.split("=", 1)[1] if arg.startswith("task=") else None
        if name and not (Path(__file__).parent / "conf" / "task" / f"{name}.yaml").is_file():
            from sde_diffusion.registry import SAMPLE_TASKS, TASKS

            if name in SAMPLE_TASKS:
                raise SystemExit(f"error: train.py cannot run task={name}: choose one of {', '.join(TASKS.names())}; "
                                 f"task={name} is a sampling task: run `python sample.py ckpt=<run> task={name}`")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from sde_diffusion.config import parse_train
    from sde_diffusion.fit import fit

    try:
        result = fit(None, parse_train(cfg))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if result.extras.get("stopped"):
        if result.trainer.is_global_zero:
            print(f"stopped at step {result.trainer.global_step}: continue with "
                  f"`python train.py run_dir={result.output_dir} resume=true` (and the same overrides)")
        return
    if result.trainer.is_global_zero:
        print(f"run directory: {result.output_dir}")
        for label, name in (("samples", "samples/latest.png"), ("accuracy by t", "accuracy_by_t.json"),
                            ("reconstructions", "reconstructions/latest.png")):
            if (result.output_dir / name).is_file():
                print(f"{label}: {result.output_dir / name}")
        print(f"checkpoint: {result.last_checkpoint}")


if __name__ == "__main__":
    refuse_a_sampling_task(sys.argv[1:])
    main()
