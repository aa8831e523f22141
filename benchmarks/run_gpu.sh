#!/usr/bin/env bash
# The study on a GPU machine in parts that each fit one 10-minute call of the device tool;
# `varlen bench --merge` joins the parts. Usage: benchmarks/run_gpu.sh PART OUT_DIR
#   tests        GPU tests (pytest -m gpu)
#   eval-eager | train-eager | eval-compiled | train-compiled   one slice of the study
#   profile      the study's padded and packed-flash cases, compiled, with --profile (where the time goes)
#   length-8k | length-32k   packed vs padded at longer samples, 65,536 tokens a batch (length scaling)
# BENCH_ARGS adds flags (e.g. --strategies). Output goes to files under OUT_DIR as it happens.
set -uo pipefail
part=$1; out=$2; mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0
case $part in
  tests) python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 tests/test_gpu.py ${TEST_ARGS:-} >"$out/gpu_tests.txt" 2>&1
         tail -15 "$out/gpu_tests.txt" ;;
  profile)
         python3 -m varlen bench --preset study --strategies padded,packed-flash --compile on --profile \
           --out "$out/profile" ${BENCH_ARGS:-} >"$out/profile.log" 2>&1
         grep -E "ms/step|FAILED|\(|fastest" "$out/profile.log" | tail -30 ;;
  length-*)
         len=${part#length-}; len=${len%k}
         python3 -m varlen bench --preset study --max-len $((len * 1024)) --tokens-per-batch 65536 --modes train \
           --strategies padded,packed-flash,packed-flex --out "$out/$part" ${BENCH_ARGS:-} >"$out/$part.log" 2>&1
         grep -E "ms/step|FAILED|fastest" "$out/$part.log" | tail -30 ;;
  *-*)   mode=${part%-*}; comp=${part#*-}; [ "$comp" = compiled ] && c=on || c=off
         python3 -m varlen bench --preset study --modes "$mode" --compile "$c" --out "$out/$part" ${BENCH_ARGS:-} \
           >"$out/$part.log" 2>&1
         grep -E "ms/step|FAILED|fastest" "$out/$part.log" | tail -30 ;;
esac
