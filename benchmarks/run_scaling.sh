#!/usr/bin/env bash
# Weak scaling of packed training on one host, one torchrun launch per (parallel, world size).
# Usage: benchmarks/run_scaling.sh OUT_DIR ["4 1 2"] ["ddp fsdp2"]; then
#   python -m varlen.bench.scaling --report OUT_DIR/runs --out RESULTS_DIR
# SCALING_ARGS adds flags (e.g. --steps 10); LAUNCH_TIMEOUT bounds each launch (seconds).
set -uo pipefail
out=$1; worlds=${2:-"4 1 2"}; pars=${3:-"ddp fsdp2"}
mkdir -p "$out/runs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
for p in $pars; do
  for w in $worlds; do
    echo "== $p on $w GPU(s), $(date -u +%T)" | tee -a "$out/scaling.log"
    timeout "${LAUNCH_TIMEOUT:-300}" torchrun --standalone --nproc-per-node "$w" -m varlen.bench.scaling \
      --parallel "$p" --out "$out/runs" ${SCALING_ARGS:-} >> "$out/scaling.log" 2>&1 || echo "   exit $?" | tee -a "$out/scaling.log"
    grep '^{' "$out/scaling.log" | tail -4 | cut -c1-230
  done
done
