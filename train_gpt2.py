"""
Baseline and C²R SAEs on a language model's residual stream, side by side.

    python train_gpt2.py                                        # GPT-2 small, layer 8, OpenWebText (internet + GPU)
    python train_gpt2.py --random-init --data random            # speed/memory run: no weights, no text needed
    python train_gpt2.py --model DIR --gguf-file F.gguf --data texts/ --device cpu --tokens 2e5 --n-latents 4096

Read it top to bottom:
  1. the model: load it, read the residual stream after block L with a forward hook
  2. the text: local .txt files, a Hugging Face dataset, or random tokens -> fixed-length contexts
  3. the activation buffer: harvest, shuffle, serve every activation once, refill
  4. evaluation: FVU, L0, dead latents, CE loss recovered, first-letter absorption,
     cross-run stability (--stability)
  5. saving: our checkpoint (reloads exactly) and the SAELens layout
  6. main: train a baseline (lambda = 0) and a C²R SAE on the same token stream with c2r.train

The training loop itself is c2r.train; nothing here re-implements it.
"""

import argparse
import functools
import itertools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import c2r
import train_toy    # its stability() / assign(): the exact cross-run matching, shared with the toy

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# -----------------------------------------------------------------------------
# 1. The model


def load_model(name, gguf_file=None, random_init=False, tokenizer=None, seed=0):
    """Returns (model, tok). tok is None only when no tokenizer can be found and none is
    needed (a --random-init run on --data random)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2Tokenizer
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"--model {name!r}: no such model directory")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    try:
        if random_init:
            # GPT2Config() *is* GPT-2 small's architecture: no download needed for the default.
            cfg = GPT2Config() if name == "gpt2" else AutoConfig.from_pretrained(name, **kw)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kw)
    except Exception as e:
        raise ValueError(f"cannot load model {name!r} ({type(e).__name__}: {str(e)[:300]})") from None
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or name, **({} if tokenizer else kw))
    except Exception as e:
        if tokenizer and os.path.exists(os.path.join(tokenizer, "merges.txt")):
            tok = GPT2Tokenizer.from_pretrained(tokenizer)    # bare GPT-2 BPE files: vocab.json + merges.txt
        elif tokenizer:
            raise ValueError(f"cannot load tokenizer {tokenizer!r} ({type(e).__name__}: {str(e)[:300]})") from None
    if tok is not None:
        tok.model_max_length = int(1e12)      # we cut contexts ourselves; silence the length warning
    return model.eval(), tok


def blocks_of(model):
    """The list of transformer blocks (model.transformer.h for GPT-2, model.model.layers for
    Llama, ...): the ModuleList with one entry per layer."""
    n = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


class StopForward(Exception):
    pass


def _hidden(out):   # blocks return a tensor or a tuple whose first entry is the hidden state
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def resid(model, blocks, layer, ids_BT, amp=nullcontext()):
    """The residual stream after block `layer`, [B, T, D] fp32. The forward pass stops
    there: the later blocks and the unembedding are never run."""
    got = {}

    def grab(mod, inp, out):
        got["h"] = _hidden(out)
        raise StopForward

    h = blocks[layer].register_forward_hook(grab)
    try:
        with amp:
            model(input_ids=ids_BT, use_cache=False)
    except StopForward:
        pass
    finally:
        h.remove()
    return got["h"].float()


@torch.no_grad()
def ce_loss(model, blocks, layer, ids_BT, splice=None, amp=nullcontext()):
    """Mean next-token CE loss. splice(h_NTD) -> h', if given, replaces the residual stream
    after block `layer` at every position but the first (which the SAE never saw)."""
    def hook(mod, inp, out):
        h = _hidden(out)
        new = h.clone()
        with torch.autocast(h.device.type, enabled=False):     # the SAE runs in fp32
            new[:, 1:] = splice(h[:, 1:].float()).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    hd = blocks[layer].register_forward_hook(hook) if splice is not None else None
    try:
        with amp:
            logits = model(input_ids=ids_BT, use_cache=False).logits
    finally:
        if hd is not None:
            hd.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten()).item()


# -----------------------------------------------------------------------------
# 2. The text


@functools.lru_cache(maxsize=2)
def read_tokens(data, tok):
    """All tokens of a .txt file or of the .txt files in a folder (sorted), documents joined
    by the end-of-text token."""
    if os.path.isdir(data):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if f.endswith(".txt"))
        if not files:
            raise ValueError(f"--data {data!r}: the folder has no .txt files")
    else:
        files = [data]
    ids = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if text.strip():
            ids += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    if not ids:
        raise ValueError(f"--data {data!r}: the text is empty")
    return torch.tensor(ids, dtype=torch.long)


def contexts(data, tok, ctx, n_eval, vocab_size, seed=0, order=None):
    """Returns (eval_ids [n_eval, ctx], train): train is an endless iterator of [ctx] rows.
    Every context starts with a BOS token (position 0, left out of training and of the SAE's
    splice) followed by ctx - 1 tokens of text. The order is fixed by the seed, so two passes
    over the stream see the same contexts in the same order. order: another seed for the
    training contexts only (local text: reshuffled; random: other tokens; a streamed dataset
    keeps its order), the held-out ones staying those of `seed`."""
    if ctx < 2:
        raise ValueError(f"--ctx must be >= 2 (BOS + at least one token), got {ctx}")
    g = torch.Generator().manual_seed(seed)
    if data == "random":   # for speed runs: uniform random tokens, endless
        def rows():
            while True:
                yield torch.randint(vocab_size, (ctx,), generator=g)
        it = rows()
        ev = torch.stack([next(it) for _ in range(n_eval)])
        if order is not None:
            g.manual_seed(order)
        return ev, it

    if tok is None:
        raise ValueError("no tokenizer: pass --tokenizer DIR (or use --data random)")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if os.path.exists(data):
        ids = read_tokens(data, tok)
        n = len(ids) // (ctx - 1)
        if n <= n_eval:
            raise ValueError(f"--data {data!r} has {len(ids)} tokens: {n} contexts of {ctx}, but the held-out "
                             f"evaluation alone needs {n_eval} (lower --eval-tokens or --ctx, or add text)")
        rows_NT = torch.cat([torch.full((n, 1), bos), ids[: n * (ctx - 1)].view(n, ctx - 1)], 1)
        rows_NT = rows_NT[torch.randperm(n, generator=g)]
        ev, tr = rows_NT[:n_eval], rows_NT[n_eval:]
        if order is not None:
            g.manual_seed(order)
            tr = tr[torch.randperm(len(tr), generator=g)]

        def cycle():   # a small corpus is repeated, in a fresh order each epoch
            for epoch in itertools.count():
                yield from tr[torch.randperm(len(tr), generator=g)] if epoch else tr
        return ev, cycle()

    if data.startswith((".", "/", "~")) or data.endswith(".txt"):
        raise ValueError(f"--data {data!r}: no such file or folder")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {data!r} is not a local path; to stream it as a Hugging Face dataset, "
                         f"`pip install datasets`") from None

    def stream():   # a streamed dataset: documents in order, cut into contexts
        buf = []
        for doc in datasets.load_dataset(data, split="train", streaming=True):
            buf += doc["input_ids"] if "input_ids" in doc else \
                tok(doc["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            while len(buf) >= ctx - 1:
                yield torch.tensor([bos] + buf[: ctx - 1])
                buf = buf[ctx - 1:]
    it = stream()
    return torch.stack([next(it) for _ in range(n_eval)]), it


# -----------------------------------------------------------------------------
# 3. The activation buffer


def harvest(model, blocks, layer, rows, model_batch, device, amp=nullcontext(), clock=None):
    """Activations, context by context: yields [model_batch * (ctx - 1), D] fp32 chunks,
    the first (BOS) position left out. clock, a dict, adds up the seconds and tokens spent."""
    while True:
        t0 = time.perf_counter()
        ids = list(itertools.islice(rows, model_batch))
        if not ids:
            return
        h = resid(model, blocks, layer, torch.stack(ids).to(device), amp)[:, 1:].reshape(-1, model.config.hidden_size)
        if clock is not None:
            if h.is_cuda:
                torch.cuda.synchronize()
            clock["s"] = clock.get("s", 0.0) + time.perf_counter() - t0
            clock["tokens"] = clock.get("tokens", 0) + len(h)
        yield h


def shuffled(chunks, n_buffer, batch, gen):
    """Random batches of `batch` rows from an iterator of [n, D] chunks.

    Fills a buffer of >= n_buffer rows, shuffles it, serves every row once, refills. The rows
    of an incomplete last batch stay for the next fill, so no activation is lost or served
    twice; when `chunks` ends, the rest goes out as a last, smaller batch. Memory stays at one
    buffer however many tokens are trained on."""
    rest, n = [], 0
    for c in itertools.chain(chunks, [None]):
        if c is not None:
            rest.append(c)
            n += len(c)
            if n < n_buffer:
                continue
        if n == 0:
            return
        buf = torch.cat(rest)
        perm = torch.randperm(len(buf), generator=gen, device=gen.device).to(buf.device)
        full = len(buf) // batch * batch
        for s in range(0, full, batch):
            yield buf[perm[s:s + batch]]
        rest = [buf[perm[full:]]]
        n = len(buf) - full
        if c is None and n:
            yield rest[0]


# -----------------------------------------------------------------------------
# 4. Evaluation


@torch.no_grad()
def recon_metrics(sae, x_ND, chunk=4096):
    """FVU, explained variance, L0, dead latents (never active on these tokens) and the mask
    of the live ones (`fired`, a tensor: pop it before writing JSON)."""
    err = l0 = 0.0
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=x_ND.device)
    for s in range(0, len(x_ND), chunk):
        x = x_ND[s:s + chunk]
        x_hat, acts, _ = sae(x)
        err += (x - x_hat).pow(2).sum().item()
        l0 += (acts != 0).sum().item()
        fired |= (acts != 0).any(0)
    fvu = err / (x_ND - x_ND.mean(0)).pow(2).sum().item()
    return dict(fvu=fvu, explained_variance=1 - fvu, l0=l0 / len(x_ND), dead=int((~fired).sum()), fired=fired)


def ce_recovered(ce_sae, ce_clean, ce_zero):
    """Fraction of the CE loss that zero-ablating the layer adds back which the SAE recovers:
    1 = the SAE's reconstruction is as good as the real activations, 0 = as bad as zeros."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def fit_logreg(X, Y, l2=1e-4, iters=100):
    """L independent one-vs-rest logistic regressions, class-balanced, by full-batch L-BFGS on
    standardised inputs. X [N, d] (shared by all) or [L, N, d] (one design per probe);
    Y [N, L] in {0, 1}. Returns W [L, d], b [L] on X's own scale: logit = x @ W[l] + b[l]."""
    X3 = X if X.ndim == 3 else X[None]
    mu, sd = X3.mean(1, keepdim=True), X3.std(1, keepdim=True).clamp(min=1e-6)
    Z = (X3 - mu) / sd
    L, d = Y.shape[1], X.shape[-1]
    W = torch.zeros(L, d, requires_grad=True)
    b = torch.zeros(L, requires_grad=True)
    p = Y.mean(0).clamp(1e-6, 1 - 1e-6)
    wt = Y / (2 * p) + (1 - Y) / (2 * (1 - p))          # each class weighs half
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (Z[0] @ W.T if len(Z) == 1 else torch.einsum("lnd,ld->nl", Z, W)) + b
        loss = (wt * F.binary_cross_entropy_with_logits(logits, Y, reduction="none")).mean() + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        W_raw = W / sd[:, 0]
        return W_raw, b - (mu[:, 0] * W_raw).sum(-1)


def f1_score(pred_NL, y_NL):
    tp = (pred_NL & y_NL).sum(0).float()
    return 2 * tp / (pred_NL.sum(0) + y_NL.sum(0)).clamp(min=1)


@torch.no_grad()
def letter_probes(x_tr, lab_tr, x_te, lab_te):
    """One linear probe per letter ("this word starts with X") on the model's activations.
    Returns (W [26, D], b [26], F1 on the test words [26])."""
    Y_tr = F.one_hot(lab_tr, 26).float()
    with torch.enable_grad():
        W, b = fit_logreg(x_tr.cpu(), Y_tr)
    f1 = f1_score(x_te.cpu() @ W.T + b > 0, F.one_hot(lab_te.cpu(), 26).bool())
    return W, b, f1


@torch.no_grad()
def absorption(sae, probe_W, probe_b, x_tr, lab_tr, x_te, lab_te, letters, max_k=10, f1_jump=0.03,
               cos_full=0.025, cos_frac=0.1, proj_min=0.4, max_absorbers=3, eps=1e-8):
    """First-letter absorption, after Chanin et al. ("A is for Absorption") and SAEBench.

    For each letter in `letters` (indices 0..25):
      main latents  k-sparse probing: rank latents by their mean activation on the letter's
                    training words minus on the others, fit a logistic regression on the top k,
                    k = 1, 2, ...; keep adding latents while the test F1 gains more than f1_jump.
                    The number kept is the letter's number of split latents.
      on each test word of the letter that the letter's probe gets right (a true positive), with
      p the unit probe direction and proj_i = act_i * cos(W_dec_i, p):
      absorption fraction  how much of the word's probe projection x.p the main latents fail to
                    carry and up to `max_absorbers` other probe-aligned latents (cos >= cos_frac)
                    carry instead (0 unless those carry >= proj_min of x.p).
      full absorption  no main latent fires, and the latent with the largest projection is
                    probe-aligned (cos >= cos_full) and carries >= proj_min of x.p.
    Returns a list with one dict per letter."""
    dev = sae.W_dec_FD.device
    enc = lambda x: torch.cat([sae.encode(c.to(dev)) for c in x.split(4096)]).cpu()
    A_tr, A_te = enc(x_tr), enc(x_te)                                       # [N, F]
    Y_tr, Y_te = F.one_hot(lab_tr.cpu(), 26).float(), F.one_hot(lab_te.cpu(), 26).bool()
    Ls = torch.tensor(letters, dtype=torch.long)
    if len(Ls) == 0:
        return []
    # ---- k-sparse probing, all letters at once
    pos = (A_tr.T @ Y_tr) / Y_tr.sum(0).clamp(min=1)
    neg = (A_tr.T @ (1 - Y_tr)) / (1 - Y_tr).sum(0).clamp(min=1)
    top_LK = (pos - neg)[:, Ls].T.topk(min(max_k, A_tr.shape[1]), dim=1).indices   # [L, K]
    f1_LK = []
    for k in range(1, top_LK.shape[1] + 1):
        idx = top_LK[:, :k]
        with torch.enable_grad():
            W, b = fit_logreg(A_tr[:, idx].permute(1, 0, 2), Y_tr[:, Ls])
        pred = torch.einsum("lnk,lk->nl", A_te[:, idx].permute(1, 0, 2), W) + b > 0
        f1_LK.append(f1_score(pred, Y_te[:, Ls]))
    f1_LK = torch.stack(f1_LK, 1)
    W_dec = F.normalize(sae.W_dec_FD.detach().float(), dim=1).cpu()
    rows = []
    for i, l in enumerate(letters):
        n_main, best = 0, -100.0
        for k in range(f1_LK.shape[1]):
            if f1_LK[i, k] > best + f1_jump:
                n_main, best = k + 1, f1_LK[i, k].item()
            else:
                break
        main = top_LK[i, :n_main]
        # ---- absorption on the probe's true positives
        p = probe_W[l] / probe_W[l].norm()
        tp = Y_te[:, l] & (x_te.cpu() @ probe_W[l] + probe_b[l] > 0)
        A, x_proj = A_te[tp], x_te.cpu()[tp] @ p                                    # [n, F], [n]
        cos_F = W_dec @ p
        proj = A * cos_F                                                             # [n, F]
        main_proj = proj[:, main].sum(1)
        cand = proj.clone()
        cand[:, main] = 0
        cand[:, cos_F < cos_frac] = 0
        absorbed = cand.clamp(min=0).topk(min(max_absorbers, cand.shape[1]), dim=1).values.sum(1)
        share = absorbed / x_proj.clamp(min=eps)
        frac = torch.where(main_proj <= 0, torch.ones_like(x_proj),
                           (torch.minimum(absorbed, x_proj - main_proj) /
                            (torch.minimum(absorbed, x_proj - main_proj) + main_proj)).clamp(0, 1))
        frac = torch.where((main_proj >= x_proj) | (share < proj_min) | (x_proj <= 0), torch.zeros_like(frac), frac)
        top_v, top_i = proj.max(1)
        full = ((A[:, main].abs() < eps).all(1) & (cos_F[top_i] >= cos_full) & (x_proj >= 0)
                & (top_v >= proj_min * x_proj))
        n = int(tp.sum())
        rows.append(dict(letter=LETTERS[l], n_true_pos=n, main_latents=main.tolist(), n_split=n_main,
                         split_f1=best, absorption_fraction=frac.sum().item() / max(n, 1),
                         full_absorption_rate=full.sum().item() / max(n, 1),
                         absorbing_latents=sorted(set(top_i[full].tolist()))))
    return rows


def letter_words(tok, n_max, seed=0):
    """Single-token words: tokens that decode to a space and >= 2 ASCII letters."""
    words = []
    for i in range(len(tok)):
        s = tok.decode([i])
        if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha():
            words.append((i, s[1:]))
    g = torch.Generator().manual_seed(seed)
    return [words[j] for j in torch.randperm(len(words), generator=g)[:n_max].tolist()]


ICL = [" tartan", " mode", " sugar"]          # a fixed few-shot prefix (fixed: all prompts same length)


@torch.no_grad()
def letter_activations(model, blocks, layer, tok, words, device, batch=64, amp=nullcontext()):
    """The residual stream at the word's position in
    '<bos> tartan has the first letter: T\\n ... {word} has the first letter:'. In a causal LM
    what follows the word cannot change it, so the prompt is run up to the word only."""
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    prefix = [bos] + sum((enc(f"{w} has the first letter: {w[1].upper()}\n") for w in ICL), [])
    ids = torch.tensor([prefix + [i] for i, _ in words])
    return torch.cat([resid(model, blocks, layer, c.to(device), amp)[:, -1] for c in ids.split(batch)])


@torch.no_grad()
def greedy_match(W_a_FD, W_b_FD, block=2048):
    """The greedy one-to-one matching of two dictionaries' rows by cosine (pairs taken in
    descending cosine, each latent at most once), without the [n_a, n_b] matrix: in rounds, each
    free latent of A finds its most similar free latent of B and vice versa (blocked maxes), and
    mutual nearest neighbours are matched. Greedy takes such a pair before any other pair that
    touches either latent, so it is in the greedy matching (ties aside); the most similar free
    pair is always mutual, so every round matches at least one. Until the smaller side is all matched: returns its min(n_a, n_b)
    matched cosines. Cost: O(n_a n_b D) per round, a few rounds in practice."""
    A, B = F.normalize(W_a_FD.float(), dim=1), F.normalize(W_b_FD.float(), dim=1)
    free_a, free_b = torch.arange(len(A), device=A.device), torch.arange(len(B), device=B.device)
    out = [A.new_zeros(0)]
    while len(free_a) and len(free_b):
        B_f = B[free_b]
        best_b = torch.empty(len(free_a), dtype=torch.long, device=A.device)   # each free a's best free b
        top_a = torch.full((len(free_b),), -float("inf"), device=A.device)     # each free b's best free a
        best_a = torch.zeros(len(free_b), dtype=torch.long, device=A.device)
        for s in range(0, len(free_a), block):
            cos = A[free_a[s:s + block]] @ B_f.T
            best_b[s:s + block] = cos.argmax(1)
            v, i = cos.max(0)
            new = v > top_a                          # strict: the first of equals, as argmax
            top_a, best_a = torch.where(new, v, top_a), torch.where(new, i + s, best_a)
        ia = (best_a[best_b] == torch.arange(len(free_a), device=A.device)).nonzero().squeeze(1)
        if len(ia) == 0:
            raise RuntimeError("greedy_match: no mutual nearest neighbours (NaN in a decoder?)")
        ib = best_b[ia]
        out.append((A[free_a[ia]] * B[free_b[ib]]).sum(1))
        keep_a = torch.ones(len(free_a), dtype=torch.bool, device=A.device)
        keep_b = torch.ones(len(free_b), dtype=torch.bool, device=A.device)
        keep_a[ia], keep_b[ib] = False, False
        free_a, free_b = free_a[keep_a], free_b[keep_b]
    return torch.cat(out)


def stability(W_a_FD, W_b_FD, alive_a, alive_b, thr=0.9, exact_max=2000):
    """Cross-run stability of two SAEs' live latents, as train_toy.stability: (fraction of the
    larger live set matched at cosine >= thr, mean matched cosine, number matched, method).
    Exact (Hungarian, train_toy.assign: O(n^3), numpy, CPU) up to exact_max live latents a side;
    above, greedy_match on the device. Greedy's number is a lower bound on the most pairs at
    >= thr any one-to-one matching has, and at least half of it; its mean cosine is a lower
    bound on the exact one."""
    W_a_FD, W_b_FD, n_a, n_b = W_a_FD.detach(), W_b_FD.detach(), int(alive_a.sum()), int(alive_b.sum())
    if max(n_a, n_b) <= exact_max:
        return (*train_toy.stability(W_a_FD.cpu(), W_b_FD.cpu(), alive_a.cpu(), alive_b.cpu(), thr), "hungarian")
    cos = greedy_match(W_a_FD[alive_a], W_b_FD[alive_b])
    n = int((cos >= thr).sum())
    return n / max(n_a, n_b), cos.mean().item(), n, "greedy"


# -----------------------------------------------------------------------------
# 5. Saving


def fold(sae, scale):
    """The SAE trained on activations * scale, rewritten to act on raw activations:
    pre(x) = (x - b_dec/s) W_enc + b_enc/s = pre'(s x) / s, and codes and reconstruction scale
    by 1/s too. Decoder rows stay unit-norm (cosines, SAELens and C²R all read them)."""
    out = c2r.SAE(sae.cfg).to(sae.W_dec_FD.device)
    out.load_state_dict(sae.state_dict())
    with torch.no_grad():
        out.b_enc_F.div_(scale)
        out.b_dec_D.div_(scale)
        out.threshold.div_(scale)
    return out.eval()


def save_saelens(sae, folder, run):
    """cfg.json + sae_weights.safetensors as SAELens (v6) reads them. BatchTopK is saved as
    JumpReLU with our inference threshold on every latent (what SAELens does itself)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    cfg = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}[cfg.kind]
    w = {"W_enc": sae.W_enc_DF, "W_dec": sae.W_dec_FD, "b_enc": sae.b_enc_F, "b_dec": sae.b_dec_D}
    if arch == "jumprelu":
        w["threshold"] = sae.threshold.expand(cfg.n_latents)
    w = {k: v.detach().float().cpu().contiguous() for k, v in w.items()}
    meta = dict(model_name=run["model"], hook_name=f"blocks.{run['layer']}.hook_resid_post",
                hook_layer=run["layer"], hook_head_index=None, context_size=run["ctx"], prepend_bos=True,
                dataset_path=run["data"])
    sl = dict(architecture=arch, d_in=cfg.d_model, d_sae=cfg.n_latents, dtype="float32", device="cpu",
              apply_b_dec_to_input=True, normalize_activations="none", reshape_activations="none",
              metadata=meta, **({"k": cfg.k} if arch == "topk" else {}), **meta)
    c2r.atomic_write(os.path.join(folder, "sae_weights.safetensors"), lambda p: save_file(w, p))
    c2r.atomic_write(os.path.join(folder, "cfg.json"), lambda p: Path(p).write_text(json.dumps(sl, indent=2)))


# -----------------------------------------------------------------------------
# 6. Main


def parse_args(argv=None):
    class Fmt(argparse.RawDescriptionHelpFormatter):    # shows defaults, except of on/off flags
        def _get_help_string(self, a):
            h = a.help or ""
            return h if a.nargs == 0 or a.default is None else h + " (default: %(default)s)"
    p = argparse.ArgumentParser(description=__doc__.split("\nRead it")[0].strip(), formatter_class=Fmt)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2", help="Hugging Face causal LM name or local directory")
    m.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    m.add_argument("--tokenizer", default=None, help="tokenizer name/directory, if not --model's")
    m.add_argument("--random-init", action="store_true", help="same architecture, random weights (speed runs)")
    m.add_argument("--layer", type=int, default=8, help="read the residual stream after this block")
    m.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="run the model and the SAE step in fp32 (TF32 matmuls); bf16 autocast is on CUDA only")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="Skylion007/openwebtext",
                   help="a .txt file or folder of them, a Hugging Face dataset (streamed; needs `datasets`), "
                        "or 'random' (uniform random tokens, for speed runs)")
    d.add_argument("--ctx", type=int, default=128, help="context length, BOS included")
    d.add_argument("--tokens", type=float, default=10_000_000, help="training tokens (activations) per SAE")
    d.add_argument("--eval-tokens", type=float, default=2 ** 17, help="held-out tokens for the evaluation")
    d.add_argument("--model-batch", type=int, default=256, help="contexts per forward pass")
    d.add_argument("--buffer", type=float, default=2 ** 19, help="activations in the shuffling buffer")
    s = p.add_argument_group("SAE (see c2r.Config)")
    s.add_argument("--kind", default="batchtopk", choices=c2r.KINDS, help="activation")
    s.add_argument("--n-latents", type=int, default=24576, help="dictionary size")
    s.add_argument("--k", type=int, default=32, help="active latents per token (topk kinds)")
    s.add_argument("--l1-coeff", type=float, default=c2r.Config.l1_coeff, help="relu only")
    s.add_argument("--lam", type=float, default=5.0, help="C²R lambda of the second SAE (the first has 0)")
    s.add_argument("--alpha", type=float, default=1.0, help="C²R alpha")
    s.add_argument("--nbr-every", type=int, default=c2r.Config.nbr_every,
                   help="refresh C²R's neighbour table every R steps (1: exact)")
    s.add_argument("--batch", type=int, default=4096, help="activations per SAE step")
    s.add_argument("--lr", type=float, default=c2r.Config.lr, help="Adam learning rate")
    s.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="train on raw activations instead of scaling them to unit mean squared norm")
    e = p.add_argument_group("evaluation")
    e.add_argument("--probe-words", type=int, default=8000, help="single-token words for the letter probes (0: skip)")
    e.add_argument("--min-probe-f1", type=float, default=0.6, help="drop letters whose probe is worse")
    e.add_argument("--max-k", type=int, default=10, help="k-sparse probing up to this k")
    e.add_argument("--stability", action="store_true",
                   help="also train baseline_run2 and c2r_run2 (SAE seed and training-token order seed + 1000) "
                        "and match each pair's live latents by decoder cosine")
    o = p.add_argument_group("run")
    o.add_argument("--out", default="out_gpt2", help="output folder")
    o.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    o.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N SAE steps")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    o.add_argument("--seed", type=int, default=0, help="SAE init, token order, shuffling")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args):
    t_start = time.time()
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True      # fp32 matmuls (--no-bf16, the eval's SAE): TF32
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" and args.bf16 \
        else nullcontext
    os.makedirs(args.out, exist_ok=True)
    say = (lambda *a: None) if args.quiet else print

    # ---- model and text
    t0 = time.time()
    model, tok = load_model(args.model, args.gguf_file, args.random_init, args.tokenizer, args.seed)
    if args.data != "random" and tok is None:
        raise ValueError(f"cannot load a tokenizer for {args.model!r}: pass --tokenizer DIR")
    model.to(dev)
    blocks = blocks_of(model)
    if not 0 <= args.layer < len(blocks):
        raise ValueError(f"--layer {args.layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
    D, T = model.config.hidden_size, args.ctx
    n_eval = max(1, math.ceil(args.eval_tokens / (T - 1)))
    steps = int(args.tokens) // args.batch
    if steps < 1:
        raise ValueError(f"--tokens {int(args.tokens)} is less than one batch of {args.batch}")
    say(f"model {args.model}{' (random init)' if args.random_init else ''}: {len(blocks)} blocks, d_model {D}, "
        f"loaded in {time.time() - t0:.1f}s; layer {args.layer}; {steps} steps x {args.batch} tokens per SAE")
    run_info = dict(model=args.model, gguf_file=args.gguf_file, random_init=args.random_init, layer=args.layer,
                    data=args.data, ctx=T, tokens=int(args.tokens), eval_tokens=int(args.eval_tokens),
                    batch=args.batch, buffer=int(args.buffer), model_batch=args.model_batch,
                    normalize=args.normalize, seed=args.seed)

    def stream(clock, seed):
        """The training batches: the same seeded token order and shuffle every time it is called
        with the same seed; another seed reorders them (same held-out tokens)."""
        ev, rows = contexts(args.data, tok, T, n_eval, model.config.vocab_size, args.seed,
                            order=None if seed == args.seed else seed)
        gen = torch.Generator(device=dev).manual_seed(seed)
        chunks = harvest(model, blocks, args.layer, rows, args.model_batch, dev, amp(), clock)
        return ev, (x * scale for x in shuffled(chunks, int(args.buffer), args.batch, gen))

    # activation scale: from the first training contexts (never the held-out ones)
    scale = 1.0
    eval_ids, _ = contexts(args.data, tok, T, n_eval, model.config.vocab_size, args.seed)
    if args.normalize:
        _, rows = contexts(args.data, tok, T, n_eval, model.config.vocab_size, args.seed)
        first = next(harvest(model, blocks, args.layer, rows, args.model_batch, dev, amp()))
        scale = first.pow(2).sum(1).mean().rsqrt().item()
    say(f"activation scale {scale:.4g}")

    # ---- train the two SAEs, one after the other, on the same stream (--stability: and their
    # second runs, with another SAE seed and token order, on the same stream as each other)
    saes, logs, timing = {}, {}, {}
    jobs = [("baseline", 0.0, args.seed), ("c2r", args.lam, args.seed)]
    if args.stability:
        jobs += [("baseline_run2", 0.0, args.seed + 1000), ("c2r_run2", args.lam, args.seed + 1000)]
    for name, lam, seed in jobs:
        cfg = c2r.Config(d_model=D, n_latents=args.n_latents, kind=args.kind, k=args.k, l1_coeff=args.l1_coeff,
                         c2r_lambda=lam, c2r_alpha=args.alpha, nbr_every=args.nbr_every, steps=steps, lr=args.lr,
                         log_every=max(1, steps // 20), seed=seed, bf16=dev.type == "cuda" and args.bf16)
        ck = os.path.join(args.out, f"{name}.ckpt.pt")
        sae, start, opt_state, log = c2r.SAE(cfg).to(dev), 0, None, []
        if args.resume and os.path.exists(ck):
            old, extra = c2r.load(ck, map_location=dev)
            diff = {k: (extra["run"].get(k), v) for k, v in run_info.items() if extra["run"].get(k) != v}
            diff.update({k: (v, getattr(cfg, k)) for k, v in asdict(old.cfg).items() if v != getattr(cfg, k)})
            if diff:
                raise ValueError(f"--resume: {ck} is from another configuration: "
                                 + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
            sae, start, opt_state, log, scale = old.to(dev), extra["step"], extra["opt"], extra["log"], extra["scale"]
            say(f"{name}: resuming at step {start} of {steps}")
        elif args.resume:
            say(f"{name}: no checkpoint {ck}, starting from step 0")

        def on_step(step, opt, new_log, sae=sae, ck=ck, log0=log):
            if (step + 1) % args.ckpt_every == 0 or step + 1 == steps:
                c2r.save(sae, ck, step=step + 1, opt=opt.state_dict(), log=log0 + new_log, run=run_info, scale=scale)

        clock = {}
        _, batches = stream(clock, seed)
        t0 = time.time()
        if start < steps:
            batches = itertools.islice(batches, start, None)    # replay the stream up to the checkpoint
            sae, new_log = c2r.train(sae, batches, progress=not args.quiet, start=start, opt_state=opt_state,
                                     on_step=on_step)
            log = log + new_log
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall, hs, ht = time.time() - t0, clock.get("s", 0.0), clock.get("tokens", 0)
        timing[name] = dict(wall_s=wall, steps=steps - start, harvest_s=hs, harvest_tok_per_s=ht / max(hs, 1e-9),
                            sae_s=wall - hs, sae_tok_per_s=(steps - start) * args.batch / max(wall - hs, 1e-9))
        saes[name], logs[name] = sae.eval(), log

    # ---- evaluate on the held-out tokens
    t0 = time.time()
    ev = eval_ids.to(dev)
    x_eval = torch.cat([resid(model, blocks, args.layer, c, amp())[:, 1:].reshape(-1, D)
                        for c in ev.split(args.model_batch)])
    ce = lambda splice: sum(ce_loss(model, blocks, args.layer, c, splice, amp()) * len(c)
                            for c in ev.split(args.model_batch)) / len(ev)
    ce_clean, ce_zero = ce(None), ce(lambda h: torch.zeros_like(h))
    results = dict(run=run_info, scale=scale, ce_clean=ce_clean, ce_zero_ablation=ce_zero, saes={})
    probes, fired = None, {}
    if args.probe_words > 0 and tok is not None:
        words = letter_words(tok, args.probe_words, args.seed)
        x_w = letter_activations(model, blocks, args.layer, tok, words, dev, amp=amp())
        lab = torch.tensor([LETTERS.index(w[0].lower()) for _, w in words])
        n_tr = int(0.8 * len(words))
        split = (x_w[:n_tr], lab[:n_tr], x_w[n_tr:], lab[n_tr:])
        W, b, f1 = letter_probes(*split)
        has = torch.bincount(lab[n_tr:], minlength=26) > 0
        ok = [l for l in range(26) if has[l] and f1[l] >= args.min_probe_f1]
        probes = (W, b, split, ok)
        results["probe"] = dict(n_words=len(words), f1={LETTERS[l]: round(f1[l].item(), 4) for l in range(26)},
                                letters_kept=len(ok), letters_dropped=26 - len(ok))
    for name, sae in saes.items():
        raw = fold(sae, scale)
        r = recon_metrics(raw, x_eval)
        fired[name] = r.pop("fired")
        r["ce_loss"] = ce(lambda h: raw(h.reshape(-1, D))[0].view_as(h))
        r["ce_recovered"] = ce_recovered(r["ce_loss"], ce_clean, ce_zero)
        if probes is not None:
            W, b, split, ok = probes
            rows = absorption(raw, W, b, *split, ok, max_k=args.max_k)
            r["absorption"] = dict(
                mean_absorption_fraction=sum(x["absorption_fraction"] for x in rows) / max(len(rows), 1),
                mean_full_absorption=sum(x["full_absorption_rate"] for x in rows) / max(len(rows), 1),
                mean_split_latents=sum(x["n_split"] for x in rows) / max(len(rows), 1), letters=rows)
        r["final_c2r"] = logs[name][-1]["c2r"] if logs[name] else None
        results["saes"][name] = r
    if args.stability:     # run 1 vs run 2, live latents (fired on the held-out tokens) only
        results["stability"] = {}
        for name in ("baseline", "c2r"):
            frac, cos, n, how = stability(saes[name].W_dec_FD, saes[name + "_run2"].W_dec_FD,
                                          fired[name], fired[name + "_run2"])
            results["stability"][name] = dict(stab09=frac, stab09_n=n, stab_cos=cos, method=how,
                                              live=[int(fired[name].sum()), int(fired[name + "_run2"].sum())])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    eval_s = time.time() - t0

    # ---- save: our checkpoint (exact reload) and the SAELens layout
    for name, sae in saes.items():
        raw = fold(sae, scale)
        c2r.save(raw, os.path.join(args.out, f"{name}.pt"), act_scale=scale, run=run_info, log=logs[name])
        save_saelens(raw, os.path.join(args.out, f"{name}_saelens"), run_info)
    results["timing"] = dict(total_s=time.time() - t_start, eval_s=eval_s, **timing,
                             peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None)
    c2r.atomic_write(os.path.join(args.out, "results.json"),
                     lambda p: Path(p).write_text(json.dumps(results, indent=2)))
    print(table(results))
    return results, saes


def table(res):
    rows = [("FVU", "fvu", "{:.4f}"), ("explained variance", "explained_variance", "{:.4f}"), ("L0", "l0", "{:.1f}"),
            ("dead latents", "dead", "{}"), ("CE loss (clean {:.4f}, zero-abl. {:.4f})".format(
                res["ce_clean"], res["ce_zero_ablation"]), "ce_loss", "{:.4f}"),
            ("CE loss recovered", "ce_recovered", "{:.4f}"), ("C²R penalty (last step)", "final_c2r", "{:.4g}")]
    names = list(res["saes"])
    out = [f"| metric | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in rows:
        out.append(f"| {label} | " + " | ".join("-" if res["saes"][n][key] is None else fmt.format(res["saes"][n][key]) for n in names) + " |")
    if "probe" in res:
        pr = res["probe"]
        for label, key in (("mean absorption fraction", "mean_absorption_fraction"),
                           ("full-absorption rate", "mean_full_absorption"), ("split latents / letter", "mean_split_latents")):
            out.append(f"| {label} | " + " | ".join(f"{res['saes'][n]['absorption'][key]:.4f}" for n in names) + " |")
        out.append(f"\nletters kept {pr['letters_kept']}/26 (probe F1 >= bar; {pr['letters_dropped']} dropped), "
                   f"{pr['n_words']} words")
    if "stability" in res:
        st = res["stability"]
        out += ["\ncross-run stability (run 1 vs run 2: live latents matched one to one by decoder cosine)",
                "| | " + " | ".join(st) + " |", "|---" * (len(st) + 1) + "|"]
        for label, key, fmt in (("matched at cos >= 0.9 (fraction of the larger live set)", "stab09", "{:.4f}"),
                                ("matched at cos >= 0.9 (number)", "stab09_n", "{}"),
                                ("mean matched cosine", "stab_cos", "{:.4f}"), ("live latents (run 1, run 2)", "live", "{}"),
                                ("matching", "method", "{}")):
            out.append(f"| {label} | " + " | ".join(fmt.format(st[n][key]) for n in st) + " |")
    t = res["timing"]
    for n in names:
        out.append(f"{n}: {t[n]['steps']} steps in {t[n]['wall_s']:.1f}s; harvest {t[n]['harvest_tok_per_s']:,.0f} tok/s, "
                   f"SAE training {t[n]['sae_tok_per_s']:,.0f} tok/s")
    mem = t["peak_gpu_mem_gib"]
    out.append(f"evaluation {t['eval_s']:.1f}s; whole run {t['total_s']:.1f}s"
               + (f"; peak GPU memory {mem:.2f} GiB" if mem is not None else ""))
    return "\n".join(out)


if __name__ == "__main__":
    run(parse_args())
