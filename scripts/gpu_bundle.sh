#!/usr/bin/env bash
# The bundle that scripts/gpu_gate.py needs on a bare GPU image (torch, lightning, transformers, peft, triton; no
# network), written into .gpu/ (git-ignored; bring it with the run's `carry`):
#   .gpu/wheels/  what finlora, train.py, eval.py and the GPU tests import that such an image lacks: hydra-core,
#                 omegaconf, antlr4-python3-runtime (built: PyPI has only its sdist), bitsandbytes (the version in
#                 .venv, its manylinux x86_64 wheel), rich and its dependencies, pytest and its own. Not wandb,
#                 gguf, tensorboard, matplotlib, ray or optuna: finlora imports them only for logger=wandb or
#                 tensorboard, the embedded GGUF, reports and sweeps. All are py3-none wheels: any Python 3.10+.
#   .gpu/model/   the embedded SmolLM2-135M-Instruct's config and tokenizer, without weights (270 MB in bf16 would not
#                 travel): gpu_gate.py saves a random-init model of this config on the device, once.
#   .gpu/data/    FinLoRA's FPB and FiQA train and test files (the gate trains on FPB; the GPU tests read both).
#   .gpu/commit.txt  the commit (and "dirty") the bundle was made at, for a copy without .git; .gpu/tree.txt its
#                 files by blob hash (`git ls-files -s`), which gpu_gate.py checks the copy against.
#   .gpu/before/  with BEFORE=REV: that commit's src, scripts, conf and train.py, for bench_before_after.py.
# On the device:  pip install --no-deps .gpu/wheels/*.whl && python scripts/gpu_gate.py --model .gpu/model --data-dir .gpu/data
#
#   bash scripts/gpu_bundle.sh          # build; split into .gpu/part1 and .gpu/part2 if the whole is over LIMIT_MIB
#   bash scripts/gpu_bundle.sh split    # build, then split whatever the size
#   bash scripts/gpu_bundle.sh join     # on the device, after both parts came: rebuild .gpu/{wheels,model,data}
# Split: each part under PART_MIB, bitsandbytes' wheel (41 MiB, over a part by itself) cut in two byte ranges that
# `join` puts back together. PY: the Python whose packages give the versions (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu
LIMIT_MIB=${LIMIT_MIB:-56}   # the bundle, beside the repository, in one run's 64 MiB of transfer
PART_MIB=${PART_MIB:-38}
mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }

join_parts() {
  [ -d "$OUT/part1" ] && [ -d "$OUT/part2" ] || { echo "gpu_bundle: join needs $OUT/part1 and $OUT/part2" >&2; exit 1; }
  rm -rf "$OUT/wheels" "$OUT/model" "$OUT/data"
  cp -r "$OUT/part1/wheels" "$OUT/part1/model" "$OUT/part1/data" "$OUT/"
  cp "$OUT/part1/commit.txt" "$OUT/part1/tree.txt" "$OUT/"
  for first in "$OUT"/part1/pieces/*.part-1; do
    name=$(basename "$first" .part-1)
    cat "$first" "$OUT/part2/pieces/$name.part-2" > "$OUT/wheels/$name"
    [ "$(sha256sum < "$OUT/wheels/$name" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$OUT/part1/pieces/$name.sha256")" ] \
      || { echo "gpu_bundle: $name does not match its checksum after joining" >&2; exit 1; }
  done
  echo "gpu_bundle: joined into $OUT/wheels ($(ls "$OUT/wheels" | wc -l) wheels), $OUT/model, $OUT/data"
}

if [ "${1:-}" = join ]; then join_parts; exit 0; fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_bundle: no $PY; run make setup, or set PY=/path/to/python" >&2; exit 1; }
pip() { "$PY" -m pip "$@" --disable-pip-version-check -q 2> >(grep -v "is ignored: it is neither" >&2); }
v() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/model" "$OUT/data/train" "$OUT/data/test"

# Wheels: the versions this checkout is tested with (.venv's).
specs=()
for p in hydra-core omegaconf bitsandbytes rich markdown-it-py mdurl pygments pytest pluggy iniconfig; do
  specs+=("$p==$(v "$p")")
done
pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT/wheels" "${specs[@]}"
pip wheel --no-deps -w "$OUT/wheels" "antlr4-python3-runtime==$(v antlr4-python3-runtime)"
ls "$OUT"/wheels/bitsandbytes-*manylinux*x86_64.whl >/dev/null

# The embedded model's config and tokenizer (converted once from its GGUF into ~/.cache/finlora).
PYTHONPATH=src "$PY" - "$OUT/model" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from finlora.config import EMBEDDED_MODELS
from finlora.models import convert_embedded

source = convert_embedded(EMBEDDED_MODELS[0], Path.home() / ".cache" / "finlora")
config = AutoConfig.from_pretrained(source)
config.dtype = torch.bfloat16  # what gpu_gate.py draws the random weights in
config.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(source).save_pretrained(sys.argv[1])
print(f"gpu_bundle: {source}'s config and tokenizer: {config.num_hidden_layers} layers, hidden {config.hidden_size}")
EOF

# FinLoRA's data: what the gate and the GPU tests read, and the rest of task=sentiment (TFNS, NWGI) for the benchmarks.
DATA=${FINLORA_DATA_DIR:-../shared/data/finlora}
for f in train/fpb_train.jsonl test/fpb_test.jsonl train/fiqa_train.jsonl test/fiqa_test.jsonl \
         train/tfns_train.jsonl test/tfns_test_fixed.jsonl test/nwgi_test.jsonl; do
  cp "$DATA/$f" "$OUT/data/$f"
done
# BEFORE=REV: that commit's tree in .gpu/before, what scripts/gpu_session.sh times this tree against
if [ -n "${BEFORE:-}" ]; then
  mkdir -p "$OUT/before"
  git archive "$BEFORE" src scripts conf train.py | tar -x -C "$OUT/before"
  git rev-parse --short "$BEFORE" > "$OUT/before/commit.txt"
fi
git ls-files -s > "$OUT/tree.txt"   # the commit's files by blob hash: gpu_gate.py checks the device's copy against it
echo "$(git rev-parse HEAD 2>/dev/null || echo unknown)$( [ -z "$(git status --porcelain 2>/dev/null)" ] || echo ' dirty')" \
  > "$OUT/commit.txt"

bnb=$(ls "$OUT"/wheels/bitsandbytes-*.whl)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
total=$(mib "$OUT")
echo "gpu_bundle: $OUT is $total MiB (wheels $(mib "$OUT/wheels"), of which $(basename "$bnb") $(mib "$bnb"); model" \
     "$(mib "$OUT/model"), data $(mib "$OUT/data")); the repository's tracked files $repo MiB"
if [ "${1:-}" != split ] && awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {exit !(t <= l)}'; then
  echo "gpu_bundle: one part: carry .gpu (with the repository: $(awk -v a="$total" -v b="$repo" 'BEGIN {printf "%.1f", a + b}') MiB)"
  exit 0
fi

# Two parts: part1 = every wheel but bitsandbytes, the model, the data and bitsandbytes' first bytes; part2 = the rest.
mkdir -p "$OUT/part1/pieces" "$OUT/part2/pieces"
name=$(basename "$bnb")
room=$(( PART_MIB * 1048576 - $(du -sb "$OUT/wheels" "$OUT/model" "$OUT/data" | awk '{s += $1} END {print s}') \
         + $(stat -c %s "$bnb") - 1048576 ))
half=$(( $(stat -c %s "$bnb") / 2 ))
first=$(( room < half ? room : half ))
[ "$first" -gt 0 ] || { echo "gpu_bundle: no room for bitsandbytes in part1 under PART_MIB=$PART_MIB" >&2; exit 1; }
head -c "$first" "$bnb" > "$OUT/part1/pieces/$name.part-1"
tail -c +"$(( first + 1 ))" "$bnb" > "$OUT/part2/pieces/$name.part-2"
(cd "$OUT/wheels" && sha256sum "$name") > "$OUT/part1/pieces/$name.sha256"
rm "$bnb"
mv "$OUT/wheels" "$OUT/model" "$OUT/data" "$OUT/commit.txt" "$OUT/tree.txt" "$OUT/part1/"
echo "gpu_bundle: two parts: $OUT/part1 $(mib "$OUT/part1") MiB, $OUT/part2 $(mib "$OUT/part2") MiB; carry one a run" \
     "(the machine keeps the first while it stays warm), then on the device: bash scripts/gpu_bundle.sh join"
