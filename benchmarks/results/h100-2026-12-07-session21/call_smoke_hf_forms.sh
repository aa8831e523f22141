#!/usr/bin/env bash
# session 21, call 4: the GPU smoke on this tree, then a compiled HF Llama train step on one packed batch in
# three forms, this tree against 669ea35 (before the model's entry read the batch)
set -u
W=/tmp/w; rm -rf $W; mkdir -p $W; cp .gpu/commit.txt $W/
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
start=$SECONDS
PYTHONPATH="$PWD/src" benchmarks/run_gpu.sh smoke $W/smoke > $W/smoke.txt 2>&1
echo "smoke exit $? after $((SECONDS - start)) s" >> $W/smoke.txt
find $W -name "*.safetensors" -delete; find $W -name "*.pt" -delete; find $W -name "*.bin" -delete; rm -rf $W/smoke/smoke-ft/export $W/smoke/smoke-train/checkpoint
(cd /tmp && tar czf $OUT/smoke.tgz --exclude="*.png" --exclude="events.*" w)
tail -4 $W/smoke.txt
F=$OUT/hf_batch_forms.jsonl
run() { PYTHONPATH=$2 timeout 120 python3 benchmarks/hf_batch_forms.py --label $1 --layers 4 --tokens 8192 --forms $3 >> $F 2>>$OUT/hf_batch_forms.err; }
run new "$PWD/src" position_ids
run 669ea35 "$PWD/.gpu/old669/src" position_ids
run new "$PWD/src" varlen_info
echo "done after $((SECONDS - start)) s"; cat $F; tail -3 $OUT/hf_batch_forms.err
