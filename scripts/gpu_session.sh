#!/usr/bin/env bash
# A session's GPU work as one device call, within LIMIT seconds (default 575, under the 600 s a command may run):
#   1. the GPU gate on this tree (scripts/gpu_gate.py: its tests and its cells at once)      -> $OUT/gpu_gate.json
#   2. beside it, issue 33's memory rows (bench_defaults.py --only memory, each a fresh process: a peak is a process's
#      own, so the gate beside it leaves it alone), then what makes up QLoRA's peak (its --breakdown)
#                                                                    -> $OUT/memory.json, $OUT/memory_breakdown.txt
#   3. on a quiet GPU, if 150 s are left: the step times of this tree against .gpu/before (bench_before_after.py)
#                                                                    -> $OUT/before_after.json, $OUT/benchmarks.md
# Needs the bundle (bash scripts/gpu_bundle.sh, with BEFORE=REV for part 3; carry .gpu). Each part writes under $OUT
# as it goes, so a call cut short keeps what finished; a second call on the still-warm machine skips what is done.
#   run: LIMIT=575 bash scripts/gpu_session.sh        (MEMORY=0: no part 2; TL: the gate's seconds, default 300;
#                                                    BA_S: the seconds part 3 waits for, default 240;
#                                                    BA_TITLE: what part 3's section says changed;
#                                                    BA_RUNS: its runs, ';' between names)
# GATE=0, BA=0: no part 1, no part 3 (part 2 may then run to the end). BA=beside: part 3 from the start, beside
# the others (its losses compare; its step times, taken on a busy GPU, do not). MEM_ONLY: part 2's bench_defaults.py
# sections (default memory; "memory memory-speed" adds tokens/s at 8 examples). To finish a gate cut short: ONLY=a,b (the
# cells whose name holds one) MERGE=earlier.json (its tests and other cells kept; no tests run now).
set -uo pipefail
cd "$(dirname "$0")/.."
END=$(( $(date +%s) + ${LIMIT:-575} ))
left() { echo $(( END - $(date +%s) )); }
export PYTHONPATH=src PYTHONPYCACHEPREFIX=/tmp/pyc PYTHONUNBUFFERED=1
python -c "import hydra, bitsandbytes" 2>/dev/null || python -m pip install --no-deps -q --no-index .gpu/wheels/*.whl
COMMIT=$(cut -d' ' -f1 .gpu/commit.txt)   # the device's copy has a .git, but of another commit than the tree
WORK=/tmp/gpu_session; mkdir -p "$WORK"

memory() {
  [ -f "$WORK/memory.done" ] || python scripts/bench_defaults.py --data .gpu/data --tokenizer .gpu/model \
    --work "$WORK/memory" --json "$OUT/memory.json" --md "$WORK/memory.md" --only ${MEM_ONLY:-memory} \
    --breakdown "$OUT/memory_breakdown.txt" > "$OUT/memory.log" 2>&1 && touch "$WORK/memory.done"
}

ba() {
  [ -d .gpu/before ] && [ ! -f "$WORK/ba.done" ] || return 0
  cp docs/benchmarks.md "$OUT/benchmarks.md"
  timeout "$(left)" python scripts/bench_before_after.py --before .gpu/before --before-name "$(cat .gpu/before/commit.txt)" \
    --after-name "${COMMIT:0:7}" ${BA_TITLE:+--title "$BA_TITLE"} --data .gpu/data --tokenizer .gpu/model \
    --json "$OUT/before_after.json" --md "$OUT/benchmarks.md" --work "$WORK/ba" \
    --runs "${BA_RUNS[@]}" > "$WORK/ba.log" 2>&1 && touch "$WORK/ba.done"
  grep -E "^\[|^\|" "$WORK/ba.log" | tail -8
}

export WORK OUT
IFS=';' read -r -a BA_RUNS <<< "${BA_RUNS:-mission, capture+regions;dora 4bit, capture}"
BESIDE=
if [ "${BA:-1}" = beside ]; then ba & BESIDE=$!; fi
if [ "${MEMORY:-1}" = 1 ]; then setsid bash -c "$(declare -f memory); memory" & MEM=$!; else MEM=; fi

if [ "${GATE:-1}" = 1 ] && { [ -n "${ONLY:-}" ] || [ ! -f "$WORK/gate.done" ]; }; then  # ONLY: asked anew
  TL=${TL:-300}; [ "$TL" -gt $(( $(left) - 30 )) ] && TL=$(( $(left) - 30 ))
  gate=(python scripts/gpu_gate.py --model .gpu/model --data-dir .gpu/data --commit "$COMMIT" --skip-tests)
  parts=()
  if [ -z "${MERGE:-}" ]; then
    python scripts/gpu_gate.py --model .gpu/model --data-dir .gpu/data --commit "$COMMIT" --no-cells \
      --tests-timeout "$TL" --out "$WORK/gate_tests.json" --work "$WORK/gt" > "$OUT/gate_tests.log" 2>&1 &
    TESTS=$!; parts=("$WORK/gate_tests.json")
  fi
  "${gate[@]}" --parallel "${PAR:-8}" --time-limit "$TL" --out "$WORK/gate_cells.json" --work "$WORK/gc" \
    ${ONLY:+--only "$ONLY"} > "$OUT/gate_cells.log" 2>&1
  [ -z "${MERGE:-}" ] && wait "$TESTS"
  "${gate[@]}" --no-cells --merge ${MERGE:-} "${parts[@]}" "$WORK/gate_cells.json" --out "$OUT/gpu_gate.json" \
    > "$WORK/gate_merge.log" 2>&1 && touch "$WORK/gate.done"
  [ -f "$OUT/gpu_gate.json" ] && python - "$OUT/gpu_gate.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); p = d["pytest"]
print(d["summary"], "| tests:", p.get("passed"), "passed,", p.get("failed"), "failed", p.get("failures") or "")
for c in d["cells"]:
    print(f"  {c['name']:20} {c['status']:8} {c.get('seconds')} {(c.get('error') or '')[:200]}")
PY
fi

while [ -n "$MEM" ] && kill -0 "$MEM" 2>/dev/null && [ "$(left)" -gt "$( [ "${BA:-1}" = 1 ] && echo "${BA_S:-240}" || echo 10)" ]; do sleep 3; done
[ -n "$MEM" ] && kill -0 "$MEM" 2>/dev/null && { echo "memory: stopped for the step times"; kill -- "-$MEM"; sleep 2; }
grep -E "^\[|^\| memory" "$OUT/memory.log" 2>/dev/null | tail -4; head -30 "$OUT/memory_breakdown.txt" 2>/dev/null

if [ "${BA:-1}" = 1 ] && [ "$(left)" -ge 150 ]; then ba; fi
[ -n "$BESIDE" ] && wait "$BESIDE"
