# Sourced by the other scripts: one cache outside the repository for libtorch and cargo's target
# directory, so every clone and every CI run on this machine reuses them.
#
#   SANCTUM_CACHE     where the cache lives (default: $XDG_CACHE_HOME/sanctum or ~/.cache/sanctum)
#   LIBTORCH          a libtorch you already have (its include/ and lib/); wins over the cache
#   CARGO_TARGET_DIR  where cargo builds (default: $SANCTUM_CACHE/target)

set -euo pipefail

TORCH_VERSION="2.11.0"
export SANCTUM_CACHE="${SANCTUM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/sanctum}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SANCTUM_CACHE/target}"
mkdir -p "$SANCTUM_CACHE"

sanctum_python() {
    # A name on PATH may be a shim for a version that is not installed: run it to be sure.
    for py in python3 python3.13 python3.12 python3.11 python3.10; do
        if "$py" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    echo "error: no Python 3.10+ with the venv module found; install one (it only installs the torch wheel that carries libtorch), or set LIBTORCH to an existing libtorch 2.11.0" >&2
    return 1
}

if [ -z "${LIBTORCH:-}" ]; then
    venv="$SANCTUM_CACHE/torch-$TORCH_VERSION"
    marker="$venv/.sanctum-complete"
    if [ ! -f "$marker" ]; then
        echo "==> installing libtorch $TORCH_VERSION from the PyPI wheel torch==$TORCH_VERSION into $venv (one time, ~4.7 GB)" >&2
        py=$(sanctum_python)
        rm -rf "$venv"
        "$py" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
        touch "$marker"
    fi
    LIBTORCH="$("$venv/bin/python" - <<'PY'
import os, importlib.util
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin))
PY
)"
    export LIBTORCH
fi
if [ ! -d "$LIBTORCH/lib" ] || [ ! -d "$LIBTORCH/include" ]; then
    echo "error: LIBTORCH=$LIBTORCH has no lib/ and include/; unset LIBTORCH to use the cached PyPI libtorch" >&2
    exit 1
fi
# The PyPI wheel has no build-version file; its version is pinned above.
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-1}"
unset LD_LIBRARY_PATH || true
