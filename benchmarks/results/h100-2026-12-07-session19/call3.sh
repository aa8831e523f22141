#!/usr/bin/env bash
# session 19, call 3 (what device time is left): the evaluator (rows planned once), the sweep's and
# the bench's typed options, on this tree
set -u
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
# the evaluator (rows planned once) and the sweep's typed options, on this tree
export PYTHONPATH=$PWD/src
(python3 -m varlen train --preset small --max-tokens 8192 --steps 4 --num-samples 2000 --eval-split 0.1 --eval-every 2 \
   --compile --no-progress --out /tmp/ev > $OUT/train_eval.txt 2>&1; echo "train with evaluation exit $?" >> $OUT/train_eval.txt
 grep eval_loss /tmp/ev/train_log.jsonl | cut -c1-300 >> $OUT/train_eval.txt) &
(torchrun --standalone --nproc-per-node 1 -m varlen.bench.scaling --preset small --dists uniform --splits balanced \
  --max-tokens-per-rank 8192 --steps 4 --timing-warmup 2 --out /tmp/sw > $OUT/sweep.txt 2>&1; echo "sweep exit $?" >> $OUT/sweep.txt) &
python3 -m varlen bench --preset smoke --strategies padded,packed-flash --compile off --timing-warmup 2 --out /tmp/b \
  > $OUT/bench.txt 2>&1; echo "bench exit $?" >> $OUT/bench.txt
wait
tail -1 $OUT/bench.txt; tail -2 $OUT/train_eval.txt; tail -1 $OUT/sweep.txt
