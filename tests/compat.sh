#!/usr/bin/env bash
# The Python tests against an older torch: the one of the GPU machine the CUDA kernels are
# verified on (torch 2.11.0, transformers 5.17.0; ../shared/GPU.md), so that a change that
# only the newer torch takes is found here, not in a rare GPU session. A venv of its own
# under build/compat, pirope built there (CPU kernels) in a copy of the tree.
#   bash tests/compat.sh [pytest args]
#   bash tests/compat.sh --install    (only the venv and its packages: .ci/run starts this early,
#                                      in the background, so that the download overlaps the builds)
# PIROPE_COMPAT_TORCH / PIROPE_COMPAT_TRANSFORMERS choose other versions. Where that torch
# cannot be installed (no PyPI), the step says so and is skipped; once installed, any
# failure fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${PIROPE_COMPAT_TORCH:-2.11.0}"
transformers_version="${PIROPE_COMPAT_TRANSFORMERS:-5.17.0}"
root="$PWD/build/compat"
venv="$root/venv-torch$torch_version"
mkdir -p "$root"
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
# The test dependencies of requirements-dev.txt, with these versions of torch and transformers
deps=("torch==$torch_version" "transformers==$transformers_version")
while read -r req; do
  case "$req" in ""|"#"*|torch*|transformers*) ;; *) deps+=("$req") ;; esac
done < <(sed 's/[[:space:]]*#.*//' requirements-dev.txt)
echo "== installing ${deps[*]} into $venv =="
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "${deps[@]}" > "$root/pip.log" 2>&1; then
  tail -5 "$root/pip.log"
  echo "compat.sh: could not install torch $torch_version (is PyPI reachable?): skipped"
  exit 0
fi
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[ "${1:-}" = "--install" ] && exit 0
dst="$root/src"
rm -rf "$dst" && mkdir -p "$dst"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dst"
cd "$dst"
echo "== building pirope (CPU kernels) against torch $torch_version =="
# At the default -O3, as users build it: at -O1 (67 s instead of 96 s here) the kernels round
# differently, and Gemma 4's tied-embedding gradient went past its test's tolerance (1.09x of it)
PIROPE_FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" setup.py build_ext --inplace > "$root/build.log" 2>&1 ||
  { tail -40 "$root/build.log"; exit 1; }
echo "== tests under torch $torch_version =="
. tests/pytest_workers.sh
workers="$(pytest_workers "$venv/bin/python")"
share_cores "$workers"
# The slow tests (pyproject.toml's marker: ~160 s of test time, ~80 s on 2 cores) touch no API of
# their own: run under the newer torch by tests/run.sh only. `bash tests/compat.sh -m ""` runs them here too.
# shellcheck disable=SC2086
PYTHONPATH="$PWD/python" "$venv/bin/python" -m pytest -q -p no:cacheprovider $workers -m "not slow" "$@"
