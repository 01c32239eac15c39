"""finlora.compat against the real libraries: one test per function, each failing with the function's name and what
changed when a release moves the private API it reaches into. The Lightning ones read a real two-step fit."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from finlora.compat import lightning as compat_lightning
from finlora.compat import torch as compat_torch

# ---------------------------------------------------------------- torch


def test_dynamo_counters_count_graph_breaks():
    compat_torch.dynamo_counters().clear()
    torch._dynamo.reset()

    def broken(x):
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    torch.compile(broken, backend="eager")(torch.ones(3))
    counters = compat_torch.dynamo_counters()
    assert sum(counters["graph_break"].values()) >= 1, \
        "compat.torch.dynamo_counters: a graph break is no longer counted under counters['graph_break']"
    assert counters["inductor"]["cudagraph_skips"] == 0, \
        "compat.torch.dynamo_counters: counters['inductor']['cudagraph_skips'] no longer reads as a count"


# ---------------------------------------------------------------- Lightning


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=1)


class _Reader(L.Callback):
    """Reads every compat.lightning function at the points finlora's callbacks call them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool | None]] = []  # batch, steps taken, logs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.logs = compat_lightning.logs_this_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((batch_idx, compat_lightning.steps_taken(trainer), self.logs))


def test_lightning_functions_read_a_real_fit(tmp_path):
    reader = _Reader()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, log_every_n_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[reader], default_root_dir=tmp_path)
    trainer.fit(_Tiny())
    assert [b for b, *_ in reader.seen] == [0, 1, 2, 3]
    assert [s for _, s, _ in reader.seen] == [0, 0, 1, 1] and compat_lightning.steps_taken(trainer) == 2, \
        f"compat.lightning.steps_taken: {[s for _, s, _ in reader.seen]} at each batch's end, not the optimizer " \
        "steps done before the batch's own"
    assert [w for *_, w in reader.seen] == [False, False, True, True], \
        "compat.lightning.logs_this_step: not true for the micro-batches of every log_every_n_steps-th step alone"
    assert compat_lightning.logs_this_step(SimpleNamespace()) is None, \
        "compat.lightning.logs_this_step: a trainer without a logger connector should read None"


def test_set_wandb_mode_is_the_mode_the_run_starts_in(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # put back afterwards: an offline WandbLogger sets it for the process
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    compat_lightning.set_wandb_mode(logger, "disabled")
    try:
        assert logger.experiment.settings.mode == "disabled", \
            "compat.lightning.set_wandb_mode: the logger's run did not start in the mode set"
    finally:
        wandb.finish()


def test_set_wandb_run_replaces_the_loggers_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    run = wandb.init(mode="disabled")
    try:
        compat_lightning.set_wandb_run(logger, run)
        assert logger.experiment is run, "compat.lightning.set_wandb_run: the logger writes to another run"
    finally:
        wandb.finish()


# ---------------------------------------------------------------- transformers


def _llama(**kwargs) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, **kwargs)
    return LlamaForCausalLM(config)


def test_input_grads_enabled_follows_enable_and_disable_input_require_grads():
    from finlora.compat.transformers import input_grads_enabled

    model = _llama()
    assert not input_grads_enabled(model), "compat.transformers.input_grads_enabled: on before enabling"
    model.enable_input_require_grads()
    assert input_grads_enabled(model), "compat.transformers.input_grads_enabled: transformers keeps its hook elsewhere"
    model.disable_input_require_grads()
    assert not input_grads_enabled(model), "compat.transformers.input_grads_enabled: still on after disabling"


def test_grandparent_is_the_node_above_a_resolvers_parent():
    from omegaconf import OmegaConf

    from finlora.compat.hydra import grandparent

    seen = []
    OmegaConf.register_new_resolver("finlora_test_grandparent", lambda *, _parent_: seen.append(grandparent(_parent_))
                                    or 1, replace=True)
    cfg = OmegaConf.create({"init": {"num_gpus": 2}, "job": {"gpus": "${finlora_test_grandparent:}"}})
    assert cfg.job.gpus == 1
    assert seen and seen[0].init.num_gpus == 2, "compat.hydra.grandparent: OmegaConf's _get_parent changed"


# ---------------------------------------------------------------- bitsandbytes


def test_drop_stale_int8_rows_keeps_a_layer_that_computes():
    import bitsandbytes as bnb

    from finlora.compat.bitsandbytes import drop_stale_int8_rows

    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    base = bnb.nn.Linear8bitLt(32, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    base.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    base.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    base = base.to("cpu")
    x = torch.randn(2, 32)
    want = base(x)
    drop_stale_int8_rows(base)
    torch.testing.assert_close(base(x), want, msg="compat.bitsandbytes.drop_stale_int8_rows: the layer changed")
