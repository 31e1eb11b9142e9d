"""Entry point: compose model + task + quant with Hydra and hand the config to vitq.engine."""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import vitq.engine.config  # noqa: F401  (registers the config resolvers before Hydra resolves anything)
from vitq.engine.lifecycle import RunInterrupted


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vitq.engine.run import run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, out_dir)
    except RunInterrupted as e:  # a scheduler's time limit, a preemption, kill or Ctrl+C: a failed run
        print(f"vitq: run {e} and stopped; {out_dir / 'FAILED'} records it", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    primary = result.get("primary")
    return result.get(f"quant_{primary}") if primary else None


if __name__ == "__main__":
    main()
