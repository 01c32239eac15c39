"""`export.py`: a saved adapter merged into its base as a transformers folder and as GGUF files (f16, Q8_0), read
back by transformers (the folder alone; the GGUF through its own GGUF loader) and by gguf-py's reader, answering
as the base with the adapter does through peft; the Hub card; and every refusal, before the base loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import DATA_DIR, ROOT, compose_cfg, lively_weights
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

from finlora.adapters import BASE_FILE, attach_adapter
from finlora.card import set_base_name
from finlora.config import AdapterConfig, AdapterMethod, Config, ModelConfig, validate
from finlora.data import read_jsonl
from finlora.errors import ConfigError
from finlora.evaluate import generate
from finlora.export import export, llama3_rope_factors, permute_rotary
from finlora.models import base_identity, load_tokenizer
from finlora.outputs import write_json

ROWS = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:6]


def save_adapter(base_dir: Path, run_dir: Path, method: AdapterMethod, summary: dict) -> Path:
    """An adapter folder as `train()` leaves it (peft files, tokenizer, base identity, portable base name) in a run
    folder with the run's config.yaml (trained on an 8-bit base) and metrics.json; B is random, so it matters."""
    cfg = ModelConfig(name_or_path=str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = attach_adapter(base, AdapterConfig(method=method, r=4, dropout=0.0), gradient_checkpointing=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = run_dir / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(str(base_dir), cfg).save_pretrained(adapter)
    identity = base_identity(str(base_dir), cfg)
    write_json(adapter / BASE_FILE, identity)
    set_base_name(adapter, identity["hub_id"])
    (adapter / "README.md").write_text("# card\n\n## Data\n\nFPB rows.\n\n## Load and merge\n\npeft\n")
    run_cfg = compose_cfg([f"model.name_or_path={base_dir}", "quant=8bit", "task=fpb", f"adapter={method.value}",
                           "run_name=tiny-run"], run_dir)
    OmegaConf.save(OmegaConf.structured(validate(run_cfg, Config)), run_dir / "config.yaml")
    write_json(run_dir / "metrics.json", summary)
    return adapter


@pytest.fixture(scope="module")
def lively_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama (SmolLM2's tokenizer) with weights large enough for prompts to get different answers."""
    path = tmp_path_factory.mktemp("lively-base")
    lively_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dora(lively_dir, tmp_path_factory) -> Path:
    return save_adapter(lively_dir, tmp_path_factory.mktemp("run"), AdapterMethod.dora,
                        {"test/fpb/accuracy": 0.625, "test/fpb/f1": 0.5, "test/fpb/n": 6.0, "final_train_loss": 1.0})


@pytest.fixture(scope="module")
def expected(lively_dir, dora) -> tuple[list[str], torch.Tensor]:
    """Greedy answers and next-token logits of the fp32 base with the adapter through plain peft."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively_dir, dtype=torch.float32), dora)
    answers, logits = answers_and_logits(model.eval(), AutoTokenizer.from_pretrained(dora))
    assert len(set(answers)) > 1  # the rows get different answers: equal answers below mean something
    return answers, logits


def answers_and_logits(model, tokenizer) -> tuple[list[str], torch.Tensor]:
    """Generated as evaluation generates (the task's prompts, greedy), and each prompt's next-token logits."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = generate(model, tokenizer, ROWS, max_new_tokens=6, batch_size=6, share_prefix=False)
    with torch.no_grad():
        logits = torch.stack([model(**tokenizer(r["context"], return_tensors="pt")).logits[0, -1] for r in ROWS])
    return answers, logits


def run_export(adapter: Path, out: Path, *overrides: str) -> dict:
    return export(compose_cfg([f"adapter_path={adapter}", f"out_dir={out}", *overrides], out.parent / "hydra",
                              config="export"))


def test_merged_folder_loads_alone_and_answers_as_base_plus_adapter(dora, expected, tmp_path):
    """format=merged (f16): transformers loads the folder alone (config, safetensors, tokenizer, generation
    config), answers each row as the fp32 base with the adapter through peft does; the card carries the adapter's
    test metrics as model-index results and says the adapter was trained on an 8-bit base."""
    expected_answers, expected_logits = expected
    out = tmp_path / "merged"
    summary = run_export(dora, out, "dtype=f16")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= set(
        p.name for p in out.iterdir())
    assert summary["trained_on_bits"] == 8 and not list(tmp_path.glob(".merged-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and model.config.use_cache and type(model).__name__ == "LlamaForCausalLM"
    answers, logits = answers_and_logits(model.float(), AutoTokenizer.from_pretrained(out))
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=0.05)

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a local base folder: no Hub id to name
    assert {"finlora", "fpb", "dora", "merged"} <= set(card.data.tags) and card.data.library_name == "transformers"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("finlora/fpb", "accuracy"): 0.625, ("finlora/fpb", "f1"): 0.5}
    assert "8-bit base" in card.text and "## Data" in card.text and "## Load and merge" not in card.text


@pytest.mark.slow  # about 45 s each: transformers and gguf-py parse the 49,152-token vocabulary several times
@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_gguf_read_back_by_transformers_and_gguf_reader(dora, expected, tmp_path, kind):
    """format=gguf: gguf-py's reader (what llama.cpp-compatible tools read with) finds llama's keys, the SmolLM2
    tokenizer's, matrices in the asked type and vectors in F32; transformers' GGUF loader rebuilds the model and a
    tokenizer that encodes as the original. F16 answers each row as the base with the adapter through peft does;
    BF16's and Q8_0's logits stay close and give the same first token on every row."""
    expected_answers, expected_logits = expected
    out = tmp_path / kind
    summary = run_export(dora, out, "format=gguf", f"gguf_type={kind}")
    [name] = summary["files"]
    assert name == f"tiny-run-{kind.upper()}.gguf" and (out / "README.md").is_file()
    reader = gguf.GGUFReader(out / name)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.add_bos_token"] is False
    assert "im_start" in fields["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied to the embeddings
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == kind.upper()
    assert len(types) == 1 + 1 + 2 * 9

    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    original = AutoTokenizer.from_pretrained(dora)
    assert [tokenizer(r["context"]).input_ids for r in ROWS] == [original(r["context"]).input_ids for r in ROWS]
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    answers, logits = answers_and_logits(model, tokenizer)
    if kind == "f16":
        assert answers == expected_answers
        assert torch.allclose(logits, expected_logits, atol=0.05)
    else:
        assert (logits - expected_logits).abs().max() < 0.1 * expected_logits.abs().max()
        assert (logits.argmax(-1) == expected_logits.argmax(-1)).all()


def test_rotary_rows_and_llama3_rope_factors_are_what_transformers_reads_back():
    """The q/k permutation is the inverse of the one transformers' GGUF loader applies (heads and grouped key/value
    heads alike), and the `rope_freqs` factors of a Llama-3.1 rope are the ratios of transformers' own inverse
    frequencies without and with that scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    loader = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for name, rows, heads in (("blk.0.attn_q.weight", 576, 9), ("blk.0.attn_k.weight", 192, 3)):
        weights = torch.randn(rows, 576)
        written = permute_rotary(weights, heads)
        assert not torch.equal(written, weights)
        assert torch.equal(torch.from_numpy(loader.process(written.numpy(), name).weights), weights)

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    llama31 = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                          rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama31, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = llama3_rope_factors(llama31)
    assert factors.min() == 1 and factors.max() == 8
    assert torch.allclose(factors, plain / scaled, rtol=1e-5)


def test_refusals_name_the_file_or_key_before_the_base_loads(dora, tmp_path):
    """A missing folder, a plain peft adapter without finlora's record, an existing output, a push while offline
    and a non-Llama base for GGUF are refused with the key or file named; nothing is written."""
    def refused(adapter: Path, *overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            run_export(adapter, tmp_path / "out", *overrides)
        assert not (tmp_path / "out").exists()
        return str(err.value)

    assert "adapter_config.json does not exist" in refused(tmp_path / "nowhere")
    foreign = tmp_path / "plain-peft"
    foreign.mkdir()
    for f in dora.iterdir():
        if f.name != BASE_FILE:
            (foreign / f.name).write_bytes(f.read_bytes())
    assert f"{foreign / BASE_FILE} does not exist" in refused(foreign)
    assert "push_to_hub: HF_HUB_OFFLINE is set" in refused(dora, "push_to_hub=me/tiny")
    assert "push_to_hub:" in refused(dora, "push_to_hub=not a repo")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    with pytest.raises(ConfigError, match="out_dir: .* exists; set overwrite=true"):
        run_export(dora, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "kept"
    (tmp_path / "out" / "mine.txt").unlink()
    (tmp_path / "out").rmdir()

    mistral = tmp_path / "mistral"  # config and tokenizer only: refused before any weight is read
    MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, architectures=["MistralForCausalLM"]).save_pretrained(mistral)
    record = json.loads((dora / BASE_FILE).read_text())
    other = tmp_path / "mistral-run" / "adapter"
    other.mkdir(parents=True)
    for f in dora.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    write_json(other / BASE_FILE, record | {"name_or_path": str(mistral)})
    assert "format=gguf: the base is a MistralForCausalLM; finlora writes GGUF for LlamaForCausalLM" in refused(
        other, "format=gguf")


def test_export_py_refuses_in_one_line_with_status_2_and_leaves_nothing(dora, tmp_path):
    """The command: an unknown format and an existing output exit 2 with one line, no traceback, no folder."""
    out = tmp_path / "exists"
    out.mkdir()
    for args, named in ((["format=onnx"], "format"), ([f"out_dir={out}"], f"out_dir: {out} exists")):
        proc = subprocess.run([sys.executable, str(ROOT / "export.py"), f"adapter_path={dora}",
                               f"hydra.run.dir={tmp_path / 'run'}", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and named in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()
