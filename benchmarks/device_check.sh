#!/usr/bin/env bash
# One lent-GPU call, in the order that matters (METHOD.md "fit the lease"): each named step under its own time limit,
# its full log in $OUT/<step>.log, the last lines of every log printed at the end (the reply carries the tail).
# Run from the repository root on the device machine, wheels carried in .whl/ (fla-core, gguf):
#   bash benchmarks/device_check.sh [graphs kernels quant engine ttft decode quant-bench prefix] (default: all, in that order)
# Steps joined by + run at the same time (tests only: timings want the machine to themselves), e.g. graphs+i8 ttft
# A step's time limit: LIMIT_<step> seconds, e.g. LIMIT_decode_big=250
# Steps:
#   graphs       the prefill-graph tests (padding segment in the GDN and attention kernels, one graph, many steps)
#                and the add + norm + SwiGLU GEMV's
#   graphs-moe   of those the engine's one-graph-many-steps test on the MoE model only (a short device lease)
#   i8           the integer (int8 x, dp4a) GEMV and MoE-pair tests of tests/cuda/test_quantized.py, the prologue GEMVs,
#                the quantized MoE with its shared expert as a pair
#   sweep        benchmarks/bench_cuda_quant.py --sweep --no-model (issue 16: GEMV variants per format and shape)
#   qmodel       bench_cuda_quant.py --formats q4_k_m --no-kernels --i8 --profile (decode and prefill with and without
#                int8 x: the GEMV, the GEMM, the MoE; each decode graph's kernels by device time)
#   kernels      tests/cuda/test_state_kernels.py + test_layer_kernels.py (the delta rule, conv, attention, GEMVs)
#   kernels-quick  of those: attention, the bf16 delta-rule layer cases, the norms
#   attn-bench   benchmarks/bench_cuda_kernels.py attention (decode and prefill attention against gather + SDPA)
#   quant        tests/cuda/test_quantized.py (quantized GEMV/GEMM, MoE, whole models: logits and greedy == solo)
#   quant-model  of those the whole models only
#   engine       tests/cuda/test_engine.py (greedy == solo at np 1/8/64, graphs with any slot assignment); engine-next,
#                engine-dense, engine-moe: its cases of one family each (joined by +, three processes share the compiles)
#   ttft         benchmarks/profile_cuda_prefill.py --profile (issue 17: TTFT, 64 x 128, host vs GPU time)
#   decode       benchmarks/bench_cuda.py --configs qwen3.5-0.8b --nps 1 64 --no-hf (issue 17's decode ratios)
#   decode-big   the same for qwen3.5-2b and qwen3-next-8l (issue 17: they keep their ratios)
#   decode-unfused the same without the add + norm in the SwiGLU GEMV (triton/linear.py ADD_NORM_PROLOGUE off)
#   quant-bench  benchmarks/bench_cuda_quant.py (issue 16: decode vs roofline per format, GEMV bandwidth)
#   prefix       benchmarks/bench_prefix_cache.py --device cuda --dtype float32 --turns 8 --rounds 2 (issue 18)
#   tp           tests/cuda/test_cuda_tensor_parallel.py (issue 19; needs a machine of 2+ GPUs, e.g. nvidia-h100-x2)
#   tp-bench     benchmarks/bench_cuda_tp.py (issue 19: decode at TP = 1, 2, 4 against TP=1 and the roofline / TP)
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT" /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.log"

step() {  # name, seconds, command... (LIMIT_<name>, dashes as underscores, overrides the seconds)
  local name=$1 var=LIMIT_${1//-/_}
  local limit=${!var:-$2}
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (limit $limit)" | tee -a "$OUT/summary.log"
}

run_step() {
  case $1 in
    graphs) step graphs 240 python3 -m pytest -q -x tests/cuda -k "padding_segment or prefill_graph or add_norm_swiglu" ;;
    graphs-moe) step graphs-moe 150 python3 -m pytest -q -x tests/cuda/test_engine.py -k "prefill_graph and qwen3_5_moe" ;;
    i8) step i8 200 python3 -m pytest -q -x tests/cuda/test_quantized.py -k "int8 or prologue or shared" ;;
    sweep) (cd benchmarks && step sweep 300 python3 bench_cuda_quant.py --sweep --no-model) ;;
    qmodel) (cd benchmarks && step qmodel 400 python3 bench_cuda_quant.py --formats ${QFORMATS:-q4_k_m} --no-kernels --i8 --profile) ;;
    kernels-quick) step kernels-quick 240 python3 -m pytest -q -x tests/cuda/test_state_kernels.py \
                     tests/cuda/test_layer_kernels.py -k "attention or (gated_delta_net and bfloat16) or norm" ;;
    attn-bench) (cd benchmarks && step attn-bench 120 python3 bench_cuda_kernels.py attention) ;;
    kernels) step kernels 420 python3 -m pytest -q -x tests/cuda/test_state_kernels.py tests/cuda/test_layer_kernels.py ;;
    quant) step quant 540 python3 -m pytest -q -x tests/cuda/test_quantized.py ;;
    quant-model) step quant-model 400 python3 -m pytest -q -x tests/cuda/test_quantized.py -k "model" ;;
    engine) step engine 540 python3 -m pytest -q -x tests/cuda/test_engine.py ;;
    engine-next) step engine-next 540 python3 -m pytest -q -x tests/cuda/test_engine.py -k qwen3_next ;;
    engine-dense) step engine-dense 540 python3 -m pytest -q -x tests/cuda/test_engine.py \
                    -k "qwen3_5 and not moe" ;;
    engine-moe) step engine-moe 540 python3 -m pytest -q -x tests/cuda/test_engine.py -k qwen3_5_moe ;;
    ttft) (cd benchmarks && step ttft 300 python3 profile_cuda_prefill.py --profile --more-budgets) ;;
    decode) (cd benchmarks && step decode 400 python3 bench_cuda.py --configs qwen3.5-0.8b --nps 1 64 --no-hf) ;;
    decode-big) (cd benchmarks && step decode-big 400 python3 bench_cuda.py --configs qwen3.5-2b qwen3-next-8l \
                   --nps 1 64 --no-hf) ;;
    decode-unfused) (cd benchmarks && step decode-unfused 400 python3 -c "import runpy, sys
import deltaserve.kernels.triton.linear as linear
linear.ADD_NORM_PROLOGUE = False
sys.argv = ['bench_cuda.py', '--configs', 'qwen3.5-0.8b', '--nps', '1', '64', '--no-hf']
runpy.run_path('bench_cuda.py', run_name='__main__')") ;;
    quant-bench) (cd benchmarks && step quant-bench 540 python3 bench_cuda_quant.py) ;;
    prefix) (cd benchmarks && step prefix 300 python3 bench_prefix_cache.py --device cuda --dtype float32 --turns 8 \
               --rounds 2) ;;
    tp) step tp 400 python3 -m pytest -q -x tests/cuda/test_cuda_tensor_parallel.py ;;
    tp-bench) (cd benchmarks && step tp-bench 540 python3 bench_cuda_tp.py) ;;
    *) echo "unknown step $1" ;;
  esac
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(graphs kernels quant engine ttft decode quant-bench prefix)
for group in "${steps[@]}"; do  # a+b+c: those steps at once (tests whose Triton compiles can share the host's cores)
  for s in ${group//+/ }; do run_step "$s" & done
  wait
done
for s in ${steps[@]//+/ }; do
  [ -f "$OUT/$s.log" ] && { echo "=== $s"; grep -v "^\s*$" "$OUT/$s.log" | tail -25; }
done
cat "$OUT/summary.log" 2>/dev/null
