#!/usr/bin/env bash
# On a machine with a GPU or TPU: the parity tests on the device and the bench beside transformers,
# then one table. Meant to finish in under 8 minutes (each step has its own time limit).
#
#   bash scripts/device_check.sh            # results also under $OUT (or /tmp/device_check)
#
# It uses the machine's python3 and the packages it has (jax with its GPU or TPU plugin, flax, optax,
# orbax, safetensors, einops, torch, transformers, pytest): nothing is downloaded. Packages it lacks can
# travel as wheels in .whl/ (pip download --no-deps them on a machine with an index): they are installed
# from there into /tmp/site first. gpt-oss (OpenAI's reference, a test peer) is one such wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-/tmp/device_check}
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

platform=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$platform" != "gpu" ] && [ "$platform" != "tpu" ]; then
    echo "device_check: jax sees no GPU or TPU here (its backend is '${platform:-none}'): nothing to check" >&2
    exit 2
fi
export JAX_PLATFORMS=$([ "$platform" = gpu ] && echo cuda || echo tpu)  # tests/conftest.py defaults to cpu
$PY - <<'EOF' | tee "$out/versions.txt"
import jax, sys
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, devices: {jax.devices()}")
EOF

# 1. Parity on the device: fp32 logits against transformers and OpenAI's reference, bf16 accuracy, the
#    Pallas kernels the runtime picks here (the model tests load with the default runtime: this device's).
timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_model_parity.py 2>&1 | tee "$out/pytest.log"
tests=$?

# 2. The bench beside transformers (bf16, 4 layers of gpt-oss-20b's width, random MXFP4 weights).
timeout 240 $PY -m eval.bench --preset gpt-oss-20b --layers 4 --compare transformers 2>&1 | tee "$out/bench.log"
bench=$?

echo
echo "| check | result |"
echo "|---|---|"
echo "| device | $(head -1 "$out/versions.txt") |"
echo "| parity tests (tests/test_model_parity.py) | $(grep -E '[0-9]+ (passed|failed)' "$out/pytest.log" | tail -1) (exit $tests) |"
grep -E "^(prefill|decode)" "$out/bench.log" | sed 's/^/| bench | /; s/$/ |/'
echo "| bench exit status | $bench |"
[ $tests -eq 0 ] && [ $bench -eq 0 ]
