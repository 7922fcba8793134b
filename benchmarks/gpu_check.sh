#!/usr/bin/env bash
# The one prepared GPU check (issue #10, item 5), for a machine lent through the device tool: the CUDA tests
# (pytest -m gpu: CUDA profiling, every method end to end in fp32 and --precision amp, CPU/CUDA feature parity),
# then the ratio table at ViT-B-16 shapes on the GPU. Everything lands in $OUT (the device tool's return folder),
# else ./gpu-check.
#
# The device image has PyTorch but not open_clip. Prepare its wheels once, here (Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth
# then run it with carry=[".whl"] and timeout_s 560: `bash benchmarks/gpu_check.sh`.
# A dry run of the mechanics on a CPU: CLBENCH_CHECK_DEVICE=cpu CLBENCH_CHECK_SHAPES=small bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DEVICE=${CLBENCH_CHECK_DEVICE:-cuda}
SHAPES=${CLBENCH_CHECK_SHAPES:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
CLBENCH_CACHE=$(mktemp -d)
export CLBENCH_CACHE

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

python3 -m pytest -q -p no:cacheprovider --benchmark-disable -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

full=()
[ "$SHAPES" = full ] && full=(--full)
timeout 400 python3 -m benchmarks.ratios "${full[@]}" --device "$DEVICE" --repeats 3 --out "$OUT/ratios.csv" 2>&1 \
  | tee "$OUT/ratios.log"
ratios_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc, ratios exit $ratios_rc" | tee -a "$OUT/device.txt"
[ "$tests_rc" -eq 0 ] && [ "$ratios_rc" -eq 0 ]
