#!/usr/bin/env bash
# session 19, call 2: host time of an eager step, before the engine (f12635e, carried in .gpu/old)
# and after it (this tree), ABBA on one GPU: benchmarks/host_phases.py as session 16 ran it
set -u
export PYTHONWARNINGS=ignore
W=$OUT/timings.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $W
hp() {  # $1 old|new, then host_phases' arguments
  local who=$1; shift
  echo "== $who host_phases $*" >> $W
  if [ $who = old ]; then PYTHONPATH=$PWD/.gpu/old/src python3 .gpu/old/host_phases.py "$@" 2>&1 | tail -1 >> $W
  else PYTHONPATH=$PWD/src python3 benchmarks/host_phases.py "$@" 2>&1 | tail -1 >> $W; fi
}
# the evaluator (rows planned once) and the sweep's typed options, on this tree
export PYTHONPATH=$PWD/src
(python3 -m varlen train --preset small --max-tokens 8192 --steps 4 --num-samples 2000 --eval-split 0.1 --eval-every 2 \
   --compile --no-progress --out /tmp/ev > $OUT/train_eval.txt 2>&1; echo "train with evaluation exit $?" >> $OUT/train_eval.txt
 grep eval_loss /tmp/ev/train_log.jsonl | cut -c1-300 >> $OUT/train_eval.txt) &
torchrun --standalone --nproc-per-node 1 -m varlen.bench.scaling --preset small --dists uniform --splits balanced \
  --max-tokens-per-rank 8192 --steps 4 --timing-warmup 2 --out /tmp/sw > $OUT/sweep.txt 2>&1; echo "sweep exit $?" >> $OUT/sweep.txt
python3 -m varlen bench --preset smoke --strategies padded,packed-flash --compile off --timing-warmup 2 --out /tmp/b \
  > $OUT/bench.txt 2>&1; echo "bench exit $?" >> $OUT/bench.txt
wait
tail -1 $OUT/bench.txt; tail -2 $OUT/train_eval.txt; tail -1 $OUT/sweep.txt
unset PYTHONPATH
e="--eager --impl torch --workers 4 --steps 30"
for who in old new new old; do hp $who eval $e --model small --batch-size=2; done
for who in old new new old; do hp $who train $e --model study --batch-size=2; done
cat $W | cut -c1-200  # printed again at the end
