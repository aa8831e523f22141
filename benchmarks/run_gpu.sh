#!/usr/bin/env bash
# The study on a GPU machine in parts that each fit one 10-minute call of the device tool;
# `varlen bench --merge` joins the parts. Usage: benchmarks/run_gpu.sh PART OUT_DIR
#   smoke        the GPU smoke, under 5 minutes: every backend against float64 (forward and backward,
#                causal and not, GQA) and every bench strategy (decoder and HF GPT2) for a few steps,
#                eager and compiled, at a small preset; exits non-zero on any failure. Run it after
#                every change to a GPU path and commit what it prints.
#   tests        GPU tests (pytest -m gpu)
#   eval-eager | train-eager | eval-compiled | train-compiled   one slice of the study
#   profile      the study's padded and packed-flash cases, compiled, with --profile (where the time goes)
#   length-8k | length-32k   packed vs padded at longer samples, 65,536 tokens a batch (length scaling)
# Wheels carried in .whl/ (benchmarks/xformers_wheels.sh download .whl) are installed first, so that
# xFormers runs; FlashAttention-4 comes with benchmarks/fa4_wheels.sh (two calls) and is used when
# installed. BENCH_ARGS adds flags (e.g. --strategies). Output goes to files under OUT_DIR as it happens.
set -uo pipefail
part=$1; out=$2; mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 PYTHONWARNINGS=ignore
if ls .whl/xformers-*.whl >/dev/null 2>&1; then
  lib=$(benchmarks/xformers_wheels.sh install .whl) || exit 1
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
fa4=$(python3 -c "from varlen.attention.flash import impl_unavailable as u; print('' if u('fa4') else ',packed-flash:fa4')")
case $part in
  smoke)
         start=$SECONDS
         python3 -m varlen info >"$out/smoke_info.txt" 2>&1
         python3 -m pytest -m gpu -q -p no:cacheprovider -rfs tests/test_gpu.py -k smoke >"$out/smoke_tests.txt" 2>&1; t=$?
         tail -3 "$out/smoke_tests.txt"
         python3 -m varlen bench --preset smoke --compile both --jobs 6 --strict --out "$out/smoke-decoder" \
           --strategies padded,longest,nested,packed-flash,packed-flash:torch$fa4,packed-xformers,packed-flex,packed-sdpa \
           >"$out/smoke_decoder.log" 2>&1; d=$?
         python3 -m varlen bench --preset smoke --model hf-gpt2 --compile both --jobs 6 --strict --out "$out/smoke-hf" \
           >"$out/smoke_hf.log" 2>&1; h=$?
         grep -hE "ms/step|FAILED|n/a here|failed:" "$out/smoke_decoder.log" "$out/smoke_hf.log"
         echo "smoke: tests exit $t, decoder bench exit $d, HF bench exit $h, $((SECONDS - start)) s"
         [ $t -eq 0 ] && [ $d -eq 0 ] && [ $h -eq 0 ] ;;
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
