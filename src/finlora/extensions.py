"""What reaches Lightning beyond finlora's own keys: any `lightning.Trainer` argument (`trainer.extra.<arg>`)
and any callback by `_target_` (the `callbacks` config group), as LightningCLI and lightning-hydra-template
allow. Both are checked against the real signatures while the config is validated, before any model loads,
and built (`hydra.utils.instantiate`, so a value may itself be a `_target_` node) when the Trainer is made.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from difflib import get_close_matches
from typing import Any

# Trainer arguments that finlora sets from its own keys: passing one through trainer.extra would mean two
# places for one setting, so that is refused, naming the key to use.
OWNED = {
    "accelerator": "trainer.accelerator", "devices": "trainer.devices", "strategy": "trainer.strategy",
    "precision": "trainer.precision", "max_steps": "trainer.max_steps", "max_epochs": "trainer.max_epochs",
    "accumulate_grad_batches": "trainer.grad_accum", "val_check_interval": "trainer.val_every_n_steps",
    "check_val_every_n_epoch": "trainer.val_every_n_steps", "log_every_n_steps": "trainer.log_every_n_steps",
    "gradient_clip_val": "trainer.grad_clip (the module clips by norm itself: fused AdamW refuses Lightning's)",
    "gradient_clip_algorithm": "trainer.grad_clip (clipping is by norm)",
    "logger": "the logger group (logger=wandb|tensorboard|[wandb,tensorboard]|csv)",
    "callbacks": "the callbacks group (callbacks=…, or callbacks.<name>._target_=…)",
    "default_root_dir": "output_dir", "enable_checkpointing": "the checkpoint.* keys",
    "plugins": "finlora's atomic checkpoint writer (not replaceable)",
}
# Trainer arguments finlora sets to a default of its own, which trainer.extra may change.
DEFAULTS = {"enable_model_summary": False, "num_sanity_val_steps": 0}
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def trainer_extra_problems(extra: Mapping[str, Any]) -> list[str]:
    """Each `trainer.extra` entry that is not a `lightning.Trainer` argument, is owned by a finlora key, or
    holds a value of a type the argument does not take."""
    if not extra:
        return []
    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters
    hints = typing.get_type_hints(L.Trainer.__init__)
    problems = []
    for name, value in extra.items():
        key = f"trainer.extra.{name}"
        if name in OWNED:
            problems.append(f"{key}: clashes with {OWNED[name]}, which sets Lightning's {name}; set that instead")
        elif name not in params or name == "self":
            close = get_close_matches(name, [p for p in params if p != "self"], n=3)
            problems.append(f"{key}: lightning.Trainer has no argument {name!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
        elif not _is_target(value) and not _fits(value, hints.get(name, Any)):
            problems.append(f"{key}: {value!r} is not a valid value for lightning.Trainer's {name} "
                            f"({_describe(hints[name])})")
    return problems


def callback_problems(callbacks: Mapping[str, Any]) -> list[str]:
    """Each `callbacks.<name>` entry that has no `_target_`, names nothing importable, is not a Lightning
    callback, or has arguments that do not bind to its signature."""
    if not callbacks:
        return []
    from hydra.utils import get_object
    from lightning.pytorch.callbacks import Callback

    problems = []
    for name, node in callbacks.items():
        key = f"callbacks.{name}"
        if node is None:
            continue  # `callbacks.<name>=null` switches an entry of a chosen option off
        if not _is_target(node):
            problems.append(f"{key}: needs a _target_ (the callback's import path, e.g. "
                            "lightning.pytorch.callbacks.EarlyStopping)")
            continue
        try:
            target = get_object(node["_target_"])
        except Exception as err:
            problems.append(f"{key}._target_: cannot import {node['_target_']!r} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]})")
            continue
        if isinstance(target, type) and not issubclass(target, Callback):
            problems.append(f"{key}._target_: {node['_target_']} is not a lightning.pytorch.callbacks.Callback")
            continue
        args = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        try:
            inspect.signature(target).bind(*node.get("_args_", []), **args)
        except TypeError as err:
            problems.append(f"{key}: the arguments {sorted(args)} do not fit {node['_target_']}: {err}")
        except ValueError:
            pass  # no signature to check (some builtins)
    return problems


def trainer_kwargs(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The Trainer arguments of `trainer.extra` (each `_target_` value built), over finlora's defaults."""
    from hydra.utils import instantiate

    return DEFAULTS | {name: instantiate(value) if _is_target(value) else value for name, value in extra.items()}


def build_callbacks(callbacks: Mapping[str, Any]) -> list[Any]:
    """The user's callbacks, in the order of the config, after finlora's own."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in callbacks.values() if node is not None]


def _is_target(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (a YAML scalar, list or mapping) can be an argument of this annotation. Only
    what a config can hold is judged; an annotation of another class (a Profiler, say) takes a list or mapping
    (its own checks judge those), and a `_target_` node is never judged here: it builds such objects."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and (hint is float or
                                                                                  isinstance(value, int))
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return value is not None and not isinstance(value, bool | int | float | str)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")
