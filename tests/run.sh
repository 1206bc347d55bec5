#!/usr/bin/env bash
# Runs every test of pirope: the C++ (Catch2) tests through CMake/ctest, then pytest.
# Assumes pirope is installed (pip install --no-build-isolation .). CUDA tests run when
# a GPU is present and skip otherwise. Extra arguments go to pytest (after the default
# "-n N --dist worksteal" of tests/pytest_workers.sh, so "-n 0" runs them in one process;
# for --pdb, -s or -p no:xdist set PIROPE_TEST_WORKERS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== C++ tests (Catch2, LibTorch) =="
mkdir -p build && cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure -j "${MAX_JOBS:-2}"
echo "== Python tests =="
. tests/pytest_workers.sh
workers="$(pytest_workers python)"
share_cores "$workers"
# shellcheck disable=SC2086  # "-n N --dist worksteal" is four words
python -m pytest -q $workers "$@"
