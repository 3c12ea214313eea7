"""
Cross-sample Consistency Regularization (C²R) for sparse autoencoders, in one file.

    w_i  = W_dec[i] / ||W_dec[i]||          latent i's decoder direction (W_dec is [F, D]: a latent is a row)
    j(i) = argmax_{j != i} <w_i, w_j>       its most similar *other* latent, exact, over the whole dictionary
    s_i  = max(<w_i, w_j(i)>, 0)^2
    a_i  = ||acts[:, i]||_2                 over the batch: cross-sample
    C²R  = mean_i (a_i + a_j(i))^alpha * s_i,     loss = recon + ... + lambda * C²R,   j(i) a constant

Read top to bottom: the C²R block (paste it into any SAE trainer: it needs only torch), then one
SAE class (Config, SAE: relu + L1, topk, batchtopk, matryoshka), a flat training loop (train),
metrics, checkpoints. Shape suffixes: B = batch, D = d_model, F = n_latents, N = kept codes,
M = candidates a latent, H = hot latents.

Jin, Wang, Ren, Xie, Lian, "C²R: Cross-sample Consistency Regularization Mitigates Feature Splitting
and Absorption in Sparse Autoencoders", ICML 2026.
"""

import contextlib
import errno
import hashlib
import numbers
import os
import pickle
import re
import socket
from dataclasses import asdict, dataclass, fields, replace

import torch.nn as nn
from tqdm.auto import tqdm

# --- begin C²R (paste this block) ---
import math
import warnings

import torch
import torch.nn.functional as F

# Two latents that point the same way cost in proportion to their use over the batch (a_i + a_j,
# whether or not they fire on the same samples): that is what splitting (near-duplicates) and
# absorption (a child latent leaning towards its parent's direction) look like. Gradients reach
# s (the decoder) and a (the codes, hence the encoder).


def c2r_loss(acts_BF, W_dec_FD, *, alpha=1.0, nbr_F=None):
    """C²R of a batch of codes acts_BF [B, F] (post-TopK for TopK SAEs) and a decoder W_dec_FD
    [F, D] (pass W_dec.T if yours is [D, F]). nbr_F: a table from nearest_neighbours, reused
    between refreshes; None searches afresh. Shapes are checked at once; the codes' values are not
    (no host read-back, no GPU wait): a NaN code gives a NaN loss, for the caller to catch. The
    norms are summed in fp32, as code_norms does, also under bf16 autocast. Under DDP use
    c2r_penalty with the global batch's norms (a_F² all-reduced, as train() does): each rank's own
    share would make lambda sqrt(N) weaker."""
    if acts_BF.ndim != 2 or W_dec_FD.ndim != 2:
        raise ValueError(f"c2r_loss wants acts [B, F] and W_dec [F, D], got acts {tuple(acts_BF.shape)} "
                         f"and W_dec {tuple(W_dec_FD.shape)}")
    if acts_BF.shape[1] != W_dec_FD.shape[0]:
        raise ValueError(f"acts has {acts_BF.shape[1]} latents but W_dec has {W_dec_FD.shape[0]} rows: "
                         f"W_dec must be [n_latents, d_model] (pass W_dec.T if yours is [d_model, n_latents])")
    if nbr_F is None:
        nbr_F = nearest_neighbours(W_dec_FD)
    fp = torch.promote_types(acts_BF.dtype, torch.float32)     # bf16 codes: sum in fp32
    a_F = torch.linalg.vector_norm(acts_BF, dim=0, dtype=fp)   # its gradient is 0 (not NaN) at a = 0
    return c2r_penalty(a_F, W_dec_FD, nbr_F, alpha=alpha)


def c2r_penalty(a_F, W_dec_FD, nbr_F, *, alpha=1.0, unit_rows=False):
    """C²R from the per-latent batch norms a_F [F] (code_norms, or vector_norm(acts_BF, dim=0)),
    the decoder W_dec_FD [F, D] and a neighbour table nbr_F [F] (int64, from nearest_neighbours).
    unit_rows=True skips normalising the rows: right only if they are kept at unit norm AND their
    gradient loses its radial part before each step (as in train()), where it gives the same value
    and stepped gradient at a third of the cost; otherwise silently wrong (dot products for cosines,
    or another step)."""
    n = W_dec_FD.shape[0]
    if W_dec_FD.ndim != 2 or a_F.shape != (n,) or nbr_F.shape != (n,):
        raise ValueError(f"c2r_penalty wants a_F [F], W_dec [F, D], nbr_F [F], got {tuple(a_F.shape)}, "
                         f"{tuple(W_dec_FD.shape)}, {tuple(nbr_F.shape)}")
    if nbr_F.dtype != torch.int64:
        raise TypeError(f"nbr_F must be int64 indices from nearest_neighbours, got {nbr_F.dtype}")
    if not alpha > 0:
        raise ValueError(f"c2r alpha must be > 0, got {alpha}")
    # -1 (an SAE's table before its first search) would wrap to the last latent without a word.
    # Asserted with no host read: on the CPU it raises here; on CUDA the device asserts, with no
    # wait (and the process must restart). torch has this assert for those two devices only.
    if nbr_F.device.type in ("cpu", "cuda"):
        torch._assert_async(((nbr_F >= 0) & (nbr_F < n)).all(), "c2r_penalty: nbr_F holds indices outside "
                            "[0, n_latents) (-1: never searched); build it with nearest_neighbours(W_dec)")
    W = W_dec_FD if unit_rows else F.normalize(W_dec_FD, dim=1)    # cosines, whatever the row norms
    return c2r_terms(a_F, W, slice(None), nbr_F, alpha=alpha).mean()


def c2r_terms(a_F, W_FD, i, nbr_N, *, alpha=1.0):
    """C²R's per-latent terms (a_i + a_j(i))^alpha * max(<w_i, w_j(i)>, 0)^2 of the latents i (a slice
    or an index tensor [N]) whose neighbours are nbr_N [N]; W_FD's rows unit norm."""
    s_N = (W_FD[i] * W_FD[nbr_N]).sum(dim=1).clamp(min=0) ** 2
    x_N = a_F[i] + a_F[nbr_N]
    if alpha != 1.0:
        # 0^alpha has an infinite slope for alpha < 1: keep pairs of silent latents
        # (x = 0, common after TopK) out of the power so no NaN reaches the gradient.
        on = x_N > 0
        x_N = torch.where(on, torch.where(on, x_N, 1.0) ** alpha, 0.0)
    return x_N * s_N


@torch.no_grad()
def nearest_neighbours(W_dec_FD, *, block=2048):
    """j(i) = argmax_{j != i} cos(w_i, w_j) over the *whole* dictionary -> int64 [F]. Exact, block by
    block, memory O(block * F): the F x F matrix never exists (16 GiB in fp32 at 65,536 latents). It
    is symmetric, so a block of rows meets only itself and the rows after it: its row maxima are its
    own candidates, its column maxima the later rows' candidates. Half the flops of a full pass.
    Under bf16 autocast the cosines are bf16: a near-tie may go to a neighbour within bf16's rounding.
    train() uses search_rows_ + rerank instead: the same neighbours at a small, even cost per step."""
    n = W_dec_FD.shape[0]
    if n < 2:
        raise ValueError(f"C²R needs at least 2 latents to find neighbours, got n_latents={n}")
    W = F.normalize(W_dec_FD.detach(), dim=1)
    best_F = torch.full((n,), -float("inf"), dtype=torch.promote_types(W.dtype, torch.float32), device=W.device)
    nbr_F = torch.zeros(n, dtype=torch.long, device=W.device)

    def offer(lo, cos_N, j_N):   # rows lo.. meet candidates j_N; strict >: the lowest j wins ties, as argmax
        hi = lo + len(cos_N)
        cos_N = cos_N.to(best_F.dtype)
        better = cos_N > best_F[lo:hi]
        best_F[lo:hi] = torch.where(better, cos_N, best_F[lo:hi])
        nbr_F[lo:hi] = torch.where(better, j_N, nbr_F[lo:hi])

    for s in range(0, n, block):
        e = min(s + block, n)
        cos = W[s:e] @ W[s:].T                               # [block, F - s]
        cos.diagonal().fill_(-float("inf"))                  # not your own neighbour
        v, j = cos.max(dim=1)
        offer(s, v, j + s)
        if e < n:
            v, i = cos[:, e - s:].max(dim=0)
            offer(e, v, i + s)
    return nbr_F


def bf16_is_fast(device):
    """Whether bf16 matmuls outrun fp32 ones on `device`, so that train() ranks its search in bf16:
    a GPU with bf16 tensor cores (compute capability 8.0 on), a CPU with AVX512-BF16 or AMX (2.3x
    fp32's rate on the one measured). Elsewhere bf16 is emulated: 6.5x *slower* on an AVX2 CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")      # torch's own (private: absent = no)
    return device.type == "cpu" and any(getattr(torch.cpu, p, lambda: False)() for p in probes)


@torch.no_grad()
def search_rows_(W_dec_FD, cand_FM, lo, hi, *, block=2048, unit_rows=False, bf16=False):
    """cand_FM[lo:hi] <- the m = cand_FM.shape[1] most similar other latents of rows lo..hi-1, in index
    order: exact, over the whole dictionary, memory O(block * F). train() searches a slice of F/R rows
    a step, so every row is renewed once per R steps at an even cost. unit_rows: rows kept unit norm.
    bf16 (or bf16 autocast): the cosines are ranked in bf16 (2-3x fp32's rate on tensor cores or a
    CPU with AVX512-BF16; emulated elsewhere: ask bf16_is_fast) and each row's 4m best measured again
    in fp32, the m best kept: the same m as an fp32 search unless 3m others lie within bf16's
    rounding (~1e-3) of them. Rounding alone lost the true neighbour from C²R's flat-topped lists
    as the lr decayed (0.7 % off, 2.4 % at a step; refresh.md)."""
    m, n = cand_FM.shape[1], len(W_dec_FD)
    if not 1 <= m < n:   # more would list a row as its own candidate
        raise ValueError(f"search_rows_: {m} candidates a row need at least {m + 1} latents, W_dec has {n}: "
                         f"use 1 <= m <= n_latents - 1")
    W = W_dec_FD.detach() if unit_rows else F.normalize(W_dec_FD.detach(), dim=1)
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    Wq = W.bfloat16() if bf16 else W
    for s in range(lo, hi, block):
        e = min(s + block, hi)
        cos = Wq[s:e] @ Wq.T                                 # [block, F]
        cos.diagonal(s).fill_(-float("inf"))                 # not your own neighbour
        if cos.dtype.itemsize < 4:                           # bf16: the 4m best again, in fp32
            X = top_m(cos, min(4 * m, n - 1)).sort(dim=1).values
            cand_FM[s:e] = X.gather(1, pair_cosines(W[s:e], W, X).topk(m, dim=1).indices).sort(dim=1).values
        else:
            cand_FM[s:e] = top_m(cos, m).sort(dim=1).values
    return cand_FM


def pair_cosines(A_ND, B_FD, X_NK):
    """<A[i], B[X[i, k]]> [N, K] (X's rows ascending), by a sampled matmul: no [N, K, D] gather; in
    A's dtype even under autocast."""
    N, K = X_NK.shape
    with warnings.catch_warnings():     # torch warns that sparse CSR is beta, and of the checks skipped
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta|Sparse invariant checks")
        csr = torch.sparse_csr_tensor(torch.arange(0, N * K + 1, K, device=A_ND.device), X_NK.flatten(),
                                      A_ND.new_zeros(N * K), (N, len(B_FD)), check_invariants=False)
        return torch.sparse.sampled_addmm(csr, A_ND, B_FD.T, beta=0.0).values().view(N, K)


def top_m(x_NF, m, run=64):
    """x_NF.topk(m, dim=1).indices, up to ties, in fewer passes over x: the m largest of a row lie in
    the m runs of `run` columns with the largest maxima (a run outside them holds nothing above their
    m maxima), so one pass takes the runs' maxima and the top-k runs on m*run columns, not F. Radix
    top-k passes over [N, F] several times; on a GPU it was most of the search (refresh.md). Below
    8*m runs' worth of columns the second top-k would cover an eighth of the row or more, so a plain
    top-k costs about as much; 64 columns a run keeps both top-ks small at 4k-1M latents."""
    n, full = x_NF.shape[1], x_NF.shape[1] // run * run
    if full < 8 * m * run:                                   # narrow: plain top-k
        return x_NF.topk(m, dim=1).indices
    runs_NM = x_NF[:, :full].unflatten(1, (-1, run)).amax(dim=2).topk(m, dim=1).indices
    cols = (runs_NM[:, :, None] * run + torch.arange(run, device=x_NF.device)).flatten(1)
    cols = torch.cat([cols, torch.arange(full, n, device=x_NF.device).expand(len(x_NF), -1)], dim=1)  # the tail
    return cols.gather(1, x_NF.gather(1, cols).topk(m, dim=1).indices)


@torch.no_grad()
def rerank(W_dec_FD, cand_FM, *, unit_rows=False, hot_H=None):
    """j(i) = the most similar to latent i, on this decoder, of its m candidates cand_FM [F, m]
    (search_rows_) and of the latents that list i among theirs (similarity is symmetric, and their
    search may be newer than i's) -> nbr_F [F]. F*m cosines by a sampled matmul (no [F, m, D]
    gather), in fp32 even under autocast (so a bf16 search need only get the neighbour into the m);
    ties: the lowest index of those offered. It follows near-tie swaps exactly. hot_H [h]: latents
    every latent also meets (train(): the h busiest in the batch, whose pairs weigh most in the
    penalty), by an [F, h] matmul in the caller's precision: each latent's 4 closest
    of them, and each hot latent's 4 closest of all latents (min(4, h) if h < 4), join the
    candidates, 4 F cosines more."""
    W = W_dec_FD.detach() if unit_rows else F.normalize(W_dec_FD.detach(), dim=1)
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    if W.device.type in ("cpu", "cuda"):     # -1 (never searched) would read outside W; no host read
        torch._assert_async((cand_FM >= 0).all(), "rerank: cand_FM holds -1: fill it with search_rows_ first")
    n = len(W)

    cos_FM = pair_cosines(W, W, cand_FM)     # fp32 even under autocast
    if hot_H is not None and len(hot_H):     # found in the caller's precision, measured in fp32
        cos_FH = W @ W[hot_H].T
        cos_FH[hot_H, torch.arange(len(hot_H), device=W.device)] = -float("inf")    # not your own neighbour
        t = min(4, len(hot_H), n - 1)
        X_FT = hot_H[cos_FH.topk(t, dim=1).indices]
        X_FT[hot_H] = cos_FH.topk(t, dim=0).indices.T
        X_FT = X_FT.sort(dim=1).values             # CSR rows in index order, as cuSPARSE expects
        cand_FM, cos_FM = torch.cat([cand_FM, X_FT], dim=1), torch.cat([cos_FM, pair_cosines(W, W, X_FT)], dim=1)
    own_F = cos_FM.amax(1)
    nbr_F = torch.where(cos_FM == own_F[:, None], cand_FM, n).amin(1)      # ties: the lowest index
    # The other way round: j's list may be newer than i's (searched since), so j finding i close is
    # news for i: j listing i offers j to i at the same cosine. Each i takes its best offer (ties:
    # the lowest j) where it beats its own list's best.
    to = cand_FM.flatten()
    offer_F = torch.full_like(own_F, -float("inf")).scatter_reduce(0, to, cos_FM.flatten(), "amax")
    by_FM = torch.where(cos_FM == offer_F[cand_FM], torch.arange(n, device=W.device)[:, None], n)
    offerer_F = torch.full_like(nbr_F, n).scatter_reduce(0, to, by_FM.flatten(), "amin")
    better = (offer_F > own_F) | ((offer_F == own_F) & (offerer_F < nbr_F))
    return torch.where(better, offerer_F, nbr_F)


@torch.no_grad()
def heading(W_FD, opt, steps, k=None):
    """Where the rows W_FD point, as unit rows, after `steps` more steps of Adam's (or AdamW's)
    current update (its bias-corrected exp_avg / sqrt(exp_avg_sq), at the group's lr): C²R's
    neighbours are mostly latents closing in on each other, so the rolling search looks there, not
    where the rows are (refresh.md). W_FD may be the parameter or its transpose (W_dec.T of a
    [D, F] decoder). W_FD itself, not normalised, if steps = 0, before the first step or with no
    Adam state. k: Adam's step count, if the caller keeps it (train() does: a fused Adam keeps it on
    the GPU, and reading it there would wait for the GPU; without k, heading reads it)."""
    # the parameter W_FD is, or views as its transpose: the one the optimizer keeps state for
    group, p = next(((g, p) for g in opt.param_groups for p in g["params"]
                     if p.data_ptr() == W_FD.data_ptr() and W_FD.shape in (p.shape, p.T.shape)), (None, None))
    st = opt.state.get(p, {})
    st = st if "exp_avg" in st else None       # not Adam's (SGD's momentum): no look-ahead
    k = float(st["step"]) if st and k is None else k
    if steps == 0 or not st or not k:      # no step yet (or a state of step 0: a failed first step)
        return W_FD.detach()
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if p.stride() != W_FD.stride():        # W_FD = p.T: so are its moments
        m, v = m.T, v.T
    b1, b2 = group["betas"]
    d = math.sqrt(1 - b2 ** k)     # the bias corrections as numbers: no kernel for them on the GPU
    # W - s lr/(1 - b1^k) m / (sqrt(v)/d + eps) = W + c m / (sqrt(v) + eps d), with c = -s lr d / (1 - b1^k):
    # three passes over [F, D], then the norms, in one buffer (a copy is GBs at 1M latents)
    P_FD = v.sqrt().add_(group["eps"] * d)
    torch.addcdiv(W_FD, m, P_FD, value=-steps * group["lr"] * d / (1 - b1 ** k), out=P_FD)
    return P_FD.div_(torch.linalg.vector_norm(P_FD, dim=1, keepdim=True).clamp_min_(1e-12))


def code_norms(vals_N, cols_N, n_latents):
    """a_F = ||acts[:, i]||_2 from the nonzero codes alone (values vals_N of latents cols_N, e.g.
    the k*B kept by TopK, flattened): no dense [B, F] matrix. sqrt has an infinite slope at 0, so
    silent latents stay out of it: their gradient is 0, as vector_norm's is, never NaN."""
    v_N = vals_N.to(torch.promote_types(vals_N.dtype, torch.float32))     # bf16 codes: sum in fp32
    sq_F = v_N.new_zeros(n_latents).index_add(0, cols_N, v_N.square())
    on = sq_F > 0
    return torch.where(on, torch.where(on, sq_F, 1.0).sqrt(), 0.0)
# --- end C²R ---


# -----------------------------------------------------------------------------
# The SAE

KINDS = ("relu", "topk", "batchtopk", "matryoshka")


@dataclass
class Config:
    """One SAE and how to train it. Units in [brackets]; a fraction is of cfg.steps."""
    # the SAE
    d_model: int = 64            # width of the activations it reads [dims]
    n_latents: int = 512         # dictionary size F [latents]
    kind: str = "batchtopk"      # relu (+ L1) | topk | batchtopk | matryoshka (batchtopk + nested prefix losses)
    k: int = 8                   # topk kinds: active latents per sample [latents] (batchtopk: on average)
    l1_coeff: float = 1e-3       # relu only: weight of the plain L1 of the codes. The decoder rows are kept at
                                 # unit norm, so this is also the "decoder-norm-weighted" L1 [per unit of code]
    prefixes: tuple = ()         # matryoshka only: nested sizes m_1 < m_2 < ... [latents]; n_latents is appended
                                 # (so replace(cfg, n_latents=...) keeps the old one as a prefix: give prefixes too)
    # C²R
    c2r_lambda: float = 0.0      # weight of C²R in the loss; 0 = the baseline (no neighbour search at all). Not
                                 # scale-free: a_i is a norm over the batch, so C²R grows as sqrt(batch) (alpha 1)
                                 # and with the codes' scale: retune lambda when either changes
    c2r_alpha: float = 1.0       # exponent of (a_i + a_j(i)), > 0
    c2r_warmup: float = 0.0      # lambda ramps up linearly from 0 over this fraction of the steps
    nbr_every: int = 0           # R: a step searches F/R rows afresh, every row once in R steps [steps]. 1 = all rows
                                 # every step, the exact definition. 0 = the default, min(ceil(F / 512), 16,
                                 # sqrt(0.02 / lr)), floored, >= 1: ~512 rows a step or more, and lr R^2 <= 0.02, as
                                 # the table strays from exact as ~lr R^2 (0.29 % off over 6,000 steps at 8,192
                                 # latents, R 8; results/refresh.md). R > 1 ranks in bf16 where fast
    nbr_cands: int = 16          # m: each latent's candidates from its last search, re-ranked every step with the
                                 # latents that list it [latents] (fewer: further off exact; refresh.md)
    nbr_ahead: float = 1.0       # the search looks where the rows will be after (R - 1) * nbr_ahead more steps of
                                 # Adam's current update (the lists serve R - 1 more steps); 0 = where they are now,
                                 # ~5x further off exact [periods of R - 1 steps]
    nbr_hot: int = 256           # h: with R > 1, every latent also meets the batch's h busiest latents (largest a_i)
                                 # every step, both ways, as their pairs weigh most; 0 = none, ~2x further off.
                                 # Costs ~h / (3 B) of a step [latents]
    # dead latents (topk kinds): AuxK, Gao et al. 2024
    aux_k: int = 0               # dead latents that model the residual [latents]; 0 = d_model // 2
    aux_coeff: float = 1 / 32    # weight of the AuxK loss
    dead_tokens: int = 1_000_000  # a latent silent for more than this many tokens is dead [tokens]
    # optimisation
    steps: int = 1000            # training steps, one batch each [steps]
    lr: float = 1e-3             # Adam's peak learning rate
    warmup: float = 0.05         # linear LR warmup over this first fraction of the steps
    decay: float = 0.2           # linear LR decay to 0 over this last fraction of the steps
    l1_warmup: float = 0.05      # relu only: l1_coeff ramps up from 0 over this fraction of the steps
    clip_grad: float = 1.0       # max global gradient norm; 0 = no clipping
    bf16: bool = False           # forward and loss under bf16 autocast (weights, grads, Adam stay fp32)
    thr_momentum: float = 0.99   # batchtopk, matryoshka: EMA momentum of the inference threshold [per step]
    log_every: int = 50          # one log row every this many steps [steps]; each waits for the device
    seed: int = 0                # the SAE's initialisation

    def __post_init__(self):
        # types first: 2.5, "3", True for an int, NaN for a float fail here by name, not deep in train()
        types = {int: (numbers.Integral, "an int"), float: (numbers.Real, "a number"), bool: (bool, "True or False")}
        for f in fields(self):
            v, (want, what) = getattr(self, f.name), types.get(f.type, (object, ""))
            if not isinstance(v, want) or (isinstance(v, bool) and f.type is not bool):
                raise TypeError(f"Config.{f.name} must be {what}, got {v!r}")
            if f.type in (int, float):
                if not math.isfinite(v):
                    raise ValueError(f"Config.{f.name} must be finite, got {v}")
                setattr(self, f.name, f.type(v))   # plain Python, so a weights_only checkpoint rebuilds it
        if self.kind not in KINDS:
            raise ValueError(f"unknown SAE kind {self.kind!r}, expected one of {KINDS}")
        if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in self.prefixes):
            raise TypeError(f"Config.prefixes must be ints, got {self.prefixes!r}")
        self.prefixes = tuple(int(m) for m in self.prefixes)
        if self.prefixes and self.kind != "matryoshka":
            raise ValueError(f"prefixes={self.prefixes} only apply to kind='matryoshka', not {self.kind!r}")
        if self.kind == "matryoshka" and self.prefixes[-1:] != (self.n_latents,):
            self.prefixes += (self.n_latents,)
        if any(a >= b for a, b in zip((0,) + self.prefixes, self.prefixes)):
            raise ValueError(f"prefixes must increase strictly from >= 1 to n_latents={self.n_latents}, "
                             f"got {self.prefixes}")
        for name, ok, want in [
                ("d_model", self.d_model >= 1, ">= 1"), ("n_latents", self.n_latents >= 1, ">= 1"),
                ("k", self.kind == "relu" or 1 <= self.k <= self.n_latents, f"in [1, n_latents={self.n_latents}]"),
                ("c2r_lambda", self.c2r_lambda >= 0, ">= 0"), ("c2r_alpha", self.c2r_alpha > 0, "> 0"),
                ("n_latents", self.c2r_lambda == 0 or self.n_latents >= 2, ">= 2 for C²R (c2r_lambda > 0)"),
                ("l1_coeff", self.l1_coeff >= 0, ">= 0"), ("nbr_every", self.nbr_every >= 0, ">= 0 (0: the default)"),
                ("nbr_cands", self.nbr_cands >= 1, ">= 1"), ("nbr_ahead", self.nbr_ahead >= 0, ">= 0"),
                ("nbr_hot", self.nbr_hot >= 0, ">= 0 (0: none)"),
                ("aux_k", self.aux_k >= 0, ">= 0"),
                ("aux_coeff", self.aux_coeff >= 0, ">= 0"), ("dead_tokens", self.dead_tokens >= 0, ">= 0"),
                ("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                ("clip_grad", self.clip_grad >= 0, ">= 0 (0: no clipping)"),
                *[(name, 0 <= getattr(self, name) <= 1, "a fraction of the steps, in [0, 1]")
                  for name in ("c2r_warmup", "warmup", "decay", "l1_warmup")],
                ("warmup + decay", self.warmup + self.decay <= 1, "<= 1 (the LR would jump where they overlap)"),
                ("thr_momentum", 0 <= self.thr_momentum <= 1, "in [0, 1]"), ("log_every", self.log_every >= 1, ">= 1")]:
            if not ok:
                got = getattr(self, name, f"{self.warmup} + {self.decay}")
                raise ValueError(f"Config.{name} must be {want}, got {name}={got}")

    def nbr_period(self):    # R; 0 is resolved here, not stored: a copy made for another width or lr gets its own
        return self.nbr_every or max(1, min(-(-self.n_latents // 512), int(min(16, math.sqrt(0.02 / self.lr)) + 1e-9)))

    def nbr_hot_count(self):     # the h in use: none at R = 1, where the table is exact already
        return min(self.nbr_hot, self.n_latents) if self.nbr_period() > 1 else 0


class SAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, Fn = cfg.d_model, cfg.n_latents
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = F.normalize(torch.randn(Fn, D, generator=g), dim=1)
        self.W_dec_FD = nn.Parameter(W_dec)               # unit-norm rows, kept so exactly
        self.W_enc_DF = nn.Parameter(W_dec.T.clone())     # encoder = decoder transpose at init
        self.b_enc_F = nn.Parameter(torch.zeros(Fn))
        self.b_dec_D = nn.Parameter(torch.zeros(D))       # set from data by train()
        # statistics, updated by the train step (never by a loss)
        self.register_buffer("threshold", torch.tensor(0.0))               # batchtopk inference
        self.register_buffer("tokens_since_fired", torch.zeros(Fn, dtype=torch.long))
        # C²R's table and each latent's m candidates (-1: never searched): buffers, so a resume is exact
        self.register_buffer("nbr_F", torch.full((Fn,), -1, dtype=torch.long))
        self.register_buffer("nbr_cand_FM", torch.full((Fn, max(1, min(cfg.nbr_cands, Fn - 1))), -1))

    def check(self, x_BD):
        if x_BD.ndim != 2 or x_BD.shape[1] != self.cfg.d_model or x_BD.shape[0] == 0:
            raise ValueError(f"expected activations of shape [batch >= 1, d_model={self.cfg.d_model}], "
                             f"got {tuple(x_BD.shape)}")

    def pre_acts(self, x_BD):
        self.check(x_BD)
        return (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F

    def activate(self, pre_BF):
        if self.cfg.kind == "relu":
            return F.relu(pre_BF)
        if self.cfg.kind in ("batchtopk", "matryoshka") and not self.training:
            # batchtopk at inference: a learned threshold, so one sample's code ignores its batch
            return pre_BF * (pre_BF > self.threshold)
        vals_N, rows_N, cols_N = self.sparse_codes(pre_BF)
        return torch.zeros_like(pre_BF).index_put((rows_N, cols_N), vals_N)

    def sparse_codes(self, pre_BF, all_ranks=False):
        """The TopK kinds' codes as (values, rows, latents) of the k*B kept, rows ascending:
        topk keeps the k largest of each sample, batchtopk and matryoshka (training) the k*B
        largest of the batch; all_ranks=True (train() under torchrun): this rank's share of the
        k*B*N largest of all N ranks' batches, as one process would keep them."""
        B, Fn = pre_BF.shape
        if self.cfg.kind == "topk":
            vals, idx = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
            rows = torch.arange(B, device=pre_BF.device).repeat_interleave(self.cfg.k)
            return F.relu(vals).flatten(), rows, idx.flatten()
        flat, (rank, n) = pre_BF.flatten(), world() if all_ranks else (0, 1)
        if n == 1:
            idx = flat.topk(min(self.cfg.k * B, flat.numel()), sorted=False).indices
        else:           # each rank's own k*B*N best, best first; of all ranks', the k*B*N best are kept
            v, i = flat.topk(min(self.cfg.k * B * n, flat.numel()))
            idx = i[:int((gather(v).topk(self.cfg.k * B * n).indices // len(v) == rank).sum())]   # a host read
        idx = idx.sort().values
        return F.relu(flat.gather(0, idx)), idx // Fn, idx % Fn

    def encode(self, x_BD):
        return self.activate(self.pre_acts(x_BD))

    def decode(self, acts_BF):
        return acts_BF @ self.W_dec_FD + self.b_dec_D

    def decode_sparse(self, vals_N, rows_N, cols_N, B):
        """decode() from sparse_codes(): each sample sums its k rows of W_dec (embedding_bag),
        so training never builds the dense [B, F] codes nor a [B, F] x [F, D] matmul and its
        backward; the gradient reaches W_dec's k*B used rows only."""
        offsets_B = torch.searchsorted(rows_N, torch.arange(B, device=rows_N.device))
        return F.embedding_bag(cols_N, self.W_dec_FD, offsets_B, mode="sum",
                               per_sample_weights=vals_N.to(self.W_dec_FD.dtype)) + self.b_dec_D

    def forward(self, x_BD):
        pre_BF = self.pre_acts(x_BD)
        acts_BF = self.activate(pre_BF)
        return self.decode(acts_BF), acts_BF, pre_BF

    @torch.no_grad()
    def renorm_(self):
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True))


@torch.no_grad()
def geometric_median(x_BD, iters=50, eps=1e-8):
    """Weiszfeld's algorithm. b_dec starts here rather than at the mean: the median is not dragged by the
    few huge-norm tokens of real residual streams ('massive activations'); on clean data it is the mean."""
    m = x_BD.mean(0)
    for _ in range(iters):
        w = 1 / (x_BD - m).norm(dim=1).clamp(min=eps)
        m = (w[:, None] * x_BD).sum(0) / w.sum()
    return m


# -----------------------------------------------------------------------------
# More than one GPU (torchrun): the ranks split every batch and train one SAE, the same on each

def world():
    """(this rank, number of ranks) of torch.distributed's process group; (0, 1) without one, and
    then nothing here talks to anyone: train() is the one-process loop."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def gather(t):
    """Every rank's t (the same shape on each), concatenated in rank order; t itself without a group."""
    if world()[1] == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world()[1])]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out)


def sharded(search, lo, hi):
    """search(a, b) -> a table of rows a..b-1 (their neighbours, say): each rank runs it on its 1/N
    of rows lo..hi-1 and all_gather gives every rank the whole table; without a group, search(lo, hi).
    The same dot products as one process's search: bit for bit where the matmul's rounding does not
    depend on how many rows it is given (this CPU's, tested; a GPU's may differ in the last bit)."""
    rank, n = world()
    per = -(-(hi - lo) // n)                    # all_gather wants one size: the last shares are padded
    a, b = min(lo + rank * per, hi), min(lo + (rank + 1) * per, hi)
    mine = search(a, b)
    return mine if n == 1 else gather(torch.cat([mine, mine.new_zeros((per - (b - a), *mine.shape[1:]))]))[:hi - lo]


# -----------------------------------------------------------------------------
# Training

@torch.no_grad()
def table_error(sae, a_F, k, rows=512):
    """How far train()'s neighbour table sae.nbr_F is from exact, for the log: |sum of C²R's terms
    with it / with an exact search - 1| (sums, as the penalty: rows' errors may cancel; inf if only
    the table's sum is > 0) over `rows` latents evenly spread over the dictionary (every
    (F // rows)-th from k % (F // rows): every age of the rolling search), on this decoder and these
    norms. Costs a search of `rows` rows; train() runs it every log_every steps."""
    W, n = sae.W_dec_FD.detach(), sae.cfg.n_latents
    i_N = torch.arange(k % max(1, n // rows), n, max(1, n // rows), device=W.device)
    cos = W[i_N] @ W.T
    cos[torch.arange(len(i_N), device=W.device), i_N] = -float("inf")
    got, want = (c2r_terms(a_F, W, i_N, j, alpha=sae.cfg.c2r_alpha).sum() for j in (sae.nbr_F[i_N], cos.argmax(1)))
    return torch.where(want > 0, (got / want - 1).abs(), torch.where(got > 0, float("inf"), 0.0))


def lr_at(step, cfg):
    """Linear warmup, constant, then linear decay to 0 over the last `decay` of the run."""
    warm, dec = cfg.warmup * cfg.steps, cfg.decay * cfg.steps
    if step < warm:   # min: when warm is not a whole number of steps, (step + 1) / warm can pass 1
        return cfg.lr * min(1.0, (step + 1) / warm)
    if step >= cfg.steps - dec:
        return cfg.lr * (cfg.steps - step) / dec
    return cfg.lr


def ramp(step, frac, steps):
    """0 -> 1 linearly over the first `frac` of the run (1 throughout if frac == 0)."""
    return 1.0 if frac <= 0 else min(1.0, (step + 1) / (frac * steps))


def aux_loss(sae, x_BD, x_hat_BD, pre_BF, dead_F):
    """AuxK (Gao et al. 2024): the top aux_k *dead* latents must model the residual the live
    ones leave, which gives dead latents a gradient that pulls them back towards the data."""
    # The one place train() waits for the GPU each step: with no dead latent, skipping AuxK's
    # top-k over the whole [B, F] pre-activations saves more than the wait costs.
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return x_BD.new_zeros(())
    k_aux = min(sae.cfg.aux_k or sae.cfg.d_model // 2, n_dead)
    vals, idx = pre_BF.masked_fill(~dead_F, -float("inf")).topk(k_aux, dim=1)
    e_BD = (x_BD - x_hat_BD).detach()
    e_hat_BD = F.embedding_bag(idx, sae.W_dec_FD, mode="sum",        # the sparse decode, as in train
                               per_sample_weights=F.relu(vals).to(sae.W_dec_FD.dtype))
    # normalised by the residual's mean square over the global batch (all ranks', under torchrun)
    return (e_hat_BD - e_BD).pow(2).sum(-1).mean() / gather(e_BD.pow(2).sum(-1).mean()[None]).mean().clamp(min=1e-12)


def prefix_losses(sae, x_BD, vals_N, rows_N, cols_N, prefixes=None):
    """Matryoshka (Bussmann et al. 2025): the reconstruction loss of each nested sub-SAE, which
    must rebuild x from latents [0:m] alone -> [len(prefixes)] (default sae.cfg.prefixes). A parent
    folded into its child's latent is then an error for every prefix that holds the parent's
    latent but not the child's. Takes the sparse codes of SAE.sparse_codes; the codes outside a
    prefix get weight 0 rather than being dropped (dropping them is a boolean index: a GPU sync)."""
    prefixes = sae.cfg.prefixes if prefixes is None else prefixes
    return x_BD.new_zeros(0) if not prefixes else torch.stack([
        (sae.decode_sparse(vals_N * (cols_N < m), rows_N, cols_N, x_BD.shape[0]) - x_BD).pow(2).sum(-1).mean()
        for m in prefixes])


def train(sae, batches, cfg=None, progress=True, start=0, opt_state=None, on_step=None):
    """Train `sae` on `batches` (any iterable of [batch, d_model] float tensors).
    Returns (sae, log): log holds a dict (step, loss, fvu, l0, c2r, nbr_err, dead) every
    cfg.log_every steps and at the last; c2r and nbr_err are None when c2r_lambda = 0. nbr_err: how
    far the neighbour table is from exact (table_error), checked at the steps that are multiples of
    log_every (the last row repeats the last check; None if this call had none). Step 0 sets b_dec
    to the geometric median of the first batch, so to fine-tune a trained SAE pass start > 0. To
    resume an interrupted run: the step to start from, the optimizer's saved state_dict, and
    `batches` positioned at that step. on_step(step, opt, log), if given, runs after every step
    (e.g. to write a checkpoint).
    Under torchrun (a torch.distributed process group) give each rank its share of every batch, the
    same size on each: the step is then the one-process step on their union, and the SAEs stay equal
    (the log's loss, fvu and l0 are this rank's share's; its c2r and dead the global batch's)."""
    cfg = replace(cfg or sae.cfg)     # a validated copy: fields set after construction are checked too
    # cfg may change how to train, not what the SAE is: activate() and the losses read sae.cfg
    differ = [f for f in ("d_model", "n_latents", "kind", "k", "prefixes", "aux_k", "nbr_cands")
              if getattr(cfg, f) != getattr(sae.cfg, f)]
    if differ:
        raise ValueError(f"cfg and sae.cfg differ in {', '.join(differ)}: build the SAE from this cfg")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= cfg.steps:
        raise ValueError(f"start must be a step in [0, steps={cfg.steps}], got start={start!r}")
    dev = sae.W_dec_FD.device
    if torch.is_autocast_enabled(dev.type):
        # autocast caches its bf16 copy of each weight until it exits: every step would use step 0's weights
        raise ValueError("do not call train() inside torch.autocast (it would keep the bf16 weights of "
                         "the first step for the whole run): set Config.bf16=True instead")
    # fused: one kernel for the whole update on the GPU (as nanoGPT); the CPU keeps the default
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=dev.type == "cuda")
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    st = opt.state.get(sae.W_dec_FD)
    n_adam = int(st["step"]) if st else 0     # Adam's step count, kept here for heading(): read once
    it, log = iter(batches), []
    # The loop waits for the GPU only at log steps (and in aux_loss): no .item(), no `if tensor`, no boolean
    # indexing, so the CPU queues the next step while the GPU runs this one; a NaN loss is checked at log steps.
    bad_loss = torch.zeros((), dtype=torch.bool, device=dev)
    bad_batch = torch.zeros((), dtype=torch.bool, device=dev)
    checked, n_ranks, nbr_err, warned, far = start, world()[1], None, False, 0
    fast = bf16_is_fast(dev)
    sae.train()
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, dynamic_ncols=True)
    for step in pbar:
        try:
            x_BD = next(it)
        except StopIteration:
            raise ValueError(f"`batches` ran out after {step} of {cfg.steps} steps") from None
        x_BD = x_BD.to(dev, sae.W_dec_FD.dtype)
        sae.check(x_BD)
        B = x_BD.shape[0]
        if step == 0:
            sae.b_dec_D.data.copy_(geometric_median(gather(x_BD)))    # of the global batch, under torchrun
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)

        # ---- the loss. relu has dense codes acts_BF; the TopK kinds keep theirs sparse, as the
        # values vals_N of latents cols_N in samples rows_N (the k*B kept): decode, the C²R norms
        # a_F and the statistics below touch those, never a dense [B, F] matrix.
        # (bf16: a fresh autocast each step, exited before backward, as autocast wants)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            pre_BF = sae.pre_acts(x_BD)
            if cfg.kind == "relu":
                acts_BF = sae.activate(pre_BF)
                x_hat_BD = sae.decode(acts_BF)
                fp = torch.promote_types(acts_BF.dtype, torch.float32)    # bf16 codes: sum in fp32
                a_F = torch.linalg.vector_norm(acts_BF, dim=0, dtype=fp)   # (as code_norms)
            else:
                vals_N, rows_N, cols_N = sae.sparse_codes(pre_BF, all_ranks=True)
                x_hat_BD = sae.decode_sparse(vals_N, rows_N, cols_N, B)
                a_F = code_norms(vals_N, cols_N, cfg.n_latents)
            if n_ranks > 1:     # the norms over the global batch (C²R is cross-sample): the sum of the ranks'
                sq_F = a_F.square()  # squares, with N x this rank's gradient (the mean of the ranks' below: the sum)
                all_F = sq_F.detach().clone()
                torch.distributed.all_reduce(all_F)
                sq_F = all_F + n_ranks * (sq_F - sq_F.detach())
                a_F = torch.where(sq_F > 0, torch.where(sq_F > 0, sq_F, 1.0).sqrt(), 0.0)
            loss = recon = (x_hat_BD - x_BD).pow(2).sum(-1).mean()
            if cfg.kind == "matryoshka":
                # the mean over the prefixes, as the reference code; the last (all latents) is `recon`, decoded
                loss = torch.cat([prefix_losses(sae, x_BD, vals_N, rows_N, cols_N, cfg.prefixes[:-1]),
                                  recon[None]]).mean()
            if cfg.kind == "relu":
                # plain L1: the rows are unit norm, ||w_i|| = 1 up to rounding (kept: runs repeat bit for bit)
                l1 = (acts_BF * sae.W_dec_FD.norm(dim=1)).sum(-1).mean()
                loss = loss + cfg.l1_coeff * ramp(step, cfg.l1_warmup, cfg.steps) * l1
            else:
                dead_F = sae.tokens_since_fired > cfg.dead_tokens
                loss = loss + cfg.aux_coeff * aux_loss(sae, x_BD, x_hat_BD, pre_BF, dead_F)
            c2r = None                                        # lambda = 0: no search, nothing logged
            if cfg.c2r_lambda > 0:
                # the rolling search: slice t of R searched afresh (torchrun: 1/N of its rows on each rank),
                # then every latent's m candidates, those listing it and the batch's h busiest latents re-ranked;
                # a fresh SAE searches every row
                R, n, W, C = cfg.nbr_period(), cfg.n_latents, sae.W_dec_FD, sae.nbr_cand_FM
                never_searched = step == start and C[0, 0] < 0   # SAE() fills C with -1; a resume keeps its lists
                lo, hi = (0, n) if never_searched else (step % R * n // R, (step % R + 1) * n // R)
                P = heading(W, opt, (R - 1) * cfg.nbr_ahead, n_adam)   # the candidates serve R - 1 more steps
                C[lo:hi] = sharded(lambda a, b: search_rows_(P, C, a, b, unit_rows=True, bf16=R > 1 and fast)[a:b]
                                   .clone(), lo, hi)     # R > 1: ranked in bf16 where it is fast (R = 1 stays exact)
                h = cfg.nbr_hot_count()
                hot = a_F.detach().topk(h).indices if h else None
                sae.nbr_F.copy_(rerank(W, C, unit_rows=True, hot_H=hot))
                # c2r_penalty(..., unit_rows=True) without its checks (5 kernels): rerank's table is valid
                c2r = c2r_terms(a_F, W, slice(None), sae.nbr_F, alpha=cfg.c2r_alpha).mean()
                loss = loss + cfg.c2r_lambda * ramp(step, cfg.c2r_warmup, cfg.steps) * c2r
        bad_loss |= ~torch.isfinite(loss)
        bad_batch |= ~torch.isfinite(x_BD).all()
        if c2r is not None and step % cfg.log_every == 0:    # the log's cadence (not also each call's last step:
            nbr_err = table_error(sae, a_F.detach().float(), step // cfg.log_every)     # bench.py calls per step)

        # ---- the update: keep decoder rows on the unit sphere exactly
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if n_ranks > 1:     # the global batch's gradient, the mean of the ranks': one all_reduce per tensor (4)
            for p in sae.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= n_ranks
        with torch.no_grad():
            W, G = sae.W_dec_FD, sae.W_dec_FD.grad
            G -= (G * W).sum(1, keepdim=True) * W     # drop the radial part of the gradient
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(sae.parameters(), cfg.clip_grad)
        opt.step()
        n_adam += 1
        sae.renorm_()                                  # and undo Adam's drift off the sphere

        # ---- statistics, here and nowhere else
        with torch.no_grad():
            sae.tokens_since_fired.add_(B * n_ranks).masked_fill_(a_F > 0, 0)
            if cfg.kind in ("batchtopk", "matryoshka"):   # EMA of the smallest code kept by BatchTopK (by any rank)
                lo = gather(vals_N.masked_fill(vals_N <= 0, float("inf")).min()[None]).min()   # inf: none fired
                m = cfg.thr_momentum
                ema = torch.where(sae.threshold > 0, m * sae.threshold + (1 - m) * lo, lo)
                sae.threshold.copy_(torch.where(lo.isinf(), sae.threshold, ema))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            if bad_loss:    # the weights are NaN from here on: stop now, and say why
                what = "an input batch contained NaN or inf" if bad_batch else \
                       "the SAE's weights or activations overflowed (try a lower lr or c2r_lambda)"
                raise FloatingPointError(f"non-finite loss between steps {checked} and {step}: {what}")
            checked = step + 1
            with torch.no_grad():
                on = (acts_BF if cfg.kind == "relu" else vals_N) > 0
                log.append(dict(step=step, loss=loss.item(), fvu=fvu(x_BD, x_hat_BD).item(), l0=on.sum().item() / B,
                                c2r=None if c2r is None else c2r.item(),
                                nbr_err=None if nbr_err is None else nbr_err.item(),
                                dead=int((sae.tokens_since_fired > cfg.dead_tokens).sum())))
            pbar.set_postfix({k: v for k, v in log[-1].items() if k != "step" and v is not None})
            if c2r is not None and step % cfg.log_every == 0:     # a new check: one of 512 rows is noisy, so
                far = far + 1 if log[-1]["nbr_err"] > 0.1 else 0   # warn when two running are over 10 %
            if far >= 2 and not warned and world()[0] == 0:       # once a call, rank 0
                warned = True
                warnings.warn(f"step {step}: C²R's neighbour table is {log[-1]['nbr_err']:.1%} off the exact one "
                              f"(nbr_err): lower Config.nbr_every (R = {cfg.nbr_period()}) to search more rows a "
                              f"step", stacklevel=2)
        if on_step is not None:
            on_step(step, opt, log)
    sae.eval()
    if start < cfg.steps and log[-1]["fvu"] > 1:
        warnings.warn(f"the last step's FVU is {log[-1]['fvu']:.3g} > 1: the SAE reconstructs its batch worse "
                      f"than the batch mean does (lr too high? c2r_lambda too large?)", stacklevel=2)
    return sae, log


# -----------------------------------------------------------------------------
# Metrics and checkpoints

def fvu(x_BD, x_hat_BD):      # fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2
    return (x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()


def l0(acts_BF):              # mean number of active latents per sample
    return (acts_BF != 0).float().sum(1).mean()


def dead_fraction(acts_NF):   # fraction of latents that never fire on these samples
    return ((acts_NF != 0).sum(0) == 0).float().mean()


def tmp_name(path, pid=None):     # the temp file beside path: this host's and pid's, so no one else's is taken
    return f"{path}.c2r-tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def remove_stale_tmp(folder):
    """Delete the temp files (tmp_name) this host's writers left when killed mid-write (a live pid's
    may be being written: it stays; other hosts' and other programs' files are not ours to judge).
    POSIX only: there os.kill(pid, 0) asks whether pid exists; on Windows it kills."""
    ours = re.compile(rf".+{re.escape(tmp_name('', ''))}(\d+)")     # <path>.c2r-tmp-<this host>-<pid>
    for name in os.listdir(folder) if os.name == "posix" else ():
        m = ours.fullmatch(name)
        if m and int(m[1]) != os.getpid():
            try:
                os.kill(int(m[1]), 0)
            except (ProcessLookupError, OverflowError):      # no such process: the writer is dead
                with contextlib.suppress(OSError):            # gone already, or not ours to remove
                    os.unlink(os.path.join(folder, name))
            except PermissionError:                          # alive, another user's
                pass


def fsync(path):     # a power cut can write the rename to disk before the data: flush the data first
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)     # Windows syncs only a writable file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(tmp), fsync, then rename tmp onto path and fsync the folder: a crash or a power cut
    leaves the old file or the new one, never half of one. The temp file sits beside path, on the
    same filesystem, which is what makes os.replace atomic."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_tmp(folder)
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "no space left on the device to write", str(path)) from None
        raise
    if os.name == "posix":
        with contextlib.suppress(OSError):     # some filesystems cannot sync a folder: the data is safe
            fsync(folder)


def digest(obj):
    """sha256 of a checkpoint's contents (tensors' dtype, shape, bytes; other values' repr), stored by
    save(), checked by load(): torch.load reads a damaged tensor without a word (no CRC check)."""
    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, (dict, list, tuple)):
            h.update(f"{type(v).__name__}{len(v)}".encode())
            for key, u in v.items() if isinstance(v, dict) else enumerate(v):
                h.update(repr(key).encode())
                walk(u)
        else:
            h.update(repr(v).encode())
    walk(obj)
    return h.hexdigest()


def save(sae, path, **extra):
    """Write atomically, with a checksum; tensors and plain values only: torch.load(weights_only=True) reads it."""
    state = sae.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:     # train() checks the loss only at log steps: never let a NaN SAE overwrite a good file
        raise FloatingPointError(f"refusing to save an SAE whose {', '.join(bad)} contain NaN or inf")
    obj = dict(config=asdict(sae.cfg), state=state, **extra)
    obj["sha256"] = digest(obj)

    def write(tmp):
        with open(tmp, "wb") as f:     # a Python file: a full disk raises OSError(ENOSPC), not a bare RuntimeError
            torch.save(obj, f)
    atomic_write(path, write)


def first_sentence(e):     # torch's messages run on for lines, with advice that does not apply here
    return str(e).split(". ")[0].split("\n")[0][:200]


def read_checkpoint(path, map_location):
    """torch.load(path) for load(), with every way the file can be wrong as one line naming it."""
    refuse = lambda why: ValueError(f"cannot load {path}: {why}")     # noqa: E731
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise refuse("the file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise                                      # these name the file already
    except pickle.UnpicklingError:
        raise refuse("not a c2r checkpoint (it is not a torch.save archive of tensors and plain values)") from None
    except Exception as e:
        raise refuse(f"truncated or damaged ({type(e).__name__}: {first_sentence(e)})") from None
    if not isinstance(obj, dict) or not {"config", "state"} <= obj.keys():
        raise refuse("not a c2r checkpoint (no config and state in it)")
    want = obj.pop("sha256", None)
    if want is None:
        warnings.warn(f"{path} has no checksum (written before c2r.save stored one): not verified", stacklevel=3)
    elif digest(obj) != want:
        raise refuse("corrupt: its contents do not match the checksum stored with them")
    return obj


def load(path, map_location="cpu"):
    """Returns (sae, extra): the SAE in eval mode, and whatever else save() was given. A file that
    is not a sound c2r checkpoint raises one ValueError naming it and what is wrong."""
    obj = read_checkpoint(path, map_location)
    try:
        cfg = Config(**{k: v for k, v in obj.pop("config").items() if k in {f.name for f in fields(Config)}})
        state = obj.pop("state")
        # on map_location's device and in the saved dtype: load_state_dict alone would copy into a CPU fp32 SAE
        sae = SAE(cfg).to(state["W_dec_FD"].device, state["W_dec_FD"].dtype)
        sae.load_state_dict({"nbr_cand_FM": sae.nbr_cand_FM, **state})     # older files have no candidates
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"cannot load {path}: its config or weights do not make an SAE "
                         f"({type(e).__name__}: {first_sentence(e)})") from None
    return sae.eval(), obj
