#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, each under its own time limit so that one slow or
# failing part does not cost the other. Results (JSON, logs, profiles) go to $OUT.
#
#   OUT=runs/gpu bash bench/gpu_suite.sh          # on a GPU machine, from the repository root
#   OUT=/tmp/gpu bash bench/gpu_suite.sh --tiny   # the same steps at a tiny shape on the CPU (a dry run)
#
# ENGINE_COMPILE=off|on|both picks the engine variants (default both), ENGINE_ASYNC=default|on|off|both
# whether they schedule asynchronously (default: the engine's choice, on), ENGINE_CONCURRENCY and
# BASELINE_CONCURRENCY the request counts (default "1 16 64 250" and "1 250"), TRAIN_VARIANTS the training
# variants (default: all four below). TESTS_S, MICRO_S, ENGINE_S, FP8_S and TRAIN_S are the parts' time
# limits in seconds, 0 skipping a part (FP8_S=0 is the default).
#
# The headline figures (the engine's and the training step's targets in docs/benchmarks.md) fit one run of
# under 10 minutes, for a GPU machine held only briefly:
#   TESTS_S=100 MICRO_S=0 ENGINE_COMPILE=on ENGINE_CONCURRENCY="1 250" ENGINE_S=300 TRAIN_S=180 \
#     TRAIN_VARIANTS=afm-compile-master,transformers bash bench/gpu_suite.sh
set -u
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT/engine"
PY=${PYTHON:-python}

if [ "${1:-}" = "--tiny" ]; then
    ENGINE=(--preset afm-nano --device cpu --concurrency ${ENGINE_CONCURRENCY:-1 8} --input-len 64 --output-len 16
            --max-model-len 256 --kv-cache-gib 0.2 --baseline-concurrency ${BASELINE_CONCURRENCY:-1 8})
    TRAIN=(--preset afm-micro --seq 64 --batch 2 --steps 3 --warmup 1 --device cpu
           --variants "${TRAIN_VARIANTS:-afm-compile-master,afm-compile-master:pytorch-sdpa,afm-compile-bf16,transformers}")
    SAMPLER=(--batch 1 16 --vocab 4096 --repeats 3 --device cpu)
    ROTARY=(--tokens 256 --device cpu)
    echo "cpu dry run" > "$OUT/machine.txt"
else
    ENGINE=(--preset afm-4.5b --concurrency ${ENGINE_CONCURRENCY:-1 16 64 250} --kv-cache-gib 40
            --baseline-concurrency ${BASELINE_CONCURRENCY:-1 250})
    TRAIN=(--layers 36 --seq 4096 --batch 1 --steps 10 --warmup 3
           --variants "${TRAIN_VARIANTS:-afm-compile-master,afm-compile-master:pytorch-sdpa,afm-compile-bf16,transformers}")
    SAMPLER=(--batch 1 16 256 --compile)
    ROTARY=(--tokens 8192)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/machine.txt"
fi
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT/machine.txt"
cat "$OUT/machine.txt"

# 0. The tests that need a GPU (the engine's host-device overlap, the Triton kernels compiled for this card
#    against their references), when pytest is installed; then (MICRO_S) the small kernel benchmarks.
if [ "${TESTS_S:-150}" -gt 0 ]; then
    if $PY -c "import pytest" 2>/dev/null; then
        { TRITON_INTERPRET=0 timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
              -k "one_launch or mixed_batch_bf16 or decode_batch or fp8 or long_prefill"
          timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k "copies or collecting"; } 2>&1 \
            | tail -30 | tee "$OUT/tests.log"
    else
        echo "pytest is not installed: GPU tests skipped" | tee "$OUT/tests.log"
    fi
fi
if [ "${MICRO_S:-150}" -gt 0 ]; then
    timeout "$(( ${MICRO_S:-150} * 3 / 5 ))" $PY bench/sampler_throughput.py "${SAMPLER[@]}" 2>&1 | tee "$OUT/sampler.log"
    timeout "$(( ${MICRO_S:-150} * 2 / 5 ))" $PY bench/rotary_prefill.py "${ROTARY[@]}" 2>&1 | tee "$OUT/rotary.log"
fi
# 1. Engine: transformers' generate (the baseline), then afm's variants, with step breakdowns.
if [ "${ENGINE_S:-400}" -gt 0 ]; then
    timeout "${ENGINE_S:-400}" $PY bench/engine_throughput.py "${ENGINE[@]}" --compile "${ENGINE_COMPILE:-both}" \
        --async-scheduling "${ENGINE_ASYNC:-default}" --baseline --breakdown --out "$OUT/engine" 2>&1 \
        | tee "$OUT/engine.log"
fi
# 1b. Engine with the fp8 KV cache (half the bytes per token of context), compiled, no baseline.
if [ "${FP8_S:-0}" -gt 0 ]; then
    timeout "$FP8_S" $PY bench/engine_throughput.py "${ENGINE[@]}" --compile on --kv-cache-dtype fp8 \
        --out "$OUT/engine-fp8" 2>&1 | tee "$OUT/engine-fp8.log"
fi
# 2. Training step: afm compiled with bf16 compute copies and MasterAdamW (`afm train`'s setting), the same under
#    PyTorch's SDPA kernel order (when it differs from afm's), in pure bf16; transformers. Each profiled once.
if [ "${TRAIN_S:-170}" -gt 0 ]; then
    timeout "${TRAIN_S:-170}" $PY bench/train_throughput.py "${TRAIN[@]}" --out "$OUT/train_throughput.json" \
        --profile "$OUT/train-profiles" 2>&1 \
        | tee "$OUT/train.log"
fi
echo "done"
