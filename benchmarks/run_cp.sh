#!/usr/bin/env bash
# Context parallelism on one host of N GPUs (default 4): the study model with an N x 32,768-token
# document a step (--dists fixed; 131,072 tokens at 4) and a long-tailed mix up to that length
# (--dists lognormal), --cp N, against one GPU on the study's lengths at 32K tokens.
# Usage: benchmarks/run_cp.sh OUT_DIR [N]; then
#   python -m varlen.bench.scaling --report OUT_DIR/runs --out RESULTS_DIR   (tflops_vs_one_gpu per run)
# CP_ARGS adds flags to every launch; LAUNCH_TIMEOUT bounds each (seconds). SAME_DOC=1 adds one GPU
# training the cp runs' document alone (the cost of splitting the row; 65,536 tokens took 55.9 GiB on
# one H200, so 131,072 does not fit an 80 GiB H100).
set -uo pipefail
out=$1; n=${2:-4}; mkdir -p "$out/runs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
common="--preset study --splits balanced --steps 10 --timing-warmup 3 --out $out/runs ${CP_ARGS:-}"
launch() {
  echo "== $*, $(date -u +%T)" | tee -a "$out/cp.log"
  timeout "${LAUNCH_TIMEOUT:-420}" torchrun --standalone "$@" >> "$out/cp.log" 2>&1 || echo "   exit $?" | tee -a "$out/cp.log"
  grep '^{' "$out/cp.log" | tail -2 | cut -c1-300
}
launch --nproc-per-node 1 -m varlen.bench.scaling $common --max-tokens-per-rank 32768 --dists uniform --label one-gpu
launch --nproc-per-node "$n" -m varlen.bench.scaling $common --max-tokens-per-rank 32768 --max-len $((n * 32768)) \
  --cp "$n" --dists fixed,lognormal --label "cp$n"
if [ "${SAME_DOC:-0}" = 1 ]; then
  launch --nproc-per-node 1 -m varlen.bench.scaling $common --max-tokens-per-rank $((n * 32768)) --max-len $((n * 32768)) \
    --dists fixed --label one-gpu-same-document
fi
