#!/usr/bin/env bash
# One-GPU check: every single-process engine x precision x teacher x accumulation path on CUDA (NCCL where it
# applies: FSDP2 and DeepSpeed run a one-process NCCL group), the real fp16 GradScaler path, torch.compile on and
# off, then the throughput figures for the README: samples/s and MFU of ViT-B-16 -> ViT-T-16 at bf16, online and
# from the teacher cache (the FLOPs count is printed with them); the frozen teacher's preparation (low-precision
# weights, --teacher-compile, skipped towers: benchmarks/teacher_forward.py) and the peer benchmark against
# open_clip_train's --distill (benchmarks/peers.py; open_clip_train ships in the open_clip_torch wheel); and the
# device-side augmentation (--decode-device cuda: nvjpeg decode + crop on the GPU, benchmarks/dataloader.py).
#
#   bash scripts/gpu_check.sh                      # on a machine with one GPU; writes gpu_check/ (or $OUT)
#   bash scripts/gpu_check.sh --download-wheels    # on a machine with PyPI: put the wheels it needs into .whl/
#
# Offline, the Python packages a CUDA PyTorch image usually lacks (open_clip_torch, webdataset, braceexpand, ftfy,
# wcwidth) are installed from .whl/ beside the repository into a private folder; nothing else is installed.
# Takes about 11-16 minutes on an H100/H200 (the matrix ~4, the benchmarks ~7-12). Exit code: the tests' (0 = all passed).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="$ROOT/.whl"
NEEDED=(open_clip_torch webdataset braceexpand ftfy wcwidth)

if [ "${1:-}" = "--download-wheels" ]; then
    PYV="${GPU_PYTHON_VERSION:-3.12}"  # the GPU image's python3
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$WHEELS" "${NEEDED[@]}"
    exit $?
fi

OUT="${OUT:-$ROOT/gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import open_clip, webdataset, braceexpand, ftfy" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "error: open_clip_torch/webdataset/braceexpand/ftfy are missing and $WHEELS has no wheels" \
             "(run: bash scripts/gpu_check.sh --download-wheels, where PyPI is reachable)" >&2
        exit 2
    fi
    SITE="${TMPDIR:-/tmp}/clip-kd-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__, torch.cuda.get_device_name(0))"
} | tee "$OUT/device.txt"

echo "[1/5] engine x precision x teacher x accumulation on one GPU, torch.compile on and off"
"$PY" -m pytest -q -p no:cacheprovider tests/test_matrix.py -k "single_gpu or one_gpu" -m "slow or not slow" \
    --timeout 900 2>&1 | tee "$OUT/matrix.txt"
status=${PIPESTATUS[0]}

echo "[2/5] throughput: ViT-B-16 -> ViT-T-16, bf16, online and cached (samples/s, MFU)"
for precision in bf16 amp_bf16; do
    "$PY" benchmarks/step_time.py --teacher ViT-B-16 --student ViT-T-16 --device cuda --precision "$precision" \
        --batch-size "${BATCH:-256}" --steps 20 --warmup-steps 5 --cache --storage-teachers "" 2>&1 \
        | grep -v " | INFO | \| | WARNING | " | tee "$OUT/throughput_$precision.txt"
done
echo "[3/5] the frozen teacher's preparation: low-precision weights, torch.compile, skipped towers (ViT-B-16)"
for precision in amp amp_bf16; do
    "$PY" benchmarks/teacher_forward.py --teacher ViT-B-16 --device cuda --precision "$precision" \
        --batch-size "${BATCH:-256}" --rounds 10 --compile 2>&1 | grep -v " | INFO | \| | WARNING | " \
        | tee "$OUT/teacher_forward_$precision.txt"
done

echo "[4/5] peers: open_clip_train --distill vs ours online (eager and --teacher-compile) and cached, ViT-B-16 -> ViT-T-16"
"$PY" benchmarks/peers.py --teacher ViT-B-16 --student ViT-T-16 --device cuda --precision amp_bf16 \
    --batch-size "${BATCH:-256}" --steps 25 --skip 5 --rounds 3 --threads "$OMP_NUM_THREADS" 2>&1 \
    | tee "$OUT/peers_amp_bf16.txt"
"$PY" benchmarks/peers.py --teacher ViT-B-16 --student ViT-T-16 --device cuda --precision amp_bf16 \
    --batch-size "${BATCH:-256}" --steps 25 --skip 10 --rounds 2 --threads "$OMP_NUM_THREADS" --teacher-compile \
    --no-cache --no-floor 2>&1 | tee "$OUT/peers_amp_bf16_compile.txt"

echo "[5/5] device-side augmentation: nvjpeg vs CPU pixels, decode ms per sample on the GPU, then KD steps fed by workers vs --decode-device cuda"
"$PY" -m pytest -q -p no:cacheprovider tests/test_data_device.py -k "decode" 2>&1 | tee "$OUT/decode_device.txt"
status=$(( status || PIPESTATUS[0] ))
"$PY" benchmarks/dataloader.py --skip-pipelines --skip-step --num-images 240 --repeats 1 --decode-device cuda \
    --data-dir "${TMPDIR:-/tmp}/clip-kd-decode-240" 2>&1 | tee -a "$OUT/decode_device.txt"
for decode in workers cuda; do
    "$PY" benchmarks/dataloader.py --skip-pipelines --skip-worker-cpu --num-images 3000 \
        --data-dir "${TMPDIR:-/tmp}/clip-kd-decode-3000" \
        --student ViT-T-16 --teacher ViT-B-16 --step-device cuda --step-decode-device "$decode" --steps 8 \
        --step-batch-size "${BATCH:-256}" --step-workers 8 2>&1 | tail -3 | tee -a "$OUT/decode_device.txt"
done
echo "results in $OUT (exit code $status: the matrix's and the decode tests')"
exit "$status"
