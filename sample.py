"""Sample from, and evaluate, a trained model: ``python sample.py ckpt=<run dir or .ckpt> [key=value ...]``
(conf/sample.yaml; ``mode=sample|likelihood|metrics|plots``)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from sde_diffusion.jobs import run

    try:
        report = run(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if report is not None:
        print(f"{report['mode']}: wrote {report['output_dir']}")


if __name__ == "__main__":
    main()
