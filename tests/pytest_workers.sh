# Sourced by run.sh and compat.sh. `workers="$(pytest_workers PYTHON)"` (an assignment, so that
# set -e stops at a bad PIROPE_TEST_WORKERS) gives pytest's "-n N" when
# pytest-xdist is installed for PYTHON (requirements-dev.txt has it), so the Python tests
# run in N processes; else nothing, and they run one after another.
# N: $PIROPE_TEST_WORKERS, or one per core up to 4 (each process imports torch and
# transformers, about 1 GB; torch's own threads still run the CPU kernels in parallel,
# so at::parallel_for's multi-threaded paths stay tested). PIROPE_TEST_WORKERS=0 or 1: serial.
# Not for sanitize.sh: its kernel tests keep the cores busy already (on 2 cores, two
# processes under ASan took 280 s where one takes 160 s).
pytest_workers() {
  local n="${PIROPE_TEST_WORKERS:-}"
  if [ -z "$n" ]; then
    n="$(nproc)"
    [ "$n" -gt 4 ] && n=4
  fi
  case "$n" in
    *[!0-9]*) echo "PIROPE_TEST_WORKERS must be a number of processes (0 or 1: one), got '$n'" >&2; return 1 ;;
  esac
  if [ "$n" -gt 1 ] && "$1" -c "import xdist" 2>/dev/null; then
    echo "-n $n"
  fi
}
