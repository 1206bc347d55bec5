#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer in a copy
# of the tree and runs the kernel tests under it. Any report aborts the run.
#   bash tests/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
dst=build/sanitize/src
rm -rf "$dst" && mkdir -p "$dst"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dst"
cd "$dst"
echo "== building with -fsanitize=address,undefined =="
PIROPE_FORCE_CUDA=0 PIROPE_SANITIZE=address,undefined MAX_JOBS="${MAX_JOBS:-2}" \
  python setup.py build_ext --inplace > ../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
# A build that lost its flags would pass vacuously: the module must call into both runtimes.
syms="$(nm -D python/pirope/_C*.so)"
for rt in __asan_report __ubsan_handle; do
  grep -q "$rt" <<<"$syms" || { echo "sanitize.sh: pirope._C is not instrumented (no $rt* symbols)"; exit 1; }
done
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python and torch are not instrumented: leaks at exit are theirs, and ASan's
# interception of torch's own allocator is fine. A request larger than memory fails as it
# does without ASan, with torch's exception (tests/test_bad_input.py asks for one), not an abort.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$PWD/python"
tests=(tests/test_apply_rope.py tests/test_bad_input.py tests/test_rope_properties.py tests/test_malformed_inputs.py)
for t in tests/test_rope_attention.py tests/test_rope_attention_varlen.py tests/test_rope_attention_window.py tests/test_rope_attention_softcap.py tests/test_rope_attention_sinks.py; do [ -f "$t" ] && tests+=("$t"); done
echo "== tests under ASan/UBSan =="
. tests/pytest_workers.sh
workers="$(pytest_workers python)"
share_cores "$workers"
# Not the opcheck and torch.compile tests: what they add to the other tests is Python work
# (fake tensors, Dynamo) on kernel calls those tests already make, a quarter of the run under
# the sanitizers. A -k of your own replaces this one.
# shellcheck disable=SC2086  # "-n N --dist worksteal" is four words
python -m pytest -q -p no:cacheprovider $workers -k "not opcheck and not compile" "${tests[@]}" "$@"
