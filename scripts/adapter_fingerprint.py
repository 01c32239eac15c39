"""Fixed-seed CPU runs through `python train.py` whose adapter files are compared byte for byte: what a refactor
that must not change results is checked with. Three runs of a tiny random Llama with SmolLM2's tokenizer (LoRA,
DoRA, DoRA on an 8-bit base), a few steps each on FinLoRA's FPB; prints each adapter file's SHA-256.

    python scripts/adapter_fingerprint.py --json before.json
    python scripts/adapter_fingerprint.py --compare before.json        # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"lora": ["adapter=lora", "quant=none"], "dora": ["adapter=dora", "quant=none"],
        "dora-8bit": ["adapter=dora", "quant=8bit"]}


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama (hidden 64), seeded, with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finlora.models import convert_embedded

    tokenizer = AutoTokenizer.from_pretrained(convert_embedded("smollm2-135m-instruct",
                                                               Path.home() / ".cache" / "finlora"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fingerprints(work: Path, data: str) -> dict[str, dict[str, str]]:
    model = tiny_model(work / "model")
    result = {}
    for name, extra in RUNS.items():
        out = work / name
        subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", f"output_dir={out}",
                        f"model.name_or_path={model}", f"paths.data_dir={data}", "trainer=cpu", "seed=7",
                        "task=fpb", "trainer.max_steps=4", "trainer.batch_size=4", "data.val_size=8",
                        "eval.enabled=false", "logger=csv", *extra], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        files = sorted(out.rglob("adapter_model.safetensors"))
        if not files:
            raise SystemExit(f"{name}: no adapter_model.safetensors under {out}")
        result[name] = {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("FINLORA_DATA", str(ROOT.parent / "shared/data/finlora")))
    parser.add_argument("--json", help="write the fingerprints here")
    parser.add_argument("--compare", help="a JSON written by --json: exit 1 where a fingerprint differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as work:
        found = fingerprints(Path(work), args.data)
    print(json.dumps(found, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [name for name in RUNS if before.get(name) != found.get(name)]
        print("identical" if not differ else f"differ: {', '.join(differ)}")
        return int(bool(differ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
