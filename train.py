"""Entry point: compose model + task + quant with Hydra and hand the config to vitq.engine."""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import vitq.engine.config  # noqa: F401  (registers the config resolvers before Hydra resolves anything)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vitq.engine.run import run

    result = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    primary = result.get("primary")
    return result.get(f"quant_{primary}") if primary else None


if __name__ == "__main__":
    main()
