#!/usr/bin/env bash
# Everything pagedjax checks on a GPU, in one run from the repository root:
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh [seconds]   # all stages within seconds
#   STAGES="kernels_f32 kernels_bf16" bash benchmarks/gpu_check.sh  # only these
#
# 1. the engine end to end on a random-weight model of the default model's shape
#    (benchmarks/random_model.py; the 98 MB GGUF need not be on the machine):
#    benchmarks/throughput.py with the Pallas kernel and the reference attention, HF
#    transformers on CUDA beside them, bfloat16 decode-heavy; then 1 and 8 decode steps
#    per device call, each with and without async scheduling (the host overhead when
#    calls overlap host work); benchmarks/gpu_timeline.py, which splits such a pass's
#    time, probes whether dispatch waits for the device and checks the replayed device
#    time against a profiler trace; the mixed workload with 1 and 8 steps; float32 mixed
#    (half the prompts), where the two attention backends' greedy tokens should agree;
# 2. the Pallas kernel compiled by Triton against the jnp reference, per step bucket, timed
#    (benchmarks/pallas_kernel.py): float32 at the default model's attention shape (9 query /
#    3 KV heads of 64), bfloat16 at a Llama-8B one (32 / 8 heads of 128).
#
# Written for a machine with JAX (CUDA), torch, transformers and flax already installed
# and no network: pagedjax is put on PYTHONPATH in its installed layout (kernels/ and
# models/ become pagedjax.kernels / pagedjax.models) and wheels under .whl/ (gguf, a
# dependency the loaders import) are installed offline when present. Each stage runs under
# its own time limit, so a failing one leaves the others' results; logs and JSON go to $OUT
# and a summary is printed last.
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${1:-600}
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

site=/tmp/pagedjax_site
rm -rf "$site" && mkdir -p "$site"
cp -r pagedjax "$site/" && cp -r kernels "$site/pagedjax/kernels" && cp -r models "$site/pagedjax/models"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD"

{
  nvidia-smi -L
  python3 -c 'import jax, jaxlib, flax, torch, transformers; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "torch", torch.__version__, "transformers", transformers.__version__); print(jax.devices())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

declare -a SUMMARY
STAGES=${STAGES:-random_model throughput_bf16 multi_step_bf16 timeline mixed_bf16 throughput_f32 kernels_f32 kernels_bf16}
stage() {  # stage NAME SECONDS COMMAND...: run with a limit that also respects the budget
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  local left=$((BUDGET - (SECONDS - START) - 15))
  ((limit > left)) && limit=$left
  if ((limit < 30)); then SUMMARY+=("$name: skipped (budget)"); return; fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name: rc=$rc in $((SECONDS - t0))s")
}

# float32 stages ask JAX for full float32 dots: on a GPU its default lets XLA use TF32 (the
# reference attention would then differ from the kernel's float32 dots by ~1e-3).
F32="env JAX_DEFAULT_MATMUL_PRECISION=highest"
stage random_model 60 python3 benchmarks/random_model.py /tmp/smollm2-shape
stage throughput_bf16 200 python3 benchmarks/throughput.py --model /tmp/smollm2-shape \
  --dtype bfloat16 --workload decode-heavy --attention-backend pallas,reference --out /tmp/tp_bf16
cp /tmp/tp_bf16/throughput.json "$OUT/throughput_bf16.json" 2>/dev/null
stage multi_step_bf16 200 python3 benchmarks/throughput.py --model /tmp/smollm2-shape \
  --dtype bfloat16 --workload decode-heavy --attention-backend pallas \
  --num-scheduler-steps 1,8 --async-scheduling off,on --skip-hf --out /tmp/tp_multi
cp /tmp/tp_multi/throughput.json "$OUT/multi_step_bf16.json" 2>/dev/null
stage timeline 150 sh -c "python3 benchmarks/gpu_timeline.py /tmp/smollm2-shape \
  --num-scheduler-steps 1 --async-scheduling; python3 benchmarks/gpu_timeline.py \
  /tmp/smollm2-shape --num-scheduler-steps 8"
stage mixed_bf16 150 python3 benchmarks/throughput.py --model /tmp/smollm2-shape \
  --dtype bfloat16 --workload mixed --attention-backend pallas \
  --num-scheduler-steps 1,8 --skip-hf --out /tmp/tp_mixed
cp /tmp/tp_mixed/throughput.json "$OUT/mixed_bf16.json" 2>/dev/null
stage throughput_f32 150 $F32 python3 benchmarks/throughput.py --model /tmp/smollm2-shape \
  --dtype float32 --workload mixed --scale 0.5 --attention-backend pallas,reference --skip-hf \
  --out /tmp/tp_f32
cp /tmp/tp_f32/throughput.json "$OUT/throughput_f32.json" 2>/dev/null
stage kernels_f32 100 $F32 python3 benchmarks/pallas_kernel.py --dtype float32 --num-heads 9 \
  --num-kv-heads 3 --head-dim 64 --iters 20
stage kernels_bf16 120 python3 benchmarks/pallas_kernel.py --dtype bfloat16 --iters 20

for name in throughput_bf16 multi_step_bf16 timeline mixed_bf16 throughput_f32 kernels_f32 kernels_bf16; do
  echo "---- $name"
  grep -v -i "warn\|loading weights\|deprecat" "$OUT/$name.log" 2>/dev/null | tail -n 24
done
echo "---- stages"
printf '%s\n' "${SUMMARY[@]}"
