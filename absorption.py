"""
First-letter feature absorption (Chanin et al., "A is for Absorption", 2024), computed as
SAEBench 0.6.0's absorption eval computes it, step for step, on activations from our own model.

    data = absorption.prepare(tok, resid_fn, device="cpu")    # the model's part, once
    res = absorption.score(sae, data)                          # one SAE (JSON-serialisable)
    gap = absorption.bootstrap_diff(res_a, res_b)              # a 95 % interval for a - b

SAEBench's run_eval loads its model by Hub name, so its steps are redone here; each is checked
against SAEBench's own functions in tests/test_absorption.py. The steps (SAEBench's files):
  1. words (vocab.py): every token whose text is ASCII letters after at most one leading space.
  2. prompts (probing.py, prompting.py): the words shuffled and split 80/20; each word gets
     '\\n' + 10 lines '{ex} has the first letter: {EX}' (examples drawn from its own split) +
     '\\n{word} has the first letter:', read at the word (the 6th token from the end), in fp32.
  3. ground-truth probes (probing.py, common.py): one linear probe per letter on the raw
     activations, Adam 1e-2 -> 1e-5 over 50 epochs, batch 64, weight decay 1e-4, BCE with
     pos_weight. Letters whose test F1 is not above 0.6 are dropped; under 20 left: no score.
  4. main latents (k_sparse_probing.py): an L1-penalised probe on the SAE's codes ranks the
     latents; a class-balanced logistic regression (scikit-learn) on the top k, k = 1, 2, ...
     while each k raises test F1 by more than 0.03: those k are the letter's main latents.
  5. absorption (feature_absorption*.py): each test word the letter's probe gets right is
     prompted again (10 new examples from all words); absorption fraction = the share of its
     probe projection carried by up to 3 other probe-aligned latents (cos >= 0.1) rather than
     the main ones (0 unless they carry >= 40 %); full absorption = no main latent fires and
     the top-projecting latent (cos >= 0.025) carries >= 40 %. Means per letter, then over letters.

Where this differs from SAEBench, and why (none changes a number SAEBench would report for the
same words and prompts):
  - the words are put in token-id order before the seeded shuffle: SAEBench shuffles them in the
    tokenizer's dict order, which for fast tokenizers changes from one process to the next, so its
    split cannot be reproduced at all;
  - each prompt is run only up to its word (the model is causal: what follows cannot change the
    activation there) and read at its own position, not at -6 of a padded batch (the same thing
    when all prompts have one length, which SAEBench's calculator demands anyway);
  - one set of re-prompts serves every SAE scored (SAEBench draws fresh examples for each SAE): the
    same words and prompts for both sides of a comparison;
  - the k-sparse probes are fitted for the kept letters only, up to the first k that adds too
    little (the main latents depend on nothing more); SAEBench fits k = 1..10 for all 26;
  - pos_weight guards a letter with no training word (SAEBench would divide by zero, NaN).
"""

import hashlib
import math
import random
import string
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
WORD_POS = -6                   # the word's token, counted from the prompt's end
N_ICL = 10                      # examples per prompt
TRAIN_SHARE = 0.8               # of the words, for the probes' training split
# the fewest words whose test split (the smaller) holds a word and N_ICL others to prompt it with
MIN_WORDS = next(n for n in range(1, 10_000) if n - int(n * TRAIN_SHARE) > N_ICL)
PROBE_F1, MIN_LETTERS = 0.6, 20                 # eval_config.py: min_GT_probe_f1, min_feats_for_eval
MAX_K, F1_JUMP = 10, 0.03                       # eval_config.py: max_k_value, f1_jump_threshold
COS_FULL, COS_FRAC, PROJ_FRAC, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3   # feature_absorption.py
EPS = 1e-8                                      # feature_absorption_calculator.py: "does not fire"

# -----------------------------------------------------------------------------
# 1. Words and prompts


def alpha_words(tok):
    """SAEBench's vocab.get_alpha_tokens: the text of every token that is ASCII letters after
    at most one leading space (' cat', 'ing', ' NASA'), here in token-id order."""
    out = []
    for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        s = tok.convert_tokens_to_string([t])
        if t[:1] == "\u2581" and s[:1] != " ":       # SentencePiece's '▁': SAEBench restores the space
            s = " " + s
        w = s[1:] if s.startswith(" ") else s
        if w and all(c in string.ascii_letters for c in w):
            out.append(s)
    return out


def letter_of(word):
    return LETTERS.index(word.strip()[0].lower())


def icl_prompt(word, examples, rng, n_icl=N_ICL):
    """SAEBench's prompting.create_icl_prompt as its eval calls it: n_icl examples sampled from
    `examples` (again while the word is among them), then the word, after a leading newline."""
    for _ in range(1000):
        icl = rng.sample(examples, n_icl)
        if word not in icl:
            break
    else:
        raise ValueError(f"no {n_icl} examples without {word!r}: too few words")
    lines = [TEMPLATE.format(word=e) + " " + e.strip()[0].upper() for e in icl]
    return "\n" + "\n".join(lines + [TEMPLATE.format(word=word)])


def split_prompts(words, rng, n_icl=N_ICL):
    """SAEBench's probing.create_dataset_probe_training: (train words, their prompts, test
    words, their prompts); each split draws its examples from itself."""
    words = rng.sample(words, len(words))
    n = int(len(words) * TRAIN_SHARE)
    tr, te = words[:n], words[n:]
    return tr, [icl_prompt(w, tr, rng, n_icl) for w in tr], te, [icl_prompt(w, te, rng, n_icl) for w in te]


@torch.no_grad()
def read(tok, resid_fn, prompts, device, batch=64, progress=False):
    """The residual stream at each prompt's word: [N, D] fp32. A prompt is BOS + its tokens (as
    TransformerLens tokenises it); it is run up to its word only (the model is causal), in
    batches right-padded with any token, and read at each row's own last position."""
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]      # TransformerLens: none if none
    ids = [bos + tok(p, add_special_tokens=False).input_ids for p in prompts]
    ids = [i[:len(i) + WORD_POS + 1] for i in ids]
    if not ids:
        return torch.zeros(0, 0)
    out = []
    starts = range(0, len(ids), batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="prompts", unit_scale=batch)
    for s in starts:
        rows = ids[s:s + batch]
        T = max(map(len, rows))
        ids_BT = torch.tensor([r + r[-1:] * (T - len(r)) for r in rows], device=device)
        pos_B = torch.tensor([len(r) - 1 for r in rows], device=device)
        h_BTD = resid_fn(ids_BT)
        out.append(h_BTD[torch.arange(len(rows), device=device), pos_B].float().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# 2. Probes


def train_probe(x_ND, y_NL, *, epochs, batch, wd, l1=0.0, lr=1e-2, end_lr=1e-5):
    """SAEBench's probing.train_multi_probe: L one-vs-rest logistic regressions as one
    nn.Linear(D, L) on x as given (no standardisation); Adam with weight decay `wd` (weight and
    bias), lr decaying exponentially to end_lr over the epochs; minibatches reshuffled each epoch;
    BCE with pos_weight = negatives / positives per probe, + l1 * mean_l sum_d |W[l, d]|.
    Draws from torch's global RNG (init, shuffle) exactly as SAEBench does: seed it first.
    Returns W [L, D], b [L]."""
    probe = nn.Linear(x_ND.shape[1], y_NL.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    pos = y_NL.sum(0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(len(y_NL) - pos) / pos.clamp(min=1))
    loader = DataLoader(TensorDataset(x_ND, y_NL.to(x_ND.dtype)), batch_size=batch, shuffle=True)
    with torch.enable_grad():
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss = loss_fn(probe(xb), yb)
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach(), probe.bias.detach()


def f1(pred_NL, y_NL):
    """Per-column F1 as scikit-learn's f1_score (0 where there is nothing to score), float64."""
    tp = (pred_NL & y_NL).sum(0).double()
    return (2 * tp / (pred_NL.sum(0) + y_NL.sum(0)).double().clamp(min=1)).tolist()


@torch.no_grad()
def prepare(tok, resid_fn, *, device, seed=42, batch=64, max_words=None, probe_epochs=50, progress=False):
    """Everything that depends on the model only. resid_fn(ids_BT) -> [B, T, D]: the residual
    stream at the SAE's layer (rows may be right-padded: each is read at its own position).
    SAEBench's definition by default; max_words (a seeded subset of the words, before the split)
    and probe_epochs (of the ground-truth probes) are faster variants, not SAEBench's.
    Returns a dict: the words and labels, the activations x_tr [N_tr, D], x_te [N_te, D] (probe
    data) and x_abs [N_abs, D] (the kept letters' true positives, re-prompted; abs_letter and
    abs_word index them), the probes W [26, D], b [26], their test F1, the kept letters, a key
    naming this exact data, and the seconds spent."""
    t0, rng = time.time(), random.Random(seed)
    words = alpha_words(tok)
    if max_words:
        words = rng.sample(words, min(max_words, len(words)))
    if len(words) < MIN_WORDS:
        raise ValueError(f"first-letter absorption needs at least {MIN_WORDS} single-token words (each split "
                         f"prompts a word with {N_ICL} others of its own), got {len(words)}")
    tr, p_tr, te, p_te = split_prompts(words, rng)
    y_tr, y_te = torch.tensor([letter_of(w) for w in tr]), torch.tensor([letter_of(w) for w in te])
    x_tr = read(tok, resid_fn, p_tr, device, batch, progress)
    x_te = read(tok, resid_fn, p_te, device, batch, progress)
    t_read = time.time() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        W, b = train_probe(x_tr, F.one_hot(y_tr, 26), epochs=probe_epochs, batch=64, wd=1e-4)
    s_te = x_te @ W.T + b
    probe_f1 = f1(s_te > 0, F.one_hot(y_te, 26).bool())
    kept = [l for l in range(26) if probe_f1[l] > PROBE_F1]
    # the absorption pass: each letter's true positives re-prompted with examples from all words,
    # every letter in turn as SAEBench does (so the RNG runs the same), the kept ones run
    abs_word, abs_prompts = [], []
    for l in range(26):
        idx = ((y_te == l) & (s_te[:, l] > 0)).nonzero().squeeze(1).tolist()
        prompts = [icl_prompt(te[i], words, rng) for i in idx]
        if l in kept and len(kept) >= MIN_LETTERS:
            abs_word += idx
            abs_prompts += prompts
    t1 = time.time()
    x_abs = read(tok, resid_fn, abs_prompts, device, batch, progress)
    abs_word = torch.tensor(abs_word, dtype=torch.long)
    key = hashlib.sha1(repr((seed, tr, te, abs_prompts)).encode()).hexdigest()[:12]
    return dict(seed=seed, max_words=max_words, probe_epochs=probe_epochs, words_tr=tr, words_te=te,
                y_tr=y_tr, y_te=y_te, x_tr=x_tr, x_te=x_te, W=W, b=b, probe_f1=probe_f1, kept=kept,
                x_abs=x_abs, abs_word=abs_word, abs_letter=y_te[abs_word], key=key,
                seconds=dict(probe_prompts=t_read, probe=t1 - t0 - t_read, abs_prompts=time.time() - t1))


# -----------------------------------------------------------------------------
# 3. One SAE


def main_latents(A_tr, y_tr, A_te, y_te, letters, seed, epochs=50):
    """SAEBench's k-sparse probing (train_k_sparse_probes, build_metrics_df,
    add_feature_splits_to_metrics_df). A_* [N, F]: SAE codes. An L1-penalised probe over all
    latents (L1 0.01, weight decay 1e-6, batch 4096) ranks them; for k = 1, 2, ... a
    class-balanced logistic regression (scikit-learn, max_iter 500) on the top k, scored by its
    test F1 at logit > 0, while F1 rises by more than F1_JUMP. Returns {letter: (main latents,
    [F1 at k = 1 .. the first k that failed, or MAX_K])}."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("absorption needs scikit-learn (pip install scikit-learn): SAEBench's "
                          "k-sparse probes are its LogisticRegression") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        W_l1, _ = train_probe(A_tr, F.one_hot(y_tr, 26), epochs=epochs, batch=4096, wd=1e-6, l1=0.01)
    out = {}
    for l in letters:
        main, f1s, best = [], [], -100.0
        for k in range(1, MAX_K + 1):
            ids = W_l1[l].topk(k).indices
            lr = LogisticRegression(max_iter=500, class_weight="balanced")
            lr.fit(A_tr[:, ids].numpy(), (y_tr == l).numpy().astype(np.int64))
            s = A_te[:, ids] @ torch.tensor(lr.coef_[0]).float() + torch.tensor(lr.intercept_[0]).float()
            f1s += f1((s > 0)[:, None], (y_te == l)[:, None])
            if f1s[-1] <= best + F1_JUMP:
                break
            main, best = ids.tolist(), f1s[-1]
        out[l] = (main, f1s)
    return out


def absorb(A_NF, x_ND, probe_w_D, W_dec_FD, main):
    """SAEBench's FeatureAbsorptionCalculator.calculate_absorption, vectorised over one letter's
    N words: A [N, F] codes, x [N, D] activations, the letter's probe weight, main latents.
    Returns (absorption fraction [N] float64, full absorption [N] bool)."""
    p = probe_w_D / probe_w_D.norm()
    cos_F = F.cosine_similarity(p[None], W_dec_FD, dim=-1)
    proj_NF = A_NF * cos_F                          # each latent's part of the probe projection
    act = (x_ND @ p).double()                       # the word's whole probe projection
    main_proj = proj_NF[:, main].sum(1).double()
    cand = proj_NF.clone()                          # other latents, aligned, projecting positively
    cand[:, main] = 0
    cand[:, cos_F < COS_FRAC] = 0
    absorbed = cand.clamp(min=0).topk(min(MAX_ABSORBERS, cand.shape[1]), dim=1).values.sum(1).double()
    part = torch.minimum(absorbed, act - main_proj)
    frac = torch.where(main_proj <= 0, 1.0, (part / (part + main_proj)).clamp(0, 1))
    frac = torch.where((main_proj >= act) | (absorbed / act < PROJ_FRAC), 0.0, frac)
    top = proj_NF.argmax(1)                         # full: one latent did the main ones' job
    top_proj = A_NF.gather(1, top[:, None])[:, 0].double() * cos_F[top].double()
    full = ((A_NF[:, main] < EPS).all(1) & (cos_F[top] >= COS_FULL) & (act >= 0)
            & (top_proj / act >= PROJ_FRAC))
    return frac, full


@torch.no_grad()
def score(sae, data, *, bootstrap=1000, seed=None, chunk=4096):
    """SAEBench's absorption scores of one SAE (sae.encode(x_ND) -> dense codes on the model's
    raw activations, sae.W_dec_FD [F, D]) on prepare()'s data. seed: of the L1 probe that ranks
    the latents (init and minibatch order; default: the data's). Returns a JSON-serialisable dict:
    the means over kept letters (None when fewer than MIN_LETTERS letters are kept: "n/a", never 0)
    and their std over letters, per-letter rows, the per-word values (for bootstrap_diff) and,
    with bootstrap > 0, a word-bootstrap 95 % interval of each mean."""
    kept, seed = data["kept"], data["seed"] if seed is None else seed
    res = dict(data_key=data["key"], l1_seed=seed, probe_f1={LETTERS[l]: data["probe_f1"][l] for l in range(26)},
               letters_kept=len(kept), letters_dropped=26 - len(kept),
               dropped=[LETTERS[l] for l in range(26) if l not in kept], min_letters=MIN_LETTERS,
               mean_absorption_fraction=None, mean_full_absorption=None, mean_split_latents=None, mean_main_f1=None, letters=[])
    if len(kept) < MIN_LETTERS:
        return res
    was, dev = sae.training, sae.W_dec_FD.device
    sae.eval()
    enc = lambda x: torch.cat([sae.encode(c.to(dev)).float().cpu() for c in x.split(chunk)])
    try:
        mains = main_latents(enc(data["x_tr"]), data["y_tr"], enc(data["x_te"]), data["y_te"], kept, seed)
        A_abs = enc(data["x_abs"])
    finally:
        sae.train(was)
    W_dec = sae.W_dec_FD.detach().float().cpu()
    rows, frac, full = [], torch.zeros(len(A_abs), dtype=torch.float64), torch.zeros(len(A_abs), dtype=torch.bool)
    for l in kept:
        m = data["abs_letter"] == l
        main, f1s = mains[l]
        frac[m], full[m] = absorb(A_abs[m], data["x_abs"][m], data["W"][l], W_dec, main)
        n = int(m.sum())
        rows.append(dict(letter=LETTERS[l], probe_f1=data["probe_f1"][l], n_true_pos=n, main_latents=main,
                         n_split=len(main), main_f1=f1s[len(main) - 1], k_sparse_f1=f1s,
                         absorption_fraction=frac[m].sum().item() / max(n, 1), n_full=int(full[m].sum()),
                         full_absorption_rate=full[m].sum().item() / max(n, 1)))
    for key, col in (("absorption_fraction", "absorption_fraction"), ("full_absorption", "full_absorption_rate"),
                     ("split_latents", "n_split"), ("main_f1", "main_f1")):
        v = np.array([r[col] for r in rows], dtype=np.float64)
        res[f"mean_{key}"], res[f"std_{key}"] = v.mean().item(), v.std(ddof=1).item()
    res["letters"] = rows
    res["per_word"] = dict(letter=data["abs_letter"].tolist(), word=data["abs_word"].tolist(),
                           absorption_fraction=frac.tolist(), full_absorption=full.int().tolist())
    if bootstrap:
        lo, hi = np.percentile(_boot([res["per_word"]], bootstrap, data["seed"])[0], [2.5, 97.5], axis=-1)
        res["ci95"] = dict(absorption_fraction=[lo[0].item(), hi[0].item()],
                           full_absorption=[lo[1].item(), hi[1].item()], n=bootstrap)
    return res


# -----------------------------------------------------------------------------
# 4. Two SAEs


def _boot(per_words, n, seed):
    """Word bootstrap of the letter-averaged means, paired across SAEs. per_words: score()'s
    per_word of each SAE, on the same words. Returns [n_saes, 2 (fraction, full), n]."""
    g = np.random.default_rng(seed)
    let = np.asarray(per_words[0]["letter"])
    vals = np.array([[pw["absorption_fraction"], pw["full_absorption"]] for pw in per_words], dtype=np.float64)
    letters = np.unique(let)
    out = np.zeros((len(per_words), 2, n))
    for l in letters:
        idx = np.flatnonzero(let == l)
        out += vals[:, :, idx[g.integers(len(idx), size=(n, len(idx)))]].mean(-1)
    return out / len(letters)


def bootstrap_diff(res_a, res_b, *, n=1000, seed=0):
    """A 95 % interval for score(a) - score(b) (mean absorption fraction, mean full-absorption
    rate), by a paired, stratified word bootstrap. SAEBench's score is a mean over the kept
    letters of a mean over each letter's words (its probe's true positives). The letters are a
    fixed list, not a sample; the words are the random part (a random 20 % of the vocabulary,
    each with a random prompt). So each replicate redraws every letter's words with replacement,
    keeping the letter's count, and the same draw serves both SAEs (scored on the same words and
    prompts), which cancels what the words do to both alike. Not covered: the SAEs' training
    seeds, and the refitting of probes and main latents on other words."""
    if res_a["data_key"] != res_b["data_key"]:
        raise ValueError(f"bootstrap_diff: the two results were scored on different data "
                         f"({res_a['data_key']} vs {res_b['data_key']}); use one prepare() for both")
    out = dict(n=n, method="paired word bootstrap within letters")
    if res_a["mean_absorption_fraction"] is None:
        return dict(out, absorption_fraction=None, full_absorption=None)
    d = _boot([res_a["per_word"], res_b["per_word"]], n, seed)
    d = d[0] - d[1]
    lo, hi = np.percentile(d, [2.5, 97.5], axis=-1)
    for i, (k, mean) in enumerate((("absorption_fraction", "mean_absorption_fraction"),
                                   ("full_absorption", "mean_full_absorption"))):
        out[k] = dict(diff=res_a[mean] - res_b[mean], ci95=[lo[i].item(), hi[i].item()])
    return out
