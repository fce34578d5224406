#!/usr/bin/env bash
# One GPU session's checks of the train step, in priority order, inside one time budget.
#
#   bash benchmarks/gpu_check.sh                      # one H200/H100: under 8 minutes
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh     # CPU smoke run of the same stages (~2 min)
#
# Needs jax (CUDA), flax, optax, transformers, torch; no ml_collections / datasets / seqeval and
# no network. Run from anywhere; it works from the repository root. Writes under $OUT
# (default ./gpu_out), 8 files at most so a device tool can carry them all back:
#   machine.txt        date, nvidia-smi, python and package versions
#   stages.txt         each stage's exit code and seconds (124 = hit its timeout)
#   gpu_check.log      every stage's stdout and stderr
#   step_cost.jsonl    benchmarks/step_cost.py rows (XLA cost analysis of the compiled steps)
#   step_cost.md       the same as a table, ratios against the hand-written reference step
#   RESULTS.md, results.json   benchmarks/throughput.py: jaxft vs Hugging Face eager and
#                      torch.compile at 128x64 and 512x16 (tokens/s, MFU vs measured matmul peak),
#                      LoRA vs full fine-tuning (time, peak memory), FGM / supervised
#   profile.txt        benchmarks/profile_summary.py: 3 profiled steps of jaxft and of the
#                      reference (kernels/step, time by kernel class, host gaps)
# Every stage has its own timeout, clamped to what is left of the budget (GPU_CHECK_BUDGET
# seconds, default 460; 170 in the tiny mode), so one failure or hang costs only its own slot.
# Throughput runs in-process (--isolate no) to spare process starts: kinds run lora, then
# supervised, then fgm, so each JAX peak (which only grows) is still that kind's own for the first
# two; the torch peers have their own allocator.

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
TINY="${GPU_CHECK_TINY:-0}"
mkdir -p "$OUT"
: >"$OUT/gpu_check.log"
: >"$OUT/stages.txt"
rm -f "$OUT/step_cost.jsonl"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
T0=$(date +%s)
if [ "$TINY" = "1" ]; then BUDGET="${GPU_CHECK_BUDGET:-170}"; else BUDGET="${GPU_CHECK_BUDGET:-460}"; fi

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND with timeout min(CAP, budget left).
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$OUT/stages.txt"
    return
  fi
  echo "===== $name (timeout ${limit}s): $*" >>"$OUT/gpu_check.log"
  local s=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$OUT/gpu_check.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $(($(date +%s) - s)) s (limit ${limit}s)" | tee -a "$OUT/stages.txt"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "tiny: $TINY"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
  git status --short 2>/dev/null | head -20 | sed 's/^/dirty: /'
  nvidia-smi 2>&1 | head -20 || echo "nvidia-smi: not available"
  $PY - <<'EOF' 2>&1
import platform
print("python", platform.python_version())
for m in ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "numpy"):
  try:
    print(m, __import__(m).__version__)
  except Exception as e:  # noqa: BLE001
    print(m, "missing", type(e).__name__)
import jax
print("devices", jax.devices())
EOF
} >"$OUT/machine.txt"
echo "machine: $(($(date +%s) - T0)) s" >>"$OUT/stages.txt"

if [ "$TINY" = "1" ]; then
  SC_SHAPE="--seq 32 --batch 4 --tiny"; PROF="--seq 16 --batch 8 --tiny"
  TP_128="--tiny --shapes 16x8 --kinds supervised --torch eager --no-host"
  TP_512=""
else
  SC_SHAPE="--seq 128 --batch 64"; PROF="--seq 128 --batch 64"
  TP_128="--shapes 128x64 --kinds lora,supervised,fgm --torch eager,compile --no-host --isolate no --steps 10"
  TP_512="--shapes 512x16 --kinds supervised --torch eager,compile --no-host --isolate no --steps 10 --append"
fi

# 1. What the compiled steps ask for: jaxft against the reference, then step-side variants (the
# skip inside AdamW, rbg dropout keys, no guard), most wanted first; rows land as they finish.
SC_ROWS="jaxft:supervised,reference:supervised,jaxft:lora,reference:lora"
SC_ROWS="$SC_ROWS,jaxft:supervised:select_guard,jaxft:supervised:default:rbg,jaxft:supervised:lean"
# The CPU smoke run measures the first two rows only (tests check the others parse).
if [ "$TINY" = "1" ]; then SC_ROWS="jaxft:supervised,reference:supervised"; fi
# shellcheck disable=SC2086
stage step_cost 110 $PY benchmarks/step_cost.py $SC_SHAPE --jsonl "$OUT/step_cost.jsonl" \
  --rows "$SC_ROWS"
[ -s "$OUT/step_cost.jsonl" ] && $PY benchmarks/step_cost.py --table "$OUT/step_cost.jsonl" \
  >"$OUT/step_cost.md" 2>>"$OUT/gpu_check.log"

# 2. Throughput against Hugging Face at 128 x 64 (+ LoRA, FGM).
# shellcheck disable=SC2086
stage throughput_128x64 180 $PY benchmarks/throughput.py $TP_128 \
  --out "$OUT/RESULTS.md" --json "$OUT/results.json"

# 3. Where the device time goes: 3 profiled steps.
# shellcheck disable=SC2086
stage profile_jaxft 60 $PY benchmarks/profile_summary.py $PROF --steps 3 \
  --out /tmp/gpu_check_profile_jaxft
sed -n '/^===== profile_jaxft/,$p' "$OUT/gpu_check.log" | grep -v '^=====' >"$OUT/profile.txt"

# 4. 512 x 16, merged into the same report.
if [ -n "$TP_512" ]; then
  # shellcheck disable=SC2086
  stage throughput_512x16 110 $PY benchmarks/throughput.py $TP_512 \
    --out "$OUT/RESULTS.md" --json "$OUT/results.json"
fi

# 5. The reference step's profile, for the kernel count it sets.
# shellcheck disable=SC2086
stage profile_reference 50 $PY benchmarks/profile_summary.py $PROF --steps 3 --reference \
  --out /tmp/gpu_check_profile_reference
{ echo; sed -n '/^===== profile_reference/,$p' "$OUT/gpu_check.log" | grep -v '^====='; } \
  >>"$OUT/profile.txt"

echo "gpu_check: $(($(date +%s) - T0)) s in all; results in $OUT"
