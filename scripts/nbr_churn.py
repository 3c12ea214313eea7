"""How often does a latent's C²R neighbour j(i) change during training? (README, Speed)

    OMP_NUM_THREADS=1 python scripts/nbr_churn.py --kind topk --seeds 0 1 2

Trains on the toy of train_toy.py (its defaults, C²R on, the exact R=1 table) and, before every
step, searches the neighbour table afresh. Prints, per phase of training, the fraction of
latents whose neighbour differs from the table of 1, 10, 100 steps before, and how much that
changes the penalty: a table refreshed every R steps is at most R-1 steps old."""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import c2r  # noqa: E402
import train_toy  # noqa: E402

LAGS = (1, 10, 100)


def churn(kind, lam, seed, args):
    toy = train_toy.Toy(seed=seed)
    data = train_toy.ToyData(toy)
    cfg = c2r.Config(d_model=toy.d_model, n_latents=args.width, kind=kind, k=args.k, c2r_lambda=lam,
                     steps=args.steps, lr=args.lr, dead_tokens=args.batch * 200, nbr_every=1, seed=seed)
    torch.manual_seed(seed)
    sae, tables, norms, decs = c2r.SAE(cfg), [], [], []

    def batches():   # sees the SAE just before each step
        for x in data.batches(args.batch, seed):
            with torch.no_grad():
                tables.append(c2r.nearest_neighbours(sae.W_dec_FD))
                norms.append(torch.linalg.vector_norm(sae.encode(x), dim=0))
                decs.append(sae.W_dec_FD.detach().clone())
            yield x

    c2r.train(sae, batches(), progress=False)
    T = torch.stack(tables)                                     # [steps, F]
    changed = {lag: (T[lag:] != T[:-lag]).float().mean(1).numpy() for lag in LAGS}
    # what a stale table does to the penalty: |C²R(table of lag steps ago) / C²R(fresh) - 1|
    err = {}
    for lag in LAGS:
        e = []
        for t in range(lag, len(T)):
            fresh = c2r.c2r_penalty(norms[t], decs[t], T[t]).item()
            stale = c2r.c2r_penalty(norms[t], decs[t], T[t - lag]).item()
            e.append(abs(stale / fresh - 1) if fresh > 0 else 0.0)
        err[lag] = np.array(e)
    return changed, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="topk", choices=c2r.KINDS)
    ap.add_argument("--lam", type=float, default=None, help="default: train_toy.DEFAULT_LAM")
    ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    lam = train_toy.DEFAULT_LAM[args.kind] if args.lam is None else args.lam
    runs = [churn(args.kind, lam, s, args) for s in args.seeds]
    n = args.steps
    phases = [(0, n // 10), (n // 10, n // 2), (n // 2, n)]
    print(f"{args.kind}, lambda {lam}, {args.width} latents, {n} steps, seeds {args.seeds}, mean ± std over seeds")
    for what, i in (("% of latents whose neighbour differs from the table of `lag` steps before", 0),
                    ("% error of C²R computed with the table of `lag` steps before", 1)):
        print(what)
        print(f"{'steps':>12} " + " ".join(f"{'lag ' + str(g):>15}" for g in LAGS))
        for lo, hi in phases:
            cells = []
            for g in LAGS:
                if hi - g <= 0:
                    cells.append("-")
                    continue
                v = np.array([100 * r[i][g][max(lo - g, 0):hi - g].mean() for r in runs])
                cells.append(f"{v.mean():6.2f} ± {v.std():5.2f}")
            print(f"{f'{lo}-{hi}':>12} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
