"""The LightningModule and its step component (`fast_step.StepRunner`): the module trains with the loss and
optimizer the component supplies, and tells the adapters after every optimizer step
(`adapter_steps.after_optimizer_step`), not after micro-batches; `finlora.nonfinite` is the one clipping and
non-finite policy."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import random_llama, random_static_batch
from torch.utils.data import DataLoader

from finlora import adapter_steps
from finlora.config import AdapterMethod, Compile, NonFinitePolicy, Scheduler, TrainerConfig
from finlora.errors import NonFiniteLoss
from finlora.fast_step import StepRunner
from finlora.module import FinetuneModule
from finlora.nonfinite import NonFiniteSteps, flag_step, measure_gradients


class CountingSteps(adapter_steps.AdapterSteps):
    def __init__(self) -> None:
        self.after = 0

    def after_optimizer_step(self, model):
        self.after += 1


def test_the_module_tells_the_adapters_after_every_optimizer_step_only(monkeypatch):
    counting = CountingSteps()
    monkeypatch.setitem(adapter_steps._registered, "counting", counting)
    cfg = TrainerConfig(lr=1e-2, scheduler=Scheduler.constant, max_steps=3, compile=Compile.eager)
    module = FinetuneModule(random_llama(1, AdapterMethod.lora, False), cfg)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=3, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([random_static_batch()] * 6, batch_size=None))
    assert trainer.global_step == 3 and counting.after == 3


def test_the_plain_step_runs_the_eager_loss_and_torchs_adamw():
    model = random_llama(1, AdapterMethod.lora, False)
    runner = StepRunner(model, TrainerConfig(compile=Compile.eager, capture=False, grad_clip=1.0))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]
    optimizer = runner.optimizer(groups, "32-true", lr=1e-3, weight_decay=0.0)
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]  # the CPU: unfused
    assert not runner.keeps_gradients and runner.report() == {}
    batch = random_static_batch()
    module = FinetuneModule(model, TrainerConfig(compile=Compile.eager), step=runner)
    assert module.train_loss is runner.loss
    torch.testing.assert_close(module.train_loss(batch), module(batch), rtol=0, atol=0)


def test_one_policy_clips_flags_and_decides(tmp_path):
    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.full((4,), 3.0)  # norm 6
    norm, bad = measure_gradients([weight], torch.tensor(1.0), clip=1.0)
    assert float(norm) == 6.0 and not bool(bad)
    torch.testing.assert_close(weight.grad.norm(), torch.tensor(1.0))
    optimizer = torch.optim.AdamW([weight], fused=False)
    found = torch.zeros(())
    flag_step(optimizer, torch.tensor(True), found)
    assert optimizer.found_inf is found and float(found) == 1.0
    steps = NonFiniteSteps(NonFinitePolicy.skip, tmp_path / "last.ckpt")
    steps.on_host(optimizer, 1, torch.tensor(float("nan")), norm, torch.tensor(True))
    assert steps.skipped == 1 and weight.grad is None
    steps = NonFiniteSteps(NonFinitePolicy.stop, tmp_path / "last.ckpt")
    steps.record(torch.tensor(True), 7, torch.tensor(float("inf")), torch.tensor(2.0))
    with pytest.raises(NonFiniteLoss, match=r"^step 7: loss inf; stopped before it reached the weights"):
        steps.check()
