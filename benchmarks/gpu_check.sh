#!/usr/bin/env bash
# The device check, prepared to run in one go on a machine with an NVIDIA GPU (or a TPU):
#
#     bash benchmarks/gpu_check.sh            # from the repository root; ~5 min on an H100
#
# 1. compiles and runs the Pallas kernels (gmm, tgmm, flash attention) against their
#    references, XLA's ragged all-to-all (dropless expert parallelism) against its
#    definition, and the native fp8 dot of the precision policies against fake-quant: the
#    tests marked `gpu` (or `tpu`), skipped on CPU;
# 2. times gmm against cuBLAS dense matmuls and ragged_dot, and attention against
#    jax.nn.dot_product_attention (XLA and cuDNN), at full-size shapes, writing
#    benchmarks/results/kernels-<device>.{json,md}.
# It needs jax with its GPU plugin, flax, optax and pytest; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
$PY -c "import jax; print(jax.__version__, jax.devices())"
marker=$($PY -c "import jax; print({'gpu': 'gpu', 'tpu': 'tpu'}.get(jax.default_backend(), 'gpu'))")
$PY -m pytest -q -m "$marker" -p no:cacheprovider \
    tests/test_pallas_kernels/test_gmm_pallas.py \
    tests/test_pallas_kernels/test_flash_attention.py \
    tests/test_pallas_kernels/test_flash_attention_tpu.py \
    tests/test_toolkit/test_expert_parallel.py \
    tests/test_toolkit/test_precision.py
tests=$?
$PY benchmarks/kernels.py --full --repeats 10
bench=$?
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
