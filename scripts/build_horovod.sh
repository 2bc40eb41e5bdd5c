#!/usr/bin/env bash
# Builds .venv-horovod for tests/test_horovod_real.py: CPU torch 2.13.0, the project (editable) and Horovod 0.28.1
# compiled from its sdist with Gloo and PyTorch support (no MPI, no GPU). About 4-5 minutes of compiling on 2 cores.
# Idempotent: exits at once when the venv already imports horovod.torch. Environment: PYTHON (a Python 3.11: the
# CPU torch wheel on this machine is cp311), HOROVOD_VENV (where to build), MAKEFLAGS (default -j$(nproc)).
set -euo pipefail
trap 'echo "error: build_horovod.sh failed at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOROVOD_VENV:-$ROOT/.venv-horovod}"
PY="$VENV/bin/python"
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0  # the release built against torch 2.13
HOROVOD_VERSION=0.28.1

say() { echo "[build_horovod ${SECONDS}s] $*"; }
run() { echo "[build_horovod] \$ $*"; "$@"; }

if [ -x "$PY" ] && "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "$VENV already imports horovod.torch (horovod $("$PY" -c 'import horovod; print(horovod.__version__)')): nothing to do"
  exit 0
fi

BASE="${PYTHON:-python3}"
if [ ! -x "$PY" ]; then
  say "creating $VENV with $("$BASE" --version)"
  run "$BASE" -m venv "$VENV"
fi
pip_() { run "$PY" -m pip --disable-pip-version-check "$@"; }

# torch stays at $TORCH_VERSION whatever the project's requirements would pull (pip also reads /etc/xdg/pip's cap,
# torch<=2.14.1, where it exists: both hold).
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"
say "constraints ($CONSTRAINTS): $(tr '\n' ' ' < "$CONSTRAINTS")"

pip_ install -q -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
say "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

# PyPI's torchvision wheels for x86_64 are CUDA builds: beside a CPU torch their C++ ops don't load, and torchvision's
# import then dies registering fake kernels for them ("operator torchvision::nms does not exist"). The project only
# uses torchvision's transforms (pure Python), so register those two fakes only when the ops loaded.
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  META="$("$PY" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py"
  say "torchvision's C++ ops don't load beside this torch: patching $META"
  run sed -i 's|^@torch.library.register_fake("torchvision::\([a-z_]*\)")$|@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))|' "$META"
fi
"$PY" -c "import torchvision.transforms.functional" || { echo "error: torchvision still fails to import" >&2; exit 1; }

pip_ install -q -c "$CONSTRAINTS" -e "$ROOT"
"$PY" -c "import open_clip, training.main" || { echo "error: the project does not import in $VENV" >&2; exit 1; }

# Horovod from source. --no-build-isolation: it must compile against the torch installed above.
pip_ install -q -c "$CONSTRAINTS" wheel packaging cffi cloudpickle psutil pyyaml
SRC="$(mktemp -d "${TMPDIR:-/tmp}/horovod-src.XXXXXX")"
trap 'rm -rf "$SRC"' EXIT
pip_ download -q --no-deps --no-binary :all: -d "$SRC" "horovod==$HOROVOD_VERSION"
run tar -xzf "$SRC/horovod-$HOROVOD_VERSION.tar.gz" -C "$SRC"
HVD_SRC="$SRC/horovod-$HOROVOD_VERSION"
# torch >= 2.x headers need C++17; raising only the torch extension's standard leaves a duplicate gloo symbol at link
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
  run sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$HVD_SRC/$f"
  grep -q 'set(CMAKE_CXX_STANDARD 17)' "$HVD_SRC/$f" || { echo "error: could not raise the C++ standard in $f" >&2; exit 1; }
done

LOG="$VENV/horovod-build.log"
say "compiling horovod $HOROVOD_VERSION (log: $LOG)"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
  HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
if ! pip_ install -v --no-build-isolation -c "$CONSTRAINTS" "$HVD_SRC" > "$LOG" 2>&1; then
  tail -n 60 "$LOG" >&2
  echo "error: horovod build failed (full log: $LOG)" >&2
  exit 1
fi

"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'horovod built without gloo'; print('[build_horovod] horovod', __import__('horovod').__version__, 'gloo', hvd.gloo_built(), 'mpi', hvd.mpi_built())"
"$PY" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__"
run "$VENV/bin/horovodrun" --check-build
say "done: $VENV"
