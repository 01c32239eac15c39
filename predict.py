"""Answer prompts with a trained adapter: `python predict.py adapter_path=outputs/runs/<run>/adapter input=rows.jsonl`
(or `interactive=true`: a prompt a line on stdin).

All logic lives in `finlora.predict`; `--cfg job` prints the resolved config.
"""

import hydra
from omegaconf import DictConfig

from finlora.run.entry import cli, run


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from finlora.predict import predict  # torch and the rest load only once a run starts

    run(predict, cfg)


if __name__ == "__main__":
    cli(main)
