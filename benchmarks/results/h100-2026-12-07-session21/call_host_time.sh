#!/usr/bin/env bash
set -u
export PYTHONWARNINGS=ignore
H=$OUT/host_time.jsonl
run() { PYTHONPATH=$2 python3 benchmarks/host_time.py --label $1 ${@:3} >> $H 2>>$OUT/host_time.err; }
for cfg in "--model hf-llama --preset small --mode eval" "--model hf-llama --preset small --mode train" "--model decoder --preset small --mode train"; do
  for i in 1 2; do run new "$PWD/src" $cfg; run 46ae48a "$PWD/.gpu/old46/src" $cfg; run 46ae48a "$PWD/.gpu/old46/src" $cfg; run new "$PWD/src" $cfg; done
done
cut -c1-260 $H | sed 's/"backend": "flash:torch", "tokens": 2048, "sequences": 7, //'; tail -5 $OUT/host_time.err
