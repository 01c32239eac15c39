"""Fine-tune a (quantized) LLM with LoRA or DoRA: `python train.py adapter=dora adapter.r=8 quant=8bit`.

All logic lives in `finlora.train`; `--cfg job` prints the resolved config, `-m` runs a sweep.
"""

import hydra
from omegaconf import DictConfig

from finlora.run.entry import cli, run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's `sweep.objective` (val/loss unless set), the value a Hydra sweeper optimizes."""
    from finlora.train import train  # torch and the rest load only once a run starts: --help stays quick

    return run(train, cfg).get("objective")


if __name__ == "__main__":
    cli(main)
