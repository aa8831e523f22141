#!/usr/bin/env bash
# Variants of the weak-scaling sweep, each at 1 GPU and at WORLD GPUs, all on one machine so that
# every efficiency compares against a 1-GPU run of the same lease. One variant a line of VARIANTS:
#   LABEL;ENV;PARALLEL;FLAGS[;WORLDS]    (ENV: space-separated VAR=value, or -; WORLDS default "WORLD 1")
# Usage: benchmarks/run_scaling_variants.sh OUT WORLD [VARIANTS_FILE]; then
#   python -m varlen.bench.scaling --report OUT/runs --out RESULTS_DIR
set -uo pipefail
out=$1; world=$2; file=${3:-/dev/stdin}
mkdir -p "$out"
while IFS=';' read -r label env par flags worlds; do
  [[ -z "$label" || "$label" == \#* ]] && continue
  for w in ${worlds:-$world 1}; do
    echo "== $label: $par on $w GPU(s) [$env] $flags, $(date -u +%T)" | tee -a "$out/scaling.log"
    ( [[ "$env" != "-" ]] && export $env
      SCALING_ARGS="--label $label $flags" benchmarks/run_scaling.sh "$out" "$w" "$par" > /dev/null )
    grep '^{' "$out/scaling.log" | tail -2 | cut -c1-200
  done
done < "$file"
