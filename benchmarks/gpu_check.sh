#!/usr/bin/env bash
# One-shot GPU verification (see shared/GPU.md): versions, build for the card, every
# CUDA test, the kernel benchmarks beside their baselines; log + tables under $OUT
# (or ./gpu-results). Usage on the GPU machine:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
# At most a few files come back from a GPU lease: the log, the build and test logs and
# the JSON results go to $OUT; text tables and sanitizer logs to scratch (echoed below).
SCRATCH="$(mktemp -d)"
exec > >(tee "$LOG") 2>&1
status=0
PY="${PYTHON:-$(command -v python3 || command -v python)}"
step() { echo; echo "== $* =="; }

step "versions"
date -u
nvidia-smi || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -2
compute-sanitizer --version 2>/dev/null | head -2
$PY -c "import transformers; print('transformers', transformers.__version__)" || true
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) uncommitted files"

step "build (TORCH_CUDA_ARCH_LIST=9.0)"
t0=$(date +%s)
PIROPE_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import pirope; print(pirope.build_info())"

step "CUDA tests"
# The fused CUDA attention kernels are opt-in until this script has verified them on a GPU.
export PIROPE_CUDA_ATTENTION=1
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 240 $PY -m pytest -q --tb=short -rf $xdist -k "cuda" -p no:cacheprovider tests \
  > "$OUT/pytest-cuda.log" 2>&1 || status=1
tail -25 "$OUT/pytest-cuda.log"

step "benchmarks"
timeout 150 $PY benchmarks/bench_rope.py --device cuda --batch 1 4 --seqlen 2048 8192 --repeat 50 \
  --json "$OUT/bench_rope.json" > "$SCRATCH/bench_rope.txt" 2>&1 || status=1
timeout 200 $PY benchmarks/bench_attention_gpu.py --modes "${ATTN_MODES:-fwd,fwd+bwd}" \
  --json "$OUT/bench_attention_gpu.json" > "$SCRATCH/bench_attention_gpu.txt" 2>&1 || status=1
if [ -f benchmarks/bench_decoder_layer.py ]; then
  timeout 150 $PY benchmarks/bench_decoder_layer.py --json "$OUT/bench_decoder_layer.json" \
    > "$SCRATCH/bench_decoder_layer.txt" 2>&1 || status=1
fi

step "compute-sanitizer over every CUDA kernel (tests/cuda_sanitize_cases.py)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    log="$SCRATCH/sanitizer-$tool.log"
    if timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        $PY tests/cuda_sanitize_cases.py > "$log" 2>&1; then
      echo "$tool: clean ($(grep -c . "$log") log lines)"
    else
      echo "$tool: FAILED or timed out (rc $?)"; tail -30 "$log"; status=1
    fi
  done
else
  echo "compute-sanitizer not found: skipped"
fi

step "summary"
for f in bench_rope bench_attention_gpu bench_decoder_layer; do
  [ -f "$SCRATCH/$f.txt" ] && { echo "-- $f"; cat "$SCRATCH/$f.txt"; }
done
echo "gpu_check status: $status (log: $LOG)"
exit $status
