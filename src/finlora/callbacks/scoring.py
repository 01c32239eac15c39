"""Task scores and sample answers at each validation (`TaskScore`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase

from finlora.config import Config, EvalSettings, FourBitEval
from finlora.evaluate import generate, pick_rows
from finlora.loggers import log_predictions
from finlora.metric_names import VAL_SAMPLES, VAL_SKIPPED, val_score
from finlora.metrics import extract_answer, score
from finlora.outputs import write_jsonl
from finlora.prompts import build_prompt

SAMPLES_DIR = "samples"  # in the run folder: a few generated answers at each validation (`TaskScore.show`)


class TaskScore(Callback):
    """At every validation, greedy answers on a fixed sample of the held-out rows (`eval.during_training.size`,
    stratified by label), scored as the task's first test set is scored (its kind and labels), and logged
    as `val/<task>/<metric>`: what `checkpoint.monitor` can keep the best adapter by, and a sweep can
    optimize. The loss says how likely the right answer is; this says how often it is the one generated.

    The first `eval.during_training.samples` of those rows (in file order; with no scored sample, the first
    held-out rows, generated for this alone) are shown as text: prompt (evaluation's, `prompts.build_prompt`),
    target and answer, as a W&B table `val/samples` and in `samples/val_step<N>.jsonl` in the run folder."""

    def __init__(self, cfg: Config, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase, precision: str) -> None:
        self.test_set, self.task = cfg.task.test[0], cfg.task.name
        during = cfg.eval.during_training
        sample = EvalSettings(limit=during.size, seed=cfg.seed)
        self.indices = (pick_rows(val_rows, self.test_set, sample) if during.size
                        else list(range(min(during.samples, len(val_rows)))))
        self.rows = [val_rows[i] for i in self.indices]
        self.scores, self.samples = bool(during.size), during.samples
        self.samples_dir = Path(cfg.output_dir) / SAMPLES_DIR
        self.tokenizer, self.precision, self.settings = tokenizer, precision, cfg.eval
        # A dense copy of a 4-bit base would be made, and its decode step compiled anew, at every validation (a
        # cost not measured against the kernels' time on such a sample): `auto` keeps bitsandbytes' kernels here.
        auto = cfg.eval.four_bit is FourBitEval.auto
        self.four_bit = FourBitEval.kernel if auto else cfg.eval.four_bit

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        answers = generate(pl_module.model, self.tokenizer, self.rows, self.test_set.max_new_tokens,
                           self.settings.batch_size, self.precision, f"val {self.task}",
                           static_cache=self.settings.static_cache, decode_compile=self.settings.decode_compile,
                           int8_cpu=self.settings.int8_cpu, four_bit=self.four_bit,
                           share_prefix=self.settings.share_prefix, prompt=self.settings.prompt)
        if self.scores:
            metrics = score(self.test_set.kind, answers, [str(r["target"]) for r in self.rows], self.test_set.labels)
            for name, value in metrics.items():
                if name not in VAL_SKIPPED:
                    pl_module.log(val_score(self.task, name), value, batch_size=len(self.rows))
        if self.samples and trainer.is_global_zero:
            self.show(trainer, answers[:self.samples])

    def show(self, trainer: L.Trainer, answers: list[str]) -> None:
        """The first rows' prompts, targets and answers, as a W&B table and a JSONL file named by the step."""
        labels = self.test_set.labels or None
        rows = [{"step": trainer.global_step, "index": i,
                 "prompt": build_prompt(r, self.settings.prompt, self.tokenizer), "target": str(r["target"]),
                 "generated": g, "predicted": extract_answer(self.test_set.kind, g, labels)}
                for i, r, g in zip(self.indices, self.rows, answers, strict=False)]
        write_jsonl(self.samples_dir / f"val_step{trainer.global_step:06d}.jsonl", rows)
        log_predictions(trainer.loggers, VAL_SAMPLES, rows)
