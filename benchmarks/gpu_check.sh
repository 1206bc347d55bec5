#!/usr/bin/env bash
# One-shot GPU verification (see shared/GPU.md): versions, build for the card, every
# CUDA test, the kernel benchmarks beside their baselines; log + tables under $OUT
# (or ./gpu-results). Usage on the GPU machine:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "== $* =="; }

step "versions"
nvidia-smi || true
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -2
python -c "import transformers; print('transformers', transformers.__version__)" || true
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) uncommitted files"

step "build (TORCH_CUDA_ARCH_LIST=9.0)"
t0=$(date +%s)
PIROPE_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
python -c "import pirope; print(pirope.build_info())"

step "CUDA tests"
# The fused CUDA attention forward is opt-in until this script has verified it on a GPU.
export PIROPE_CUDA_ATTENTION=1
python -m pytest -q -x tests -k "cuda" -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" || status=1
python -m pytest -q tests/test_apply_rope_cuda.py -p no:cacheprovider || status=1

step "compute-sanitizer (memcheck, racecheck) over a subset of the CUDA tests"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    log="$OUT/sanitizer-$tool.log"
    : > "$log"
    ok=1
    for sel in "tests/test_apply_rope_cuda.py" \
               "tests/test_rope_attention_cuda.py::test_partial_rotary_layouts_and_positions" \
               "tests/test_rope_attention_cuda.py::test_out_of_range_position_poisons_with_nan"; do
      compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
        python -m pytest -q -x -p no:cacheprovider "$sel" >> "$log" 2>&1 || ok=0
    done
    if [ $ok = 1 ]; then echo "$tool: clean"; else echo "$tool: FAILED"; tail -30 "$log"; status=1; fi
  done
else
  echo "compute-sanitizer not found: skipped"
fi

step "benchmarks"
python benchmarks/bench_rope.py --device cuda --batch 1 4 --seqlen 2048 8192 --repeat 50 \
  --json "$OUT/bench_rope.json" | tee "$OUT/bench_rope.txt" || status=1
if [ -f benchmarks/bench_attention.py ]; then
  python benchmarks/bench_attention.py --device cuda --seqlens 512,2048,8192,16384 --dtypes bfloat16 \
    --heads 32/32,32/8 --repeat 20 --json "$OUT/bench_attention.json" \
    | tee "$OUT/bench_attention.txt" || status=1
fi

step "summary"
cat "$OUT/bench_rope.txt"
[ -f "$OUT/bench_attention.txt" ] && cat "$OUT/bench_attention.txt"
echo "gpu_check status: $status (log: $LOG)"
exit $status
