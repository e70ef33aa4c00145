"""Sample from, and evaluate, a trained model: ``python sample.py [ckpt=<run dir or .ckpt>] [key=value ...]``
(``mode=sample|likelihood|metrics|plots``, ``task=sample|inpaint|colorize``; every key and its default is in
the schema, sde_diffusion/config/schema.py (SampleConfig); conf/sample.yaml chooses the groups; without
ckpt=, the newest finished run of train.py)."""
import sys

import hydra
from omegaconf import DictConfig

from sde_diffusion.config import register_configs

register_configs()

# `task=` is a value of the sampling config, not train.py's config group conf/task/: it is taken off
# the command line before Hydra reads it (sde_diffusion.jobs.cli) and set after composition.
ARGV = list(sys.argv)
TASK = None


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sde_diffusion.config import parse_sample
    from sde_diffusion.jobs import run
    from sde_diffusion.jobs.cli import request

    sys.argv[:] = ARGV  # the command as typed, for the reports
    try:
        report = run(parse_sample(request(cfg, HydraConfig.get().overrides.task, TASK)))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if report is not None:
        print(f"{report['mode']}: wrote {report['output_dir']}")


if __name__ == "__main__":
    from sde_diffusion.jobs.cli import split_task

    TASK, sys.argv[1:] = split_task(sys.argv[1:])
    main()
