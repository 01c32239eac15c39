"""finlora.compat against the real libraries: one test per function of compat/torch.py, compat/lightning.py and
compat/transformers.py, each failing with the function's name and what changed when a release moves the private
API it reaches into. The Lightning ones read a real two-step fit."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from finlora.compat import lightning as compat_lightning
from finlora.compat import torch as compat_torch
from finlora.compat import transformers as compat_transformers

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


def test_mark_dynamic_compiles_one_graph_for_every_width():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: x.sum(-1) * 2, backend=backend)
    for width in (3, 5, 7):
        x = torch.ones(2, width)
        compat_torch.mark_dynamic(x, 1)
        compiled(x)
    assert len(graphs) == 1, f"compat.torch.mark_dynamic: {len(graphs)} compilations for three widths, not one"


def test_dynamo_error_is_what_a_refused_trace_raises():
    torch._dynamo.reset()

    def broken(x):
        torch._dynamo.graph_break()
        return x

    with pytest.raises(Exception) as err:
        torch.compile(broken, backend="eager", fullgraph=True)(torch.ones(2))
    assert isinstance(err.value, compat_torch.dynamo_error()), \
        f"compat.torch.dynamo_error: a fullgraph break raised {type(err.value)}, not a subclass of the returned class"


def test_skip_side_effects_in_checkpoint_recompute_switches_dynamos_option_for_the_block_only():
    config = torch._dynamo.config
    name = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    with compat_torch.skip_side_effects_in_checkpoint_recompute():
        inside = getattr(config, name, None)
    if hasattr(config, name):
        assert inside is True and getattr(config, name) is False, \
            f"compat.torch.skip_side_effects_in_checkpoint_recompute: {name} was {inside} inside, " \
            f"{getattr(config, name)} after"
    else:
        assert inside is None  # a torch without the switch: nothing to patch


def test_foreach_copy_copies_every_pair():
    dst, src = [torch.zeros(3), torch.zeros(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    compat_torch.foreach_copy(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True)), \
        "compat.torch.foreach_copy: the destinations do not hold the sources"


def test_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = compat_torch.version(t)
    t.add_(1)
    assert compat_torch.version(t) == before + 1, "compat.torch.version: an in-place add no longer bumps it by one"


def test_mkldnn_bf16_supported_answers_a_bool():
    supported = compat_torch.mkldnn_bf16_supported()
    assert isinstance(supported, bool), f"compat.torch.mkldnn_bf16_supported: returned {type(supported)}"
    if supported:
        a = torch.randn(4, 4, dtype=torch.bfloat16)
        assert (a @ a).dtype == torch.bfloat16


def test_dynamo_static_input_sees_dynamos_static_mark():
    t = torch.zeros(3)
    assert not compat_torch.dynamo_static_input(t), "compat.torch.dynamo_static_input: a plain tensor reads static"
    torch._dynamo.mark_static_address(t)
    assert compat_torch.dynamo_static_input(t), \
        "compat.torch.dynamo_static_input: torch._dynamo.mark_static_address no longer leaves the attribute it reads"


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
        self.seen: list[tuple[int, int, bool, bool | None]] = []  # batch, steps taken, accumulating, logs
        self.kept_before = self.kept_after = self.stepping = None

    def on_fit_start(self, trainer, pl_module):
        self.stepping = trainer.estimated_stepping_batches  # sets the training loader up, as a run's schedule does
        self.kept_before = trainer.fit_loop._combined_loader
        compat_lightning.drop_kept_loader(trainer)
        self.kept_after = trainer.fit_loop._combined_loader

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.logs = compat_lightning.logs_this_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((batch_idx, compat_lightning.steps_taken(trainer), compat_lightning.accumulating(trainer),
                          self.logs))


def test_lightning_functions_read_a_real_fit(tmp_path):
    reader = _Reader()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, log_every_n_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[reader], default_root_dir=tmp_path)
    trainer.fit(_Tiny())
    assert reader.stepping == 2 and reader.kept_before is not None and reader.kept_after is None, \
        "compat.lightning.drop_kept_loader: the fit loop no longer keeps its loader where it sets it aside"
    assert [b for b, *_ in reader.seen] == [0, 1, 2, 3], \
        "compat.lightning.drop_kept_loader: the fit did not build its loader again after it was dropped"
    assert [s for _, s, _, _ in reader.seen] == [0, 0, 1, 1] and compat_lightning.steps_taken(trainer) == 2, \
        f"compat.lightning.steps_taken: {[s for _, s, _, _ in reader.seen]} at each batch's end, not the optimizer " \
        "steps done before the batch's own"
    assert [a for _, _, a, _ in reader.seen] == [True, False, True, False], \
        "compat.lightning.accumulating: not true for the first micro-batch of each optimizer step alone"
    assert [w for *_, w in reader.seen] == [False, False, True, True], \
        "compat.lightning.logs_this_step: not true for the micro-batches of every log_every_n_steps-th step alone"
    assert compat_lightning.logs_this_step(SimpleNamespace()) is None, \
        "compat.lightning.logs_this_step: a trainer without a logger connector should read None"


def test_set_last_lr_is_what_get_last_lr_returns():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    compat_lightning.set_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25], "compat.lightning.set_last_lr: get_last_lr() does not return it"


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


def test_attn_implementation_reads_the_config():
    model = _llama(attn_implementation="eager")
    assert compat_transformers.attn_implementation(model.config) == "eager", \
        "compat.transformers.attn_implementation: a model loaded with eager attention does not read 'eager'"
    assert compat_transformers.attn_implementation(None) is None


def test_set_attn_implementation_routes_a_loaded_models_attention():
    model = _llama(attn_implementation="sdpa")
    calls = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("finlora_test_compat", recorded)
    compat_transformers.set_attn_implementation(model.config, "finlora_test_compat")
    model(torch.tensor([[1, 2, 3]]))
    assert calls, "compat.transformers.set_attn_implementation: the model's attention did not go to the one named"


def test_checkpointing_function_is_the_layers_checkpoint():
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[0]
    checkpoint = compat_transformers.checkpointing_function(layer)
    x = torch.randn(3, requires_grad=True)
    y = checkpoint(lambda t: t * 2, x)
    assert torch.equal(y, x * 2) and y.requires_grad, \
        "compat.transformers.checkpointing_function: the layer's checkpoint function does not run what it is given"


def test_no_split_modules_names_the_decoder_layer():
    assert compat_transformers.no_split_modules(_llama()) == {"LlamaDecoderLayer"}, \
        "compat.transformers.no_split_modules: a Llama model no longer names LlamaDecoderLayer as kept whole"
    assert compat_transformers.no_split_modules(nn.Linear(1, 1)) == set()


def test_input_grads_enabled_follows_enable_and_disable_input_require_grads():
    from transformers import LlamaConfig, LlamaForCausalLM

    from finlora.compat.transformers import input_grads_enabled

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
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
