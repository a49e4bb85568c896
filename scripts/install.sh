#!/usr/bin/env bash
# Install moelocal into a virtual environment with llama.cpp built for this machine's backend.
#
#   scripts/install.sh [VENV] [--backend cpu|cuda|metal] [--dev]
#
# llama-cpp-python is compiled from source: CUDA when nvcc and an NVIDIA driver are present, Metal on
# Apple Silicon, else the CPU. llama.cpp's RPC backend is always built (moelocal worker, --worker).
# pip's wheel cache ignores CMAKE_ARGS, so the build runs with --no-cache-dir whenever the backend
# recorded in the venv differs from the one wanted: a cached CPU wheel is never handed back for CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
BACKEND=auto
DEV=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND="$2"; shift 2 ;;
    --backend=*) BACKEND="${1#*=}"; shift ;;
    --dev) DEV=1; shift ;;
    *) VENV="$1"; shift ;;
  esac
done

if [ "$BACKEND" = auto ]; then
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
    BACKEND=metal
  elif command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    BACKEND=cuda
  else
    BACKEND=cpu
  fi
fi
case "$BACKEND" in
  cpu) CMAKE="-DGGML_RPC=on" ;;
  cuda) CMAKE="-DGGML_RPC=on -DGGML_CUDA=on" ;;
  metal) CMAKE="-DGGML_RPC=on -DGGML_METAL=on" ;;
  *) echo "unknown backend: $BACKEND (cpu, cuda or metal)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/install.log"
: > "$LOG"
# pip's and setuptools' chatter goes to a log; it is shown only when a step fails
quiet() { "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; echo "install failed; full log: $LOG" >&2; exit 1; }; }
PIP="$VENV/bin/python -m pip"
quiet $PIP install -q --upgrade pip

LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python>=\([0-9.]*\),.*/\1/p' pyproject.toml)
MARKER="$VENV/.llama-backend"
WANT="$BACKEND $LLAMA_VERSION $CMAKE"
# The sdist is kept: the build uses it, and the tests read the real chat templates, vocab-only GGUFs
# of real tokenizers and the architecture list of the llama.cpp it vendors.
SDIST="$VENV/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
ASSETS="$VENV/share/llama.cpp"
fetch_sdist() {
  [ -s "$SDIST" ] || quiet $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$VENV/sdist"
}
if [ "$(cat "$MARKER" 2>/dev/null)" != "$WANT" ] || ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llama_cpp') is None)" 2>/dev/null; then
  echo "Building llama-cpp-python $LLAMA_VERSION for $BACKEND (takes a few minutes)..." >&2
  fetch_sdist
  quiet env CMAKE_ARGS="$CMAKE" $PIP install -q --no-cache-dir --force-reinstall --no-deps "$SDIST"
  echo "$WANT" > "$MARKER"
fi
if [ "$DEV" = 1 ] && [ ! -f "$ASSETS/.complete" ]; then
  fetch_sdist
  rm -rf "$ASSETS" && mkdir -p "$ASSETS"
  top="llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  quiet tar -xzf "$SDIST" -C "$ASSETS" --strip-components=3 "$top/models" "$top/src"
  echo "$LLAMA_VERSION" > "$ASSETS/.complete"
fi
if [ "$DEV" = 1 ]; then
  quiet $PIP install -q -e ".[dev]"
else
  quiet $PIP install -q -e .
fi
echo "moelocal installed in $VENV (llama.cpp backend: $BACKEND)" >&2
