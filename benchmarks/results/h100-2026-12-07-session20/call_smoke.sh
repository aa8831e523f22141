#!/usr/bin/env bash
# session 20: the GPU smoke on this commit (no FA4: too little device time was left for its two calls), then
# the host time of an eager step before and after (new, 92490ca, ec30c06, ec30c06, 92490ca, new)
set -u
W=/tmp/w; mkdir -p $W; cp .gpu/commit.txt $W/
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])"; } > $W/device.txt 2>&1
start=$SECONDS
PYTHONPATH="$PWD/src" benchmarks/run_gpu.sh smoke $W/smoke > $W/smoke.txt 2>&1
echo "smoke exit $? after $((SECONDS - start)) s" >> $W/smoke.txt
find $W -name "*.safetensors" -delete; find $W -name "*.pt" -delete; find $W -name "*.bin" -delete; rm -rf $W/smoke/smoke-ft/export $W/smoke/smoke-train/checkpoint
(cd /tmp && tar czf $OUT/smoke.tgz --exclude="*.png" --exclude="events.*" w)
cat $W/device.txt; tail -6 $W/smoke.txt
H="eval --eager --impl torch --workers 4 --steps 30 --model small --batch-size=2"
run() { echo "== $1" >> $OUT/host_phases.txt; PYTHONPATH=$2 python3 $3 $H >> $OUT/host_phases.txt 2>&1; }
run new "$PWD/src" benchmarks/host_phases.py
run 92490ca "$PWD/.gpu/old92/src" .gpu/old92/host_phases.py
run ec30c06 "$PWD/.gpu/oldec/src" .gpu/oldec/host_phases.py
run ec30c06 "$PWD/.gpu/oldec/src" .gpu/oldec/host_phases.py
run 92490ca "$PWD/.gpu/old92/src" .gpu/old92/host_phases.py
run new "$PWD/src" benchmarks/host_phases.py
echo "done after $((SECONDS - start)) s" >> $OUT/host_phases.txt
cut -c1-150 $OUT/host_phases.txt
