#!/usr/bin/env bash
# The study on a GPU machine in parts that each fit one 10-minute call of the device tool;
# `varlen bench --merge` joins the parts. Usage: benchmarks/run_gpu.sh PART OUT_DIR
#   smoke        the GPU smoke, under 5 minutes: every backend against float64 (forward and backward,
#                causal and not, GQA) and every bench strategy (decoder and HF GPT2) for a few steps,
#                eager and compiled, at a small preset, and `varlen train` compiled with a checkpoint
#                and a resume; exits non-zero on any failure. Run it after
#                every change to a GPU path and commit what it prints.
#   tests        GPU tests (pytest -m gpu)
#   features     attention sinks (GPT-OSS), soft-capping (Gemma 2) and MLA (DeepSeek-V3) through `varlen check`
#                on FA4 (where installed), Flex and the reference; hybrid Qwen3-Next and Mamba2 (mixers sample by sample)
#   features-fa4 the same three on FA4 alone (a second call, once the wheels are installed)
#   check        `varlen check --device cuda` with the flash backend on the decoder and small random
#                Llama, Qwen2, Mistral (sliding window) and Gemma 2 (soft-capping) configs; DeepSeek-V3
#                (MLA, MoE) and Mixtral (MoE) on every backend; transformers' own sdpa, which must report
#                the leak (exit 1); a Mamba model, which must be refused before any check (exit 1)
#   eval-eager | train-eager | eval-compiled | train-compiled   one slice of the study
#   profile      the study's padded and packed-flash cases, compiled, with --profile (where the time goes)
#   lognormal    the study preset on long-tailed lengths, compiled and profiled: padded, longest, packed
#   graphs       long-tailed lengths, packed-flash compiled with and without CUDA graphs (beside padded)
#   levers       issue 18's levers, packed-flash compiled and profiled: as is, bf16 residual stream, FP8
#                linears (rowwise, tensorwise; torchao's wheel in .whl/), both
#   autotune     issue 18's epilogue lever: packed-flash compiled and profiled, as is and with --autotune
#                (Inductor max-autotune: GEMM templates with the elementwise work around them fused in)
#   mlp          issue 18's epilogue lever by hand: packed-flash compiled and profiled with exact GELU, tanh GELU
#                and quack's fused MLP (GELU in fc1's GEMM epilogue, its derivative in fc2's backward GEMM)
#   train-graphs `varlen train` on long-tailed lengths, compiled, as is and with --cuda-graphs (step times,
#                losses side by side)
#   parity       200 training steps of each lever from one seed beside bf16 autocast (loss parity)
#   te           the TransformerEngine peer (packed-te, eager) beside padded and packed-flash, study preset
#   length-8k | length-32k   packed vs padded at longer samples, 65,536 tokens a batch (length scaling)
# Wheels carried in .whl/ (benchmarks/xformers_wheels.sh download .whl) are installed first, so that
# xFormers runs; FlashAttention-4 comes with benchmarks/fa4_wheels.sh (two calls) and is used when
# installed. BENCH_ARGS adds flags (e.g. --strategies). Output goes to files under OUT_DIR as it happens.
set -uo pipefail
part=$1; out=$2; mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 PYTHONWARNINGS=ignore
if ls .whl/xformers-*.whl >/dev/null 2>&1; then
  lib=$(benchmarks/xformers_wheels.sh install .whl) || exit 1
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ls .whl/torchao-*.whl >/dev/null 2>&1; then  # FP8 linears (the fp8 part): pip download --no-deps torchao==0.18.0 -d .whl
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/torchao-*.whl || exit 1
fi
fa4=$(python3 -c "from varlen.attention.flash import impl_unavailable as u; print('' if u('fa4') else ',packed-flash:fa4')")
# packed-xformers where xFormers loads (a --strict smoke would otherwise fail on every machine without its wheels)
xf=$(python3 -c "from varlen.attention.xformers import unavailable as u; print('' if u() else ',packed-xformers')")
# the TransformerEngine peer where benchmarks/te_wheels.sh installed it (eager only)
te=$(python3 -c "from varlen.models.te_decoder import te_unavailable as u; print('' if u() else 'packed-te')")
# quack's fused MLP where quack-kernels is installed (it comes with FlashAttention-4)
quack=$(python3 -c "from varlen.models.mlp import quack_unavailable as u; print('' if u() else 'quack')")
configs() {  # small random HF configs under $out/configs
  python3 - "$out/configs" <<'PY'
import sys, transformers as t
base = dict(num_hidden_layers=2, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=1024, vocab_size=1000, max_position_embeddings=4096)
for name, cfg in {"llama": t.LlamaConfig(**base), "qwen2": t.Qwen2Config(**base),
                  "mistral": t.MistralConfig(**base, sliding_window=128),
                  "gemma2": t.Gemma2Config(**base, head_dim=64, sliding_window=128),
                  # MLA at DeepSeek-V3's head sizes (q/k 128 + 64 rotary, v 128), MoE with a shared expert
                  "deepseek_v3": t.DeepseekV3Config(**{**base, "num_key_value_heads": 8}, qk_nope_head_dim=128,
                                                    qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=128,
                                                    q_lora_rank=256, n_routed_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=256, first_k_dense_replace=1, n_group=1,
                                                    topk_group=1),
                  "mixtral": t.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2),
                  # attention sinks on every layer, sliding-window layers, MoE
                  "gpt_oss": t.GptOssConfig(**base, head_dim=64, sliding_window=128, num_local_experts=4,
                                            num_experts_per_tok=2)}.items():
    cfg.save_pretrained(f"{sys.argv[1]}/{name}")
t.MambaConfig(num_hidden_layers=2, hidden_size=256, vocab_size=1000).save_pretrained(f"{sys.argv[1]}/mamba")
from varlen.matrix import tiny_config
for name in ("qwen3_next", "mamba2"):  # the matrix's tiny hybrids (width 64)
    tiny_config(name).save_pretrained(f"{sys.argv[1]}/{name}")
PY
}
run() { name=$1; shift; python3 -m varlen check --device cuda --max-len 1024 --json "$out/check-$name.json" "$@" \
          >"$out/check-$name.txt" 2>&1; echo "check $name: exit $?"; }
case $part in
  smoke)
         # the kernel tests and both benches at once: each is mostly compile time on the host's
         # cores, and one after another they took over 5 minutes
         start=$SECONDS
         python3 -m varlen info >"$out/smoke_info.txt" 2>&1
         python3 -m pytest -m gpu -q -p no:cacheprovider -rfs tests/test_gpu.py -k smoke >"$out/smoke_tests.txt" 2>&1 &
         tests=$!
         # packed-flash is auto's pick of the implementations below (its rule is tested): not run twice
         python3 -m varlen bench --preset smoke --compile both --jobs 5 --strict --out "$out/smoke-decoder" \
           --strategies padded,longest,nested,packed-flash:torch$fa4$xf,packed-flex,packed-sdpa \
           >"$out/smoke_decoder.log" 2>&1 &
         decoder=$!
         python3 -m varlen bench --preset smoke --model hf-gpt2 --compile both --jobs 5 --strict --out "$out/smoke-hf" \
           >"$out/smoke_hf.log" 2>&1 &
         hf=$!
         # CUDA graphs on batches of samples (a graph per row size), every packed kernel that captures
         python3 -m varlen bench --preset smoke --compile on --cuda-graphs --modes eval,train --jobs 3 --strict \
           --strategies packed-flash:torch$fa4,packed-sdpa,packed-flex --out "$out/smoke-graphs" >"$out/smoke_graphs.log" 2>&1 &
         graphs=$!
         # varlen train on the GPU: compiled, AdamW with clipping, a checkpoint, resumed from it
         tr() { python3 -m varlen train --preset small --compile --max-tokens 8192 --optimizer adamw --lr 3e-4 \
                  --max-grad-norm 1.0 --save-every 3 --no-progress --out "$out/smoke-train" "$@"; }
         (tr --steps 6 && tr --steps 8 --resume) >"$out/smoke_train.log" 2>&1 &
         train=$!
         # fine-tuning a saved HF folder (stdlib documents, its own BPE tokenizer): compiled, bf16, the head
         # inside the loss, eval, export
         (python3 -c "import sys; from pathlib import Path; from varlen.corpus import *
docs = stdlib_documents(limit=300); tok = train_tokenizer(docs, 2048); o = Path(sys.argv[1])
save_model_folder(o / 'model', tok, 'llama', hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                  max_position_embeddings=4096); write_text_jsonl(docs, o / 'docs.jsonl')" "$out/smoke-ft" &&
          python3 -m varlen train --model "$out/smoke-ft/model" --data "$out/smoke-ft/docs.jsonl" --max-len 4096 \
            --truncate --max-tokens 16384 --compile --optimizer adamw --lr 2e-3 --lr-schedule cosine --warmup-steps 2 \
            --max-grad-norm 1.0 --eval-split 0.05 --eval-every 10 --steps 20 --loss-chunk 2048 --no-progress \
            --out "$out/smoke-ft/run" --export "$out/smoke-ft/export" &&
          python3 -c "import json, sys; log = [json.loads(x) for x in open(sys.argv[1])]
print('finetune: loss', round(log[0]['loss'], 3), '->', round(log[-1]['loss'], 3), 'held out', [round(r['eval_loss'], 3) for r in log if 'eval_loss' in r])" \
            "$out/smoke-ft/run/train_log.jsonl") >"$out/smoke_finetune.log" 2>&1 &
         ft=$!
         q=0
         if [ -n "$quack" ]; then  # quack's fused MLP: GELU and its derivative in the GEMMs' epilogues
           python3 -m varlen bench --preset smoke --compile both --modes eval,train --strict --gelu tanh \
             --mlp-kernel quack --strategies packed-flash:torch$fa4 --out "$out/smoke-quack" >"$out/smoke_quack.log" 2>&1 || q=$?
           grep -hE "ms/step|FAILED|n/a here|failed:" "$out/smoke_quack.log"
         fi
         e=0
         if [ -n "$te" ]; then
           python3 -m varlen bench --preset smoke --compile off --strict --strategies $te --out "$out/smoke-te" \
             >"$out/smoke_te.log" 2>&1 || e=$?
           grep -hE "ms/step|FAILED|n/a here|failed:" "$out/smoke_te.log"
         fi
         wait $tests; t=$?; wait $decoder; d=$?; wait $hf; h=$?; wait $graphs; g=$?; wait $train; r=$?; wait $ft; f=$?
         tail -3 "$out/smoke_tests.txt"
         grep -hE "ms/step|FAILED|n/a here|failed:" "$out/smoke_decoder.log" "$out/smoke_hf.log" "$out/smoke_graphs.log"
         grep -hE "resuming|error|step_ms_median" "$out/smoke_train.log" | cut -c1-300
         grep -hE "finetune:|error|step_ms_median|exported" "$out/smoke_finetune.log" | cut -c1-300
         echo "smoke: tests exit $t, decoder bench exit $d, HF bench exit $h, graphs bench exit $g, train exit $r, finetune exit $f, quack MLP exit $q, TE peer exit $e, $((SECONDS - start)) s"
         [ $t -eq 0 ] && [ $d -eq 0 ] && [ $h -eq 0 ] && [ $g -eq 0 ] && [ $r -eq 0 ] && [ $f -eq 0 ] && [ $q -eq 0 ] && [ $e -eq 0 ] ;;
  check)
         configs
         run decoder-small --preset small --backend flash
         run decoder-small-compiled --preset small --backend flash --compile
         for m in llama qwen2 mistral gemma2; do run "$m" --hf-config "$out/configs/$m" --random-init --backend flash; done
         run gemma2-flex --hf-config "$out/configs/gemma2" --random-init --backend flex
         for b in flash flex sdpa ${fa4:+flash:fa4}; do  # one process per backend at once (each is small)
           (for m in deepseek_v3 mixtral; do run "$m-${b/:/-}" --hf-config "$out/configs/$m" --random-init --backend "$b"
            done) &
         done
         run mamba-refused --hf-config "$out/configs/mamba" --random-init --backend flash; wait
         run llama-hf-sdpa --hf-config "$out/configs/llama" --random-init --attn-implementation sdpa ;;
  features|features-fa4)
         # issue 30's attention features on the kernels that take them: sinks (GPT-OSS), soft-capping
         # (Gemma 2), MLA (DeepSeek-V3), each through `varlen check` (packed against alone, gradients);
         # features-fa4: FA4's runs alone (FA4 comes in a second call, after the others ran)
         configs
         if [ "$part" = features-fa4 ]; then
           [ -n "$fa4" ] || { echo "features-fa4: FlashAttention-4 is not installed"; exit 1; }
           for m in gpt_oss gemma2 deepseek_v3; do (run "$m-flash-fa4" --hf-config "$out/configs/$m" --random-init \
             --backend flash:fa4) & done; wait; exit 0
         fi
         for b in ${fa4:+flash:fa4} flex reference; do
           (run "gpt_oss-${b/:/-}" --hf-config "$out/configs/gpt_oss" --random-init --backend "$b") &
         done; wait
         for b in ${fa4:+flash:fa4} flex; do
           (run "gemma2-${b/:/-}" --hf-config "$out/configs/gemma2" --random-init --backend "$b"
            run "deepseek_v3-${b/:/-}" --hf-config "$out/configs/deepseek_v3" --random-init --backend "$b") &
         done
         # hybrids: Gated DeltaNet and Mamba2 mixers one packed sample at a time (varlen.samplewise)
         (run qwen3_next --hf-config "$out/configs/qwen3_next" --random-init --backend flash --max-len 256
          run mamba2 --hf-config "$out/configs/mamba2" --random-init --backend flash --max-len 256) &
         wait ;;
  tests) python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 tests/test_gpu.py ${TEST_ARGS:-} >"$out/gpu_tests.txt" 2>&1
         tail -15 "$out/gpu_tests.txt" ;;
  profile)
         python3 -m varlen bench --preset study --strategies padded,packed-flash --compile on --profile \
           --out "$out/profile" ${BENCH_ARGS:-} >"$out/profile.log" 2>&1
         grep -E "ms/step|FAILED|\(|fastest" "$out/profile.log" | tail -30 ;;
  lognormal)
         # issue 18's long-tailed target (packed <= 0.25x padded): the study preset on lognormal lengths,
         # compiled and profiled (fixed costs weigh more when most samples are short)
         python3 -m varlen bench --preset study --length-dist lognormal --compile on --profile \
           --strategies padded,longest,packed-flash,packed-flex --out "$out/lognormal" ${BENCH_ARGS:-} >"$out/lognormal.log" 2>&1
         grep -E "ms/step|FAILED|fastest" "$out/lognormal.log" | tail -30 ;;
  levers)
         # issue 18's levers on the packed step (compiled, profiled, one after another on one GPU): bf16
         # autocast as it is, the bf16 residual stream, FP8 linears (each recipe; torchao from .whl/), and
         # both; MODES=eval,train for both modes
         lever() { name=$1; shift
           python3 -m varlen bench --preset study --strategies packed-flash --modes "${MODES:-train}" --compile on \
             --profile "$@" --out "$out/lever-$name" ${BENCH_ARGS:-} >"$out/lever-$name.log" 2>&1
           grep -E "ms/step|FAILED" "$out/lever-$name.log" | sed "s/^/$name: /"; }
         lever base; lever residual --residual-dtype bf16; lever fp8-rowwise --fp8 rowwise
         lever fp8-tensorwise --fp8 tensorwise; lever residual+fp8-${FP8:-rowwise} --residual-dtype bf16 --fp8 "${FP8:-rowwise}" ;;
  autotune)
         for a in off on; do
           flag=; [ $a = on ] && flag=--autotune
           python3 -m varlen bench --preset study --strategies packed-flash --modes "${MODES:-train}" --compile on \
             --profile $flag --out "$out/autotune-$a" ${BENCH_ARGS:-} >"$out/autotune-$a.log" 2>&1
           grep -E "ms/step|FAILED" "$out/autotune-$a.log" | sed "s/^/autotune $a: /"
         done ;;
  mlp)
         # issue 18's epilogue lever by hand: the study's packed step (compiled, profiled) with exact GELU,
         # GELU's tanh approximation (the same kernels) and quack's fused MLP on it; MODES=eval,train for both,
         # MLPS="tanh quack" for some
         for m in ${MLPS:-exact tanh quack}; do
           case $m in exact) f=;; tanh) f="--gelu tanh";; quack) f="--gelu tanh --mlp-kernel quack";; esac
           python3 -m varlen bench --preset study --strategies packed-flash --modes "${MODES:-train}" --compile on \
             --profile $f --out "$out/mlp-$m" ${BENCH_ARGS:-} >"$out/mlp-$m.log" 2>&1
           grep -E "ms/step|FAILED|n/a here" "$out/mlp-$m.log" | sed "s/^/$m: /"
         done ;;
  train-graphs)
         for g in off on; do
           flag=; [ $g = on ] && flag=--cuda-graphs
           python3 -m varlen train --preset study --data lognormal --compile $flag --steps ${STEPS:-80} \
             --max-tokens ${TOKENS:-6144} --timing-warmup 30 --seed 0 --no-progress --out "$out/train-graphs-$g" \
             >"$out/train-graphs-$g.log" 2>&1
           python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('$g:', {k: s.get(k) for k in ('step_ms_mean', 'step_ms_median', 'compiled_after_warmup', 'tokens_per_s', 'peak_mem_gib')}, 'last loss', s['losses'][-1])" \
             "$out/train-graphs-$g/summary.json" || tail -5 "$out/train-graphs-$g.log"
         done ;;
  parity)
         # the levers' loss parity: 200 AdamW steps of the study model from one seed, compiled, as bf16
         # autocast, the bf16 residual stream, FP8 rowwise linears and both (run at once: only losses count);
         # LEVERS="tanh quack best" for the MLP lever: tanh GELU against exact, quack's fused MLP against the
         # same model on torch's kernels (tanh), and quack + bf16 residual + --cuda-graphs against exact
         levers=${LEVERS:-residual fp8 both}
         for name in base $levers; do
           case $name in base) f=;; residual) f="--residual-dtype bf16";; fp8) f="--fp8 rowwise";;
                         both) f="--residual-dtype bf16 --fp8 rowwise";; tanh) f="--gelu tanh";;
                         quack) f="--gelu tanh --mlp-kernel quack";;
                         best) f="--gelu tanh --mlp-kernel quack --residual-dtype bf16 --cuda-graphs";; esac
           python3 -m varlen train --preset study --compile --steps 200 --max-tokens 16384 --seed 0 \
             --optimizer adamw --lr 3e-4 $f --no-progress --out "$out/parity-$name" >"$out/parity-$name.log" 2>&1 &
         done
         wait
         python3 - "$out" $levers <<'PY'
import json, sys
def losses(name):
    try:
        return [json.loads(x)["loss"] for x in open(f"{sys.argv[1]}/parity-{name}/train_log.jsonl")]
    except OSError as e:
        return print(f"{name}: no losses ({e})")
for name in sys.argv[2:]:
    ref = "tanh" if name == "quack" and "tanh" in sys.argv[2:] else "base"
    base, run = losses(ref), losses(name)
    if base and run:
        gap = [abs(a - b) for a, b in zip(base, run)]
        tail = sum(run[-20:]) / 20 - sum(base[-20:]) / 20
        print(f"{name}: 200-step loss {run[-1]:.4f} vs {ref} {base[-1]:.4f}; largest step gap {max(gap):.2e}, "
              f"mean of the last 20 steps {tail:+.2e}")
PY
         ;;
  graphs)
         # the host lever on long-tailed lengths (launch-bound: benchmarks/host_phases.py): padded and
         # packed-flash compiled as they are, then packed-flash as CUDA graphs (rows in 8 sizes an
         # octave, a graph each, recorded in warm-up), profiled; DISTS="lognormal uniform" adds the study's
         for dist in ${DISTS:-lognormal}; do
           python3 -m varlen bench --preset study --length-dist $dist --compile on --strategies padded,packed-flash \
             --out "$out/graphs-off-$dist" ${BENCH_ARGS:-} >"$out/graphs-off-$dist.log" 2>&1
           python3 -m varlen bench --preset study --length-dist $dist --compile on --cuda-graphs --profile \
             --strategies packed-flash --out "$out/graphs-on-$dist" ${BENCH_ARGS:-} >"$out/graphs-on-$dist.log" 2>&1
           grep -hE "ms/step|FAILED" "$out/graphs-off-$dist.log" "$out/graphs-on-$dist.log" | sed "s/^/$dist: /"
         done ;;
  te)
         # issue 18's peer beside varlen's best, study preset (TE eager, as Megatron runs it; varlen eager
         # and compiled); install first: benchmarks/te_wheels.sh (five calls)
         [ -n "$te" ] || { python3 -c "from varlen.models.te_decoder import te_unavailable as u; print(u())"; exit 1; }
         python3 -m varlen bench --preset study --strategies padded,packed-te,packed-flash$fa4 --compile off --profile \
           --out "$out/te-eager" ${BENCH_ARGS:-} >"$out/te-eager.log" 2>&1
         python3 -m varlen bench --preset study --strategies padded,packed-flash$fa4 --compile on \
           --out "$out/te-compiled" ${BENCH_ARGS:-} >"$out/te-compiled.log" 2>&1
         grep -hE "ms/step|FAILED|n/a" "$out/te-eager.log" "$out/te-compiled.log" ;;
  length-*)
         len=${part#length-}; len=${len%k}
         python3 -m varlen bench --preset study --max-len $((len * 1024)) --max-tokens 65536 --modes train \
           --strategies padded,packed-flash,packed-flex --out "$out/$part" ${BENCH_ARGS:-} >"$out/$part.log" 2>&1
         grep -E "ms/step|FAILED|fastest" "$out/$part.log" | tail -30 ;;
  *-*)   mode=${part%-*}; comp=${part#*-}; [ "$comp" = compiled ] && c=on || c=off
         python3 -m varlen bench --preset study --modes "$mode" --compile "$c" --out "$out/$part" ${BENCH_ARGS:-} \
           >"$out/$part.log" 2>&1
         grep -E "ms/step|FAILED|fastest" "$out/$part.log" | tail -30 ;;
esac
