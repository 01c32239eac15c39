"""Export a saved adapter merged into its base: `python export.py adapter_path=outputs/runs/<run>/adapter format=gguf`.

All logic lives in `finlora.export`; `--cfg job` prints the resolved config.
"""

import hydra
from omegaconf import DictConfig

from finlora.run.entry import cli, run


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from finlora.export import export  # torch and the rest load only once the export starts

    run(export, cfg)


if __name__ == "__main__":
    cli(main)
