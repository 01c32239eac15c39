"""Evaluate on FinLoRA's tasks: `python eval.py adapter_path=outputs/runs/<run>/adapter task=fpb`.

All logic lives in `finlora.evaluate`; `--cfg job` prints the resolved config.
"""

import hydra
from omegaconf import DictConfig

from finlora.run.entry import cli, run


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from finlora.evaluate import evaluate  # torch and the rest load only once a run starts

    run(evaluate, cfg)


if __name__ == "__main__":
    cli(main)
