#!/usr/bin/env bash
# Every GPU number of the README, as the one prepared script for a session with an H200:
#
#     OUT=/some/dir bash results/gpu.sh       # about 9 minutes expected; 17 at most (the parts'
#                                             # timeouts): over one device call's 10 and a session's
#                                             # 15, so run it as two calls, ONLY="pieces wide" first
#     SMALL=1 OUT=/tmp/g bash results/gpu.sh  # the same, tiny, on a CPU: to try this script itself
#     ONLY="pieces wide" OUT=... bash ...      # only these parts (bench wide pieces profile gpt2)
#
# 1. bench.py at its GPU sizes (README, Speed): the step table at 24,576 and 65,536 latents and
#    c2r_loss alone up to 131,072 (`ours + C²R`: the default rolling search, R = 11 / 14 at 24k /
#    65k at bench.py's lr 2e-4 / sqrt(F / 16,384), timed against its twin without C²R, and its
#    penalty error); then that ratio and error at 4,096 / 262,144 / 1,048,576
#    latents (issue 12: <= 10 % of the step at every width; 1,048,576 without the error, whose exact
#    fp32 searches alone take minutes); then the rolling search's per-step pieces (heading, slice search,
#    rerank with the hot set, penalty) from 4,096 to 1,048,576 latents, at R = 1 (no hot set), and
#    without the hot set at R = 8, m = 16 (the old default from 8,192 latents) and R = 32, m = 128
#    (pieces.txt); then a torch.profiler table of each row (packed into profile.tgz).
# 2. train_gpt2.py's defaults (BatchTopK, 24,576 latents, k=32, 10M tokens per SAE, layer 8) on
#    GPT-2 small's architecture with random weights and random tokens (no weights or text can be
#    reached there), for its throughput, peak memory and wall time (README, GPT-2 small). With
#    GPT-2's tokenizer in .tok/gpt2 (vocab.json + merges.txt; carry .tok), the letter-probe
#    evaluation runs and is timed too (its numbers mean nothing on a random model).
#
# $OUT gets 8 files at most (the device tool brings back 8): env.txt, bench.txt, bench.json,
# bench_wide.txt, pieces.txt, profile.tgz, gpt2_log.txt, gpt2_results.json. Checkpoints stay on the machine.
# A part that fails or runs out of time says so in its file, and the next part still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out_gpu}
RUN=${RUN:-/tmp/c2r_gpu_run}
mkdir -p "$OUT" "$RUN"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1     # no Hub there: fail at once instead of retrying
BENCH=() GPT2=()
if [ -n "${SMALL:-}" ]; then                   # seconds on a CPU, every code path of the big run
    BENCH=(--device cpu --d-model 32 --n-latents 512 --batch 64 --k 4 --steps 2 --warmup 1 --c2r-latents 512)
    GPT2=(--device cpu --tokens 4096 --batch 512 --n-latents 256 --eval-tokens 512 --buffer 8192
          --model-batch 8 --probe-words 300)
fi
ONLY=${ONLY:-bench wide pieces profile gpt2}
on() { [[ " $ONLY " == *" $1 "* ]]; }
for p in $ONLY; do [[ " bench wide pieces profile gpt2 " == *" $p "* ]] || { echo "ONLY: no part $p"; exit 2; }; done
part() {     # part SECONDS FILE COMMAND...: run with a time limit, keep the output, go on whatever happens
    local s=$1 f=$2; shift 2
    timeout "$(( s + 30 ))" "$@" 2>&1 | tee "$f"     # a pipe, so the file is whole when part returns
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 0 ] || echo "!! exit status $rc (124: out of time) for: $*" | tee -a "$f"
}

{ date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| cuda', torch.version.cuda,
              '| gpu', torch.cuda.is_available(), '| transformers', transformers.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

on bench && part 150 "$OUT/bench.txt" python3 bench.py --out "$OUT/bench.json" "${BENCH[@]}"
WIDE=(--n-latents 4096 262144 --steps 20 --warmup 5 --err-steps 3) HUGE=(--n-latents 1048576 --steps 10 --warmup 3 --err-steps 0)
PIECES=(--parts-latents 4096 24576 65536 262144 1048576) EXACT=(--parts-latents 4096 24576 65536)
if [ -n "${SMALL:-}" ]; then     # 2,048: R = 4, the look-ahead runs
    WIDE=(--n-latents 256 2048 --steps 3 --warmup 1 --err-steps 2) HUGE=(--n-latents 4096 --steps 2 --warmup 1 --err-steps 0)
    PIECES=(--parts-latents 256 2048) EXACT=(--parts-latents 256)
fi
if on pieces; then
    part 60 "$OUT/pieces.txt" python3 bench.py "${BENCH[@]}" --n-latents --c2r-latents "${PIECES[@]}"
    part 40 "$RUN/exact.txt" python3 bench.py "${BENCH[@]}" --n-latents --c2r-latents --nbr-every 1 "${EXACT[@]}"
    cat "$RUN/exact.txt" >> "$OUT/pieces.txt"
    for rmh in "8 16 0" "32 128 0"; do     # no hot set: the old default; m = 4 R (refresh.md, 7th pass)
        read -r R M H <<< "$rmh"
        part 60 "$RUN/rm.txt" python3 bench.py "${BENCH[@]}" --n-latents --c2r-latents --nbr-every "$R" \
            --nbr-cands "$M" --nbr-hot "$H" "${PIECES[@]}"
        cat "$RUN/rm.txt" >> "$OUT/pieces.txt"
    done
fi
if on wide; then
    part 60 "$OUT/bench_wide.txt" python3 bench.py "${BENCH[@]}" --c2r-latents --rows "ours + C²R" "${WIDE[@]}"
    part 120 "$RUN/huge.txt" python3 bench.py "${BENCH[@]}" --c2r-latents --rows "ours + C²R" "${HUGE[@]}"
    cat "$RUN/huge.txt" >> "$OUT/bench_wide.txt"
fi
if on profile; then
    rm -rf "$RUN/profile"                      # a warm machine keeps $RUN: nothing of an earlier call
    part 30 "$RUN/profile.txt" python3 bench.py "${BENCH[@]}" --c2r-latents --steps 10 --warmup 5 --profile "$RUN/profile"
    mkdir -p "$RUN/profile" && mv "$RUN/profile.txt" "$RUN/profile/" && tar czf "$OUT/profile.tgz" -C "$RUN" profile
fi

TOK=()
if [ -d .tok/gpt2 ]; then TOK=(--tokenizer .tok/gpt2); fi
if on gpt2; then
    rm -rf "$RUN/gpt2"
    t0=$(date +%s%N)
    part 170 "$OUT/gpt2_log.txt" python3 train_gpt2.py --random-init --data random "${TOK[@]}" --out "$RUN/gpt2" --quiet "${GPT2[@]}"
    echo "wall time of the whole train_gpt2.py command: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/gpt2_log.txt"
    cp "$RUN/gpt2/results.json" "$OUT/gpt2_results.json" 2>/dev/null || echo "no results.json" | tee -a "$OUT/gpt2_log.txt"
fi
true
