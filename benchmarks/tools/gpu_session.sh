#!/usr/bin/env bash
# The GPU measurements, in stages that each fit one 10-minute device call.
#
#   bash benchmarks/tools/gpu_session.sh <stage> [pytest -k expression]
#
# Stages, most informative first:
#   tests             the whole test suite on CUDA (EFFOPS_AUTOTUNE=0 there: heuristic tiles)
#   osa               OSA blocks of VoVNet-39, fp16, eager + effops + compile default (no max-autotune)
#   osa-max-autotune  the same blocks at batch 32 with torch.compile max-autotune + freezing
#   models            whole models, fp16, eager + effops (no torch.compile)
#   models-compile    whole VoVNet-39 at batch 32 with compile default and max-autotune + freezing
#   conv              conv+BN+act shapes, fp16, with the torch.compile columns
#   main              python -m effops --model vovnet39 --batch 32 (and --v2)
#   sweep             every tile of the pointer and the TMA conv kernel on VoVNet shapes, vs cuDNN
#                     (tools/sweep_conv_configs.py: which kernel and tile wins where)
#
# Logs and result files go to $OUT (the folder the device tool returns), or to
# benchmarks/results when OUT is unset. Results are stamped with device and versions.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export EFFOPS_BENCH_OUT="$OUT"
PYTEST=(python -m pytest -q -p no:logging -p no:cacheprovider -W ignore)
stage="${1:?usage: gpu_session.sh <tests|osa|osa-max-autotune|models|models-compile|conv|main|sweep>}"
log="$OUT/gpu_${stage}_$(date -u +%Y-%m-%d).log"

k="${2:-}"   # optional pytest -k expression narrowing a benchmark stage
karg=(); [ -n "$k" ] && karg=(-k "$k")

case "$stage" in
  tests)
    "${PYTEST[@]}" tests 2>&1 | tee "$log" ;;
  osa)
    EFFOPS_BENCH_DTYPES=float16 EFFOPS_BENCH_TAG=fp16 EFFOPS_BENCH_COMPILE_MODES=default \
      "${PYTEST[@]}" benchmarks/test_osa.py "${karg[@]}" 2>&1 | tee "$log" ;;
  osa-max-autotune)   # ~1-2 min of compile per block: split, e.g. "b32 and (s2 or s3 or s4_osa_b)" then "b32 and (v2 or s5)"
    EFFOPS_BENCH_DTYPES=float16 EFFOPS_BENCH_TAG=fp16_max_autotune EFFOPS_BENCH_COMPILE_MODES=max-autotune \
      "${PYTEST[@]}" benchmarks/test_osa.py -k "${k:-b32}" 2>&1 | tee "$log" ;;
  models)
    EFFOPS_BENCH_DTYPES=float16 EFFOPS_BENCH_TAG=fp16_nocompile EFFOPS_BENCH_COMPILE=0 \
      "${PYTEST[@]}" benchmarks/test_models.py "${karg[@]}" 2>&1 | tee "$log" ;;
  models-compile)
    EFFOPS_BENCH_DTYPES=float16 EFFOPS_BENCH_TAG=fp16_vovnet39_compile EFFOPS_BENCH_MODELS=vovnet39 \
      "${PYTEST[@]}" benchmarks/test_models.py -k "${k:-b32}" 2>&1 | tee "$log" ;;
  conv)               # 9 shapes x max-autotune may not fit one call: split with -k, e.g. "3x3" then "agg"
    EFFOPS_BENCH_DTYPES=float16 EFFOPS_BENCH_TAG=fp16_compile \
      "${PYTEST[@]}" benchmarks/test_conv_bn_act.py -k "${k:-b32}" 2>&1 | tee "$log" ;;
  main)
    { python -m effops --model vovnet39 --batch 32; python -m effops --model vovnet39 --batch 32 --v2; } 2>&1 \
      | grep -v "^W[0-9]" | tee "$log" ;;
  sweep)
    python benchmarks/tools/sweep_conv_configs.py float16 2>&1 | grep -v "^W[0-9]" | tee "$log" ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
