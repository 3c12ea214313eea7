"""
C²R on a toy where splitting and absorption can be measured exactly.

    python train_toy.py                  # baseline vs C²R, every SAE kind, 3 seeds, < 60 s on 2 cores
    python train_toy.py --kind topk --lam 0.1 --seeds 0 1 2 3 4

The data are sums of known feature directions with known activations:
  - hierarchical families: a child can fire only when its parent fires. An SAE with a
    sparsity penalty saves a latent by folding the parent into the child's latent
    ("absorption"): the parent's own latent then stays silent exactly where it should fire.
  - independent features, as controls, with magnitudes that vary.
  - a dictionary wider than the ground truth, so a baseline can also spend spare
    latents on near-duplicates and parent+child composites ("splitting").
Every metric below is computed against the ground truth; README.md gives the formulas.
"""

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import c2r

# -----------------------------------------------------------------------------
# the synthetic data


@dataclass
class Toy:
    d_model: int = 40
    n_parents: int = 4
    n_children: int = 4          # per parent; at most one child fires at a time
    n_indep: int = 16
    p_parent: float = 0.15
    p_child: float = 0.6         # P(some child fires | parent fires)
    p_indep: float = 0.15
    mag_lo: float = 0.5          # active magnitudes ~ U[mag_lo, mag_hi]
    mag_hi: float = 1.5
    seed: int = 0

    @property
    def n_features(self):
        return self.n_parents * (1 + self.n_children) + self.n_indep


class ToyData:
    """Features are ordered [parents | children (parent-major) | independents].
    The directions G_GD are random unit vectors (seeded); with n_features > d_model they are
    in superposition, otherwise drawn orthonormal."""

    def __init__(self, toy: Toy):
        self.toy = t = toy
        g = torch.Generator().manual_seed(1000 + t.seed)
        n = t.n_features
        if n <= t.d_model:
            G = torch.linalg.qr(torch.randn(t.d_model, n, generator=g))[0].T
        else:
            G = F.normalize(torch.randn(n, t.d_model, generator=g), dim=1)
        self.G_GD = G.contiguous()
        self.parents = torch.arange(t.n_parents)
        self.children = t.n_parents + torch.arange(t.n_parents * t.n_children).view(t.n_parents, t.n_children)

    def sample(self, B, g):
        """Returns (x_BD, f_BG): activations and the true feature magnitudes."""
        t = self.toy
        f = torch.zeros(B, t.n_features)
        par = torch.rand(B, t.n_parents, generator=g) < t.p_parent
        f[:, : t.n_parents] = par.float()
        # given the parent: with prob p_child exactly one of its children, uniformly
        has_child = par & (torch.rand(B, t.n_parents, generator=g) < t.p_child)
        which = torch.randint(t.n_children, (B, t.n_parents), generator=g)
        kid = self.children[torch.arange(t.n_parents), which]             # [B, P] feature index
        f.scatter_(1, kid, has_child.float())
        f[:, -t.n_indep:] = (torch.rand(B, t.n_indep, generator=g) < t.p_indep).float() if t.n_indep else 0
        f *= t.mag_lo + (t.mag_hi - t.mag_lo) * torch.rand(B, t.n_features, generator=g)
        return f @ self.G_GD, f

    def batches(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(B, g)[0]


# -----------------------------------------------------------------------------
# exact metrics against the ground truth

MATCH = 0.5    # a latent "encodes" a feature when their directions have cosine >= this
OWN = 0.9      # ... and *is* that feature's own latent when cosine >= this (or it is the best match)


def cosines(W_dec_FD, G_GD):
    return F.normalize(W_dec_FD, dim=1) @ G_GD.T                            # [F, G]


def recovery(W_dec_FD, G_GD):
    """(mean over features of the best decoder cosine, fraction with best cosine >= 0.9)."""
    best = cosines(W_dec_FD, G_GD).max(0).values
    return best.mean().item(), (best >= 0.9).float().mean().item()


def splitting(W_dec_FD, G_GD, alive_F):
    """Mean over features encoded at all of the number of live latents with cosine >= MATCH
    to that feature. 1.0 is ideal; a near-duplicate latent or a parent+child composite
    (cosine 0.71 to each if equal-sized) raises it."""
    n = ((cosines(W_dec_FD, G_GD) >= MATCH) & alive_F[:, None]).sum(0).float()
    return n[n > 0].mean().item() if (n > 0).any() else float("nan")


def own_latents(W_dec_FD, g_D, alive_F):
    cos = F.normalize(W_dec_FD, dim=1) @ g_D
    cos = torch.where(alive_F, cos, -2.0)
    own = cos >= OWN
    own[cos.argmax()] = True
    return own & alive_F


def absorption(data, W_dec_FD, acts_NF, f_NG):
    """Per parent, on the samples where it and one of its children are active:
      full    = fraction where none of the parent's own latents fires;
      partial = mean share of the parent's projection sum_l a_l * max(cos(w_l, g_p), 0)
                carried by latents other than its own.
    Returns (mean full, mean partial) over parents that occur with a child."""
    alive = (acts_NF > 0).any(0)
    full, part = [], []
    for p in data.parents.tolist():
        both = (f_NG[:, p] > 0) & (f_NG[:, data.children[p]] > 0).any(1)
        if not both.any():
            continue
        g = data.G_GD[p]
        own = own_latents(W_dec_FD, g, alive)
        a = acts_NF[both]
        full.append((a[:, own] <= 0).all(1).float().mean().item())
        proj = a * (F.normalize(W_dec_FD, dim=1) @ g).clamp(min=0)               # [n, F]
        tot = proj.sum(1)
        other = proj[:, ~own].sum(1)
        part.append(torch.where(tot > 0, other / tot.clamp(min=1e-12), 1.0).mean().item())
    return float(np.mean(full)), float(np.mean(part))


@torch.no_grad()
def evaluate(sae, data, x, f):
    sae.eval()
    x_hat, acts, _ = sae(x)
    alive = (acts > 0).any(0)
    rec_mean, rec_09 = recovery(sae.W_dec_FD, data.G_GD)
    full, part = absorption(data, sae.W_dec_FD, acts, f)
    return dict(absorb=part, absorb_full=full, split=splitting(sae.W_dec_FD, data.G_GD, alive),
                recov=rec_mean, recov09=rec_09, fvu=c2r.fvu(x, x_hat).item(), l0=c2r.l0(acts).item(),
                dead=c2r.dead_fraction(acts).item())


# -----------------------------------------------------------------------------
# the experiment

def run(kind, lam, seed, args, toy):
    data = ToyData(Toy(**{**toy.__dict__, "seed": seed}))
    cfg = c2r.Config(d_model=toy.d_model, n_latents=args.width, kind=kind, k=args.k, l1_coeff=args.l1,
                     c2r_lambda=lam, c2r_alpha=args.alpha, steps=args.steps, lr=args.lr,
                     dead_tokens=args.batch * 200, nbr_every=args.nbr_every, seed=seed)
    torch.manual_seed(seed)
    sae, _ = c2r.train(c2r.SAE(cfg), data.batches(args.batch, seed), progress=False)
    x, f = data.sample(args.n_eval, torch.Generator().manual_seed(10_000 + seed))
    return evaluate(sae, data, x, f)


COLS = ["absorb", "absorb_full", "split", "recov", "recov09", "fvu", "l0", "dead"]


def table(rows):
    """rows: {(kind, lam): [metrics per seed]} -> printed mean ± std table."""
    head = f"{'kind':>10} {'lambda':>7} " + " ".join(f"{c:>15}" for c in COLS)
    lines = [head, "-" * len(head)]
    for (kind, lam), ms in rows.items():
        cells = []
        for c in COLS:
            v = np.array([m[c] for m in ms])
            cells.append(f"{v.mean():7.3f} ± {v.std():5.3f}")
        lines.append(f"{kind:>10} {lam:>7g} " + " ".join(f"{s:>15}" for s in cells))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="all", choices=["all", *c2r.KINDS])
    ap.add_argument("--lam", type=float, default=None, help="C²R lambda (default: per kind, see DEFAULT_LAM)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--width", type=int, default=80, help="SAE latents")
    ap.add_argument("--k", type=int, default=4, help="topk / batchtopk k")
    ap.add_argument("--l1", type=float, default=DEFAULT_L1, help="relu L1 coefficient")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-eval", type=int, default=8192)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nbr-every", type=int, default=c2r.Config.nbr_every, help="C²R neighbour refresh every R steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)   # the toy's matrices are tiny: more threads only add overhead
    kinds = c2r.KINDS if args.kind == "all" else [args.kind]
    toy = Toy()
    t0 = time.time()
    rows = {}
    for kind in kinds:
        lam = DEFAULT_LAM[kind] if args.lam is None else args.lam
        for l in (0.0, lam):
            rows[(kind, l)] = [run(kind, l, s, args, toy) for s in args.seeds]
    print(table(rows))
    print(f"{len(args.seeds)} seeds, {time.time() - t0:.1f} s")
    return rows


DEFAULT_LAM = dict(relu=0.1, topk=0.1, batchtopk=0.2)
DEFAULT_L1 = 0.3

if __name__ == "__main__":
    main()
