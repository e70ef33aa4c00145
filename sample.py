"""Sample from, and evaluate, a trained model: ``python sample.py [ckpt=<run dir or .ckpt>] [key=value ...]``
(conf/sample.yaml; ``mode=sample|likelihood|metrics|plots``; without ckpt=, the newest finished run of train.py)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sde_diffusion.jobs import drop_implied_model, run

    try:
        report = run(drop_implied_model(cfg, HydraConfig.get().overrides.task))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if report is not None:
        print(f"{report['mode']}: wrote {report['output_dir']}")


if __name__ == "__main__":
    main()
