#!/usr/bin/env bash
# session 21: the GPU smoke on main's HEAD, then the host's time for one eager step, 46ae48a (issue 29 filed)
# against this tree, in turns (new, old, old, new) for each of four steps
set -u
W=/tmp/w; mkdir -p $W; cp .gpu/commit.txt $W/
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])"; } > $W/device.txt 2>&1
start=$SECONDS
if [ "${SKIP_SMOKE:-0}" != 1 ]; then
PYTHONPATH="$PWD/src" benchmarks/run_gpu.sh smoke $W/smoke > $W/smoke.txt 2>&1
echo "smoke exit $? after $((SECONDS - start)) s" >> $W/smoke.txt
find $W -name "*.safetensors" -delete; find $W -name "*.pt" -delete; find $W -name "*.bin" -delete; rm -rf $W/smoke/smoke-ft/export $W/smoke/smoke-train/checkpoint
(cd /tmp && tar czf $OUT/smoke.tgz --exclude="*.png" --exclude="events.*" w)
cat $W/device.txt; tail -6 $W/smoke.txt
fi
H=$OUT/host_time.jsonl
run() { PYTHONPATH=$2 python3 benchmarks/host_time.py --label $1 ${@:3} >> $H 2>>$OUT/host_time.err; }
for cfg in "--model decoder --preset study --mode eval" "--model decoder --preset small --mode train" \
           "--model hf-llama --preset study --mode eval" "--model hf-llama --preset small --mode train"; do
  run new "$PWD/src" $cfg; run 46ae48a "$PWD/.gpu/old46/src" $cfg; run 46ae48a "$PWD/.gpu/old46/src" $cfg; run new "$PWD/src" $cfg
done
echo "done after $((SECONDS - start)) s"
cut -c1-260 $H; tail -5 $OUT/host_time.err
