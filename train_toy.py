"""
C²R on a toy where splitting and absorption can be measured exactly.

    python train_toy.py                  # baseline vs C²R: relu, topk, batchtopk, 3 seeds, 1–2 min on 2 cores
    python train_toy.py --kind topk --c2r-lambda 0.1 --seeds 0 1 2 3 4

The data are sums of known feature directions with known activations:
  - hierarchical families: a child can fire only when its parent fires. An SAE with a
    sparsity penalty saves a latent by folding the parent into the child's latent
    ("absorption"): the parent's own latent then stays silent exactly where it should fire.
  - independent features, as controls, with magnitudes that vary.
  - a dictionary wider than the ground truth, so a baseline can also spend spare
    latents on near-duplicates and parent+child composites ("splitting").
Every metric below is computed against the ground truth; results/README.md gives the formulas.
"""

import argparse
import math
import os
import sys
import tempfile
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
        f[:, t.n_features - t.n_indep:] = (torch.rand(B, t.n_indep, generator=g) < t.p_indep).float()
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
# cross-run stability: do two runs learn the same latents?

def assign(S):
    """Exact maximum-weight one-to-one matching of the rows of S [n, m] (n <= m) to columns:
    the Hungarian algorithm with potentials (Kuhn-Munkres, as in Jonker-Volgenant's shortest
    augmenting paths), O(n^2 m), the inner loop over columns in numpy. Returns col[n].
    (scipy.optimize.linear_sum_assignment does the same; scipy is not a dependency.)"""
    C = -np.asarray(S, dtype=np.float64)             # maximise S = minimise -S
    n, m = C.shape
    if n > m:
        raise ValueError(f"assign wants no more rows than columns, got {n} x {m}: pass S.T")
    u, v = np.zeros(n + 1), np.zeros(m + 1)          # dual potentials; index 0 is a virtual column
    row_of = np.zeros(m + 1, dtype=np.int64)         # row_of[j]: 1-based row matched to column j, 0 = free
    for i in range(1, n + 1):                        # add rows one at a time, each by one augmenting path
        row_of[0], j0 = i, 0
        minv, way = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=np.int64)
        used = np.zeros(m + 1, dtype=bool)
        while row_of[j0] != 0:                       # Dijkstra on reduced costs until a free column
            used[j0] = True
            i0, free = row_of[j0], ~used
            cur = C[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (cur < minv[1:])
            minv[1:][better], way[1:][better] = cur[better], j0
            j1 = 1 + np.where(free[1:], minv[1:], np.inf).argmin()
            delta = minv[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
        while j0:                                    # flip the path's edges
            j1 = way[j0]
            row_of[j0], j0 = row_of[j1], j1
    col = np.empty(n, dtype=np.int64)
    col[row_of[1:][row_of[1:] > 0] - 1] = np.nonzero(row_of[1:])[0]
    return col


def stability(W_a_FD, W_b_FD, alive_a=None, alive_b=None, thr=0.9):
    """Match the live latents of two SAEs one to one by decoder cosine (exact, assign()) and
    return (fraction matched at cosine >= thr, mean matched cosine, number matched at >= thr).
    The fraction is over the larger of the two live sets, so a latent left without a partner
    counts as unmatched; the number is there because an SAE with fewer live latents scores a
    higher fraction with the same number of stable ones."""
    A = F.normalize(W_a_FD[alive_a] if alive_a is not None else W_a_FD, dim=1)
    B = F.normalize(W_b_FD[alive_b] if alive_b is not None else W_b_FD, dim=1)
    S = (A @ B.T).double().numpy() if len(A) <= len(B) else (B @ A.T).double().numpy()
    cos = S[np.arange(len(S)), assign(S)]
    n = int((cos >= thr).sum())
    return n / max(len(A), len(B)), float(cos.mean()), n


# -----------------------------------------------------------------------------
# the experiment

DEFAULT_LAM = dict(relu=0.1, topk=0.1, batchtopk=0.2, matryoshka=0.2)   # C²R lambda; matryoshka: BatchTopK's


def matryoshka_prefixes(n_latents):
    """Nested prefixes F/16, F/8, F/4, F/2, F: Bussmann et al.'s groups of F/16, F/16, F/8, F/4, F/2."""
    return tuple(sorted({max(1, n_latents // d) for d in (16, 8, 4, 2, 1)}))


def config(kind, lam, seed, args, toy):
    """One run's c2r.Config (the flags carry its field names); check() builds every run's first."""
    return c2r.Config(d_model=toy.d_model, n_latents=args.n_latents, kind=kind, k=args.k, l1_coeff=args.l1_coeff,
                      prefixes=matryoshka_prefixes(args.n_latents) if kind == "matryoshka" else (),
                      c2r_lambda=lam, c2r_alpha=args.c2r_alpha, steps=args.steps, lr=args.lr,
                      dead_tokens=args.batch * 200, nbr_every=args.nbr_every, seed=seed)


def run(kind, lam, seed, args, toy, sae_seed=None):
    """Train one SAE on the toy drawn with `seed` -> (metrics, decoder, which latents fire on the
    evaluation set). sae_seed (default: seed) sets the SAE's init and data order: another sae_seed
    on the same toy is the 'same SAE, another run' of the stability measurement."""
    sae_seed = seed if sae_seed is None else sae_seed
    data = ToyData(Toy(**{**toy.__dict__, "seed": seed}))
    torch.manual_seed(sae_seed)
    sae = c2r.SAE(config(kind, lam, sae_seed, args, toy))
    sae, _ = c2r.train(sae, data.batches(args.batch, sae_seed), progress=False)
    x, f = data.sample(args.n_eval, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        return evaluate(sae, data, x, f), sae.W_dec_FD.detach().clone(), (sae.encode(x) > 0).any(0)


def run_job(job):
    """One (kind, lam, seed, args, toy) job -> metrics; with args.stability, the run's twin
    (same toy, another SAE seed and data order) is trained too and the two are matched."""
    kind, lam, seed, args, toy = job
    m, W_a, alive_a = run(kind, lam, seed, args, toy)
    if args.stability:
        _, W_b, alive_b = run(kind, lam, seed, args, toy, sae_seed=1000 + seed)
        m["stab09"], m["stab_cos"], m["stab09_n"] = stability(W_a, W_b, alive_a, alive_b)
        # chance: the same statistic for unrelated random dictionaries of the same live sizes
        g = torch.Generator().manual_seed(seed)
        m["chance_cos"] = stability(torch.randn(int(alive_a.sum()), toy.d_model, generator=g),
                                    torch.randn(int(alive_b.sum()), toy.d_model, generator=g))[1]
    return m


def run_all(jobs, n_jobs):
    """Run jobs in order, or over n_jobs worker processes (spawned: a fresh torch each) with one
    thread each, so N workers share N cores without fighting over them. imap, not map: a job is
    reported once it and those before it are done, and the results keep the jobs' order."""
    pool, t0, out, every = None, time.time(), [], -(-len(jobs) // 20)    # about 20 lines at most
    if n_jobs > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(n_jobs, initializer=torch.set_num_threads, initargs=(1,))
    try:
        for (kind, lam, seed, a, _), m in zip(jobs, pool.imap(run_job, jobs) if pool else map(run_job, jobs)):
            out.append(m)     # on stderr, so that stdout holds the table alone
            what = f"{kind} {f'l1-coeff {a.l1_coeff:g}' if kind == 'relu' else f'k {a.k}'} λ {lam:g} seed {seed}"
            if not m["fvu"] <= 1:                      # NaN too
                print(f"warning: {what}: final FVU {m['fvu']:.3f} > 1, worse than predicting the mean", file=sys.stderr)
            if len(out) % every == 0 or len(out) == len(jobs):
                print(f"[{len(out):{len(str(len(jobs)))}}/{len(jobs)}] {what}: absorb {m['absorb']:.3f} split "
                      f"{m['split']:.3f} fvu {m['fvu']:.3f}  {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()     # let the workers exit on their own: terminate() would leak their locks
            pool.join()
    return out


COLS = ["absorb", "absorb_full", "split", "recov09", "fvu", "l0", "dead"]   # "recov" is in rows, not printed
LEGEND = "absorb(_full): partial (full) absorption; split: latents per feature; recov09: features at cos≥.9"
STAB_COLS = ["stab09", "stab09_n", "stab_cos", "chance_cos"]
STAB_LEGEND = "stab09(_n): share (number) matched at cos≥.9 by a 2nd run; stab_cos: mean cos; chance_cos: random"


def table(rows, cols=COLS, names=("kind", "λ"), group=0):
    """rows: {key: [metrics per seed]} -> a line per key, each metric as mean±std over the seeds.
    group=n: the first n parts of the key become a title line above their rows, not a column."""
    keys = [[k if isinstance(k, str) else f"{k:g}" for k in key[group:]] for key in rows]
    cells = [[f"{np.mean([m[c] for m in ms]):.3f}±{np.std([m[c] for m in ms]):.3f}" for c in cols]
             for ms in rows.values()]
    wk = [max(map(len, c)) for c in zip(names, *keys)]          # each column as wide as its widest cell
    wc = [max(map(len, c)) for c in zip(cols, *cells)]

    def line(ks, cs):
        return " ".join(f"{k:<{w}}" for k, w in zip(ks, wk)) + " " + " ".join(f"{c:>{w}}" for c, w in zip(cs, wc))
    out, title = [line(names, cols), "-" * len(line(names, cols))], None
    for key, ks, cs in zip(rows, keys, cells):
        if group and key[:group] != title:
            title = key[:group]
            out.append(", ".join(map(str, title)) + ":")
        out.append(line(ks, cs))
    return "\n".join(out)


# -----------------------------------------------------------------------------
# the grids: the default, --compare (Matryoshka too, on two toys) and --sweep (trade-off curves)

# in the spirit of Nabeshima's Matryoshka toy (github.com/noanabeshima/matryoshka-saes, tree.json):
# 3 parents (p=0.15), each with 3 mutually exclusive children (p=0.2 each given the parent, so
# 0.6 for some child), 8 independent features (p=0.05), binary magnitudes, 20 orthogonal directions
# in 20 dimensions. Its SAE: 40 latents, k=2 (the toy has 1.1 active features per sample, ours 3.4).
NABESHIMA = Toy(d_model=20, n_parents=3, n_children=3, n_indep=8, p_parent=0.15, p_child=0.6,
                p_indep=0.05, mag_lo=1.0, mag_hi=1.0)
NABESHIMA_SAE = dict(n_latents=40, k=2)


def grid(args):
    """[(key, kind, lam, flags it overrides, toy)]. Default: baseline and C²R, per kind. --compare: the
    same for batchtopk and matryoshka on two toys, each run twice (stability). --sweep: each method's
    sparsity knob (k; L1 for ReLU) and C²R's lambda at the default k, key = (method, knob, value).
    BatchTopK fixes L0 = k, so '+ C²R' at the same k is C²R at matched L0."""
    lam = {kind: DEFAULT_LAM[kind] if args.c2r_lambda is None else args.c2r_lambda for kind in DEFAULT_LAM}
    if args.compare:
        return [((name, kind, l), kind, l, {**over, "stability": True}, toy)
                for name, toy, over in [("toy ours", Toy(), {}), ("toy nabeshima", NABESHIMA, NABESHIMA_SAE)]
                for kind in ("batchtopk", "matryoshka") for l in (0.0, lam[kind])]
    if not args.sweep:
        kinds = ("relu", "topk", "batchtopk") if args.kind == "all" else [args.kind]   # matryoshka: --compare
        return [((kind, l), kind, l, {}, Toy()) for kind in kinds for l in (0.0, lam[kind])]
    ks = sorted({max(1, round(args.k * f)) for f in (0.5, 0.75, 1, 1.5, 2)})
    out = [((method, "k", k), kind, l, dict(k=k), Toy()) for method, kind, l in
           [("BatchTopK", "batchtopk", 0.0), ("BatchTopK+C2R", "batchtopk", lam["batchtopk"]),
            ("Matryoshka", "matryoshka", 0.0), ("Matryoshka+C2R", "matryoshka", lam["matryoshka"])] for k in ks]
    out += [(("C2R-lambda", "c2r-lambda", lam["batchtopk"] * f), "batchtopk", lam["batchtopk"] * f, {}, Toy())
            for f in (0.1, 0.3, 1, 3, 10)]
    return out + [((method, "l1-coeff", args.l1_coeff * f), "relu", l, dict(l1_coeff=args.l1_coeff * f), Toy())
                  for method, l in (("ReLU", 0.0), ("ReLU+C2R", lam["relu"])) for f in (0.25, 0.5, 1, 2, 4)]


def plot_sweep(rows, path):
    """One curve per method: each metric against FVU, mean ± std over seeds. Needs matplotlib."""
    panels = [("absorb", "absorption"), ("absorb_full", "full absorption"), ("split", "splitting")]
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(key[0] for key in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.6))
    for ax, (col, title) in zip(axes, panels):
        for i, method in enumerate(methods):
            pts = [(key, ms) for key, ms in rows.items() if key[0] == method]
            x = np.array([[m["fvu"] for m in ms] for _, ms in pts])
            y = np.array([[m[col] for m in ms] for _, ms in pts])
            dashed = method.endswith("C2R") or method == "C2R-lambda"
            ax.errorbar(x.mean(1), y.mean(1), xerr=x.std(1), yerr=y.std(1), marker="os^vDP<"[i % 7],
                        ms=4, capsize=2, lw=1.2, ls="--" if dashed else "-", label=method)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no crowded labels within a decade
        ax.set_xlabel("FVU (log scale)")
        ax.set_title(f"{title} vs FVU (lower left is better)", fontsize=10)
        ax.grid(alpha=0.3)
    n = len(next(iter(rows.values())))
    fig.suptitle(f"train_toy.py --sweep: one curve per method across its knob (k, λ or L1), "
                 f"mean ± std over {n} seed{'s' * (n > 1)}", fontsize=11)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(methods), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="all", choices=["all", *c2r.KINDS], help="all: relu, topk and batchtopk")
    ap.add_argument("--c2r-lambda", type=float, default=None, help="C²R weight λ (default: per kind, DEFAULT_LAM)")
    ap.add_argument("--c2r-alpha", type=float, default=1.0, help="C²R exponent α")
    ap.add_argument("--n-latents", type=int, default=80, help="SAE latents")
    ap.add_argument("--k", type=int, default=4, help="topk / batchtopk k")
    ap.add_argument("--l1-coeff", type=float, default=0.3, help="relu L1 coefficient")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-eval", type=int, default=8192, help="held-out samples the metrics are computed on")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nbr-every", type=int, default=c2r.Config.nbr_every,
                    help="C²R search period R: F/R rows searched a step (1: exact; 0: min(ceil(F / 512), 16, sqrt(0.02 / lr)))")
    ap.add_argument("--sweep", action="store_true", help="trade-off curves: every method across its knob")
    ap.add_argument("--compare", action="store_true", help="BatchTopK, Matryoshka ± C²R on 2 toys, with stability")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--out", default="results/sweep", help="--sweep writes OUT.txt and OUT.png")
    ap.set_defaults(stability=False)
    return ap


def check(ap, args, jobs):
    """Every flag and every run's c2r.Config, before any work: a mistake found after minutes of
    training costs those minutes (an unwritable --out: the whole sweep). Exits with status 2."""
    for name in "n_latents k steps batch n_eval nbr_every jobs lr c2r_alpha c2r_lambda l1_coeff".split():
        v, zero_ok = getattr(args, name), name in ("c2r_lambda", "l1_coeff", "nbr_every")
        if v is not None and not (math.isfinite(v) and (v >= 0 if zero_ok else v > 0)):   # NaN fails both
            ap.error(f"--{name.replace('_', '-')} must be {'>=' if zero_ok else '>'} 0, got {v}")
    if len(set(args.seeds)) < len(args.seeds):     # the std over seeds would count one run twice
        ap.error(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    for kind, lam, s, a, toy in jobs:              # what Config checks besides (the sweep's k reach 2 * --k)
        try:
            config(kind, lam, s, a, toy)
        except ValueError as e:
            ap.error(f"{kind}, c2r-lambda {lam:g}, n-latents {a.n_latents}, k {a.k}"
                     f"{' (--sweep runs k from --k / 2 to 2 * --k)' if args.sweep else ''}: {e}")
    folder = os.path.dirname(os.path.abspath(args.out))
    try:                                           # --sweep writes its table after the last SAE: try now
        if args.sweep:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        ap.error(f"--out {args.out}: cannot write in {folder} ({e})")


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    plan = grid(args)
    jobs = [(kind, lam, s, argparse.Namespace(**{**vars(args), **over}), toy) for _, kind, lam, over, toy in plan
            for s in args.seeds]
    check(ap, args, jobs)
    torch.set_num_threads(1)   # the toy's matrices are tiny: more threads only add overhead
    t0 = time.time()
    res = iter(run_all(jobs, args.jobs))
    rows = {key: [next(res) for _ in args.seeds] for key, *_ in plan}
    text = table(rows, names=("value",), group=2) if args.sweep else table(rows, group=int(args.compare))
    text += "\n" + LEGEND
    if args.compare:
        text += "\n\n" + table(rows, STAB_COLS, group=1) + "\n" + STAB_LEGEND
    print(text)
    print(f"mean±std over {len(args.seeds)} seeds, {args.jobs} jobs, {time.time() - t0:.1f} s")
    if args.sweep:
        with open(args.out + ".txt", "w") as f:
            f.write(text + "\n")
        try:
            plot_sweep(rows, args.out + ".png")
        except ImportError:
            print("matplotlib is not installed: table only (pip install matplotlib for the figure)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
