"""Train a score-based model: ``python train.py [group=choice ...] [key=value ...]`` (conf/train.yaml)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from sde_diffusion.training import train

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if result.trainer.is_global_zero:
        print(f"run directory: {result.output_dir}")
        latest = result.output_dir / "samples" / "latest.png"
        if latest.is_file():
            print(f"samples: {latest}")
        print(f"checkpoint: {result.last_checkpoint}")


if __name__ == "__main__":
    main()
