"""`trainer.capture` (issue 12): refused where it cannot run, before the model loads, and with the settings CUDA
graphs cannot replay; on a GPU, the recorded forward and backward give the eager loss and gradients step after
step, with LoRA and with finlora's DoRA (whose norms must follow every optimizer step inside the graph), its layers
compiled or not, over two
batch shapes replayed in turn from one memory pool; a step that cannot be recorded runs unrecorded after one
line saying why, with the random generator fit for eager use again; an earlier run's graphs freed by the garbage
collector do not spoil a recording. The decode step recorded by `recorded_backend` (`eval.decode_compile=recorded`)
gives the answers of Dynamo's CUDA-graph backend and of eager generation; where nothing can be recorded (the CPU)
the traced graph runs as it is. The optimizer's update recorded with it (`RecordedAdamW`) steps the weights as fused
AdamW after the guard's measurement does, and the guard reads its verdict after the step."""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA_DIR, compose_cfg, random_llama, random_static_batch, step_each

from finlora.callbacks import NonFiniteGuard
from finlora.capture import CapturedLoss, recorded_backend
from finlora.compiled import training_loss
from finlora.config import AdapterMethod, Compile, DecodeCompile, NonFinitePolicy, validate
from finlora.data import read_jsonl
from finlora.dora import forget_norms
from finlora.dora.state import state_of
from finlora.errors import ConfigError, NonFiniteLoss
from finlora.evaluate import generate
from finlora.loss import answer_loss
from finlora.train import train
from finlora.update import RecordedAdamW, measure_gradients

CPU_RUN = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "logger=csv",
           "eval.enabled=false", "data.val_size=8"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_capture_refused_on_the_cpu_before_the_model_loads(tmp_path):
    cfg = compose_cfg([*CPU_RUN, "trainer.capture=true", "data.batching=static"], tmp_path)
    cfg.model.name_or_path = "org/never-loaded"  # a hub id: loading it here would fail with another error
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^trainer.capture: runs on a CUDA GPU only, and this run is on cpu; "
                                          r"use trainer.capture=false"):
        train(cfg)
    assert time.perf_counter() - started < 30 and not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("overrides,named", [
    (["data.batching=packed"], "trainer.capture: CUDA graphs replay fixed shapes: set data.batching=static"),
    (["trainer.grad_accum=2"], "trainer.capture: CUDA graphs replay the backward .* trainer.grad_accum=1"),
    (["trainer.compile=cudagraphs"], "trainer.capture: trainer.compile=cudagraphs records CUDA graphs already"),
    (["trainer.strategy=fsdp"], "trainer.capture: FSDP gathers each layer's weights")])
def test_capture_refuses_what_graphs_cannot_replay(tmp_path, overrides, named):
    cfg = compose_cfg([*CPU_RUN, "trainer.capture=true", "data.batching=static", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


def test_forgotten_norms_are_computed_again_and_the_frozen_ones_kept():
    model = random_llama(2, AdapterMethod.dora, False)
    batch = random_static_batch()
    before = answer_loss(model, batch)
    layer = next(m for m in model.modules() if (st := state_of(m)) is not None and st.constants)
    w2 = state_of(layer).frozen
    forget_norms(model)
    assert not state_of(layer).constants and not state_of(layer).grams and state_of(layer).frozen is w2
    torch.testing.assert_close(answer_loss(model, batch), before)
    assert state_of(layer).frozen is w2 and "default" in state_of(layer).constants


def _on_gpu(method: AdapterMethod, checkpointing: bool):
    return random_llama(3, method, checkpointing).cuda()


def _to_gpu(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch.items()}


@cuda
@pytest.mark.parametrize("method,checkpointing,regions", [
    (AdapterMethod.lora, False, False), (AdapterMethod.dora, False, False), (AdapterMethod.dora, True, False),
    (AdapterMethod.dora, False, True)])
def test_recorded_step_matches_eager_step_after_step_over_two_shapes(method, checkpointing, regions):
    """With `regions`, the recorded step holds the layers compiled by inductor (`trainer.compile_regions`), which read
    DoRA's norms refreshed, batched, before them in the same graph (`dora.fresh_norms`). Every replayed backward
    leaves the gradients at the same addresses, whatever the shape, and gives them back to parameters whose `.grad`
    was let go (`zero_grad`)."""
    eager_model, captured_model = _on_gpu(method, checkpointing), _on_gpu(method, checkpointing)
    loss = (training_loss(captured_model, Compile.inductor, regions=True) if regions
            else lambda b: answer_loss(captured_model, b))
    captured = CapturedLoss(captured_model, loss)
    shapes = [_to_gpu(random_static_batch((20, 28, 16), seed=1)), _to_gpu(random_static_batch((40, 50, 30), seed=2))]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True)
                  for m in (eager_model, captured_model)]
    addresses = set()
    for step in range(6):  # the shapes in turn, each replayed after the other's: one pool, no clobbering
        batch = shapes[step % 2] if step < 4 else _to_gpu(random_static_batch((20, 28, 16), seed=step))
        computes = (lambda b=batch: answer_loss(eager_model, b), lambda b=batch: captured(b))
        losses, grads = step_each((eager_model, captured_model), computes, optimizers)
        addresses.add(tuple(p.grad.data_ptr() for p in captured_model.parameters() if p.requires_grad))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)
    assert captured.failure is None and captured.shapes == 2
    assert captured.keeps_gradients and len(addresses) == 1


@cuda
def test_a_step_that_waits_for_the_host_runs_unrecorded_after_one_line(caplog):
    model = _on_gpu(AdapterMethod.lora, False)
    batch = _to_gpu(random_static_batch())

    def syncing(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = answer_loss(model, b)
        return loss * float(loss.detach().abs().max() > 0)  # .item(): not allowed while a graph records

    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)

    captured = CapturedLoss(model, syncing)
    with caplog.at_level("WARNING", logger="finlora.capture"):
        loss = captured(batch)
    said = [r.getMessage() for r in caplog.records]
    assert captured.failure and captured.shapes == 0
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("trainer.capture: the step could not be recorded")
    torch.testing.assert_close(loss, answer_loss(model, batch))
    torch.testing.assert_close(captured(batch), loss)  # later steps: unrecorded, no new attempt
    torch.manual_seed(0)  # the random generator is back to eager use: dropout runs, and draws as before
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5), dropped)


@cuda
def test_an_earlier_runs_graphs_freed_by_the_collector_do_not_spoil_a_recording():
    """A sweep's jobs can run in one process: the graphs of a finished run, held in a reference cycle, are freed
    whenever the collector runs, which may be while the next run records (here made certain: a collection at
    nearly every allocation). CUDA forbids freeing a graph while another records."""
    batch = _to_gpu(random_static_batch())
    model = _on_gpu(AdapterMethod.lora, False)
    earlier = CapturedLoss(model, lambda b: answer_loss(model, b))
    earlier(batch).backward()
    earlier.cycle = earlier
    del earlier
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        later_model = _on_gpu(AdapterMethod.lora, False)
        later = CapturedLoss(later_model, lambda b: answer_loss(later_model, b))
        loss = later(batch)
    finally:
        gc.set_threshold(*thresholds)
    assert later.failure is None and later.shapes == 1
    torch.testing.assert_close(loss, answer_loss(later_model, batch))


def test_recorded_backend_runs_the_traced_graph_where_nothing_can_be_recorded():
    def fn(x, w):
        return (x @ w).relu() + 1

    compiled = torch.compile(fn, backend=recorded_backend)
    for seed in range(4):  # past the warm-up calls, where a CUDA input would be recorded
        x, w = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)), torch.randn(8, 3)
        torch.testing.assert_close(compiled(x, w), fn(x, w))


@cuda
def test_recorded_decode_step_gives_the_answers_of_the_cudagraphs_backend_and_of_eager(lively):
    tokenizer, model = lively
    model = model.cuda()
    records = [r for name in ("fpb", "fiqa") for r in read_jsonl(DATA_DIR / "test" / f"{name}_test.jsonl")[:40:4]]
    eager = generate(model, tokenizer, records, 6, 8, static_cache=False)
    by_dynamo = generate(model, tokenizer, records, 6, 8, decode_compile=DecodeCompile.cudagraphs)
    recorded = generate(model, tokenizer, records, 6, 8, decode_compile=DecodeCompile.recorded)
    assert recorded == by_dynamo == eager
    assert len(set(recorded)) > 3  # answers that differ between prompts: the check can tell them apart


def test_the_recorded_decode_step_reads_one_cache_for_every_batch_of_a_task(lively, monkeypatch):
    """Its cause found on the CPU (traced there by Dynamo as on a GPU): transformers made a new static KV cache at
    every `generate` call, so the inputs the recording reads in place moved at each batch and the step was recorded
    again for each. With one cache for the task (`evaluate.TaskCache`) they stay where they are."""
    import dataclasses

    import finlora.capture
    import finlora.evaluate

    tokenizer, model = lively
    anywhere = dataclasses.replace(finlora.evaluate.DECODE_COMPILE[DecodeCompile.recorded])
    anywhere._compile_all_devices = True  # transformers compiles the decode step on CUDA only, unless told so
    monkeypatch.setitem(finlora.evaluate.DECODE_COMPILE, DecodeCompile.recorded, anywhere)
    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    kept: dict[int, set[tuple]] = {}
    traced = finlora.capture._Recorded.__call__

    def spy(self, *args):
        kept.setdefault(id(self), set()).add(tuple(a.data_ptr() for a in args if isinstance(a, torch.nn.Parameter)
                                                   or hasattr(a, "_dynamo_static_input_type")))
        return traced(self, *args)

    monkeypatch.setattr(finlora.capture._Recorded, "__call__", spy)
    records = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:20]
    answers = generate(model, tokenizer, records, 4, 8, decode_compile=DecodeCompile.recorded)  # 3 batches
    assert kept and all(len(addresses) == 1 for addresses in kept.values())
    assert answers == generate(model, tokenizer, records, 4, 8, static_cache=False)


def _updates(recorded: bool, device: str, steps: int = 7) -> tuple[list[list[torch.Tensor]], torch.optim.Optimizer]:
    """The weights after each of `steps` AdamW steps under a warm-up schedule, clipped to a norm of 1, with gradients
    left in two sets of buffers in turn (as the recorded backwards of two batch shapes leave them), the fourth
    step's loss not finite: by `RecordedAdamW`, or by fused AdamW with the guard's measurement before each step."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in ((5, 3), (7,), (2, 4))]
    buffers = [[torch.zeros_like(w) for w in weights] for _ in range(2)]
    optimizer = (RecordedAdamW(weights, clip=1.0, lr=0.1, weight_decay=0.01) if recorded
                 else torch.optim.AdamW(weights, lr=0.1, weight_decay=0.01, fused=True))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 4)
    out = []
    for step in range(steps):
        for w, b in zip(weights, buffers[step % 2], strict=True):
            b.copy_(torch.randn(w.shape, generator=gen) * 3)
            w.grad = b
        loss = torch.tensor(float("nan") if step == 3 else 1.0, device=device)
        if not recorded:
            optimizer.found_inf = measure_gradients(weights, loss, 1.0)[1].float()
        optimizer.step(lambda loss=loss: loss)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        out.append([w.detach().clone() for w in weights])
    return out, optimizer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_recorded_update_measures_clips_and_steps_as_the_guard_and_fused_adamw_do(device):
    """On a GPU from one graph per set of gradient buffers (the first step, which makes the moments, as it is); on the
    CPU as it is. The same weights step after step, the not-finite step skipped, the schedule's rates followed."""
    expected, _ = _updates(False, device)
    got, optimizer = _updates(True, device)
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        for w, h in zip(want, have, strict=True):
            assert torch.equal(h, w), f"step {step}"
    assert all(torch.equal(a, b) for a, b in zip(got[3], got[2], strict=True))  # the NaN step left the weights alone
    assert len(optimizer.graphs) == (2 if device == "cuda" else 0) and optimizer.failure is None
    assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)  # as schedules expect


def test_the_guard_reads_the_recorded_updates_verdict_after_the_step(tmp_path):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = RecordedAdamW([weight], clip=1.0, lr=0.1)
    guard = NonFiniteGuard(NonFinitePolicy.stop, tmp_path / "last.ckpt", every_n_steps=50, clip=1.0)
    logged = {}
    module = SimpleNamespace(device=weight.device, log=lambda name, value, **k: logged.update({name: value}))
    for step, value in enumerate([1.0, float("nan")], 1):
        trainer = SimpleNamespace(global_step=step - 1, optimizers=[optimizer], log_every_n_steps=50, max_steps=10)
        weight.grad = torch.full((4,), 2.0)
        guard.on_before_optimizer_step(trainer, module, optimizer)
        assert torch.equal(weight.grad, torch.full((4,), 2.0))  # the guard left measuring and clipping to the update
        optimizer.step(lambda value=value: torch.tensor(value))
        trainer.global_step = step
        guard.on_train_batch_end(trainer, module, None, None, 0)
        assert float(logged["train/grad_norm"]) == pytest.approx(4.0)
    with pytest.raises(NonFiniteLoss, match=r"^step 2: loss nan; stopped before it reached the weights"):
        guard.check()
