"""How often does a latent's C²R neighbour j(i) change during training? (README, Speed)

    OMP_NUM_THREADS=1 python results/nbr_churn.py --kind topk --seeds 0 1 2

Trains on the toy of train_toy.py (its defaults, C²R on, the exact R=1 table) and, before every
step, searches the neighbour table afresh. Prints, per phase of training, the fraction of
latents whose neighbour differs from the table of 1, 10, 100 steps before, and how much that
changes the penalty: a table refreshed every R steps is at most R-1 steps old. Last, whether a
list of each latent's m most similar latents, kept from `lag` steps before and re-ranked, would
still hold the true neighbour (a cheaper refresh than a full search, if it did)."""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import c2r  # noqa: E402
import train_toy  # noqa: E402

LAGS = (1, 10, 100)
CANDS = (2, 4, 8)


def churn(kind, lam, seed, args):
    toy = train_toy.Toy(seed=seed)
    data = train_toy.ToyData(toy)
    cfg = c2r.Config(d_model=toy.d_model, n_latents=args.width, kind=kind, k=args.k, c2r_lambda=lam,
                     steps=args.steps, lr=args.lr, dead_tokens=args.batch * 200, nbr_every=1, seed=seed)
    torch.manual_seed(seed)
    sae, tables, norms, decs, tops = c2r.SAE(cfg), [], [], [], []

    def batches():   # sees the SAE just before each step
        for x in data.batches(args.batch, seed):
            with torch.no_grad():
                tables.append(c2r.nearest_neighbours(sae.W_dec_FD))
                W = torch.nn.functional.normalize(sae.W_dec_FD, dim=1)
                tops.append((W @ W.T).fill_diagonal_(-float("inf")).topk(max(CANDS), dim=1).indices)
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
    # the true neighbour now is not among the top m of `lag` steps before
    Tk = torch.stack(tops)                                      # [steps, F, max m]
    missed = {(m, lag): (Tk[:-lag, :, :m] != T[lag:, :, None]).all(-1).float().mean(1).numpy()
              for m in CANDS for lag in LAGS}
    return changed, err, missed


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
    tables = [("% of latents whose neighbour differs from the table of `lag` steps before", 0, None),
              ("% error of C²R computed with the table of `lag` steps before", 1, None)]
    tables += [(f"% of latents whose neighbour is not among their top {m} of `lag` steps before", 2, m)
               for m in CANDS]
    for what, i, m in tables:
        print(what)
        print(f"{'steps':>12} " + " ".join(f"{'lag ' + str(g):>15}" for g in LAGS))
        for lo, hi in phases:
            cells = []
            for g in LAGS:
                if hi - g <= 0:
                    cells.append("-")
                    continue
                v = np.array([100 * r[i][g if m is None else (m, g)][max(lo - g, 0):hi - g].mean() for r in runs])
                cells.append(f"{v.mean():6.2f} ± {v.std():5.2f}")
            print(f"{f'{lo}-{hi}':>12} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
