"""`trainer.compile` (issue 12): refused where it cannot run, before the model loads; finlora's DoRA gives
the eager loss and gradients when traced by torch.compile, step after step (its norms refreshed before a compiled
training step, or rebuilt inside the graph, never read from a cache the graph would not re-read); the step
compiled by regions (the decoder layers compiled, one compilation reused by every layer,
`trainer.compile_regions`) gives the eager loss and gradients with LoRA and DoRA, checkpointed or not; the fused
optimizer's skip of a non-finite step never waits for the GPU and leaves the weights as they were; for torch.compile's
CUDA graphs, DoRA's refreshed constants stay at their addresses."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA_DIR, compose_cfg, random_b, random_llama, random_static_batch, step_each

from finlora.adapters import attach_adapter
from finlora.batching import pack_static, static_widths, with_stats
from finlora.callbacks import NonFiniteGuard, ThroughputLogger
from finlora.compat.torch import dynamo_counters
from finlora.compiled import decoder_layers, training_loss
from finlora.config import AdapterConfig, AdapterMethod, Compile, ModelConfig, NonFinitePolicy, QuantConfig, validate
from finlora.data import read_jsonl
from finlora.dora import fresh_norms, prepare_compile
from finlora.dora.state import state_of
from finlora.errors import ConfigError, NonFiniteLoss
from finlora.loss import answer_loss
from finlora.models import load_model, load_tokenizer
from finlora.prompts import encode_example
from finlora.train import train

pytestmark = pytest.mark.gpu  # compiled code: the GPU gate runs these under the GPU image's torch and transformers

CPU_RUN = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "logger=csv",
           "eval.enabled=false", "data.val_size=8"]


def test_compile_refused_on_the_cpu_before_the_model_loads(tmp_path):
    cfg = compose_cfg(["model.name_or_path=/nonexistent-never-loaded", *CPU_RUN, "trainer.compile=inductor"],
                      tmp_path)
    cfg.model.name_or_path = "org/never-loaded"  # a hub id: loading it here would fail with another error
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^trainer.compile: runs on a CUDA GPU only, and this run is on cpu"):
        train(cfg)
    assert time.perf_counter() - started < 30 and not (tmp_path / "config.yaml").exists()


def test_eight_bit_base_trains_eager_with_one_line_saying_why(tiny_model_dir, tmp_path, caplog):
    """bitsandbytes 8-bit syncs inside its matmuls, so compiling it is slower than eager: the run goes eager (even
    on the CPU, where a compiled run would be refused) and says so in one line; the summary says what ran."""
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", *CPU_RUN, "quant=8bit",
                       "trainer.compile=cudagraphs", "data.batching=static"], tmp_path)
    with caplog.at_level("WARNING", logger="finlora.plan"):
        summary = train(cfg)
    said = [r.getMessage() for r in caplog.records if r.name == "finlora.plan"]
    assert any(m.startswith("trainer.compile=cudagraphs: bitsandbytes' LLM.int8") and m.endswith("running eager")
               and "\n" not in m for m in said)
    assert summary["compile"] == "eager" and summary["step_path"] == "eager" and summary["steps"] == 2


@pytest.mark.parametrize("override,named", [("data.batching=packed", "data.batching=static"),
                                            ("trainer.grad_accum=2", "trainer.grad_accum=1")])
def test_cudagraphs_needs_static_batches_and_no_accumulation(tmp_path, override, named):
    cfg = compose_cfg([*CPU_RUN, "trainer.compile=cudagraphs", "data.batching=static", override], tmp_path)
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


def _dora(model_dir: Path, bits: int | None):
    base = load_model(str(model_dir), ModelConfig(name_or_path=str(model_dir)), QuantConfig(bits=bits),
                      torch.float32, torch.device("cpu"))
    model = attach_adapter(base, AdapterConfig(method=AdapterMethod.dora, r=4, dropout=0.0,
                                               target_modules=["q_proj", "v_proj", "down_proj"]), False)
    return random_b(model)


@pytest.mark.parametrize("bits,in_step", [(None, False), pytest.param(8, False, marks=pytest.mark.slow), (None, True),
                                          (4, True), (4, False)])
def test_compiled_dora_matches_eager_step_after_step(tiny_model_dir, bits, in_step):
    """Compiled as a training step (`in_step`), the layers read the norms `fresh_norms` refreshes before it (4-bit
    layers, as in eager training, compute theirs in their forward from their base's dequantized weight and the A·Aᵀ
    refreshed there); compiled otherwise (a decode step), they rebuild them inside the graph. Either way the norms
    follow each update."""
    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    rows = read_jsonl(DATA_DIR / "train" / "fpb_train.jsonl")[:8]
    encoded = [encode_example(tokenizer, r, 96) for r in rows]
    batch = with_stats(lambda b: pack_static(b, tokenizer.pad_token_id, static_widths(8, 96)), encoded,
                       label_slots=64)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    eager_model, traced_model = _dora(tiny_model_dir, bits), _dora(tiny_model_dir, bits)
    trained = {name for name, p in eager_model.named_parameters() if p.requires_grad}  # the bases load alike
    traced_model.load_state_dict({k: v for k, v in eager_model.state_dict().items() if k in trained}, strict=False)
    dynamo_counters().clear()
    prepare_compile(traced_model)
    # aot_eager: what torch.compile traces and differentiates, without generating kernels (minutes on a CPU)
    traced = (training_loss(traced_model, Compile.inductor, backend="aot_eager") if in_step
              else torch.compile(lambda b: answer_loss(traced_model, b), backend="aot_eager", dynamic=False))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (eager_model, traced_model)]
    for _ in range(3):  # each step changes A, B and m: the traced norms must follow
        losses, grads = step_each((eager_model, traced_model),
                                   (lambda: answer_loss(eager_model, batch), lambda: traced(batch)), optimizers)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        assert grads[0].keys() == grads[1].keys() and any("magnitude" in n for n in grads[0])
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)
    assert not sum(dynamo_counters()["graph_break"].values())  # the layers ran compiled, not eagerly after a break
    if bits == 4:  # in training, 4-bit layers compute their norm in their forward (`DoraLinear4bit`): only A·Aᵀ kept
        kept = [{("default" in st.grams, "default" in st.constants) for m in model.modules()
                 if type(m).__name__ == "DoraLinear4bit" and (st := state_of(m)) is not None
                 and (st.grams or st.constants or st.frozen is not None)}
                for model in (eager_model, traced_model)]
        assert kept[0] == {(True, False)} and kept[1] == ({(True, False)} if in_step else {(False, False)})


def test_dora_constants_for_torch_compiles_cuda_graphs_keep_their_addresses_and_follow_each_update():
    """torch.compile takes the tensors modules hold for static inputs, and its CUDA graphs (`trainer.compile=
    cudagraphs`) are recorded again whenever one moves. So its steps refresh DoRA's constants in place: each layer's
    norm, scale and branch weights stay where they were, with the values of the weights after each update."""
    model = random_llama(2, AdapterMethod.dora, False)
    layers = [m for m in model.modules() if (st := state_of(m)) is not None and st.group is not None]
    refreshed = fresh_norms(model, in_place=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, previous = random_static_batch(), None
    for _ in range(3):
        with refreshed():
            entries = [state_of(layer).constants["default"] for layer in layers]
        addresses = [t.data_ptr() for e in entries for t in (e.norm, e.scale, e.sb, *e.derived[torch.float32])]
        assert previous is None or addresses == previous
        previous = addresses
        for layer, entry in zip(layers, entries, strict=True):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            want = torch.linalg.norm(layer.base_layer.weight + layer.scaling["default"] * b @ a, dim=1)
            torch.testing.assert_close(entry.norm, want.detach())
            torch.testing.assert_close(entry.scale, (layer.lora_magnitude_vector["default"].weight / want).detach())
        optimizer.zero_grad()
        answer_loss(model, batch).backward()  # eager: reads the same constants (their keys hold until the update)
        optimizer.step()


@pytest.mark.parametrize("method,checkpointing", [  # the fast suite: plain LoRA, DoRA checkpointed
    (AdapterMethod.lora, False), pytest.param(AdapterMethod.lora, True, marks=pytest.mark.slow),
    pytest.param(AdapterMethod.dora, False, marks=pytest.mark.slow), (AdapterMethod.dora, True)])
def test_step_compiled_by_regions_matches_eager_and_compiles_one_layer_for_all(method, checkpointing):
    """Four layers, two steps: the first layer (whose input needs no gradient) compiles, the second compiles
    again for an input that does, and every later layer and step reuses that; were the compilation keyed on
    the layer, there would be one per layer. No graph breaks; outside the step the layers are plain again."""
    layers = 4
    eager_model, compiled_model = (random_llama(layers, method, checkpointing) for _ in range(2))
    graphs = []

    def backend(gm, example_inputs):  # what Dynamo hands the compiler, then aot_eager: Dynamo + AOTAutograd, no kernels
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    assert len(decoder_layers(compiled_model)) == layers
    step = training_loss(compiled_model, Compile.inductor, regions=True, backend=backend)
    batch = random_static_batch()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (eager_model, compiled_model)]
    for _ in range(2):  # the second step after an update: DoRA's norms follow the new weights
        losses, grads = step_each((eager_model, compiled_model),
                                   (lambda: answer_loss(eager_model, batch), lambda: step(batch)), optimizers)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) == layers * 3 * (3 if method.value == "dora" else 2)
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    adapted = [n for gm in graphs for n in gm.graph.nodes if n.op == "placeholder" and "lora_a" in n.name]
    assert len(graphs) == 2 and not sum(dynamo_counters()["graph_break"].values())
    assert len(adapted) == 2 * 3  # each graph is one layer: q, k and v's A
    checkpoints = [n for gm in graphs for n in gm.graph.nodes if "checkpoint" in str(n.target)]
    assert len(checkpoints) == (2 if checkpointing else 0), checkpoints  # recomputed in the compiled backward
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(compiled_model))  # plain layers outside


class _Scope:
    active: object = None


def test_step_compiled_by_regions_checkpoints_a_layer_whose_forward_sets_python_state_and_back(monkeypatch):
    """A checkpointed layer whose forward sets Python state outside itself and sets it back, as transformers 5.25's
    hub kernels do around the attention's forward (`kernels.use_kernelized_func`: a ContextVar set and reset), still
    compiles as one region with its checkpoint in the graph. Had Dynamo given the checkpoint up (a graph break), it
    would run eagerly around compiled code and recompute other tensors in the backward (CheckpointError)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    scope, plain = _Scope(), LlamaAttention.forward

    def forward(self, *args, **kwargs):
        previous, scope.active = scope.active, self
        try:
            return plain(self, *args, **kwargs)
        finally:
            scope.active = previous

    monkeypatch.setattr(LlamaAttention, "forward", forward)
    torch._dynamo.reset()  # the layers compile afresh, with the patched attention
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    eager_model, compiled_model = (random_llama(2, AdapterMethod.dora, True) for _ in range(2))
    step = training_loss(compiled_model, Compile.inductor, regions=True, backend=backend)
    batch = random_static_batch()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (eager_model, compiled_model)]
    for _ in range(2):
        losses, grads = step_each((eager_model, compiled_model),
                                   (lambda: answer_loss(eager_model, batch), lambda: step(batch)), optimizers)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert not sum(dynamo_counters()["graph_break"].values()) and scope.active is None
    assert sum("checkpoint" in str(n.target) for gm in graphs for n in gm.graph.nodes) == len(graphs) == 2


@pytest.mark.parametrize("policy", list(NonFinitePolicy))
def test_fused_optimizer_skips_a_nonfinite_step_and_the_guard_reports_it_later(tmp_path, policy, caplog):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)  # fused AdamW runs on the CPU too
    guard = NonFiniteGuard(policy, tmp_path / "last.ckpt", every_n_steps=50)
    module = SimpleNamespace(device=weight.device, log=lambda *a, **k: None)
    for step, value in enumerate([1.0, float("nan"), 1.0]):
        trainer = SimpleNamespace(global_step=step)
        guard.on_before_backward(trainer, module, torch.tensor(value))
        weight.grad = torch.full((4,), value)
        before = weight.detach().clone()
        guard.on_before_optimizer_step(trainer, module, optimizer)
        optimizer.step()
        assert torch.equal(weight, before) == (value != value)  # the NaN step left the weights alone
    assert int(optimizer.state[weight]["step"]) == 2  # and did not count as a step
    with caplog.at_level(logging.WARNING):
        if policy is NonFinitePolicy.stop:
            with pytest.raises(NonFiniteLoss, match=r"^step 2: loss nan; stopped before it reached the weights"):
                guard.check()
        else:
            guard.check()
            assert "1 optimizer steps skipped so far (the first at step 2: loss nan)" in caplog.text


def test_guard_clips_by_the_norm_it_logs_as_clip_grad_norm_would():
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    grads = [torch.tensor([3.0, 0.0, 4.0]), torch.tensor([[0.0, 12.0], [0.0, 0.0]])]  # total norm 13
    expected = [g.clone().requires_grad_() for g in grads]
    for e, g in zip(expected, grads, strict=True):
        e.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(expected, 1.0)
    logged = {}
    for clip, want in ((1.0, [e.grad for e in expected]), (0.0, grads)):
        for w, g in zip(weights, grads, strict=True):
            w.grad = g.clone()
        guard = NonFiniteGuard(NonFinitePolicy.stop, Path("last.ckpt"), every_n_steps=50, clip=clip)
        module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **k: logged.update({name: value}))
        guard.on_before_optimizer_step(SimpleNamespace(global_step=0), module, torch.optim.AdamW(weights))
        assert float(logged["train/grad_norm"]) == pytest.approx(13.0)
        for w, g in zip(weights, want, strict=True):
            torch.testing.assert_close(w.grad, g)


def test_logging_only_where_lightning_writes_keeps_the_logs_and_the_summary(tiny_model_dir, tmp_path):
    """Values logged at batches whose logs Lightning does not write are never seen, so finlora logs only at
    those it writes, and at the last (written too: `loggers.LastStepLogs`), whose values the summary reads: the
    same rows and the same final loss."""
    runs = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", *CPU_RUN, "trainer.max_steps=3",
                           f"trainer.log_every_n_steps={every}"], out)
        runs[every] = train(cfg), list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    (every_step, rows1), (every_other, rows2) = runs[1], runs[2]
    assert every_other["final_train_loss"] == every_step["final_train_loss"] is not None
    logged = [r for r in rows2 if r.get("train/loss")]
    assert [r["step"] for r in logged] == ["1", "2"]  # the second optimizer step (counted from 0), and the last
    for row in logged:
        same = next(r for r in rows1 if r.get("train/loss") and r["step"] == row["step"])
        assert all(row[k] == same[k] for k in ("train/loss", "train/grad_norm", "train/padding_fraction"))
    assert float(logged[-1]["train/loss"]) == pytest.approx(every_other["final_train_loss"])


def test_first_batches_of_each_shape_are_reported_as_compile_time():
    logger = ThroughputLogger(warm_up=2)
    module = SimpleNamespace(log=lambda *a, **k: None)
    from finlora.batching import BatchStats
    for width in (64, 64, 64, 128, 128, 128, 64):
        batch = {"input_ids": torch.zeros(1, width), "stats": BatchStats(2, width - 8, width)}
        logger.on_train_batch_end(None, module, None, batch, 0)
    summary = logger.summary()
    assert summary["batch_shapes"] == 2 and summary["compile_s"] is not None
    assert logger.timed_tokens == 56 + 120 + 56  # the 3rd batch of each shape onwards


@pytest.mark.parametrize("regions", [pytest.param(False, marks=pytest.mark.slow), True])
def test_compiled_4bit_dora_keeps_no_dequantized_weight_for_its_backward(tiny_model_dir, regions):
    """Compiled, Inductor's partitioner merges identical operators of forward and backward. Had a 4-bit DoRA layer's
    backward dequantized W0 with the operators its forward uses, the forward's dequantized W0 would be kept for the
    backward, 48 MB a Llama-3.1-8B q/k/v layer, where bitsandbytes' matmul keeps none. With that partitioner, the
    compiled step saves no tensor of a base weight's shape (and gives the eager loss)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved: list[tuple[str, ...]] = []  # (sizes may be symbolic)

    def forward_compiler(gm: torch.fx.GraphModule, _: list) -> object:
        outputs = gm.graph.find_nodes(op="output")[0].args[0]
        saved.extend(tuple(map(str, n.meta["val"].shape)) for n in outputs if isinstance(n, torch.fx.Node)
                     and isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()  # the layer's forward compiles afresh: earlier tests' compilations count to Dynamo's limit
    model = _dora(tiny_model_dir, 4)
    batch = random_static_batch((40, 50, 30))  # one row of 128 tokens: no activation of a weight's shape
    eager = answer_loss(model, batch)
    loss = training_loss(model, Compile.inductor, regions=regions, backend=backend)(batch)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
    weights = {tuple(map(str, m.get_base_layer().weight.quant_state.shape)) for m in model.modules()
               if type(m).__name__ == "DoraLinear4bit"}
    assert len(weights) == 3 and saved and not weights & set(saved), sorted(set(saved))
