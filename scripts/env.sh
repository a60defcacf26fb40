# Sourced by the project's scripts: finds or builds the Python environment and exports the paths.
#
# The environment (torch brings gigabytes of CUDA libraries) lives in a cache outside the clone,
# keyed by the dependency lock and the interpreter, so CI and later sessions reuse it. The project's
# own packages are put on PYTHONPATH rather than installed, so one cached environment serves every
# clone.

DEEPTUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEEPTUNE_CACHE="${DEEPTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deeptune}"
DEEPTUNE_PYTHON_BOOTSTRAP="${DEEPTUNE_PYTHON_BOOTSTRAP:-python3}"
UV_VERSION="0.13.8"

_deeptune_log() { printf '[deeptune] %s\n' "$*" >&2; }

_deeptune_uv() {
  local tools="$DEEPTUNE_CACHE/tools-uv-$UV_VERSION"
  if [ ! -x "$tools/bin/uv" ]; then
    _deeptune_log "installing uv $UV_VERSION into $tools"
    rm -rf "$tools.tmp"
    "$DEEPTUNE_PYTHON_BOOTSTRAP" -m venv "$tools.tmp"
    "$tools.tmp/bin/pip" install --quiet "uv==$UV_VERSION"
    rm -rf "$tools" && mv "$tools.tmp" "$tools"
  fi
  printf '%s\n' "$tools/bin/uv"
}

# A virtual environment built from a lock file, cached under a name keyed by the lock and the
# interpreter; extra packages (arguments after the lock) go in with --no-deps. Prints its path.
deeptune_cached_venv() {
  local name="$1" lock="$2" py_version key venv uv
  shift 2
  py_version="$("$DEEPTUNE_PYTHON_BOOTSTRAP" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  key="$({ cat "$lock"; [ "$#" -eq 0 ] || printf '%s\n' "$@"; } | sha256sum | cut -c1-16)"
  venv="$DEEPTUNE_CACHE/$name-py$py_version-$key"
  if [ ! -f "$venv/.complete" ]; then
    mkdir -p "$DEEPTUNE_CACHE"
    exec 9>"$DEEPTUNE_CACHE/$name.lock"
    flock 9
    if [ ! -f "$venv/.complete" ]; then
      uv="$(_deeptune_uv)"
      _deeptune_log "building the Python environment $name (first run only): $venv"
      rm -rf "$venv"
      "$uv" venv --quiet --python "$(command -v "$DEEPTUNE_PYTHON_BOOTSTRAP")" "$venv"
      VIRTUAL_ENV="$venv" "$uv" pip sync --quiet "$lock"
      if [ "$#" -gt 0 ]; then
        VIRTUAL_ENV="$venv" "$uv" pip install --quiet --no-deps "$@"
      fi
      touch "$venv/.complete"
      _deeptune_log "environment $name ready"
    fi
    exec 9>&-
  fi
  _deeptune_compiled "$name" "$venv"
  printf '%s\n' "$venv"
}

# uv installs no bytecode, and this machine's environment sets PYTHONDONTWRITEBYTECODE=1, so without
# this every Python process compiled each module it imports from source: a trainer process spent
# 9.3 s importing deeptune_trainer.training, 7.7 s with bytecode (measured). Compiled once per cached
# environment, also in one built before this step existed (the marker says it is done).
_deeptune_compiled() {
  local name="$1" venv="$2"
  [ -f "$venv/.compiled" ] && return 0
  exec 9>"$DEEPTUNE_CACHE/$name.lock"
  flock 9
  if [ ! -f "$venv/.compiled" ]; then
    _deeptune_log "compiling the bytecode of $venv (first run only)"
    # Some packages ship files that are not Python 3 (templates, test data): compileall names them
    # and goes on; they are never imported.
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" > /dev/null 2>&1 || true
    touch "$venv/.compiled"
  fi
  exec 9>&-
}

DEEPTUNE_VENV="$(deeptune_cached_venv venv "$DEEPTUNE_ROOT/requirements.lock")"
export DEEPTUNE_ROOT DEEPTUNE_CACHE DEEPTUNE_VENV
export VIRTUAL_ENV="$DEEPTUNE_VENV"
export PATH="$DEEPTUNE_VENV/bin:$PATH"
export PYTHONPATH="$DEEPTUNE_ROOT/operator:$DEEPTUNE_ROOT/trainer-image:$DEEPTUNE_ROOT/serving-image${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is ever fetched from a model hub here; fail fast instead of hanging on the network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
