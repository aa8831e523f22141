#!/usr/bin/env bash
# session 19, call 1: the GPU smoke on the engine, the scaling sweep and the cost fit on 1 GPU,
# DeepSeek-V3 (MLA, q/k 192) through varlen check on Flex (head sizes zero-padded for its kernel)
set -u
W=/tmp/w; mkdir -p $W; cp /tmp/commit.txt $W/
export PYTHONPATH="$PWD/src" PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])"; } > $W/device.txt 2>&1
start=$SECONDS
benchmarks/run_gpu.sh smoke $W/smoke > $W/smoke.txt 2>&1 &
smoke=$!
# the scaling sweep (moved to varlen.bench.scaling), one process under torchrun: DDP, compiled, --cost measure
(torchrun --standalone --nproc-per-node 1 -m varlen.bench.scaling --preset small --parallel ddp --dists lognormal \
   --splits balanced --max-tokens-per-rank 8192 --steps 4 --timing-warmup 2 --cost measure --out $W/scaling \
   && python3 -m varlen.bench.scaling --report $W/scaling --out $W/scaling-report) > $W/scaling.txt 2>&1
echo "scaling exit $?" >> $W/scaling.txt
# varlen train with --cost measure (the engine's cost fit) and eval, eager
python3 -m varlen train --preset small --max-tokens 8192 --steps 6 --cost measure --data lognormal --eval-split 0.1 \
  --eval-every 3 --no-progress --out $W/train-cost > $W/train_cost.txt 2>&1; echo "train --cost measure exit $?" >> $W/train_cost.txt
# DeepSeek-V3 on Flex and the MLA kernel tests on Flex
python3 - $W/configs <<'PY'
import sys, transformers as t
base = dict(num_hidden_layers=2, hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
            intermediate_size=1024, vocab_size=1000, max_position_embeddings=4096)
t.DeepseekV3Config(**base, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=128,
                   q_lora_rank=256, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                   first_k_dense_replace=1, n_group=1, topk_group=1).save_pretrained(f"{sys.argv[1]}/deepseek_v3")
PY
python3 -m varlen check --device cuda --max-len 1024 --hf-config $W/configs/deepseek_v3 --random-init --backend flex \
  > $W/check-deepseek_v3-flex.txt 2>&1; echo "check deepseek_v3 flex exit $?" >> $W/check-deepseek_v3-flex.txt
wait $smoke; echo "smoke exit $? after $((SECONDS - start)) s" >> $W/smoke.txt
find $W -name "*.safetensors" -delete; find $W -name "*.pt" -delete; find $W -name "*.bin" -delete; rm -rf $W/smoke/smoke-ft/export $W/smoke/smoke-train/checkpoint
cd /tmp && tar czf $OUT/call1.tgz --exclude="*.png" --exclude="events.*" w
tail -5 $W/smoke.txt; tail -3 $W/scaling.txt; tail -2 $W/train_cost.txt; tail -4 $W/check-deepseek_v3-flex.txt
ls -la $OUT
