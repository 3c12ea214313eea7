"""
The language-model side of train_gpt2.py: a model's residual stream as SAE training data.

Read it top to bottom:
  1. the model: load it, read the residual stream after block L with a forward hook, and the CE
     loss with an SAE's reconstruction spliced in
  2. the text: local .txt files, a Hugging Face dataset, or random tokens -> fixed-length contexts
  3. the activations: harvest, shuffle, serve every activation once; the on-disk cache
  4. export: an SAE trained on scaled activations, rewritten for raw ones; the SAELens layout
  5. fingerprints of the files a run read, so --resume and --cache refuse changed inputs
  6. the figure: absorption against CE loss recovered and FVU
  7. flags from a dataclass (c2r.Config's fields), with its comments as help
"""

import argparse
import ast
import functools
import hashlib
import importlib.metadata
import inspect
import io
import itertools
import json
import math
import os
import time
import tokenize
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import c2r

# -----------------------------------------------------------------------------
# 1. The model

def load_model(name, gguf_file=None, random_init=False, tokenizer=None, seed=0, check=lambda cfg: None,
               hub_tokenizer=True):
    """Returns (model, tok). check(config) runs before the weights load (a bad flag fails fast).
    tok is None only when no tokenizer can be found and none is needed (a --random-init run on
    --data random, which passes hub_tokenizer=False: no tokenizer download unless --tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2Tokenizer
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"--model {name!r}: no such model directory")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    fail = lambda e: ValueError(f"cannot load model {name!r} ({type(e).__name__}: {str(e)[:300]})")
    try:
        # GPT2Config() *is* GPT-2 small's architecture: no download needed for the default.
        cfg = GPT2Config() if random_init and name == "gpt2" else AutoConfig.from_pretrained(name, **kw)
    except Exception as e:
        raise fail(e) from None
    check(cfg)
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg) if random_init else \
            AutoModelForCausalLM.from_pretrained(name, config=cfg, dtype=torch.float32, **kw)   # GGUF: parsed once
    except Exception as e:
        raise fail(e) from None
    tok = None
    if not (tokenizer or hub_tokenizer or os.path.isdir(os.path.expanduser(name))):
        return model.eval(), tok
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
    """The transformer blocks (model.transformer.h for GPT-2, model.model.layers for Llama, ...):
    the ModuleList with one entry per layer."""
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
# 2. The text: every context is a BOS token (position 0, left out of training and of the SAE's
# splice) and ctx - 1 tokens. The order is fixed by the seed: every pass sees the same contexts.

def data_files(data):
    """The regular files --data names: the file itself, or every regular *.txt file in the folder,
    sorted (a FIFO or a device would block or never end)."""
    if os.path.isdir(data):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs
                       if f.endswith(".txt") and os.path.isfile(os.path.join(r, f)))
        if not files:
            raise ValueError(f"--data {data!r}: the folder has no regular .txt files")
        return files
    if not os.path.isfile(data):
        raise ValueError(f"--data {data!r}: not a regular file or a folder")
    return [data]


def read_text(f):
    """A file's text, strictly UTF-8: a binary, Latin-1 or UTF-16 file is refused, not read as
    replacement characters."""
    raw = Path(f).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: {f} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    if "\0" in text:
        raise ValueError(f"--data: {f} is not text (it holds NUL bytes: binary or UTF-16)")
    return text


@functools.lru_cache(maxsize=2)
def read_tokens(data, tok):
    """All tokens of a .txt file or of the .txt files in a folder (sorted), documents joined
    by the end-of-text token."""
    ids = []
    for f in data_files(data):
        text = read_text(f)
        if text.strip():
            ids += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    if not ids:
        raise ValueError(f"--data {data!r}: the text is empty")
    return torch.tensor(ids, dtype=torch.long)


def random_rows(ctx, vocab_size, g):
    """--data random, for speed runs: uniform random tokens, endless."""
    while True:
        yield torch.randint(vocab_size, (ctx,), generator=g)


def text_rows(data, tok, bos, ctx, n_eval, g):
    """Local text cut into contexts, shuffled: (held-out [n_eval, ctx], endless training rows);
    a small corpus is repeated, in a fresh order each epoch."""
    ids = read_tokens(data, tok)
    n = len(ids) // (ctx - 1)
    if n <= n_eval:
        raise ValueError(f"--data {data!r} has {len(ids)} tokens: {n} contexts of {ctx}, but the held-out "
                         f"evaluation alone needs {n_eval} (lower --eval-tokens or --ctx, or add text)")
    rows_NT = torch.cat([torch.full((n, 1), bos), ids[: n * (ctx - 1)].view(n, ctx - 1)], 1)
    rows_NT = rows_NT[torch.randperm(n, generator=g)]
    tr = rows_NT[n_eval:]

    def cycle():
        for epoch in itertools.count():
            yield from tr[torch.randperm(len(tr), generator=g)] if epoch else tr
    return rows_NT[:n_eval], cycle()


def dataset_rows(data, tok, bos, ctx):
    """A streamed Hugging Face dataset: documents in order ('text' or pre-tokenised 'input_ids')."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {data!r} is not a local path; to stream it as a Hugging Face dataset, "
                         f"`pip install datasets`") from None
    buf = []
    for doc in datasets.load_dataset(data, split="train", streaming=True):
        buf += doc["input_ids"] if "input_ids" in doc else \
            tok(doc["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        while len(buf) >= ctx - 1:
            yield torch.tensor([bos] + buf[: ctx - 1])
            buf = buf[ctx - 1:]


def contexts(data, tok, ctx, n_eval, vocab_size, seed=0):
    """Returns (eval_ids [n_eval, ctx], train): train is an endless iterator of [ctx] rows."""
    if ctx < 2:
        raise ValueError(f"--ctx must be >= 2 (BOS + at least one token), got {ctx}")
    g = torch.Generator().manual_seed(seed)
    if data == "random":
        it = random_rows(ctx, vocab_size, g)
        return torch.stack([next(it) for _ in range(n_eval)]), it
    if tok is None:
        raise ValueError("no tokenizer: pass --tokenizer DIR (or use --data random)")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if os.path.exists(data):
        return text_rows(data, tok, bos, ctx, n_eval, g)
    if data.startswith((".", "/", "~")) or data.endswith(".txt"):
        raise ValueError(f"--data {data!r}: no such file or folder")
    it = dataset_rows(data, tok, bos, ctx)
    return torch.stack([next(it) for _ in range(n_eval)]), it


# -----------------------------------------------------------------------------
# 3. The activations

def harvest(model, blocks, layer, rows, model_batch, device, amp=nullcontext()):
    """Activations, context by context: [model_batch * (ctx - 1), D] fp32 chunks, the first
    (BOS) position left out."""
    while ids := list(itertools.islice(rows, model_batch)):
        yield resid(model, blocks, layer, torch.stack(ids).to(device), amp)[:, 1:].reshape(-1, model.config.hidden_size)


def timed(chunks, clock):
    """The chunks, adding up into clock (a dict) the seconds and rows it took to make them. On a GPU
    the clock starts once the work queued before (the SAE's last step) is done, so none of it counts."""
    dev = None
    while True:
        if dev is not None:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        c = next(chunks, None)
        if c is None:
            return
        if c.is_cuda:
            dev = c.device
            torch.cuda.synchronize(dev)
        clock["s"], clock["tokens"] = clock.get("s", 0.0) + time.perf_counter() - t0, clock.get("tokens", 0) + len(c)
        yield c


def rounded(chunks):
    """Activations rounded to float16, what the cache stores, and back to fp32."""
    for c in chunks:
        r = c.half()
        if not torch.isfinite(r).all():
            raise ValueError(f"an activation of magnitude {c.abs().max().item():,.0f} is beyond float16's 65,504: "
                             f"train without --cache, in float32")
        yield r.float()


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


def share(items, size, rank, ranks):
    """torchrun: this rank's items of a stream, cut in blocks of `size`: blocks rank, rank + ranks, ..."""
    while block := list(itertools.islice(items, size * ranks)):
        yield from block[rank * size:(rank + 1) * size]


def rows_needed(steps, batch, n_buffer, chunk):
    """How many activations shuffled() pulls from chunks of `chunk` rows to serve `steps` batches:
    what the cache must hold. It mirrors shuffled's bookkeeping, chunk by chunk."""
    pulled = have = served = 0
    while served < steps:
        pulled, have = pulled + chunk, have + chunk
        if have >= n_buffer:
            served, have = served + have // batch, have % batch
    return pulled


# The cache (--cache DIR): the training activations, in stream order (before the shuffle, which
# runs on them as on live ones), as float16 .npy shards acts_00000.npy, ... of a whole number of
# model batches each, memory-mapped when read. float16 rather than bfloat16: 3 more bits of
# mantissa (relative rounding 2^-11), a numpy dtype that np.load can memory-map, and its range
# (65,504) is checked as it is written. settings.json says what the cache holds; each shard is
# written whole under a temporary name and renamed; manifest.json (token count, shards, scale)
# comes last, so a cache without it is incomplete whatever its shards hold, and a rerun continues
# after the last full shard. Only training contexts enter: the held-out ones come first in the
# seeded order and are never harvested. The SAEs then train on float16-rounded activations, which
# train_gpt2.py's --act-dtype float16 gives without a cache, bit for bit.
SHARD_BYTES = 2 ** 28


def shard_path(folder, i):
    return os.path.join(folder, f"acts_{i:05d}.npy")


def read_json(path):
    return json.loads(Path(path).read_text()) if os.path.exists(path) else None


def check_cache(folder, settings):
    """Refuse a cache made with other settings or from other text or model files, naming what differs."""
    have = read_json(os.path.join(folder, "settings.json"))
    if have is None:
        if os.path.isdir(folder) and os.listdir(folder):
            raise ValueError(f"--cache {folder}: not empty and no settings.json: not a cache of this script")
        return None
    diff = [f"{k} {have.get(k)!r} there, {v!r} here" for k, v in settings.items() if have.get(k) != v and k != "inputs"]
    diff += fingerprint_diff(have.get("inputs"), settings["inputs"], "the cache")   # the files it read
    if diff:
        raise ValueError(f"--cache {folder} holds activations made with other settings ({'; '.join(diff)}): "
                         f"use another folder")
    return read_json(os.path.join(folder, "manifest.json"))


def open_cache(folder, settings, n_rows):
    """The shards of a complete cache of >= n_rows activations, memory-mapped."""
    man = check_cache(folder, settings)
    if man is None:
        raise ValueError(f"--cache {folder} is incomplete (no manifest.json): rerun with the same settings "
                         f"to continue its harvest")
    if man["tokens"] < n_rows:
        raise ValueError(f"--cache {folder} holds {man['tokens']} activations, this run needs {n_rows}")
    shards = [np.load(shard_path(folder, i), mmap_mode="r") for i in range(len(man["shards"]))]
    bad = [i for i, (a, n) in enumerate(zip(shards, man["shards"])) if a.shape != (n, settings["d_model"])]
    if bad:
        raise ValueError(f"--cache {folder}: shard {shard_path(folder, bad[0])} is not the one the manifest lists")
    # np.load memory-maps a damaged shard without a word: check the shards this run reads against the
    # manifest's sha256s (a pass over them, ~1-2 GB/s, before training rather than a wrong run after)
    need = [shard_path(folder, i) for i in range(len(shards)) if sum(man["shards"][:i]) < n_rows]
    if "sha256" not in man:
        warnings.warn(f"--cache {folder} has no checksums (written before the manifest held them): not verified",
                      stacklevel=2)
    elif bad := [p for p, (_, h), want in zip(need, files_fp(need).values(), man["sha256"]) if h != want]:
        raise ValueError(f"--cache {folder}: shard {bad[0]} is damaged: its contents do not match the sha256 "
                         f"its manifest lists (delete the shard and the manifest, and rerun to harvest it again)")
    return shards


def read_cache(shards, chunk, device, rank=0, ranks=1):
    """The cached activations in the chunks harvest() yields (shards hold whole chunks), as fp32;
    under torchrun this rank's chunks alone, those share() gives it of the live stream."""
    for a, s in [(a, s) for a in shards for s in range(0, len(a), chunk)][rank::ranks]:
        yield torch.from_numpy(np.array(a[s:s + chunk])).to(device).float()


def fill_cache(folder, settings, rows, harvest_fn, n_rows, scale, say):
    """Harvest n_rows training activations into the cache, after the full shards already there.
    harvest_fn(rows) -> chunks already rounded by rounded(). Under torchrun every rank calls it and
    harvests every N-th shard; the bookkeeping is rank 0's."""
    (rank, ranks), man_path = c2r.world(), os.path.join(folder, "manifest.json")
    barrier = torch.distributed.barrier if ranks > 1 else lambda: None
    barrier()                                   # every rank has read the cache's state before rank 0 changes it
    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        if check_cache(folder, settings) is None:
            c2r.atomic_write(os.path.join(folder, "settings.json"), lambda p: Path(p).write_text(json.dumps(settings)))
        elif os.path.exists(man_path):          # too short: extend it, incomplete meanwhile
            os.unlink(man_path)
        for f in os.listdir(folder):            # what a killed process left half-written
            if ".c2r-tmp-" in f:            # c2r.tmp_name
                os.unlink(os.path.join(folder, f))
    barrier()
    per, T1 = settings["shard_rows"], settings["ctx"] - 1
    done = 0
    while os.path.exists(shard_path(folder, done)) and len(np.load(shard_path(folder, done), mmap_mode="r")) == per:
        done += 1
    if done:
        say(f"cache {folder}: {done} full shards there, harvesting from token {done * per}")
    chunks = harvest_fn(share(itertools.islice(rows, done * per // T1, None), per // T1, rank, ranks))
    for i in range(done + rank, -(-n_rows // per), ranks):     # shard i: rows i * per, ... of the stream
        got, n = [], 0
        while n < min(per, n_rows - i * per) and (c := next(chunks, None)) is not None:
            got.append(c.half().cpu())
            n += len(c)
        if not got:     # a finite dataset ran out: the cache holds what there was
            break

        def write(p, a=torch.cat(got).numpy()):
            with open(p, "wb") as f:
                np.save(f, a)
        c2r.atomic_write(shard_path(folder, i), write)
    barrier()
    paths = [p for i in range(max(done, -(-n_rows // per))) if os.path.exists(p := shard_path(folder, i))]
    sizes = [len(np.load(p, mmap_mode="r")) for p in paths]
    man = dict(settings, tokens=sum(sizes), shards=sizes, scale=scale, date=time.ctime())
    if rank == 0:
        man["sha256"] = [h for _, h in files_fp(paths).values()]     # open_cache checks them
        c2r.atomic_write(man_path, lambda p: Path(p).write_text(json.dumps(man, indent=1)))
    barrier()
    return man


# -----------------------------------------------------------------------------
# 4. Export

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
    try:                     # SAELens reads a config without sae_lens_version as pre-6.0 and renames its keys
        version = importlib.metadata.version("sae-lens")     # without importing it: that takes seconds
    except importlib.metadata.PackageNotFoundError:
        version = "6.0.0"
    # the metadata SAELens's own trainer writes (llm_sae_training_runner.py); we train on every
    # position but the first (BOS), of contexts that start with BOS, special tokens included
    meta = dict(model_name=run["model"], model_class_name="HookedTransformer",
                hook_name=f"blocks.{run['layer']}.hook_resid_post", hook_layer=run["layer"], hook_head_index=None,
                context_size=run["ctx"], prepend_bos=True, seqpos_slice=(1, None), exclude_special_tokens=False,
                model_from_pretrained_kwargs={"center_writing_weights": False}, dataset_path=run["data"],
                sae_lens_version=version, sae_lens_training_version=None)
    sl = dict(architecture=arch, d_in=cfg.d_model, d_sae=cfg.n_latents, dtype="float32", device="cpu",
              apply_b_dec_to_input=True, normalize_activations="none", reshape_activations="none",
              metadata=meta, **({"k": cfg.k} if arch == "topk" else {}), **meta)
    c2r.atomic_write(os.path.join(folder, "sae_weights.safetensors"), lambda p: save_file(w, p))
    c2r.atomic_write(os.path.join(folder, "cfg.json"), lambda p: Path(p).write_text(json.dumps(sl, indent=2)))


# -----------------------------------------------------------------------------
# 5. What a run read: a fingerprint of its text and model files (size and sha256 of each), stored
# with every checkpoint and in the cache's settings, so --resume and --cache refuse changed inputs.
WEIGHTS = (".gguf", ".safetensors", ".bin", ".pt", ".pth", "config.json", "tokenizer.json", "vocab.json", "merges.txt")
TOKENIZER = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json")      # what transformers reads a tokenizer from


def writable_folder(folder, flag):
    """Create folder and write a probe file in it: an unwritable --out fails before the model loads."""
    if not folder:
        raise ValueError(f"{flag} is empty: name a folder")
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        Path(probe).write_text("")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {folder!r} is not a writable folder ({e.strerror or e})") from None


def files_fp(paths):
    """{path: [size, sha256]}, read in 1 MiB chunks; once per run (fingerprint() is called once)."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(2 ** 20):
                h.update(chunk)
        out[p] = [os.path.getsize(p), h.hexdigest()]
    return out


def fingerprint(data, model, gguf_file=None, random_init=False, seed=0, config=None, tokenizer=None):
    """{"data": {file: [size, sha256]} (or the dataset's name), "model": the same for the weights
    files in --model's directory (or, for --random-init, its config and the seed), "tokenizer": the
    same for the tokenizer's files (--tokenizer's directory, else --model's; or the Hub name)}."""
    fp = dict(data={"random": seed} if data == "random" else
              files_fp(data_files(data)) if os.path.exists(data) else {"dataset": data})
    if random_init:
        fp["model"] = {"config": config, "seed": seed}
    elif os.path.isdir(model):
        names = [gguf_file] if gguf_file else sorted(f for f in os.listdir(model) if f.endswith(WEIGHTS))
        fp["model"] = files_fp([os.path.join(model, f) for f in names if os.path.isfile(os.path.join(model, f))])
    else:
        fp["model"] = {"hub": model}
    where = os.path.expanduser(tokenizer or model)
    fp["tokenizer"] = files_fp([os.path.join(where, f) for f in sorted(os.listdir(where)) if f in TOKENIZER]) \
        if os.path.isdir(where) else {"hub": tokenizer or model}
    return fp


def fingerprint_diff(old, new, where):
    """What changed between two fingerprints (old=None: one not recorded), one phrase per file."""
    if old is None:
        return [f"{where} does not record the files it was made from (it predates fingerprints)"]
    out = []
    for part, flag in (("data", "--data"), ("model", "--model"), ("tokenizer", "--tokenizer")):
        if part not in old:
            out.append(f"{where} does not record its {part} files (it predates their fingerprints)")
            continue
        a, b = old[part], new.get(part, {})
        out += [f"a file was added to {flag}: {f}" for f in b if f not in a]
        out += [f"a file was removed from {flag}: {f}" for f in a if f not in b]
        out += [f"{f} changed since {where} was written (size {a[f][0]} -> {b[f][0]}, "
                f"sha256 {a[f][1][:12]}… -> {b[f][1][:12]}…)"
                if isinstance(a[f], list) and isinstance(b[f], list) else f"{flag} {f} was {a[f]!r}, now {b[f]!r}"
                for f in b if f in a and a[f] != b[f]]
    return out


# -----------------------------------------------------------------------------
# 6. The figure of train_gpt2.py's results

def plot(res, path):
    """Absorption against CE loss recovered and against FVU: one curve per method, a point per
    setting, mean ± std over its seeds, in the style of train_toy.py's sweep. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {}
    for g in res["groups"]:
        if g["absorption"] is not None:
            curves.setdefault(g["method"], []).append(g)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (col, label) in zip(axes, [("ce_recovered", "CE loss recovered (higher is better)"),
                                       ("fvu", "FVU (lower is better)")]):
        for i, (m, gs) in enumerate(curves.items()):
            gs = sorted(gs, key=lambda g: g[col][0])
            ax.errorbar([g[col][0] for g in gs], [g["absorption"][0] for g in gs], xerr=[g[col][1] for g in gs],
                        yerr=[g["absorption"][1] for g in gs], marker="os^vDP<"[i % 7], ms=4, capsize=2, lw=1.2,
                        ls="--" if m.endswith("C²R") else "-", label=m)
        ax.set_xlabel(label)
        ax.set_ylabel("mean absorption fraction (lower is better)")
        ax.grid(alpha=0.3)
    n = max(len(g["runs"]) for g in res["groups"])
    fig.suptitle(f"train_gpt2.py: {res['run'].get('gguf_file') or os.path.basename(res['run']['model'].rstrip('/'))}, "
                 f"layer {res['run']['layer']}; mean ± std over "
                 f"up to {n} seed{'s' * (n > 1)}", fontsize=11)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=max(1, len(curves)), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 7. Flags from a dataclass: train_gpt2.py's SAE flags are c2r.Config's fields, with their types,
# defaults and the comments beside them as help

class HelpFormat(argparse.RawDescriptionHelpFormatter):   # shows defaults, but of on/off flags and unset ones
    def _get_help_string(self, a):
        on_off = a.nargs == 0 and not isinstance(a, argparse.BooleanOptionalAction)
        return a.help if on_off or a.default is None else a.help + " (default: %(default)s)"


def field_docs(cls):
    """{field: help}, from the class's source: the field's trailing `# comment` (continued by the
    comment lines indented under it) or the attribute docstring after it."""
    src = inspect.cleandoc(inspect.getsource(cls))
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    body, docs = ast.parse(src).body[0].body, {}
    for node, nxt in zip(body, body[1:] + [None]):
        if not isinstance(node, ast.AnnAssign):
            continue
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
            continue
        text, ln = [comments.get(node.end_lineno, "")], node.end_lineno
        while ln < len(lines) and lines[ln].lstrip().startswith("#") and \
                len(lines[ln]) - len(lines[ln].lstrip()) > node.col_offset:
            text, ln = text + [comments[ln + 1]], ln + 1
        docs[node.target.id] = " ".join(t for t in text if t)
    return docs


def field_type(f):
    """The field's type as a parser of strings (a flag's or a --runs value)."""
    t = f.type if isinstance(f.type, type) else type(f.default)
    return {tuple: lambda s: tuple(int(v) for v in s.split(",") if v),
            bool: lambda s: {"true": True, "false": False}[s.lower()]}.get(t, t)


def at_least(t, lo, strict=False):
    """A flag's parser: a finite t >= lo (> lo if strict), else argparse's error (exit 2)."""
    def parse(s):
        v = t(s)
        if not math.isfinite(v) or v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {lo}, got {s!r}")
        return v
    return parse
