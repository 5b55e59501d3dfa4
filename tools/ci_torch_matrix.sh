#!/usr/bin/env bash
# The op, pass, compiler, API and merge tests on torch versions other than the README's 2.13.0
# (lors_fx supports 2.11 to 2.14; what differs is listed in lors_fx/compiler/_torch_versions.py).
#
#   bash tools/ci_torch_matrix.sh                 # torch 2.11.0 and 2.14.1 (what CI runs)
#   bash tools/ci_torch_matrix.sh 2.12.1 2.14.1   # any versions in the range
#
# Each version gets a venv .venv-torch<MAJOR><MINOR>/ in the repository (ignored by git), made on
# the first run and reused after; set LORS_TORCH_VENVS=DIR to keep them elsewhere. Outside the
# README's 2.13.0 CPU wheel the package index has only the CUDA builds: each pulls the nvidia
# packages (about 5 GB installed; they run on CPU). Timings are in docs/torch_versions.md.
# Exits non-zero when any version fails to install or any test run fails (pytest's exit 5, no
# test collected, included); the other versions still run.
set -euo pipefail
cd "$(dirname "$0")/.."

TESTS=(tests/test_ops.py tests/passes tests/compiler tests/test_api.py tests/test_compile_e2e.py
       tests/cli/test_merge.py tests/test_adapters.py tests/test_architecture.py
       tests/test_quant.py tests/test_quant_ops.py tests/test_quantized.py)
if [ "$#" -eq 0 ]; then
    set -- 2.11.0 2.14.1
fi
venv_root="${LORS_TORCH_VENVS:-.}"
failed=()
summary=()

# install VERSION VENV: make VENV with torch==VERSION and this checkout (editable, dev extra).
# (Called from an `if`, where bash ignores set -e: every step says `|| return 1`.)
install() {
    local version="$1" venv="$2"
    local check="import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')"
    if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
        rm -rf "$venv" || return 1
        python3 -m venv "$venv" || return 1
        "$venv/bin/pip" install -q "torch==$version" || return 1
    fi
    # Every run: this checkout, editable (a reused venv may point at another), and the current
    # dependencies; torch stays the one asked for.
    "$venv/bin/pip" install -q -e ".[dev]" "torch==$version" || return 1
}

for version in "$@"; do
    if ! [[ "$version" =~ ^([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
        echo "ci_torch_matrix: not a torch version: $version" >&2
        exit 2
    fi
    venv="$venv_root/.venv-torch${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    echo "=== torch $version ($venv)"
    start=$(date +%s)
    if ! install "$version" "$venv"; then
        summary+=("torch $version: install failed after $(($(date +%s) - start)) s")
        failed+=("$version: install failed")
        continue
    fi
    installed=$(date +%s)
    rc=0
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" || rc=$?
    done_at=$(date +%s)
    took="install $((installed - start)) s, tests $((done_at - installed)) s"
    summary+=("torch $version: $took, pytest exit $rc")
    if [ "$rc" -eq 5 ]; then
        failed+=("$version: no test collected")
    elif [ "$rc" -ne 0 ]; then
        failed+=("$version: pytest exit $rc")
    fi
done

printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'ci_torch_matrix FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
