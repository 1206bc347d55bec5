# Sourced by run.sh, compat.sh and sanitize.sh. `workers="$(pytest_workers PYTHON)"` (an
# assignment, so that set -e stops at a bad PIROPE_TEST_WORKERS) gives pytest's
# "-n N --dist worksteal" when pytest-xdist is installed for PYTHON (requirements-dev.txt has
# it), so the Python tests run in N processes; else nothing, and they run one after another.
# N: $PIROPE_TEST_WORKERS, or one per core up to 4 (each process imports torch and
# transformers, about 1 GB). PIROPE_TEST_WORKERS=0 or 1: serial.
# `share_cores "$workers"` then gives each process its share of the cores (below).
pytest_workers() {
  local n="${PIROPE_TEST_WORKERS:-}"
  if [ -z "$n" ]; then
    n="$(nproc)"
    [ "$n" -gt 4 ] && n=4
  fi
  case "$n" in
    *[!0-9]*) echo "PIROPE_TEST_WORKERS must be a number of processes (0 or 1: one), got '$n'" >&2; return 1 ;;
  esac
  # worksteal: an idle process takes tests queued for a busy one (the suite's few 20-40 s tests
  # otherwise leave one process working alone at the end: 367 s instead of 386 s on 2 cores)
  if [ "$n" -gt 1 ] && "$1" -c "import xdist" 2>/dev/null; then
    echo "-n $n --dist worksteal"
  fi
}

# `share_cores "$workers"` (after pytest_workers): each of the N processes gets cores / N torch
# threads (at least 1), exported as OMP_NUM_THREADS unless that is set already. N processes of
# one thread per core each oversubscribe the cores: on 2 cores the suite took 533 s so and
# 386 s with one thread each, the ASan run 180 s in one process and 118 s in two. The tests of
# the kernels' multi-threaded paths set their thread counts themselves
# (tests/attention_inputs.py: at_thread_counts, many_threads).
share_cores() {
  local n
  read -r _ n _ <<<"$1"  # "-n N --dist ..."
  if [ -n "$n" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    local t=$(( $(nproc) / n ))
    [ "$t" -lt 1 ] && t=1
    export OMP_NUM_THREADS="$t"
    echo "pytest: $n processes of $t torch thread(s) each (OMP_NUM_THREADS)"
  fi
}
