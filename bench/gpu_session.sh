#!/usr/bin/env bash
# The GPU checks of one lent-device session, in priority order, each bounded in time so that a slow
# part cannot eat the next (a session has about 15 minutes of device time, start-up included).
#
#   1. the CUDA paths through the CLI on the tiny model: fp16 (GradScaler) and bf16 with LoRA, full
#      fine-tuning in both trainer compute paths (half_copy, autocast), gradient checkpointing,
#      4-bit (bitsandbytes NF4), asynchronous rollouts (--max-staleness 1: the sampler process on the GPU,
#      never run on one yet); a line per run with the mismatch, loss scale and skipped steps;
#   2. bench/gpu_step.py at the seed's shape (prompt 8,600 + 8 x 1,024 tokens, LoRA r=1) on a
#      1B-shaped random Llama, fp16 and bf16, the trainer's prompt shared (the default) and not; then
#      an 8B-shaped one in fp16 (SIZES=1b skips it).
# First the trainer's shared-prompt forward against the plain one on the GPU's kernels
# (bench/prompt_forward_check.py).
#
# Runs from the repository root with the image's torch/transformers; packages the image lacks (or has
# too old: transformers >= 5.24) come as wheels in .whl/ (git-ignored via .git/info/exclude), fetched
# on the dev machine with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl transformers==5.24.0 peft==0.21.2 datasets==5.2.0 bitsandbytes==0.50.2 dill multiprocess
# (56 MB). Results go to $OUT (or /tmp/gpu_out). On a CPU:
# WHEELS=0 DEVICE=cpu SEED_SHAPE=0 bash bench/gpu_session.sh (the 4-bit runs are refused there).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FP16RL_HOME=/tmp/fp16rl_home
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

summary() {  # one line per run: steps, last mismatch, loss scale, skipped steps, loss finite
  python3 - "$1" <<'EOF'
import math, sys
from fp16rl.runs.tracking import read_metrics
rows = read_metrics(sys.argv[1] + "/metrics.jsonl")
if not rows:
    print("    no metrics"); sys.exit()
last = rows[-1]
print(f"    steps {len(rows)}, |log pi - log mu| {last['mismatch/logp_abs_diff_mean']:.2e}, "
      f"kl_k3 {last['mismatch/token_kl_k3']:.2e}, loss scale {last['optim/loss_scale']:g}, "
      f"skipped {last['optim/skipped_steps_total']:g}, losses finite {all(math.isfinite(r['optim/loss']) for r in rows)}, "
      f"step {last['time/step_s']:.2f} s")
EOF
}

echo "== 0. shared-prompt trainer forward vs plain, tiny model"
timeout 90 python3 bench/prompt_forward_check.py --device "${DEVICE:-cuda}" 2>&1 | grep -v -i "warn\|loading"

echo "== 1. CUDA paths, tiny model"
i=0
while read -r args; do
  i=$((i + 1))
  run="/tmp/fp16rl_cuda_runs/run$i"
  echo "-- train $args"
  timeout 60 python3 -m fp16rl train --model-path tiny --device "${DEVICE:-cuda}" --max-steps 3 --num-generations 4 \
    --prompts-per-step 2 --max-completion-length 48 --report-to none --output-dir "$run" $args \
    >"$OUT/run$i.log" 2>&1 && summary "$run" || { echo "    FAILED (rc $?)"; tail -5 "$OUT/run$i.log"; }
done <<'EOF'
--dtype float16
--dtype bfloat16
--dtype float16 --gradient-checkpointing
--dtype float16 --lora-r 0
--dtype bfloat16 --lora-r 0
--dtype float16 --lora-r 0 --trainer-compute autocast --gradient-checkpointing
--dtype float16 --load-in-4bit
--dtype bfloat16 --load-in-4bit --gradient-checkpointing
--dtype float16 --max-staleness 1 --decoupled-loss --is-correction token_truncate
EOF

[ "${SEED_SHAPE:-1}" = 1 ] || exit 0
echo "== 2. bench/gpu_step.py at the seed's shape ($SECONDS s in)"
timeout 200 python3 bench/gpu_step.py --size 1b --prompt-tokens 8600 --completion-tokens 1024 --generations 8 \
  --lora-r 1 --steps 1 --warmup-steps 1 --output-json "$OUT/gpu_step_1b.json" 2>&1 | grep -v Warning
timeout 120 python3 bench/gpu_step.py --size 1b --prompt-tokens 8600 --completion-tokens 1024 --generations 8 \
  --lora-r 1 --steps 1 --warmup-steps 1 --dtypes float16 --no-share-prompt-forward \
  --output-json "$OUT/gpu_step_1b_plain.json" 2>&1 | grep -v Warning
[ "${SIZES:-1b,8b}" = 1b ] && exit 0
timeout 330 python3 bench/gpu_step.py --size 8b --prompt-tokens 8600 --completion-tokens 1024 --generations 8 \
  --lora-r 1 --steps 1 --warmup-steps 0 --dtypes float16 --output-json "$OUT/gpu_step_8b.json" 2>&1 | grep -v Warning
echo "== done ($SECONDS s)"
