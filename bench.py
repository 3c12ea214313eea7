"""
Speed of one SAE training step, side by side, and of c2r_loss alone (README, Speed).

    python bench.py                 # CUDA if present: d_model 768, 24,576 and 65,536 latents, batch 4,096,
                                    # TopK k=32, bf16 autocast; c2r_loss at 24,576 / 65,536 / 131,072
    python bench.py --device cpu    # small sizes (the defaults below), fp32

The step rows, all TopK with the same SAE, optimiser and batch:
  ours            c2r.train's own step (sparse codes, embedding_bag decode), C²R off
  ours + C²R      the same with C²R (lambda 5, alpha 1) and c2r.train's rolling neighbour search: F/R
                  rows a step, in bf16 where fast (R: Config's default, min(ceil(F / 512), 16,
                  sqrt(0.02 / lr)), unless --nbr-every; lr: --lr, by default 2e-4 / sqrt(F / 16,384)
                  as dictionary_learning scales it), m candidates and the h busiest latents'
                  matches (--nbr-hot) re-ranked every step. After the timed steps, --err-steps more
                  measure how far its penalty is from the exact one (a fresh full search), on the
                  same decoder and codes
  dense           a straightforward step: dense codes, dense decode, dense backward, no C²R
  dense + chunked the same with C²R as the authors' code computes it, every step: the latents cut
                  into random chunks of 8,192, a cosine matrix per chunk (neighbours within the
                  chunk), a_F from the dense [B, F] code matrix; written here from that description
ms/step is the mean over the timed steps (every step of the rolling search costs the same; a fresh
SAE's first step, which searches every row once, is a warmup step); the median is printed too.
Every row runs in its own fresh process, so memory is its own:
peak torch.cuda.max_memory_allocated on GPU, on CPU the growth of the process's peak RSS
(ru_maxrss) over the steps (model and data excluded: torch's CPU allocator has no peak counter).
"""

import argparse
import itertools
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import c2r

ROWS = ("ours", "ours + C²R", "dense", "dense + chunked C²R")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(batches, stamps, dev, prof=None, prof_steps=()):
    """Yields the batches and stamps the time of each request: the time between two requests
    is one whole step, whoever runs the loop (c2r.train or the dense loop below). Runs the
    profiler, if any, over the steps in prof_steps, which come after the timed ones."""
    for i, x in enumerate(batches):
        sync(dev)
        stamps.append(time.perf_counter())
        if prof is not None and i in (prof_steps[0], prof_steps[-1] + 1):
            prof.start() if i == prof_steps[0] else prof.stop()
        yield x


def chunked_c2r(acts_BF, W_dec_FD, *, alpha=1.0, chunk=8192):
    """C²R as the authors compute it (from the description in the issue): every step, random
    chunks of `chunk` latents, the full cosine matrix of each chunk, the nearest other latent
    *within the chunk*, and a_F from the dense code matrix."""
    n = W_dec_FD.shape[0]
    f32 = torch.promote_types(W_dec_FD.dtype, torch.float32)      # bf16 under autocast: sum in fp32
    a_F = torch.linalg.vector_norm(acts_BF.to(f32), dim=0)
    perm = torch.randperm(n, device=W_dec_FD.device)
    total = 0.0
    for s in range(0, n, chunk):
        idx = perm[s:s + chunk]
        W = F.normalize(W_dec_FD[idx], dim=1)
        cos = (W @ W.T).to(f32)
        cos = cos.masked_fill(torch.eye(len(idx), dtype=torch.bool, device=cos.device), -float("inf"))
        c, j = cos.max(1)
        a = a_F[idx]
        total = total + ((a + a[j]) ** alpha * c.clamp(min=0) ** 2).sum()
    return total / n


def dense_train(sae, batches, cfg, chunked):
    """The straightforward step: sae(x) (dense codes, dense decode), autograd through it all;
    the same Adam, bf16 autocast, decoder-gradient projection, clipping and renormalisation as
    c2r.train."""
    dev = sae.W_dec_FD.device
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=dev.type == "cuda")
    sae.train()
    for step, x in enumerate(itertools.islice(batches, cfg.steps)):
        if step == 0:
            sae.b_dec_D.data.copy_(c2r.geometric_median(x))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            x_hat, acts, _ = sae(x)
            loss = (x_hat.float() - x).pow(2).sum(-1).mean()
            if chunked:
                loss = loss + cfg.c2r_lambda * chunked_c2r(acts, sae.W_dec_FD, alpha=cfg.c2r_alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, G = sae.W_dec_FD, sae.W_dec_FD.grad
            G -= (G * W).sum(1, keepdim=True) * W
        nn.utils.clip_grad_norm_(sae.parameters(), cfg.clip_grad)
        opt.step()
        sae.renorm_()


def penalty_error(sae, batches, errs, steps, start=0, also=None):
    """Wraps `batches` for c2r.train(sae, batches, on_step=...): at each step in `steps` appends to
    errs["train()"] the relative error |C²R(train()'s table) / C²R(exact table) - 1|, both on the
    decoder and codes of that step (the codes recomputed here, in fp32), and to errs[name] that of
    each also[name](W, step), a search run alongside (W: that step's unit rows); and to errs["exact"],
    where errs has that key, the exact penalty itself. `batches` start at step `start`. Returns
    (batches, on_step)."""
    now = {}

    def wrapped():     # runs just before each step, on the SAE that step starts from
        for t, x in enumerate(batches, start):
            if t in steps:
                with torch.no_grad():
                    W = sae.W_dec_FD.detach().clone()
                    a_F = torch.linalg.vector_norm(sae.encode(x.to(W.device, W.dtype)), dim=0)
                    now[t] = W, a_F, {name: table(W, t) for name, table in (also or {}).items()}
            yield x

    def on_step(step, opt, log):     # sae.nbr_F: the table step `step` used (the update does not touch it)
        if step in now:
            W, a_F, tables = now.pop(step)
            exact = c2r.c2r_penalty(a_F, W, c2r.nearest_neighbours(W)).item()
            if "exact" in errs:
                errs["exact"].append(exact)
            for name, table in {"train()": sae.nbr_F, **tables}.items():
                got = c2r.c2r_penalty(a_F, W, table).item()
                errs[name].append(abs(got / exact - 1) if exact > 0 else 0.0)
    return wrapped(), on_step


def clock(dev, fn, reps, warmup=False):
    """Median wall time of fn() over reps calls [ms], each waited for; one untimed call first if warmup."""
    if warmup:
        fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def start_memory(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return maxrss_mib()


def peak_memory(dev, rss0):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return maxrss_mib() - rss0


def step_row(a, row, n_latents):
    """One row of the step table, run in this (fresh) process."""
    dev = torch.device(a.device)
    W, N = a.warmup, a.steps
    P = 5 if a.profile else 0                     # profiled steps, after the timed ones
    cfg = step_config(a, n_latents, "C²R" in row, W + N + P + 1)
    sae = c2r.SAE(cfg).to(dev)
    xs, stamps, prof = batches_of(a, dev), [], None
    if a.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        prof = torch.profiler.profile(activities=acts)
    batches = timed(itertools.cycle(xs), stamps, dev, prof, range(W + N, W + N + P))
    rss0 = start_memory(dev)
    if row.startswith("ours"):
        c2r.train(sae, batches, progress=False)
    else:
        dense_train(sae, batches, cfg, chunked="C²R" in row)
    sync(dev)
    ms = [1e3 * (t1 - t0) for t0, t1 in zip(stamps[W:W + N], stamps[W + 1:W + N + 1])]
    if prof is not None:
        os.makedirs(a.profile, exist_ok=True)
        name = f"profile-{row.replace(' ', '').replace('+', '-').replace('²', '2')}-{n_latents}.txt"
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        with open(os.path.join(a.profile, name), "w") as f:
            f.write(f"{row}, {n_latents} latents, {P} steps\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))
    return dict(row=row, n_latents=n_latents, ms=statistics.fmean(ms), ms_median=statistics.median(ms),
                tok_s=a.batch / statistics.fmean(ms) * 1e3, mem_mib=peak_memory(dev, rss0), steps=N, R=cfg.nbr_period())


def step_config(a, n_latents, with_c2r, steps):
    return c2r.Config(d_model=a.d_model, n_latents=n_latents, kind="topk", k=a.k, lr=lr_of(a.lr, n_latents),
                      c2r_lambda=a.c2r_lambda if with_c2r else 0.0, c2r_alpha=1.0, nbr_every=a.nbr_every,
                      nbr_cands=a.nbr_cands, nbr_hot=a.nbr_hot, steps=steps, warmup=0.0, decay=0.0,
                      log_every=10**9, seed=0, bf16=a.amp == "bf16")


def lr_of(lr, n_latents):     # the lr sets the default R; the speed of a step does not depend on it
    return lr or 2e-4 / math.sqrt(n_latents / 16384)     # None: dictionary_learning's


def batches_of(a, dev):      # 4 batches of Gaussian noise, cycled: the speed does not depend on the data
    g = torch.Generator(device=dev).manual_seed(0)
    return [torch.randn(a.batch, a.d_model, device=dev, generator=g) for _ in range(4)]


def pair_row(a, n_latents):
    """`ours + C²R` and its twin without C²R (`ours`) in one process, in alternating blocks of
    --block steps on the same batches, so both see the same machine load: their time ratio is
    C²R's cost even on a busy machine. Then --err-steps more steps of the C²R SAE measure how far
    its penalty is from the exact one. Memory: the growth over both (the twin's is `ours`')."""
    dev = torch.device(a.device)
    W, N, E = a.warmup, a.steps, a.err_steps
    cfgs = {"C²R": step_config(a, n_latents, True, W + N + E), "off": step_config(a, n_latents, False, W + N)}
    saes = {r: c2r.SAE(c).to(dev) for r, c in cfgs.items()}
    xs, opt_state, ms, errs = batches_of(a, dev), {}, {r: [] for r in cfgs}, {"train()": []}

    def block(r, lo, hi, measure=False):     # steps lo..hi-1 of SAE r, each timed from its batch to its end
        t0 = {}

        def batches():
            for t in range(lo, hi):
                sync(dev)
                t0[t] = time.perf_counter()
                yield xs[t % len(xs)]

        def on_step(step, opt, log):
            sync(dev)
            if W <= step < W + N:
                ms[r].append(1e3 * (time.perf_counter() - t0[step]))
            opt_state[r] = opt.state_dict()
            if measure:
                track(step, opt, log)
        it, track = penalty_error(saes[r], batches(), errs, range(lo, hi), lo) if measure else (batches(), None)
        c2r.train(saes[r], it, replace(cfgs[r], steps=hi), progress=False, start=lo, opt_state=opt_state.get(r),
                  on_step=on_step)

    rss0 = start_memory(dev)
    for lo in range(0, W + N, a.block):
        for r in cfgs:
            block(r, lo, min(lo + a.block, W + N))
    mem = peak_memory(dev, rss0)
    if E:
        block("C²R", W + N, W + N + E, measure=True)
    on, off, e, R = ms["C²R"], ms["off"], errs["train()"], cfgs["C²R"].nbr_period()
    return dict(row="ours + C²R", n_latents=n_latents, ms=statistics.fmean(on), ms_median=statistics.median(on),
                tok_s=a.batch / statistics.fmean(on) * 1e3, mem_mib=mem, steps=N, R=R, m=a.nbr_cands,
                h=cfgs["C²R"].nbr_hot_count(), ms_twin=statistics.fmean(off), ratio=sum(on) / sum(off),
                ratio_median=statistics.median(c / o for c, o in zip(on, off)), err_steps=[W + N, W + N + E - 1],
                err_mean=statistics.fmean(e) if e else None, err_max=max(e, default=None))


def c2r_row(a, n_latents):
    """c2r_loss alone: an exact fresh neighbour search, the value, and its backward, in fp32,
    on post-TopK codes [batch, n_latents] (k nonzeros a row). Also the search alone."""
    dev = torch.device(a.device)
    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(n_latents, (a.batch, a.k), device=dev, generator=g)
    acts = torch.zeros(a.batch, n_latents, device=dev).scatter_(
        1, idx, torch.rand(a.batch, a.k, device=dev, generator=g) + 0.1).requires_grad_()
    W = torch.randn(n_latents, a.d_model, device=dev, generator=g).requires_grad_()
    rss0 = start_memory(dev)

    def loss():
        acts.grad = W.grad = None
        c2r.c2r_loss(acts, W).backward()

    reps = a.c2r_reps
    res = dict(row="c2r_loss", n_latents=n_latents, ms=clock(dev, loss, reps, warmup=reps > 1))
    res["mem_mib"] = peak_memory(dev, rss0)
    res["search_ms"] = clock(dev, lambda: c2r.nearest_neighbours(W), reps)
    # what train() pays on the steps between two searches: the penalty from the k*B values, on
    # unit-norm decoder rows as they are (unit_rows=True, as train() calls it)
    nbr_F, (rows, cols) = c2r.nearest_neighbours(W), acts.detach().nonzero(as_tuple=True)
    vals = acts.detach()[rows, cols].requires_grad_()
    W_unit = F.normalize(W.detach(), dim=1).requires_grad_()

    def penalty():
        vals.grad = W_unit.grad = None
        c2r.c2r_penalty(c2r.code_norms(vals, cols, n_latents), W_unit, nbr_F, alpha=1.0, unit_rows=True).backward()

    res["penalty_ms"] = clock(dev, penalty, max(reps, 5), warmup=reps > 1)
    if dev.type == "cuda":                             # the search in bf16: not exact near ties
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res["search_bf16_ms"] = clock(dev, lambda: c2r.nearest_neighbours(W), reps)
    return res


def parts_row(a, n_latents):
    """What a step of train()'s rolling search costs, piece by piece, on a fresh SAE whose Adam has
    stepped twice (random gradients: the costs do not depend on the values): the look-ahead
    (c2r.heading over all F rows), the search of one slice of F/R rows (in bf16 at R > 1 where fast),
    the re-ranking of all F*m candidates with the h busiest latents' matches (their top-h, an [F, h]
    matmul under --amp, as in train()), the penalty (code_norms of k*B codes + C²R's terms, forward
    and backward), and train()'s check (table_error, once every log_every steps). Median of reps."""
    dev, B = torch.device(a.device), a.batch
    cfg = step_config(a, n_latents, True, 10)
    R, m = cfg.nbr_period(), min(a.nbr_cands, n_latents - 1)
    sae = c2r.SAE(cfg).to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=dev.type == "cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    adam_steps = 2
    for _ in range(adam_steps):
        for p in sae.parameters():
            p.grad = 1e-3 * torch.randn(p.shape, device=dev, generator=g)
        opt.step()
    sae.renorm_()
    W = sae.W_dec_FD
    C = torch.randint(n_latents, (n_latents, m), device=dev, generator=g).sort(dim=1).values
    sae.nbr_F.copy_(C[:, 0])
    cols = torch.randint(n_latents, (B * a.k,), device=dev, generator=g)
    vals = (torch.rand(B * a.k, device=dev, generator=g) + 0.1).requires_grad_()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.amp == "bf16")
    hi = -(-n_latents // R)
    a_F = c2r.code_norms(vals.detach(), cols, n_latents)
    h = cfg.nbr_hot_count()

    def rerank():      # as train() calls it
        with amp:
            sae.nbr_F.copy_(c2r.rerank(W, C, unit_rows=True, hot_H=a_F.topk(h).indices if h else None))

    def search():
        with amp:
            c2r.search_rows_(P, C, 0, hi, unit_rows=True, bf16=R > 1 and c2r.bf16_is_fast(dev))

    def penalty():     # as train() computes it: the terms on the unit rows, no index check
        vals.grad = W.grad = None
        with amp:
            a_F = c2r.code_norms(vals, cols, n_latents)
            p = c2r.c2r_terms(a_F, W, slice(None), sae.nbr_F).mean()
        p.backward()

    def heading():     # Adam's step count given, as train() gives it
        return c2r.heading(W, opt, (R - 1) * cfg.nbr_ahead, adam_steps)

    rss0 = start_memory(dev)
    res = dict(row="parts", n_latents=n_latents, R=R, m=m, h=h, rows=hi)
    res["heading_ms"] = clock(dev, heading, 10, warmup=True)
    P = heading()
    res["search_ms"] = clock(dev, search, 10, warmup=True)
    res["rerank_ms"] = clock(dev, rerank, 10, warmup=True)
    res["penalty_ms"] = clock(dev, penalty, 10, warmup=True)
    res["check_ms"] = clock(dev, lambda: c2r.table_error(sae, vals.detach().new_ones(n_latents), 0), 10, warmup=True)
    res["mem_mib"] = peak_memory(dev, rss0)
    return res


def child(a, spec):
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    row, n = spec["row"], spec["n_latents"]
    if row == "c2r_loss":
        res = c2r_row(a, n)
    elif row == "parts":
        res = parts_row(a, n)
    elif row == "ours + C²R" and not a.profile:
        res = pair_row(a, n)
    else:
        res = step_row(a, row, n)
    print("RESULT " + json.dumps(res))


def run_child(argv, spec):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", json.dumps(spec)],
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(spec, error=err[:200])


def widths(argv, row, ns, results, line):
    """Runs `row` at each width in ns, each in a fresh process; prints line(result), or why it failed."""
    for n in ns:
        r = run_child(argv, dict(row=row, n_latents=n))
        results.append(r)
        print(f"{n:>10,}  failed: {r['error']}" if "error" in r else line(r), flush=True)


def error_note(r):
    """The penalty error of an `ours + C²R` row, for the line of its cost ratio."""
    if r.get("err_mean") is None:
        return ""
    lo, hi = r["err_steps"]
    return (f"\n{'':>30} its penalty {100 * r['err_mean']:.3f} % (max {100 * r['err_max']:.3f} %) from the exact "
            f"one (a fresh full search), steps {lo}-{hi}")


def fmt(v, f):
    return "-" if v is None else format(v, f)


def parse(argv):
    """The flags, each default filled in for the device: GPU sizes on a GPU, small ones on a CPU."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-model", type=int, default=None, help="default: 768 on GPU, 256 on CPU")
    ap.add_argument("--n-latents", type=int, nargs="*", default=None,
                    help="step table at these widths; default 24576 65536 (GPU), 4096 16384 (CPU)")
    ap.add_argument("--batch", type=int, default=None, help="tokens a step; default 4096 (GPU), 512 (CPU)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--c2r-lambda", type=float, default=5.0, help="C²R lambda (the paper's)")
    ap.add_argument("--nbr-every", type=int, default=c2r.Config.nbr_every,
                    help="R for `ours + C²R` (Config's default: 0, min(ceil(F / 512), 16, sqrt(0.02 / lr)); 1: exact)")
    ap.add_argument("--lr", type=float, default=None, help="Adam's lr, which sets the default R; default "
                    "2e-4 / sqrt(F / 16384)")
    ap.add_argument("--nbr-cands", type=int, default=c2r.Config.nbr_cands, help="m for `ours + C²R`")
    ap.add_argument("--nbr-hot", type=int, default=c2r.Config.nbr_hot, help="h for `ours + C²R` (0: none)")
    ap.add_argument("--err-steps", type=int, default=None, help="`ours + C²R`: steps whose penalty error is "
                    "measured, after the timed ones; default 20 (GPU), 5 (CPU)")
    ap.add_argument("--block", type=int, default=None, help="`ours + C²R` and its twin without C²R alternate "
                    "in blocks of this many steps; default 10 (GPU), 2 (CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps; default 20 (GPU), 3 (CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps; default 100 (GPU), 10 (CPU)")
    ap.add_argument("--amp", choices=["bf16", "none"], default=None, help="autocast; default bf16 on GPU")
    ap.add_argument("--c2r-latents", type=int, nargs="*", default=None,
                    help="c2r_loss alone at these widths; default 24576 65536 131072 (GPU), 4096 16384 (CPU)")
    ap.add_argument("--c2r-reps", type=int, default=None, help="timed repeats of c2r_loss; default 5 (GPU), 1 (CPU)")
    ap.add_argument("--parts-latents", type=int, nargs="*", default=[],
                    help="the rolling search's per-step pieces (heading, search, rerank, penalty) at these widths")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of 5 steps of each row to this folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    # before the defaults below: `or` would take an explicit 0 for "not given" and time something else
    if a.lr is not None and not a.lr > 0:
        ap.error(f"--lr must be > 0, got {a.lr}")
    for name in ("d_model", "batch", "k", "nbr_cands", "steps", "c2r_reps", "block"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("warmup", "nbr_every", "nbr_hot", "err_steps"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if min(a.n_latents or [2]) < 2 or min(a.c2r_latents or [2]) < 2 or min(a.parts_latents or [2]) < 2:
        ap.error(f"--n-latents, --c2r-latents and --parts-latents must be >= 2, got {a.n_latents}, "
                 f"{a.c2r_latents} and {a.parts_latents}")    # C²R needs a neighbour
    a.d_model = a.d_model or (768 if gpu else 256)
    a.n_latents = ([24576, 65536] if gpu else [4096, 16384]) if a.n_latents is None else a.n_latents
    a.batch = a.batch or (4096 if gpu else 512)
    a.warmup = (20 if gpu else 3) if a.warmup is None else a.warmup
    a.steps = a.steps or (100 if gpu else 10)
    a.err_steps = (20 if gpu else 5) if a.err_steps is None else a.err_steps
    a.block = a.block or (10 if gpu else 2)
    a.amp = a.amp or ("bf16" if gpu else "none")
    a.c2r_latents = ([24576, 65536, 131072] if gpu else [4096, 16384]) if a.c2r_latents is None else a.c2r_latents
    a.c2r_reps = a.c2r_reps or (5 if gpu else 1)
    return a, gpu


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a, gpu = parse(argv)
    if a.child:
        return child(a, json.loads(a.child))

    dev_name = torch.cuda.get_device_name() if gpu else f"CPU, {a.threads or torch.get_num_threads()} threads"
    print(f"python bench.py {shlex.join(argv)}\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {dev_name}, "
          f"torch {torch.__version__}, d_model {a.d_model}, batch {a.batch}, TopK k={a.k}, "
          f"autocast {a.amp}, C²R lambda {a.c2r_lambda}, R={a.nbr_every or 'min(ceil(F / 512), 16, sqrt(0.02 / lr))'}, "
          f"m={a.nbr_cands}, h={a.nbr_hot}, lr {a.lr or '2e-4 / sqrt(F / 16384)'}, the search at R > 1 ranked "
          f"in {'bf16' if c2r.bf16_is_fast(torch.device(a.device)) else 'fp32 (bf16 is slow here)'}")
    mem = "peak MiB (cuda max allocated)" if gpu else "MiB (peak RSS growth)"
    results = []
    for n in a.n_latents:
        R = step_config(a, n, True, 1).nbr_period()
        print(f"\n{n:,} latents: one training step ({a.steps} timed steps after {a.warmup} warmup; "
              f"C²R: R = {R}, {-(-n // R)} rows searched a step)")
        print(f"{'':>22} {'ms/step':>9} {'median':>8} {'tokens/s':>11} {mem:>30}")
        got = {}
        for row in a.rows:
            r = got[row] = run_child(argv, dict(row=row, n_latents=n))
            results.append(r)
            if "error" in r:
                print(f"{row:>22}  failed: {r['error']}")
                continue
            print(f"{row:>22} {r['ms']:9.2f} {r['ms_median']:8.2f} {r['tok_s']:11,.0f} {r['mem_mib']:30.0f}",
                  flush=True)
        ok = {k: v["ms"] for k, v in got.items() if "error" not in v}
        pair = got.get("ours + C²R", {})
        if "ratio" in pair:     # timed against its twin without C²R, interleaved in one process
            print(f"{'':>22} {pair['ratio']:6.2f}x  C²R's cost on our step, interleaved with a twin without C²R "
                  f"(median over steps {pair['ratio_median']:.2f}x; target <= 1.10){error_note(pair)}")
        for num, den, what in (("ours + C²R", "ours", "C²R's cost on our step, run by run"),
                               ("dense + chunked C²R", "dense", "chunked C²R's cost on the dense step"),
                               ("dense", "ours", "dense step / our step"),
                               ("dense + chunked C²R", "ours + C²R", "with C²R: dense + chunked / ours")):
            if num in ok and den in ok:
                print(f"{'':>22} {ok[num] / ok[den]:6.2f}x  {what}")
    if a.c2r_latents:
        print(f"\nc2r_loss alone, fp32, fresh exact search + value + backward, batch {a.batch} "
              f"(median of {a.c2r_reps}); the search alone; the penalty alone, as train() computes it "
              f"between searches (code_norms of the k*B values + c2r_penalty, forward and backward)")
        print(f"{'latents':>10} {'c2r_loss ms':>12} {'search ms':>10} {'search bf16 ms':>15} {'penalty ms':>11} {mem:>30}")
        widths(argv, "c2r_loss", a.c2r_latents, results, lambda r: (
            f"{r['n_latents']:>10,} {r['ms']:12.1f} {r['search_ms']:10.1f} "
            f"{fmt(r.get('search_bf16_ms'), '15.1f'):>15} {r['penalty_ms']:11.2f} {r['mem_mib']:30.0f}"))
    if a.parts_latents:
        print(f"\nthe rolling search's pieces, ms a step (median of 10): the look-ahead (all F rows), the search of "
              f"one slice, the re-ranking of the F*m candidates and the h busiest latents' matches, the penalty "
              f"(forward and backward); the check (table_error, 512 rows) runs once every log_every steps; "
              f"autocast {a.amp}")
        print(f"{'latents':>10} {'R':>5} {'m':>3} {'h':>4} {'heading':>8} {'search':>8} {'rerank':>8} {'penalty':>8} "
              f"{'sum':>8} {'check':>8} {mem:>30}")
        widths(argv, "parts", a.parts_latents, results, lambda r: (
            f"{r['n_latents']:>10,} {r['R']:5} {r['m']:3} {r.get('h', 0):4} {r['heading_ms']:8.2f} "
            f"{r['search_ms']:8.2f} {r['rerank_ms']:8.2f} {r['penalty_ms']:8.2f} "
            f"{sum(r[k] for k in ('heading_ms', 'search_ms', 'rerank_ms', 'penalty_ms')):8.2f} "
            f"{r['check_ms']:8.2f} {r['mem_mib']:30.0f}"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(argv=argv, device=dev_name, torch=torch.__version__, args=vars(a), results=results), f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
