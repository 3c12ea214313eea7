#!/usr/bin/env bash
# The GPU numbers of README's Speed section, as one short script for a session with a GPU (H200):
#     bash scripts/gpu_bench.sh                # writes $OUT/env.txt, bench.txt, bench.json, bench_R50.txt, profile.txt, profile.tgz
# Extra arguments go to bench.py; the tiny CPU check of this script itself:
#     OUT=/tmp/gb bash scripts/gpu_bench.sh --device cpu --d-model 32 --latents 512 --batch 64 --k 4 \
#         --steps 2 --c2r-latents 512
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
    git log -1 --format='commit %H %s' 2>/dev/null || true
} > "$OUT/env.txt"
cat "$OUT/env.txt"
# the whole table (estimated 2-4 minutes on an H200, untested there), then a profile of each row
python bench.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
# C²R's cost against the refresh period R (the default is 10): the search is paid once every R steps
python bench.py --c2r-latents --rows "ours + C²R" --nbr-every 50 "$@" 2>&1 | tee "$OUT/bench_R50.txt"
python bench.py --c2r-latents --steps 10 --warmup 5 --profile "$OUT/profile" "$@" > "$OUT/profile.txt" 2>&1 || echo "profile run failed: see $OUT/profile.txt"
# the device tool brings back at most 8 files: pack the per-row profiles into one
[ -d "$OUT/profile" ] && tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -r "$OUT/profile"
true
