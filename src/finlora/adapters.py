"""LoRA / DoRA adapters (peft) on a base model: new ones to train, or saved ones to evaluate; and what they
make trainable."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from finlora.compat.transformers import input_grads_enabled
from finlora.config import AdapterConfig, AdapterMethod, DoraImpl
from finlora.errors import ConfigError
from finlora.lora_dropout import use_dropped_product

log = logging.getLogger(__name__)


def lora_config(cfg: AdapterConfig) -> LoraConfig:
    targets = cfg.target_modules
    return LoraConfig(
        task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_dora=cfg.method is AdapterMethod.dora, use_rslora=cfg.rslora, bias="none")


def attach_adapter(model: PreTrainedModel, cfg: AdapterConfig, gradient_checkpointing: bool) -> nn.Module:
    """Wrap the base model for training: a peft LoRA/DoRA model, or the model itself for full fine-tuning.

    A quantized base is frozen much as peft's `prepare_model_for_kbit_training` freezes it (`freeze_quantized`),
    without its float32 copies of the unquantized weights. Gradient checkpointing is non-reentrant: the checkpointed
    layers' inputs need no gradient for the adapter's weights inside them to get theirs, so the hook that
    transformers puts on the embeddings for that (a `requires_grad_` that splits a compiled step in three graphs)
    is removed. It is enabled after peft wraps the model, which would add a second hook whose handle is lost.
    LoRA adapters with dropout keep their layer input and a mask for backward, not a dropped copy each
    (`finlora.lora_dropout`).
    """
    if getattr(model, "is_quantized", False):
        freeze_quantized(model)
    wrapped = model if cfg.method is AdapterMethod.none else get_peft_model(model, lora_config(cfg))
    if cfg.method is AdapterMethod.dora:
        choose_dora(wrapped, cfg.impl)
    elif cfg.method is AdapterMethod.lora:
        use_dropped_product(wrapped)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if input_grads_enabled(model):
            model.disable_input_require_grads()
    return wrapped


def freeze_quantized(model: PreTrainedModel) -> None:
    """Freeze the base; float16 norms (and any bias) go to float32, as peft's `prepare_model_for_kbit_training` puts
    them, against float16's overflow. Unlike peft, bf16 ones stay bf16: bf16 has float32's range, and a float32 norm
    makes every layer's output, and so the residual stream that gradient checkpointing keeps, float32 (twice the
    activation memory, docs/benchmarks.md), where a bf16 base without quantization runs it in bf16. The frozen
    embedding and LM head stay in their dtype too: upcast, they would double in memory (the largest part of a
    quantized model's peak) for matmuls autocast runs in bf16."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.ndim == 1 and param.dtype == torch.float16 and type(param).__name__ != "Params4bit":
            param.data = param.data.float()


BASE_FILE = "base_model.json"  # in a saved adapter: `models.base_identity` of the base it was trained on


QUANT_KEYS = ("bits", "quant_type", "double_quant")  # what makes two quantized bases differ (not how they compute)


def recorded_quant(adapter_path: str) -> tuple[dict | None, Path | None]:
    """The quantization of the base a saved adapter was trained on, and the file that says so: `quant` in its
    `BASE_FILE` (written by training since it records it), else the `quant` of the run's `config.yaml` beside the
    adapter folder; (None, None) for an adapter without either (plain peft)."""
    folder = Path(adapter_path)
    try:
        record = json.loads((folder / BASE_FILE).read_text()).get("quant")
        if isinstance(record, dict):
            return record, folder / BASE_FILE
    except (OSError, ValueError):
        pass
    run_config = folder.parent / "config.yaml"
    try:
        from omegaconf import OmegaConf

        record = OmegaConf.to_container(OmegaConf.load(run_config)).get("quant")
    except Exception:  # no run folder around the adapter, or not a finlora config
        return None, None
    return (record, run_config) if isinstance(record, dict) and "bits" in record else (None, None)


def target_problems(config: PretrainedConfig, cfg: AdapterConfig) -> list[str]:
    """`adapter.target_modules` entries that name no module of the model, found from its config alone (the
    model is built on the meta device: no weights), with the linear layers it has; and an `adapter.r` above
    the smaller side of every adapted layer (an adapter larger than the layers it adapts: r=100000 ran out of
    memory only once the model had loaded). An r above some adapted layers' smaller side is warned of: their
    update is full-rank, at more parameters than the layer has."""
    if cfg.method is AdapterMethod.none:
        return []
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    if cfg.target_modules == ["all-linear"]:  # peft's all-linear leaves out the output layer
        targeted = {n: m for n, m in linear.items() if m is not skeleton.get_output_embeddings()}
    else:
        names = [name for name, _ in skeleton.named_modules()]
        missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            layers = sorted({n.rsplit(".", 1)[-1] for n in linear})
            return [f"adapter.target_modules: {missing} name no module of {config.architectures[0]}; its linear "
                    f"layers: {layers} (or [all-linear])"]
        targeted = {n: m for n, m in linear.items() if any(n == t or n.endswith("." + t) for t in cfg.target_modules)}
    sides = {n.rsplit(".", 1)[-1]: min(m.in_features, m.out_features) for n, m in targeted.items()}
    if not sides:
        return []
    widest = max(sides, key=sides.__getitem__)
    if cfg.r > sides[widest]:
        return [f"adapter.r: {cfg.r} is more than every adapted layer's smaller side (at most {sides[widest]}, "
                f"{widest}); use adapter.r <= {sides[widest]}"]
    if narrow := sorted(n for n, side in sides.items() if side < cfg.r):
        log.warning("adapter.r: %d is more than the smaller side of %s (%d): their update is full-rank, at more "
                    "parameters than the layer has", cfg.r, narrow, min(sides.values()))
    return []


def check_saved_adapter(adapter_path: str, base: dict) -> None:
    """Refuse, before the base loads, a saved adapter whose weights file cannot be read (a copy cut short), or
    one on a base other than the one it was trained on: the weights would not be its own (a size mismatch at
    best, silently wrong scores if the shapes agree). Adapters saved without `BASE_FILE` (plain peft) are
    not checked for their base."""
    adapter_config = Path(adapter_path) / "adapter_config.json"
    if problem := config_problem(adapter_config):
        raise ConfigError(f"adapter_path: {adapter_config}: {problem}; it should be the adapter_config.json that "
                          "training wrote")
    weights = Path(adapter_path) / "adapter_model.safetensors"
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as err:
            raise ConfigError(f"adapter_path: {weights} cannot be read ({type(err).__name__}: {err})") from None
    path = Path(adapter_path) / BASE_FILE
    if not path.is_file():
        return
    trained = json.loads(path.read_text())
    same = (trained.get("weights") == base.get("weights") if trained.get("weights") and base.get("weights")
            else (trained.get("name_or_path"), trained.get("revision")) == (base["name_or_path"], base["revision"]))
    if not same or trained.get("shapes") != base["shapes"]:
        raise ConfigError(f"adapter_path: {adapter_path} was trained on {_describe(trained)}, not on the base asked "
                          f"for, {_describe(base)}; set model.name_or_path (and model.revision) to its base")


@dataclass
class SavedAdapter:
    """What a training run recorded about its adapter: peft's `adapter_config.json`, the base it was trained on
    (`BASE_FILE`), and from the run folder above it, where there is one, the run's config (`config.yaml`: its
    quantization, task and settings) and summary (`metrics.json`: losses and test metrics)."""

    path: Path
    peft: dict
    base: dict
    run: dict
    summary: dict

    @property
    def quant_bits(self) -> int | None:
        """The bits of the base the adapter was trained on (None: not quantized, or not recorded), by the one rule
        eval.py and predict.py use (`recorded_quant`: the adapter's own record first, then the run's config)."""
        return (recorded_quant(str(self.path))[0] or {}).get("bits")

    @property
    def method(self) -> str:
        return "dora" if self.peft.get("use_dora") else "lora"

    @property
    def run_name(self) -> str:
        return self.run.get("run_name") or self.path.resolve().parent.name


def read_saved_adapter(adapter_path: str) -> SavedAdapter:
    """A finlora adapter folder's record, refusing (naming the file and key) a folder that is not one."""
    import yaml

    folder = Path(adapter_path)
    if problem := config_problem(folder / "adapter_config.json"):
        raise ConfigError(f"adapter_path: {folder / 'adapter_config.json'}: {problem}; it should be the "
                          "adapter_config.json that training wrote")
    try:
        base = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"adapter_path: {folder / BASE_FILE} cannot be read ({err}); it names the base the adapter "
                          "was trained on, and training writes it next to the adapter") from None
    missing = [k for k in ("name_or_path", "shapes") if not isinstance(base, dict) or k not in base]
    if missing:
        raise ConfigError(f"adapter_path: {folder / BASE_FILE} has no {', '.join(missing)}; it should be the file "
                          "that training wrote")
    run_dir = folder.resolve().parent
    run = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    peft = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return SavedAdapter(folder, peft, base, run or {}, summary)


def config_problem(path: Path) -> str | None:
    """What makes a saved `adapter_config.json` unusable, or None: missing, not JSON, not a LoRA config."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return err.strerror
    except ValueError as err:  # not UTF-8, or not JSON (the message gives line and column)
        return f"not JSON ({err})"
    if not isinstance(saved, dict):
        return f"a JSON {type(saved).__name__}, not an object"
    if missing := [k for k in ("peft_type", "r", "target_modules") if k not in saved]:
        return f"no {', '.join(missing)}"
    if not isinstance(saved["r"], int) or saved["r"] < 1:
        return f"r must be a positive integer, got {saved['r']!r}"
    return None


def _describe(base: dict) -> str:
    revision = f" at {base['revision']}" if base.get("revision") else ""
    weights = f", weights {base['weights'][:12]}" if base.get("weights") else ""
    layers = (base.get("shapes") or {}).get("num_hidden_layers")
    return f"{base.get('name_or_path')}{revision} ({layers} layers{weights})"


def load_adapter(model: PreTrainedModel, path: str, impl: DoraImpl, merge: bool) -> nn.Module:
    """A saved peft adapter on its base, for evaluation: DoRA layers computed by `impl`, or the adapter
    merged into the base weights (a plain model: no adapter at inference)."""
    peft_model = PeftModel.from_pretrained(model, path)
    if merge:
        return peft_model.merge_and_unload()
    if any(getattr(c, "use_dora", False) for c in peft_model.peft_config.values()):  # LoRA has no DoRA layers
        choose_dora(peft_model, impl)
    return peft_model


def choose_dora(model: PeftModel, impl: DoraImpl) -> None:
    """Run the model's DoRA layers with finlora's implementation (`impl=finlora`), or leave peft's."""
    if impl is DoraImpl.finlora:
        from finlora.dora import use_fast_dora

        log.info("finlora DoRA on %d layers", use_fast_dora(model))


@dataclass
class ParamGroup:
    """Trainable parameters of one kind of adapted matrix (e.g. every layer's q_proj)."""

    module: str
    matrices: int
    shape: tuple[int, int]  # (d_out, d_in)
    lora: int  # r·(d_in + d_out) per matrix
    magnitude: int  # d_out per matrix for DoRA, else 0

    @property
    def total(self) -> int:
        return self.matrices * (self.lora + self.magnitude)


def trainable_breakdown(model: nn.Module) -> list[ParamGroup]:
    """Trainable adapter parameters per matrix kind, read from the modules themselves (not from the config),
    so the printed counts are what the optimizer really gets."""
    groups: dict[tuple[str, tuple[int, int]], list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, module in model.named_modules():
        if not isinstance(module, nn.Module) or not hasattr(module, "lora_A") or not module.lora_A:
            continue
        for adapter, a in module.lora_A.items():
            b = module.lora_B[adapter]
            kind = re.sub(r".*\.", "", name)
            shape = (b.weight.shape[0], a.weight.shape[1])
            entry = groups[(kind, shape)]
            entry[0] += 1
            entry[1] = a.weight.numel() + b.weight.numel()
            mags = getattr(module, "lora_magnitude_vector", None)
            entry[2] = mags[adapter].weight.numel() if mags and adapter in mags else 0
    return [ParamGroup(kind, n, shape, lora, mag) for (kind, shape), (n, lora, mag) in sorted(groups.items())]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized 4-bit weights count as their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, PeftModel):
        _, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
    return trainable, total
