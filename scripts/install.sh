#!/usr/bin/env bash
# Install moelocal into a virtual environment with llama.cpp built for this machine's backend.
#
#   scripts/install.sh [VENV] [--backend cpu|cuda|metal] [--cuda-arch LIST] [--dev] [--print-cmake-args]
#
# llama-cpp-python is compiled from source: CUDA when nvcc and an NVIDIA driver are present, Metal on
# Apple Silicon, else the CPU. llama.cpp's RPC backend is always built (moelocal worker, --worker).
# --backend cuda builds wherever nvcc is, GPU or not: a toolkit without cuBLAS gets it from PyPI
# (nvidia-cublas, into the venv); without the driver library (libcuda.so) llama.cpp is built without
# its virtual memory management (-DGGML_CUDA_NO_VMM=ON). --cuda-arch (or CMAKE_CUDA_ARCHITECTURES)
# picks the GPU architectures to compile for: default "native" when a GPU is here, else 90 (Hopper);
# e.g. --cuda-arch "86;89" for RTX 30xx/40xx. Each architecture adds a long compile (about 19 minutes
# for one on 2 cores). --print-cmake-args prints what the build would get and stops.
# pip's wheel cache ignores CMAKE_ARGS, so the build runs with --no-cache-dir whenever the backend
# recorded in the venv differs from the one wanted: a cached CPU wheel is never handed back for CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
BACKEND=auto
DEV=0
CUDA_ARCH="${CMAKE_CUDA_ARCHITECTURES:-}"
PRINT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND="$2"; shift 2 ;;
    --backend=*) BACKEND="${1#*=}"; shift ;;
    --cuda-arch) CUDA_ARCH="$2"; shift 2 ;;
    --cuda-arch=*) CUDA_ARCH="${1#*=}"; shift ;;
    --print-cmake-args) PRINT_ONLY=1; shift ;;
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

# ---- CUDA: find what the toolkit lacks, bring cuBLAS from PyPI if need be -------------------
cuda_fail() { echo "--backend cuda: $1" >&2; exit 2; }
if [ "$BACKEND" = cuda ]; then
  NVCC=$(command -v nvcc || true)
  [ -n "$NVCC" ] || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; } \
    || cuda_fail "nvcc not found: install the CUDA toolkit (or set CUDA_HOME), or use --backend cpu"
  # nvcc may be a wrapper script: nvcc itself says where its toolkit is
  CUDA_ROOT=$("$NVCC" --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  CUDA_ROOT=$(cd "${CUDA_ROOT:-$(dirname "$(readlink -f "$NVCC")")/..}" && pwd)
  CUDA_MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p' | head -n 1)
  [ -n "$CUDA_MAJOR" ] || cuda_fail "cannot read the CUDA version from $NVCC --version"
  CMAKE="$CMAKE -DCMAKE_CUDA_COMPILER=$CUDA_ROOT/bin/nvcc -DCUDAToolkit_ROOT=$CUDA_ROOT"
  find_in_toolkit() { find "$CUDA_ROOT/include" "$CUDA_ROOT/lib64/" "$CUDA_ROOT/lib/" "$CUDA_ROOT"/targets/*/ \
                        -name "$1" 2>/dev/null | head -n 1; }
  [ -n "$(find_in_toolkit cuda_runtime.h)" ] || cuda_fail "the toolkit at $CUDA_ROOT has no CUDA runtime headers \
(cuda_runtime.h): install its cudart development files (nvidia-cuda-runtime on PyPI)"
  if [ -z "$(find_in_toolkit cublas_v2.h)" ] || [ -z "$(find_in_toolkit 'libcublas.so*')" ]; then
    case "$CUDA_MAJOR" in 13) CUBLAS_PKG=nvidia-cublas ;; *) CUBLAS_PKG="nvidia-cublas-cu$CUDA_MAJOR" ;; esac
    echo "The CUDA $CUDA_MAJOR toolkit at $CUDA_ROOT has no cuBLAS: installing $CUBLAS_PKG from PyPI into $VENV..." >&2
    quiet $PIP install -q "$CUBLAS_PKG==$CUDA_MAJOR.*"
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
    CUBLAS_H=$(find "$SITE/nvidia" -name cublas_v2.h 2>/dev/null | head -n 1)
    [ -n "$CUBLAS_H" ] || cuda_fail "$CUBLAS_PKG installed no cublas_v2.h under $SITE/nvidia"
    CUBLAS_INC=$(dirname "$CUBLAS_H")
    CUBLAS_LIB=$(dirname "$(find "$SITE/nvidia" -name 'libcublas.so.*' | head -n 1)")
    # the wheel ships only versioned names (libcublas.so.13): point CMake at the files themselves, and
    # the built library at their folder (its RUNPATH), so that it finds them when it runs
    CMAKE="$CMAKE -DCUDA_cublas_LIBRARY=$(ls "$CUBLAS_LIB"/libcublas.so.* | head -n 1)"
    CMAKE="$CMAKE -DCUDA_cublasLt_LIBRARY=$(ls "$CUBLAS_LIB"/libcublasLt.so.* | head -n 1)"
    CMAKE="$CMAKE -DCMAKE_CUDA_FLAGS=-I$CUBLAS_INC -DCMAKE_CXX_FLAGS=-I$CUBLAS_INC"
    CMAKE="$CMAKE -DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,$CUBLAS_LIB"
  fi
  HAVE_GPU=0
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
  if ! { ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; } && [ -z "$(find_in_toolkit 'libcuda.so')" ]; then
    echo "No CUDA driver library (libcuda.so) here: building without llama.cpp's virtual memory management" \
      "(-DGGML_CUDA_NO_VMM=ON); the library runs wherever an NVIDIA driver is installed." >&2
    CMAKE="$CMAKE -DGGML_CUDA_NO_VMM=ON"
  fi
  if [ -z "$CUDA_ARCH" ]; then
    if [ "$HAVE_GPU" = 1 ]; then CUDA_ARCH=native; else
      CUDA_ARCH=90
      echo "No GPU here: compiling for CUDA architecture 90 (Hopper) only; pick others with --cuda-arch" \
        "\"86;89\" (RTX 30xx/40xx) or CMAKE_CUDA_ARCHITECTURES." >&2
    fi
  fi
  CMAKE="$CMAKE -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
fi
if [ "$PRINT_ONLY" = 1 ]; then
  echo "$CMAKE"
  exit 0
fi

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
