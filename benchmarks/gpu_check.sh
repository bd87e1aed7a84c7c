#!/usr/bin/env bash
# The GPU checks in one go, in under 5 minutes on one GPU (issue 26):
#   1. the test suite's GPU-marked tests (tests/unit/test_gpu.py: grouped-GEMM experts vs the loop, train/eval/generate
#      on --device cuda against the CPU);
#   2. a short train (bf16-mixed), eval, generate and inspect-routing of the mixtral recipe on --device cuda;
#   3. benchmarks/gpu_layer.py: the MoE layer in bf16, moecli's grouped GEMM vs transformers' grouped_mm experts;
#   4. with 2 GPUs or more, a 2-rank --fsdp run on them (nccl), and its losses against one GPU's.
#     bash benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT, else /tmp/gpu_check)
# Each step's output goes to OUTDIR (and the console); the script goes on after a failing step and exits 1 if any
# failed. transformers is needed for 1 and 3 (pip install -e ".[test]").
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
FAILED=0
step() {  # step NAME CMD...: run, tee to OUTDIR/NAME.txt, time it
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" > >(tee "$OUTDIR/$name.txt") 2>&1; then echo "=== $name: ok in $((SECONDS - t0)) s"
  else echo "=== $name: FAILED (rc $?) in $((SECONDS - t0)) s"; FAILED=1; fi
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
  echo "error: gpu_check.sh: torch sees no CUDA GPU"; exit 2; }
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')" \
  | tee "$OUTDIR/gpu.txt"
step tests python -m pytest -q -m gpu tests/unit/test_gpu.py
step train moe train mixtral --max-steps 40 --device cuda --precision bf16-mixed -o "$WORK/run" --force -q --json
step eval moe eval "$WORK/run" --device cuda --json
step generate moe generate "$WORK/run" -p "def main(" -n 40 -t 0 --device cuda --json
step inspect moe inspect-routing "$WORK/run" --device cuda --json
step layer python benchmarks/gpu_layer.py --repeats 20 --out "$OUTDIR/gpu_layer.json"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step fsdp1 moe train mixtral --max-steps 10 --device cuda -o "$WORK/one" --force -q --json
  step fsdp2 moe train mixtral --max-steps 10 --device cuda --nproc 2 --fsdp -o "$WORK/fsdp" --force -q --json
  step fsdp_losses python - "$WORK/one" "$WORK/fsdp" <<'PY'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl")] for d in sys.argv[1:])
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"2-rank --fsdp vs one GPU: worst relative loss difference {worst:.2e} over {len(a)} steps")
sys.exit(0 if worst < 1e-3 else 1)
PY
else
  echo "=== fsdp: skipped (one GPU)"
fi
rm -rf "$WORK"
exit $FAILED
