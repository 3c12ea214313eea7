"""
SAEs on a language model's residual stream, trained by c2r.train: one per setting, all on the same
batches, evaluated into one table, one JSON and one figure. By default a baseline (c2r_lambda=0)
and C²R (5, the paper's).

    python train_gpt2.py                                    # GPT-2 small, layer 8, OpenWebText (internet + GPU)
    python train_gpt2.py --random-init --data random        # speed/memory run: no weights, no text needed
    python train_gpt2.py --model DIR --gguf-file F.gguf --data texts/ --device cpu --tokens 2e5 --n-latents 4096
    python train_gpt2.py --cache acts/ --runs c2r_lambda=0 c2r_lambda=5 kind=matryoshka "kind=matryoshka c2r_lambda=5"

Read it top to bottom (lm.py: the model, the text, the activation buffer and cache, the export, the
fingerprints of the input files, the figure):
  1. evaluation: FVU, L0, dead latents, CE loss recovered, first-letter absorption (absorption.py)
  2. reporting: one table, one JSON, one figure (lm.plot)
  3. the flags: every c2r.Config field is a flag of the same name; --runs lists the SAEs
  4. the run, in stages: model, activations (scale, cache), train each SAE, evaluate, save, report
"""

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import c2r
import lm


# -----------------------------------------------------------------------------
# 1. Evaluation

@torch.no_grad()
def recon_metrics(sae, x_ND, chunk=4096):
    """FVU, explained variance, L0 and dead latents (never active on these tokens)."""
    err = l0 = 0.0
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=x_ND.device)
    for s in range(0, len(x_ND), chunk):
        x = x_ND[s:s + chunk]
        x_hat, acts, _ = sae(x)
        err += (x - x_hat).pow(2).sum().item()
        l0 += (acts != 0).sum().item()
        fired |= (acts != 0).any(0)
    fvu = err / (x_ND - x_ND.mean(0)).pow(2).sum().item()
    return dict(fvu=fvu, explained_variance=1 - fvu, l0=l0 / len(x_ND), dead=int((~fired).sum()))


def ce_recovered(ce_sae, ce_clean, ce_zero):
    """Fraction of the CE loss that zero-ablating the layer adds back which the SAE recovers:
    1 = the SAE's reconstruction is as good as the real activations, 0 = as bad as zeros."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def get(r, key):      # r["a"]["b"] for key "a.b"; None where any part is missing
    return functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, key.split("."), r)


def seed_groups(cfgs, saes_res):
    """Runs that differ in their seed alone, as one point: mean ± std of the plotted metrics
    (None where a run has no value)."""
    groups = {}
    for name, cfg in cfgs.items():
        key = json.dumps({k: v for k, v in asdict(cfg).items() if k != "seed"}, sort_keys=True)
        label = dict(relu="ReLU", topk="TopK", batchtopk="BatchTopK", matryoshka="Matryoshka")[cfg.kind]
        groups.setdefault(key, dict(method=label + "+C²R" * (cfg.c2r_lambda > 0), runs=[]))["runs"].append(name)
    for g in groups.values():
        for key in ("fvu", "ce_recovered", ABSORPTION):
            vs = [get(saes_res[n], key) for n in g["runs"]]
            g[key.split(".")[0]] = None if None in vs else [float(np.mean(vs)), float(np.std(vs))]
    return list(groups.values())


# -----------------------------------------------------------------------------
# 2. Reporting

ABSORPTION = "absorption.mean_absorption_fraction"
COLS = [("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.1f}"), ("dead", "dead", "{}"), ("CE loss", "ce_loss", "{:.4f}"),
        ("CE rec.", "ce_recovered", "{:.4f}"), ("C²R (last step)", "final_c2r", "{:.4g}"),
        ("absorption", ABSORPTION, "{:.4f}"), ("full abs.", "absorption.mean_full_absorption", "{:.4f}"),
        ("split", "absorption.mean_split_latents", "{:.2f}"), ("main F1", "absorption.mean_main_f1", "{:.3f}"),
        ("absorption - baseline's [95% CI]", "vs_baseline.absorption_fraction",
         "{0[diff]:+.4f} [{0[ci95][0]:+.4f}, {0[ci95][1]:+.4f}]")]


def table(res):
    """One row per SAE, then mean ± std of each setting that has several seeds."""
    fmt = lambda f, v: "n/a" if v is None else f.format(v)
    ms = lambda v: "n/a" if v is None else f"{v[0]:.4f} ± {v[1]:.4f}"
    out = [f"CE loss clean {res['ce_clean']:.4f}, zero-ablated {res['ce_zero_ablation']:.4f}; baseline: "
           f"{res['baseline']}", "| SAE | " + " | ".join(c[0] for c in COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
    out += [f"| {n} | " + " | ".join(fmt(f, get(r, k)) for _, k, f in COLS) + " |" for n, r in res["saes"].items()]
    if any(len(g["runs"]) > 1 for g in res["groups"]):
        out += ["\nmean ± std over seeds", "| runs | method | FVU | CE rec. | absorption |", "|---" * 5 + "|"]
        out += [f"| {', '.join(g['runs'])} | {g['method']} | {ms(g['fvu'])} | {ms(g['ce_recovered'])} | "
                f"{ms(g['absorption'])} |" for g in res["groups"]]
    t = res["timing"]
    out += [f"{n}: {t[n]['steps']} steps in {t[n]['wall_s']:.1f}s; activations from the {t[n]['source']} "
            f"{t[n]['source_tok_per_s']:,.0f} tok/s, SAE training {t[n]['sae_tok_per_s']:,.0f} tok/s"
            for n in res["saes"]]
    a, mem = t["activations"], t["peak_gpu_mem_gib"]
    if a.get("harvested_tokens"):
        out.append(f"cache: {a['harvested_tokens']} activations harvested by this run, the model at "
                   f"{a['harvested_tokens'] / max(a['harvest_s'], 1e-9):,.0f} tok/s")
    out.append(f"evaluation {t['eval_s']:.1f}s; whole run {t['total_s']:.1f}s"
               + (f"; peak GPU memory {mem:.2f} GiB" if mem is not None else ""))
    return "\n".join(out)


# -----------------------------------------------------------------------------
# 3. The flags. Every c2r.Config field is a flag of the same name (--n-latents, --c2r-lambda, ...),
# with Config's type, default and documentation, but for these, which the script sets itself:
SET_HERE = dict(d_model="the model's", steps="--tokens / --batch", log_every="steps // 20")
NOTES = dict(seed="here also the token order, the shuffle and a --random-init model; a run's seed= sets the "
                  "SAE's init alone", bf16="here also the model's forward; CUDA only",
             prefixes="comma-separated; default here: n_latents / 16, / 8, / 4, / 2")
DEFAULT_RUNS = ["baseline: c2r_lambda=0", "c2r: c2r_lambda=5"]
TIMING = ("total_s", "eval_s", "activations", "peak_gpu_mem_gib")    # results.json timing's own keys


def parse_args(argv=None):
    i1, f0 = lm.at_least(int, 1), lm.at_least(float, 0, strict=True)    # validated as parsed, before any work
    p = argparse.ArgumentParser(description=__doc__.split("\nRead it")[0].strip(), formatter_class=lm.HelpFormat)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2", help="Hugging Face causal LM name or local directory")
    m.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    m.add_argument("--tokenizer", default=None, help="tokenizer name/directory, if not --model's")
    m.add_argument("--random-init", action="store_true", help="same architecture, random weights (speed runs)")
    m.add_argument("--layer", type=lm.at_least(int, 0), default=8, help="read the residual stream after this block")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="Skylion007/openwebtext",
                   help="a .txt file or folder of them, a Hugging Face dataset (streamed; needs `datasets`), "
                        "or 'random' (uniform random tokens, for speed runs)")
    d.add_argument("--ctx", type=lm.at_least(int, 2), default=128, help="context length, BOS included")
    d.add_argument("--tokens", type=f0, default=10_000_000, help="training tokens (activations) per SAE")
    d.add_argument("--eval-tokens", type=f0, default=2 ** 17, help="held-out tokens for the evaluation")
    d.add_argument("--model-batch", type=i1, default=256, help="contexts per forward pass")
    d.add_argument("--buffer", type=f0, default=2 ** 19, help="activations in the shuffling buffer")
    d.add_argument("--batch", type=i1, default=4096, help="activations per SAE step")
    d.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="train on raw activations instead of scaling them to unit mean squared norm")
    d.add_argument("--cache", default=None, metavar="DIR",
                   help="harvest the training activations into DIR once (float16), or read them from there")
    d.add_argument("--act-dtype", choices=("float32", "float16"), default=None,
                   help="the SAEs train on the activations rounded to this (default: float16 with --cache, "
                        "which stores that, else float32)")
    s = p.add_argument_group("SAE: c2r.Config's fields; each run's field=value overrides them",
                             "set here: " + "; ".join(f"{k}: {v}" for k, v in SET_HERE.items()))
    docs = lm.field_docs(c2r.Config)
    for f in dataclasses.fields(c2r.Config):
        if f.name not in SET_HERE:
            h = "; ".join(t for t in (docs.get(f.name), NOTES.get(f.name)) if t) or "see c2r.Config"
            kw = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else \
                dict(type=lm.field_type(f), metavar=f.name.upper(), choices=c2r.KINDS if f.name == "kind" else None)
            s.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=h.replace("%", "%%"), **kw)
    p.set_defaults(n_latents=24576, k=32, bf16=True)      # GPT-2 small's SAE: Config's defaults are the toy's
    s.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="RUN",
                   help="one SAE per entry, all on the same batches: 'field=value ...' on top of the flags, "
                        "optionally named 'NAME: field=value ...'")
    e = p.add_argument_group("evaluation")
    e.add_argument("--probe-words", type=lm.at_least(int, 0), default=None, help="first-letter absorption "
                   "(absorption.py) on a seeded subset of this many single-token words; default: all, as SAEBench; "
                   "0: skip it")
    e.add_argument("--probe-epochs", type=i1, default=50, help="epochs of the letter probes (SAEBench: 50)")
    o = p.add_argument_group("run")
    o.add_argument("--out", default="out_gpt2", help="output folder")
    o.add_argument("--resume", action="store_true", help="continue each SAE from its checkpoint in --out")
    o.add_argument("--ckpt-every", type=i1, default=500, help="checkpoint every N SAE steps")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for k in ("model", "data", "tokenizer", "gguf_file", "cache", "out"):     # transformers does not expand ~
        if isinstance(getattr(args, k, None), str) and getattr(args, k).startswith("~"):
            setattr(args, k, os.path.expanduser(getattr(args, k)))
    import absorption
    if args.probe_words and args.probe_words < absorption.MIN_WORDS:      # it would fail after all the training
        p.error(f"--probe-words {args.probe_words}: first-letter absorption needs 0 (skip it) or at least "
                f"{absorption.MIN_WORDS} words (each split prompts a word with {absorption.N_ICL} others of its own)")
    return args


def parse_runs(entries):
    """--runs -> {name: {field: value}}, each value parsed as its field's type."""
    known = {f.name: f for f in dataclasses.fields(c2r.Config) if f.name not in SET_HERE}
    runs = {}
    for e in entries:
        name, _, body = e.rpartition(":")
        over, raw = {}, []
        for kv in body.split():
            k, eq, v = kv.partition("=")
            if k not in known or not eq:
                raise ValueError(f"--runs {e!r}: {kv!r} is not field=value with a field of c2r.Config "
                                 f"({', '.join(known)})")
            try:
                over[k] = lm.field_type(known[k])(v)
            except (ValueError, KeyError):
                raise ValueError(f"--runs {e!r}: {v!r} is not a valid {k}") from None
            raw.append(v if k == "kind" else k.replace("c2r_lambda", "lam") + v)
        name = name.strip() or "_".join(raw) or "flags"
        if not re.fullmatch(r"[\w.,+=-]+", name) or name in runs or name in TIMING:
            why = "taken" if name in runs else "a key of results.json's timing" if name in TIMING else "no file name"
            raise ValueError(f"--runs {e!r}: the name {name!r} is {why}: name it as 'NAME: ...'")
        runs[name] = over
    return runs


def config_for(args, name, over, D, steps, dev):
    """The run's c2r.Config: the flags, its overrides, and what the script sets."""
    v = {f.name: getattr(args, f.name) for f in dataclasses.fields(c2r.Config) if f.name not in SET_HERE} | over
    if v["kind"] == "matryoshka" and not v["prefixes"]:    # Bussmann et al.'s nested groups
        v["prefixes"] = tuple(sorted({max(1, v["n_latents"] // d) for d in (16, 8, 4, 2)}))
    elif v["kind"] != "matryoshka" and "prefixes" not in over:
        v["prefixes"] = ()
    try:
        return c2r.Config(**v | dict(d_model=D, steps=steps, log_every=max(1, steps // 20),
                                     bf16=v["bf16"] and dev.type == "cuda"))
    except (ValueError, TypeError) as e:
        raise type(e)(f"run {name!r}: {e}") from None


# -----------------------------------------------------------------------------
# 4. The run, stage by stage

def load_net(args, say):
    """Stage 1: the model on its device and its tokenizer; net.resid(ids), net.ce(ids, splice) and
    net.harvest(rows) run it up to block --layer (under bf16 autocast on CUDA, unless --no-bf16)."""
    t0, dev = time.time(), torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True      # fp32 matmuls (--no-bf16, the eval's SAE): TF32
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" and args.bf16 else nullcontext
    def check(cfg):           # the flags that need the model's config, before its weights load
        if args.layer >= cfg.num_hidden_layers:
            raise ValueError(f"--layer {args.layer} is out of range: the model has {cfg.num_hidden_layers} blocks "
                             f"(0..{cfg.num_hidden_layers - 1})")
        if args.ctx > (getattr(cfg, "max_position_embeddings", None) or float("inf")):
            raise ValueError(f"--ctx {args.ctx} is beyond the model's {cfg.max_position_embeddings} positions")
    model, tok = lm.load_model(args.model, args.gguf_file, args.random_init, args.tokenizer, args.seed, check,
                               hub_tokenizer=not (args.random_init and args.data == "random"))
    if args.data != "random" and tok is None:
        raise ValueError(f"cannot load a tokenizer for {args.model!r}: pass --tokenizer DIR")
    blocks, L = lm.blocks_of(model.to(dev)), args.layer
    say(f"model {args.model}{' (random init)' if args.random_init else ''}: {len(blocks)} blocks, "
        f"d_model {model.config.hidden_size}, loaded in {time.time() - t0:.1f}s; layer {L}")
    return argparse.Namespace(model=model, tok=tok, dev=dev, bf16=amp is not nullcontext, D=model.config.hidden_size,
                              resid=lambda ids: lm.resid(model, blocks, L, ids.to(dev), amp()),
                              ce=lambda ids, splice=None: lm.ce_loss(model, blocks, L, ids.to(dev), splice, amp()),
                              harvest=lambda rows: lm.harvest(model, blocks, L, rows, args.model_batch, dev, amp()))


def activations(args, net, n_eval, steps, fp, say):
    """Stages 2 and 3: the activation scale (from the first training contexts, never the held-out
    ones) and source() -> the training activations in chunks, the same every call: from the
    model, or from the --cache, harvested first where it is missing or short."""
    rows = lambda: lm.contexts(args.data, net.tok, args.ctx, n_eval, net.model.config.vocab_size, args.seed)[1]
    first_scale = lambda: next(net.harvest(rows())).pow(2).sum(1).mean().rsqrt().item()    # the same on every rank
    live = lambda r: lm.rounded(net.harvest(r)) if args.act_dtype == "float16" else net.harvest(r)
    rank, ranks = c2r.world()                   # torchrun: each rank its every N-th model batch
    if not args.cache:
        return first_scale() if args.normalize else 1.0, \
            lambda: live(lm.share(rows(), args.model_batch, rank, ranks)), dict(source="model")
    chunk = args.model_batch * (args.ctx - 1)
    settings = dict(model=args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer, random_init=args.random_init,
                    layer=args.layer, data=args.data, ctx=args.ctx, seed=args.seed, held_out_contexts=n_eval,
                    model_batch=args.model_batch, model_bf16=net.bf16, d_model=net.D, dtype="float16", inputs=fp,
                    shard_rows=max(1, lm.SHARD_BYTES // (2 * net.D * chunk)) * chunk)
    n_rows = ranks * lm.rows_needed(steps, args.batch // ranks, int(args.buffer), chunk)
    man = lm.check_cache(args.cache, settings)
    clock = {}                                   # the model's time and tokens, disk writes apart
    if man is None or man["tokens"] < n_rows:
        timed_live = lambda r: lm.timed(live(r), clock)
        man = lm.fill_cache(args.cache, settings, rows(), timed_live, n_rows, first_scale(), say)
    shards = lm.open_cache(args.cache, settings, n_rows)
    return man["scale"] if args.normalize else 1.0, lambda: lm.read_cache(shards, chunk, net.dev, rank, ranks), \
        dict(source="cache", harvested_tokens=clock.get("tokens", 0), harvest_s=clock.get("s", 0.0))


def train_one(args, name, cfg, batches, scale, run_info, fp, dev, say):
    """Stage 4: one SAE, checkpointed to <out>/<name>.ckpt.pt and, with --resume, continued from it
    if it was made from the same settings and the same text and model files (fp)."""
    ck = os.path.join(args.out, f"{name}.ckpt.pt")
    sae, start, opt_state, log = c2r.SAE(cfg).to(dev), 0, None, []
    if args.resume and os.path.exists(ck):
        old, extra = c2r.load(ck, map_location=dev)
        extra["run"].setdefault("ranks", 1)       # written before torchrun runs: by one process
        changed = lm.fingerprint_diff(extra.get("inputs"), fp, f"the checkpoint {ck}")
        if changed:
            raise ValueError(f"--resume: {'; '.join(changed)}: start over in another --out")
        diff = {k: (extra["run"].get(k), v) for k, v in run_info.items() if extra["run"].get(k) != v}
        diff.update({k: (v, getattr(cfg, k)) for k, v in asdict(old.cfg).items() if v != getattr(cfg, k)})
        if extra["scale"] != scale:
            diff["activation scale"] = (extra["scale"], scale)
        if diff:
            raise ValueError(f"--resume: {ck} is from another configuration: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        sae, start, opt_state, log = old.to(dev), extra["step"], extra["opt"], extra["log"]
        say(f"{name}: resuming at step {start} of {cfg.steps}")
    elif args.resume and c2r.world()[0] == 0:
        print(f"{name}: --resume found no checkpoint {ck}, starting from step 0", file=sys.stderr)

    def on_step(step, opt, new_log):            # rank 0 writes: the ranks' SAEs are the same
        if c2r.world()[0] == 0 and ((step + 1) % args.ckpt_every == 0 or step + 1 == cfg.steps):
            c2r.save(sae, ck, step=step + 1, opt=opt.state_dict(), log=log + new_log, run=run_info, scale=scale,
                     inputs=fp)

    clock, t0 = {}, time.time()
    if start < cfg.steps:
        batches = itertools.islice(batches(clock), start, None)    # replay the stream up to the checkpoint
        sae, new_log = c2r.train(sae, batches, progress=not args.quiet, start=start, opt_state=opt_state,
                                 on_step=on_step)
        log = log + new_log
        for before, row in zip(log, log[1:]):   # a row repeats the last check (c2r.train); a resumed call's first
            if row["nbr_err"] is None:          # rows before its first check have none: the checkpoint's log does
                row["nbr_err"] = before["nbr_err"]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall, src_s, n = time.time() - t0, clock.get("s", 0.0), cfg.steps - start
    return sae.eval(), log, dict(wall_s=wall, steps=n, source_s=src_s, sae_s=wall - src_s,
                                 source_tok_per_s=clock.get("tokens", 0) / max(src_s, 1e-9),
                                 sae_tok_per_s=n * args.batch / max(wall - src_s, 1e-9))


@torch.no_grad()
def evaluate(args, net, eval_ids, cfgs, saes, scale):
    """Stage 5: every SAE on the held-out tokens (reconstruction; CE loss with the SAE spliced in)
    and on absorption.py's prompts; absorption minus the first baseline's, by a paired bootstrap."""
    ids = eval_ids.split(args.model_batch)
    x_eval = torch.cat([net.resid(c)[:, 1:].reshape(-1, net.D) for c in ids])
    ce = lambda splice: sum(net.ce(c, splice) * len(c) for c in ids) / len(eval_ids)
    base = next((n for n, cfg in cfgs.items() if cfg.c2r_lambda == 0), next(iter(cfgs)))
    res = dict(ce_clean=ce(None), ce_zero_ablation=ce(lambda h: torch.zeros_like(h)), baseline=base, saes={})
    data = None
    if args.probe_words != 0 and net.tok is not None:    # the model's part, once for all SAEs
        import absorption
        f = args.cache and os.path.join(args.cache, f"absorption_{args.probe_words or 'all'}_{args.probe_epochs}.pt")
        if f and os.path.exists(f):                      # the cache's model and layer: checked by its manifest
            data = torch.load(f, weights_only=True)
        else:                                            # SAEBench's seed (42): its words, split and prompts
            data = absorption.prepare(net.tok, net.resid, device=net.dev, max_words=args.probe_words,
                                      probe_epochs=args.probe_epochs, progress=not args.quiet)
            if f:
                c2r.atomic_write(f, lambda p: torch.save(data, p))
    for name, (sae, log) in saes.items():
        raw = lm.fold(sae, scale)
        r = res["saes"][name] = dict(recon_metrics(raw, x_eval), final_c2r=log[-1]["c2r"] if log else None,
                                     ce_loss=ce(lambda h: raw(h.reshape(-1, net.D))[0].view_as(h)))
        r["ce_recovered"] = ce_recovered(r["ce_loss"], res["ce_clean"], res["ce_zero_ablation"])
        if data is not None:
            r["absorption"] = absorption.score(raw, data)
    for name, r in res["saes"].items():
        if data is not None and name != base:
            r["vs_baseline"] = absorption.bootstrap_diff(r["absorption"], res["saes"][base]["absorption"])
    res["groups"] = seed_groups(cfgs, res["saes"])
    return res


def save_and_report(args, net, res, saes, scale, t_start):
    """Stage 6: each SAE as our checkpoint (exact reload) and in the SAELens layout; then, with the
    whole run's time and peak memory, results.json, the table and the figure."""
    for name, r in res["saes"].items():        # worse than predicting the mean activation: say so, even --quiet
        if r["fvu"] > 1:
            print(f"warning: SAE {name!r} has FVU {r['fvu']:.3f} > 1 on the held-out tokens", file=sys.stderr)
    for name, (sae, log) in saes.items():
        raw = lm.fold(sae, scale)
        c2r.save(raw, os.path.join(args.out, f"{name}.pt"), act_scale=scale, run=res["run"], log=log)
        lm.save_saelens(raw, os.path.join(args.out, f"{name}_saelens"), res["run"])
    mem = torch.cuda.max_memory_allocated(net.dev) / 2 ** 30 if net.dev.type == "cuda" else None
    res["timing"].update(total_s=time.time() - t_start, peak_gpu_mem_gib=mem)
    c2r.atomic_write(os.path.join(args.out, "results.json"), lambda p: Path(p).write_text(json.dumps(res, indent=2)))
    print(table(res))
    try:
        if any(g["absorption"] for g in res["groups"]):        # a figure of absorption, where there is some
            lm.plot(res, os.path.join(args.out, "results.png"))
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)


def run(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():   # torchrun
        if args.device == "cuda":               # one GPU per rank
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, ranks = c2r.world()
    args.quiet |= rank > 0                       # rank 0 speaks, and evaluates and writes alone
    t_start, say = time.time(), (lambda *a: None) if args.quiet else print
    runs = parse_runs(args.runs)                 # a typo fails here, before the model loads
    steps = int(args.tokens) // args.batch
    if steps < 1 or args.batch % ranks:
        raise ValueError(f"--tokens {int(args.tokens)} is less than one batch of {args.batch}" if steps < 1 else
                         f"--batch {args.batch} does not split evenly over the {ranks} ranks")
    for name, over in runs.items():                # each run's Config too: d_model is checked nowhere else
        config_for(args, name, over, 1, steps, torch.device(args.device))
    if args.cache and args.act_dtype == "float32":
        raise ValueError("--cache stores float16 activations: drop --act-dtype float32")
    args.act_dtype = args.act_dtype or ("float16" if args.cache else "float32")
    torch.manual_seed(args.seed)
    lm.writable_folder(args.out, "--out")
    net = load_net(args, say)
    fp = lm.fingerprint(args.data, args.model, args.gguf_file, args.random_init, args.seed,
                        json.loads(net.model.config.to_json_string()), args.tokenizer)
    cfgs = {name: config_for(args, name, over, net.D, steps, net.dev) for name, over in runs.items()}
    n_eval = max(1, math.ceil(args.eval_tokens / (args.ctx - 1)))
    eval_ids, _ = lm.contexts(args.data, net.tok, args.ctx, n_eval, net.model.config.vocab_size, args.seed)
    scale, source, acts_info = activations(args, net, n_eval, steps, fp, say)
    say(f"activation scale {scale:.4g}; {len(cfgs)} SAEs, {steps} steps x {args.batch} tokens each")
    run_info = {k: getattr(args, k) for k in ("model", "gguf_file", "tokenizer", "random_init", "layer", "data",
                                              "ctx", "model_batch", "batch", "normalize", "seed", "act_dtype")}
    # ranks: each reads its share of the stream, so a checkpoint resumes exactly with as many ranks alone
    run_info.update(tokens=int(args.tokens), eval_tokens=int(args.eval_tokens), buffer=int(args.buffer), ranks=ranks)

    def batches(clock):       # the same batches for every SAE: seeded token order and shuffle
        gen = torch.Generator(device=net.dev).manual_seed(args.seed)
        return (x * scale for x in lm.shuffled(lm.timed(source(), clock), int(args.buffer), args.batch // ranks, gen))
    saes, timing = {}, {}
    for name, cfg in cfgs.items():
        sae, log, timing[name] = train_one(args, name, cfg, batches, scale, run_info, fp, net.dev, say)
        saes[name], timing[name]["source"] = (sae, log), acts_info["source"]
    if rank > 0:
        return None, {n: s for n, (s, _) in saes.items()}
    t0 = time.time()
    res = dict(run=run_info, scale=scale, configs={n: asdict(c) for n, c in cfgs.items()},
               **evaluate(args, net, eval_ids, cfgs, saes, scale))
    res["timing"] = dict(total_s=None, eval_s=time.time() - t0, **timing, activations=acts_info, peak_gpu_mem_gib=None)
    save_and_report(args, net, res, saes, scale, t_start)
    return res, {n: s for n, (s, _) in saes.items()}


if __name__ == "__main__":
    run(parse_args())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
