"""The top-level schemas of train.py, eval.py, export.py and predict.py: their sections, and the checks that
span sections (settings that exclude each other, metrics a run must log, tokens in values)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from finlora import metric_names as names
from finlora.config.checks import SEED_MAX, check, flat, run_name_problems, saved_adapter_problems, token_problems
from finlora.config.enums import (
    AdapterMethod,
    Batching,
    Compile,
    ExportFormat,
    GgufType,
    HalfDtype,
    RecordFormat,
    TrainPrompt,
)
from finlora.config.evaluation import DecodeSettings, EvalSettings, SavedAdapterConfig, TrainEvalSettings
from finlora.config.model import AdapterConfig, ModelConfig, QuantConfig
from finlora.config.task import TaskConfig
from finlora.config.tracking import CheckpointConfig, LoggerConfig, PathsConfig, SweepConfig
from finlora.config.trainer import DataConfig, TrainerConfig


@dataclass
class RunConfig:
    """What a training run and an evaluation share: the base model, the task, where things are, the logger."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "run"
    output_dir: str = "???"

    def problems(self) -> list[str]:
        problems: list[str] = []
        problems += run_name_problems(self.run_name)
        check(problems, not self.task.reads_data_dir or Path(self.paths.data_dir).is_dir(), "paths.data_dir",
               f"data folder {self.paths.data_dir!r} does not exist (set FINLORA_DATA_DIR or paths.data_dir)")
        for section in (self.model, self.quant, self.task, self.logger):
            problems += section.problems()
        return problems


@dataclass
class Config(RunConfig):
    """`train.py`: fine-tune the base model with an adapter (or fully) on a task."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: TrainEvalSettings = field(default_factory=TrainEvalSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: …, args} (`finlora.extensions`)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 42  # weights init, dropout and the order of training batches
    ckpt_path: str | None = None  # a checkpoint file, or last; null: a rerun in a run folder resumes its last.ckpt
    # what a resume may change from the checkpoint's run: config keys (trainer.lr) and training files as the task
    # names them (train/fpb_train.jsonl), each recorded old → new with the step; anything else changed is refused
    resume_changes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        problems = super().problems()
        check(problems, not (self.quant.bits and self.adapter.method is AdapterMethod.none), "quant.bits",
               "full fine-tuning (adapter=none) cannot train quantized weights; use quant=none")
        check(problems, 0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        check(problems, bool(self.task.train), "task.train",
               f"task {self.task.name!r} has no training files (it is for evaluation only: use eval.py)")
        check(problems, self.ckpt_path in (None, "last") or Path(self.ckpt_path).is_file(), "ckpt_path",
               f"checkpoint {self.ckpt_path!r} does not exist (or use last)")
        for section in (self.adapter, self.data, self.trainer, self.eval, self.checkpoint):
            problems += section.problems()
        chat = [f"task.train[{i}]" for i, src in enumerate(self.task.train) if src.format is RecordFormat.chat]
        check(problems, not chat or self.data.train_prompt is TrainPrompt.plain, "data.train_prompt",
               f"{self.data.train_prompt.value} wraps a FinLoRA context, and {', '.join(chat)} has format chat, whose "
               "prompt is the tokenizer's chat template: use data.train_prompt=plain")
        names = flat(asdict(self)).keys() | {src.origin for src in self.task.train}
        unknown = [k for k in self.resume_changes if k not in names]
        check(problems, not unknown, "resume_changes", f"{unknown} name no config key or training file of this run")
        t = self.trainer
        check(problems, not (t.capture and t.compile is Compile.cudagraphs), "trainer.capture",
               "trainer.compile=cudagraphs records CUDA graphs already: capture goes with trainer.compile=eager "
               "or inductor")
        check(problems, not (t.capture and t.strategy == "fsdp"), "trainer.capture",
               "FSDP gathers each layer's weights into fresh memory around its forward, which a recorded graph would "
               "not follow: use trainer.capture=false, or trainer.strategy=ddp")
        graphs = "trainer.capture" if t.capture else "trainer.compile" if t.compile is Compile.cudagraphs else None
        check(problems, not graphs or self.data.batching in (Batching.static, Batching.auto), graphs,
               "CUDA graphs replay fixed shapes: set data.batching=static "
               f"(got data.batching={self.data.batching.value})")
        check(problems, not graphs or t.grad_accum == 1, graphs,
               "CUDA graphs replay the backward into the same memory each micro-batch, so gradients cannot "
               "accumulate: use trainer.grad_accum=1 with a larger trainer.batch_size "
               f"(got trainer.grad_accum={t.grad_accum})")
        return problems + self.extension_problems() + self.metric_problems() + token_problems(asdict(self))

    @property
    def scores_in_training(self) -> bool:
        """Whether each validation also generates on held-out rows and logs the task's scores (`TaskScore`)."""
        return (self.data.val_size > 0 and self.eval.during_training.size > 0 and bool(self.task.test)
                and self.trainer.strategy != "fsdp")

    @property
    def tests_after_training(self) -> bool:
        """Whether the run ends by scoring the task's test sets (not under FSDP: generation runs on one GPU)."""
        return self.eval.enabled and bool(self.task.test) and self.trainer.strategy != "fsdp"

    def extension_problems(self) -> list[str]:
        """`trainer.extra` and `callbacks`: their targets and arguments."""
        from finlora.extensions import callback_problems, trainer_extra_problems

        return trainer_extra_problems(self.trainer.extra) + callback_problems(self.callbacks)

    def logged_metrics(self) -> list[str]:
        """Every metric this run logs (`finlora.metric_names`): the training step's, the learning rates, the
        validation loss with a validation split, the task's scores with in-training scoring, and each test set's
        with a test stage."""
        groups = 2 if self.adapter.magnitude_lr_scale != 1 else 1  # `module.param_groups`
        logged = [*names.TRAIN, *names.learning_rates(groups)]
        if self.data.val_size > 0:
            logged.append(names.VAL_LOSS)
        if self.scores_in_training:  # scored as the first test set is (`callbacks.TaskScore`)
            logged += [names.val_score(self.task.name, n) for n in names.SCORE_NAMES[self.task.test[0].kind.value]
                       if n not in names.VAL_SKIPPED]
        if self.tests_after_training:
            logged += [names.test_score(t.name, n) for t in self.task.test for n in names.SCORE_NAMES[t.kind.value]]
        return logged

    def metric_problems(self) -> list[str]:
        """Each metric named by `sweep.objective`, a callback's `monitor` or (when it keeps best checkpoints)
        `checkpoint.monitor` that this run will not log, with the closest names it will."""
        monitors = [(f"callbacks.{n}.monitor", c["monitor"]) for n, c in self.callbacks.items()
                    if isinstance(c, dict) and isinstance(c.get("monitor"), str)]
        metrics = [*([("sweep.objective", self.sweep.objective)] if self.sweep.objective else []), *monitors]
        if self.checkpoint.keep_best and self.data.val_size > 0:
            metrics.append(("checkpoint.monitor", self.checkpoint.monitor))
        logged = self.logged_metrics()
        problems = []
        for key, metric in metrics:
            offered = [n for n in logged if n.startswith(names.VAL_PREFIX)] if key == "checkpoint.monitor" else logged
            if metric in offered:
                continue
            close = get_close_matches(metric, offered, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"it logs {', '.join(offered)}"
            problems.append(f"{key}: {metric!r} is not a validation metric; {hint}" if metric in logged
                            else f"{key}: this run does not log {metric!r}; {hint}")
        return problems


@dataclass
class EvalConfig(RunConfig):
    """`eval.py`: a base model, optionally with a saved adapter (or merged), on a task's test sets."""

    eval: EvalSettings = field(default_factory=EvalSettings)
    adapter: SavedAdapterConfig = field(default_factory=SavedAdapterConfig)
    adapter_path: str | None = None
    merge: bool = False  # merge the adapter into the base weights (a plain model, no adapter at inference)
    accelerator: str = "auto"
    precision: str | None = None  # null: bf16-mixed on a GPU, else 32-true

    def problems(self) -> list[str]:
        problems = super().problems()
        check(problems, bool(self.task.test), "task.test", f"task {self.task.name!r} has no test sets")
        problems += saved_adapter_problems(self.adapter_path, self.merge, self.quant.bits)
        problems += self.eval.problems()
        return problems + token_problems(asdict(self))


@dataclass
class ExportConfig:
    """`export.py`: a saved adapter merged into the base it was trained on (loaded unquantized), written as a
    transformers folder or a GGUF file, with a model card; optionally uploaded to the Hugging Face Hub."""

    adapter_path: str = "???"  # the `adapter/` folder of a training run
    format: ExportFormat = ExportFormat.merged
    dtype: HalfDtype = HalfDtype.bf16  # format=merged: the weights' dtype
    gguf_type: GgufType = GgufType.f16  # format=gguf: f16, bf16 or q8_0
    out_dir: str | None = None  # null: <run folder>/<format> (merged/ or gguf/), beside the adapter
    overwrite: bool = False  # replace an existing out_dir (refused otherwise)
    push_to_hub: str | None = None  # a Hub repo id (org/name): upload the folder there once written (needs network)
    private: bool = True  # push_to_hub: a repo created by the upload is private
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "export"
    output_dir: str = "???"

    @property
    def target(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.adapter_path).resolve().parent / self.format.value

    def problems(self) -> list[str]:
        problems: list[str] = []
        adapter = Path(self.adapter_path)
        for name in ("adapter_config.json", "base_model.json"):
            if not (adapter / name).is_file():
                problems.append(f"adapter_path: {adapter / name} does not exist; give the adapter/ folder of a "
                                f"finlora training run (it holds adapter_config.json and base_model.json)")
                break
        check(problems, self.overwrite or not self.target.exists(), "out_dir",
               f"{self.target} exists; set overwrite=true to replace it, or out_dir=… to write elsewhere")
        if self.push_to_hub is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
                check(problems, "/" in self.push_to_hub, "push_to_hub",
                       f"must be a repo id org/name (or user/name), got {self.push_to_hub!r}")
            except HFValidationError as err:
                problems.append(f"push_to_hub: {str(err).splitlines()[0]}")
        return problems + token_problems(asdict(self))


@dataclass
class PredictConfig:
    """`predict.py`: answers from a base model, optionally with a saved adapter (or merged), for the prompts of a
    JSONL file or typed one a line (`interactive`), generated with evaluation's prompt and decoding."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)  # unless given: the quantization the adapter trained on
    paths: PathsConfig = field(default_factory=PathsConfig)
    adapter: SavedAdapterConfig = field(default_factory=SavedAdapterConfig)
    adapter_path: str | None = None
    merge: bool = False
    input: str | None = None  # JSONL: {"context": …} (FinLoRA's, an "instruction" optional) or {"prompt": …} a line
    output: str | None = None  # the answers' JSONL; null: <run folder>/predictions.jsonl
    interactive: bool = False  # a prompt a line on stdin, each answer printed, until end of input
    max_new_tokens: int = 32  # answer tokens at most (a row also stops at EOS)
    eval: DecodeSettings = field(default_factory=DecodeSettings)  # decoding, with eval.py's keys
    accelerator: str = "auto"
    precision: str | None = None  # null: bf16-mixed on a GPU, else 32-true
    run_name: str = "predict"
    output_dir: str = "???"

    def problems(self) -> list[str]:
        problems = self.model.problems() + self.quant.problems()
        problems += run_name_problems(self.run_name)
        check(problems, (self.input is not None) != self.interactive, "input",
               "give input=<file.jsonl> or interactive=true (one of the two)")
        check(problems, self.input is None or Path(self.input).is_file(), "input",
               f"{self.input!r} is not a file")
        check(problems, self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        problems += saved_adapter_problems(self.adapter_path, self.merge, self.quant.bits)
        problems += self.eval.problems()
        return problems + token_problems(asdict(self))
