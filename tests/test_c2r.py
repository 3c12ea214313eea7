"""c2r.py against naive references: the loss, its gradients, the SAE kinds, training, checkpoints."""

import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import c2r
from conftest import c2r_reference, neighbours_reference

torch.set_num_threads(1)


def rand_case(n=40, d=6, B=16, seed=0, dtype=torch.float64, p=0.4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=dtype)
    acts = torch.rand(B, n, generator=g, dtype=dtype) * (torch.rand(B, n, generator=g, dtype=dtype) < p)
    return acts, W


# -----------------------------------------------------------------------------
# the loss

@pytest.mark.parametrize("n,block", [(30, 2048), (50, 16), (67, 8)])   # below / above the block size
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_loss_matches_reference(n, block, alpha):
    acts, W = rand_case(n=n, seed=n)
    want = c2r_reference(acts, W, alpha).item()
    assert c2r.c2r_loss(acts, W, alpha=alpha).item() == pytest.approx(want, rel=1e-10)
    nbr = c2r.nearest_neighbours(W, block=block)
    assert c2r.c2r_loss(acts, W, alpha=alpha, nbr_F=nbr).item() == pytest.approx(want, rel=1e-10)


def test_neighbours_exact_across_blocks():
    W = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    for block in (1, 5, 7, 64, 300, 4096):
        assert torch.equal(c2r.nearest_neighbours(W, block=block), neighbours_reference(W))


def test_neighbours_ties_go_to_the_lowest_index():
    """Rows of +-1/2 in 4 dims: unit norm and every cosine exact, with only 16 distinct rows, so
    most rows have exact ties. The symmetric blocked search must pick what argmax picks."""
    W = (torch.randint(0, 2, (40, 4), generator=torch.Generator().manual_seed(0)) - 0.5).double()
    cos = W @ W.T
    cos.fill_diagonal_(-float("inf"))
    assert (cos == cos.max(1, keepdim=True).values).sum(1).gt(1).any()      # the case has ties
    for block in (1, 3, 7, 40):
        assert torch.equal(c2r.nearest_neighbours(W, block=block), cos.argmax(1))
        assert torch.equal(c2r.nearest_neighbours(W, block=block), neighbours_reference(W))


def test_loss_zero_for_orthogonal_decoder():
    W = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]      # orthonormal rows
    acts = torch.rand(32, 12, dtype=torch.float64)
    assert c2r.c2r_loss(acts, W).item() == pytest.approx(0.0, abs=1e-12)
    # and for anti-parallel pairs: max(cos, 0) clips them to zero too
    assert c2r.c2r_loss(acts[:, :2], torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)).item() == 0.0


def test_loss_by_hand():
    # latents 0 and 1 at 60 degrees (cos 1/2), latent 2 orthogonal to both in 3D.
    W = torch.tensor([[1.0, 0, 0], [0.5, math.sqrt(3) / 2, 0], [0, 0, 2.0]], dtype=torch.float64)
    acts = torch.tensor([[3.0, 0, 1], [4.0, 1, 0]], dtype=torch.float64)   # a = (5, 1, 1)
    # j(0)=1, j(1)=0: s = 1/4 each; j(2): cos 0 with both -> s = 0
    want = ((5 + 1) * 0.25 + (1 + 5) * 0.25 + 0) / 3
    assert c2r.c2r_loss(acts, W).item() == pytest.approx(want)
    assert c2r.c2r_loss(acts, W, alpha=2.0).item() == pytest.approx((36 * 0.25 * 2) / 3)
    assert c2r_reference(acts, W).item() == pytest.approx(want)          # the reference, checked by hand too
    # the scale of a decoder row does not matter, only its direction
    assert c2r.c2r_loss(acts, W * torch.tensor([[3.0], [0.1], [7.0]], dtype=torch.float64)).item() == pytest.approx(want)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_loss_scales_as_batch_norms(alpha):
    """lambda is not scale-free (README): a_i is a norm over the batch, so the same codes repeated
    4 times give (sqrt 4)^alpha the penalty, and codes 3 times larger 3^alpha."""
    acts, W = rand_case()
    L = c2r.c2r_loss(acts, W, alpha=alpha)
    assert torch.allclose(c2r.c2r_loss(acts.repeat(4, 1), W, alpha=alpha), 2 ** alpha * L)
    assert torch.allclose(c2r.c2r_loss(3 * acts, W, alpha=alpha), 3 ** alpha * L)


def test_loss_permutation_invariant():
    acts, W = rand_case(n=50, seed=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert c2r.c2r_loss(acts[:, perm], W[perm]).item() == pytest.approx(c2r.c2r_loss(acts, W).item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.7])
def test_gradcheck(alpha):
    acts, W = rand_case(n=12, d=5, B=6, seed=4, p=1.0)            # all positive: a_i > 0, smooth
    acts.requires_grad_(True)
    W.requires_grad_(True)
    nbr = c2r.nearest_neighbours(W)                                 # held fixed, as in training
    assert torch.autograd.gradcheck(lambda a, w: c2r.c2r_loss(a, w, alpha=alpha, nbr_F=nbr), (acts, W))
    assert torch.autograd.gradcheck(lambda a, w: c2r_reference(a, w, alpha), (acts, W))


def test_gradients_match_dense_reference():
    acts, W = rand_case(n=45, seed=5)
    for alpha in (1.0, 2.0, 0.5):
        a1, w1 = acts.clone().requires_grad_(), W.clone().requires_grad_()
        a2, w2 = acts.clone().requires_grad_(), W.clone().requires_grad_()
        c2r.c2r_loss(a1, w1, alpha=alpha).backward()
        c2r_reference(a2, w2, alpha).backward()
        torch.testing.assert_close(a1.grad, a2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)


def test_gradient_finite_with_silent_latents():
    acts, W = rand_case(n=20, seed=6, p=0.1)
    acts[:, :5] = 0                                                 # silent pairs: a_i + a_j = 0
    for alpha in (0.5, 1.0, 2.0):
        a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
        c2r.c2r_loss(a, w, alpha=alpha).backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(w.grad).all()


def test_loss_sums_bf16_codes_in_fp32():
    """bf16 codes (a trainer under autocast) have their batch norms summed in fp32, as code_norms
    does: the same C²R as the codes cast to fp32 first, to the last bit (bf16 norms were ~0.3 % off)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 8, generator=g)
    acts = F.relu(torch.randn(4096, 64, generator=g)).bfloat16()
    nbr = c2r.nearest_neighbours(W)
    assert torch.equal(c2r.c2r_loss(acts, W, nbr_F=nbr), c2r.c2r_loss(acts.float(), W, nbr_F=nbr))


def test_penalty_on_unit_rows_skips_normalize_exactly():
    """unit_rows=True (train's call, whose decoder rows are unit and whose decoder gradient loses
    its radial part) gives the same value, and the same gradient once that part is removed."""
    acts, W = rand_case(n=40, seed=3)
    W = F.normalize(W, dim=1)
    nbr, a = c2r.nearest_neighbours(W), torch.linalg.vector_norm(acts, dim=0)
    grads = []
    for unit in (False, True):
        w = W.clone().requires_grad_()
        val = c2r.c2r_penalty(a, w, nbr, unit_rows=unit)
        val.backward()
        grads.append((val.detach(), w.grad - (w.grad * W).sum(1, keepdim=True) * W, w.grad))
    (v0, g0, raw0), (v1, g1, raw1) = grads
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    assert (raw1 - raw0).abs().max() > 1e-3          # the raw gradients do differ: the radial part
    # and rows off the unit sphere make unit_rows=True silently wrong: dot products taken for cosines
    W3 = W * 3
    assert c2r.c2r_penalty(a, W3, nbr, unit_rows=True) > 8 * c2r.c2r_penalty(a, W3, nbr)


def test_loss_bad_input():
    acts, W = rand_case(n=10)
    with pytest.raises(ValueError, match="latents"):
        c2r.c2r_loss(acts, W[:9])
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        c2r.c2r_loss(acts[0], W)
    for alpha in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            c2r.c2r_loss(acts, W, alpha=alpha)
    # the old positional call c2r_loss(acts, W, nbr) died on "Boolean value of Tensor ... ambiguous"
    with pytest.raises(TypeError, match="positional"):
        c2r.c2r_loss(acts, W, c2r.nearest_neighbours(W))


def test_loss_does_not_read_values():
    """c2r_loss checks shapes, never values (a host read per call is a GPU sync, and isfinite a
    full pass over [B, F]): a NaN code gives a NaN loss, as it does in train(), for the caller."""
    acts, W = rand_case(n=10)
    acts[0, 0] = float("nan")
    assert torch.isnan(c2r.c2r_loss(acts, W))


def test_penalty_refuses_a_bad_table():
    acts, W = rand_case(n=10)
    a = torch.linalg.vector_norm(acts, dim=0)
    nbr = c2r.nearest_neighbours(W)
    assert c2r.c2r_penalty(a, W, nbr).item() == pytest.approx(c2r_reference(acts, W).item())
    never_searched = c2r.SAE(c2r.Config(d_model=6, n_latents=10, k=2)).nbr_F          # all -1
    for bad in (never_searched, torch.full((10,), 10), nbr.clone().index_fill_(0, torch.tensor([3]), -1)):
        with pytest.raises(RuntimeError, match=r"outside \[0, n_latents\)"):
            c2r.c2r_penalty(a, W, bad)
    with pytest.raises(ValueError, match=r"nbr_F \[F\]"):
        c2r.c2r_penalty(a, W, nbr[:9])
    with pytest.raises(ValueError, match=r"a_F \[F\]"):
        c2r.c2r_penalty(a[:9], W, nbr)
    for dtype in (torch.float32, torch.int32, torch.bool):
        with pytest.raises(TypeError, match="int64"):
            c2r.c2r_penalty(a, W, nbr.to(dtype))


# -----------------------------------------------------------------------------
# the SAE

def make(kind="topk", **kw):
    return c2r.SAE(c2r.Config(**{**dict(d_model=8, n_latents=64, kind=kind, k=3, steps=20, log_every=5), **kw}))


def test_shapes():
    for kind in c2r.KINDS:
        sae = make(kind)
        x = torch.randn(5, 8)
        acts = sae.encode(x)
        assert acts.shape == (5, 64) and sae.decode(acts).shape == (5, 8)
        x_hat, acts2, pre = sae(x)
        assert x_hat.shape == (5, 8) and torch.equal(acts, acts2) and pre.shape == (5, 64)


def test_topk_exactly_k_per_row():
    sae = make("topk")
    acts = sae.encode(torch.randn(100, 8))
    assert ((acts > 0).sum(1) == 3).all()


def test_batchtopk_exactly_kB_in_training_threshold_in_eval():
    sae = make("batchtopk").train()
    x = torch.randn(50, 8)
    acts = sae.encode(x)
    assert (acts > 0).sum() == 3 * 50
    assert (acts > 0).sum(1).float().std() > 0                    # per-sample counts vary
    sae.threshold.fill_(0.3)
    sae.eval()
    pre = sae.pre_acts(x)
    acts = sae.encode(x)
    assert torch.equal(acts > 0, pre > 0.3)
    # in eval one sample's code does not depend on the rest of its batch
    torch.testing.assert_close(sae.encode(x[:1]), acts[:1])


def test_init():
    sae = make("relu")
    assert torch.equal(sae.W_enc_DF, sae.W_dec_FD.T)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(64))


def batches(d=8, B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(B, d, generator=g) * 2 + 1


@pytest.mark.parametrize("kind", c2r.KINDS)
def test_training_keeps_unit_decoder_and_learns(kind):
    sae = make(kind, c2r_lambda=0.5, steps=60, lr=1e-2)
    x = next(batches(seed=99))
    before = c2r.fvu(x, sae(x)[0]).item()
    sae, log = c2r.train(sae, batches(), progress=False)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(64))
    assert not sae.training
    assert log[-1]["step"] == 59 and set(log[0]) >= {"loss", "fvu", "l0", "c2r", "dead"}
    assert c2r.fvu(x, sae(x)[0]).item() < before
    if kind in ("batchtopk", "matryoshka"):
        assert sae.threshold > 0


def test_b_dec_starts_at_geometric_median():
    x = torch.cat([torch.zeros(9, 2), torch.tensor([[100.0, 100.0]])])     # one huge outlier
    assert c2r.geometric_median(x).norm() < 1.0 < x.mean(0).norm()
    sae = make("topk", d_model=2, steps=1)
    sae.b_dec_D.data.fill_(5.0)
    c2r.train(sae, iter([x]), c2r.Config(d_model=2, n_latents=64, kind="topk", k=3, steps=1, lr=1e-12),
              progress=False)
    torch.testing.assert_close(sae.b_dec_D.data, c2r.geometric_median(x), atol=1e-6, rtol=0)


def test_dead_latents_counted_and_aux_loss():
    sae = make("topk", dead_tokens=64, steps=3)
    c2r.train(sae, batches(), progress=False)
    dead = sae.tokens_since_fired > 64
    assert dead.any() and (sae.tokens_since_fired[~dead] <= 64).all()
    x = torch.randn(16, 8)
    x_hat, _, pre = sae(x)
    assert c2r.aux_loss(sae, x, x_hat, pre, torch.zeros(64, dtype=torch.bool)) == 0
    aux = c2r.aux_loss(sae, x, x_hat, pre, torch.ones(64, dtype=torch.bool))
    assert aux > 0 and torch.isfinite(aux)


def test_c2r_in_training_equals_the_reference():
    """The value logged by train() is C²R of that step's codes and decoder."""
    sae = make("batchtopk", c2r_lambda=1.0, steps=1, log_every=1, lr=1e-12, clip_grad=0)
    x = next(batches())
    sae.train()
    sae.b_dec_D.data.copy_(c2r.geometric_median(x))
    _, acts, _ = sae(x)
    want = c2r_reference(acts, sae.W_dec_FD).item()
    _, log = c2r.train(sae, iter([x]), progress=False)
    assert log[0]["c2r"] == pytest.approx(want, rel=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="k=100"):
        c2r.Config(n_latents=64, k=100)
    with pytest.raises(ValueError, match="c2r_lambda"):
        c2r.Config(c2r_lambda=-1.0)
    with pytest.raises(ValueError, match="kind"):
        c2r.Config(kind="gated")
    for bad, what in [(dict(warmup=-0.1), "warmup"), (dict(decay=1.5), "decay"), (dict(c2r_warmup=2.0), "c2r_warmup"),
                      (dict(warmup=0.6, decay=0.5), "warmup \\+ decay"), (dict(log_every=0), "log_every"),
                      (dict(thr_momentum=1.5), "thr_momentum"), (dict(aux_k=-1), "aux_k"),
                      (dict(clip_grad=-1.0), "clip_grad"), (dict(n_latents=1, k=1, c2r_lambda=0.1), "n_latents"),
                      (dict(nbr_every=-1), "nbr_every"), (dict(nbr_cands=0), "nbr_cands"),
                      (dict(nbr_ahead=-0.5), "nbr_ahead"), (dict(nbr_hot=-1), "nbr_hot")]:
        with pytest.raises(ValueError, match=what):
            c2r.Config(**bad)


def test_default_search_period_follows_width_and_lr():
    """nbr_every = 0 searches 512 rows a step (R = ceil(F / 512); R = 1, the exact search, up to 512
    latents), R <= 16, and lr * R^2 <= 0.02 (R >= 1); it is resolved from the width and the lr each
    time, so a copy of the Config at another width or lr gets its own."""
    P = lambda n, lr: c2r.Config(n_latents=n, k=1, lr=lr).nbr_period()     # noqa: E731
    assert [P(n, 1e-4) for n in (80, 512, 513, 8192, 8193, 16384, 2 ** 20)] == [1, 1, 2, 14, 14, 14, 14]
    assert [P(2 ** 20, lr) for lr in (1.0, 1e-2, 1e-3, 4e-4, 2.83e-4, 2e-4, 1e-4, 5e-5)] == [1, 1, 4, 7, 8, 10, 14, 16]
    # dictionary_learning's lr, 2e-4 / sqrt(F / 16384): R = 7 / 8 / 10 at 4,096 / 8,192 / 16,384 latents
    assert [P(n, 2e-4 / math.sqrt(n / 16384)) for n in (2048, 4096, 8192, 16384, 2 ** 20)] == [4, 7, 8, 10, 16]
    assert dataclasses.replace(c2r.Config(n_latents=80, k=1, lr=2e-4), n_latents=8192).nbr_period() == 10
    assert dataclasses.replace(c2r.Config(n_latents=8192, k=1, lr=2e-4), lr=1e-3).nbr_period() == 4
    assert c2r.Config(n_latents=4096, nbr_every=1, lr=1e-5).nbr_period() == 1
    assert P(2 ** 20, 1e-311) == P(2 ** 20, 5e-324) == 16     # 0.02 / lr overflows to inf, not an error
    # the busiest latents met every step: h, at most F, none at R = 1 (exact already)
    assert [c2r.Config(n_latents=n, k=1).nbr_hot_count() for n in (80, 512, 513, 8192)] == [0, 0, 256, 256]
    assert c2r.Config(n_latents=100, k=1, nbr_every=2).nbr_hot_count() == 100
    assert c2r.Config(n_latents=8192, k=1, nbr_hot=0).nbr_hot_count() == 0


@pytest.mark.parametrize("name", ["c2r_lambda", "c2r_alpha", "l1_coeff", "aux_coeff", "lr", "clip_grad", "warmup"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_config_refuses_nan_and_inf(name, value):
    """nan > 0 is False: a NaN lambda used to switch C²R off without a word, a NaN alpha or lr to
    pass every check."""
    with pytest.raises(ValueError, match=f"Config.{name} must be finite"):
        c2r.Config(**{name: value})


@pytest.mark.parametrize("name", ["steps", "k", "nbr_every", "n_latents", "d_model", "log_every", "aux_k", "seed"])
@pytest.mark.parametrize("value", [2.5, "3", True, None])
def test_config_refuses_non_integers(name, value):
    with pytest.raises(TypeError, match=f"Config.{name} must be an int"):
        c2r.Config(**{name: value})


def test_config_types():
    with pytest.raises(TypeError, match="Config.lr must be a number"):
        c2r.Config(lr="1e-3")
    with pytest.raises(TypeError, match="Config.bf16"):
        c2r.Config(bf16="no")
    with pytest.raises(TypeError, match="Config.prefixes must be ints"):
        c2r.Config(kind="matryoshka", n_latents=64, prefixes=(8, 16.5))
    cfg = c2r.Config(steps=np.int64(7), lr=1, c2r_lambda=0)    # numpy ints and Python ints for floats: fine,
    assert (type(cfg.steps), type(cfg.lr), type(cfg.c2r_lambda)) == (int, float, float)    # stored as plain Python


def test_train_refuses_a_bad_start():
    for start in (-5, 21, 2.0, True):
        with pytest.raises(ValueError, match="start"):
            c2r.train(make("topk"), batches(), progress=False, start=start)


def test_train_revalidates_a_changed_config():
    sae = make("topk")
    sae.cfg.c2r_lambda = float("nan")          # set after construction: train() checks it again
    with pytest.raises(ValueError, match="c2r_lambda"):
        c2r.train(sae, batches(), progress=False)


def test_lambda_zero_never_searches(monkeypatch):
    """A baseline (lambda = 0) used to run the exact neighbour search at every log step, only to
    log a C²R value; with one latent it then died with a C²R error. It logs None now."""
    calls = []
    for name in ("nearest_neighbours", "search_rows_", "rerank"):
        monkeypatch.setattr(c2r, name, lambda *a, **k: calls.append(1))
    _, log = c2r.train(make("batchtopk", log_every=1, steps=4), batches(), progress=False)
    assert calls == [] and [row["c2r"] for row in log] == [None] * 4
    _, log = c2r.train(make("topk", n_latents=1, k=1, steps=3), batches(), progress=False)    # one latent
    assert log[-1]["c2r"] is None and log[-1]["l0"] <= 1


def test_warns_when_final_fvu_above_one(recwarn):
    sae = make("relu", steps=2, lr=1e-12, clip_grad=0)
    with torch.no_grad():
        sae.W_enc_DF.mul_(100)                  # codes 100x too large: x_hat far worse than the mean
    with pytest.warns(UserWarning, match=r"FVU is .* > 1"):
        c2r.train(sae, batches(), progress=False)
    c2r.train(make("topk", steps=30, lr=1e-2), batches(), progress=False)   # a run that learns: no warning
    assert not [w for w in recwarn if "FVU" in str(w.message)]


def test_train_refuses_a_cfg_for_another_sae():
    """train(sae, batches, cfg) may change the optimisation, not the SAE: a cfg of another kind
    used to train a topk SAE through the relu branch (L1, dense codes) without a word."""
    with pytest.raises(ValueError, match="kind, k"):
        c2r.train(make("topk"), batches(), c2r.Config(d_model=8, n_latents=64, kind="relu", k=5), progress=False)
    sae, log = c2r.train(make("topk"), batches(), dataclasses.replace(make("topk").cfg, steps=4), progress=False)
    assert log[-1]["step"] == 3


def test_bad_batches():
    sae = make("topk")
    with pytest.raises(ValueError, match="d_model=8"):
        c2r.train(sae, iter([torch.randn(4, 7)]), progress=False)
    for kind in ("topk", "batchtopk", "relu"):         # an empty batch (a loader's last) named, not a NaN or a torch error
        with pytest.raises(ValueError, match=r"batch >= 1.*got \(0, 8\)"):
            c2r.train(make(kind, steps=2), iter([torch.randn(4, 8), torch.zeros(0, 8)]), progress=False)
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        c2r.train(make("topk"), iter([x]), progress=False)
    x[3, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="inf"):
        c2r.train(make("relu"), iter([x]), progress=False)
    with pytest.raises(ValueError, match="ran out"):
        c2r.train(make("topk", steps=5), iter([torch.randn(4, 8)]), progress=False)


def test_nan_mid_run_stops_at_the_next_log_step_and_is_never_saved(tmp_path):
    """train() records a non-finite loss on the device and checks it at log steps (so the GPU is
    never waited for in between): a NaN batch at step 7 stops the run at step 10 (log_every=5)
    with the steps and the cause; a checkpoint written in between refuses the NaN SAE."""
    xs = [x for x, _ in zip(batches(), range(20))]
    xs[7] = xs[7].clone()
    xs[7][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"between steps 6 and 10: an input batch contained NaN"):
        c2r.train(make("batchtopk"), xs, progress=False)

    path = tmp_path / "sae.pt"
    sae = make("batchtopk")
    with pytest.raises(FloatingPointError, match="refusing to save an SAE whose W_dec_FD"):
        c2r.train(sae, xs, progress=False, on_step=lambda step, opt, log: c2r.save(sae, path, step=step))
    assert c2r.load(path)[1]["step"] == 6             # the last good one stays
    assert [p.name for p in tmp_path.iterdir()] == ["sae.pt"]

    sae = make("topk")          # a finite batch but weights that overflow: the other message
    sae.W_enc_DF.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="overflowed"):
        c2r.train(sae, batches(), progress=False)


@pytest.mark.parametrize("kind,per_step,kw", [("relu", 0, {}), ("batchtopk", 1, {}),
                                             ("matryoshka", 1, dict(prefixes=(8, 24)))])
def test_no_gpu_sync_between_log_steps(kind, per_step, kw, monkeypatch):
    """Between log steps c2r.py never reads a tensor's value on the host (.item(), bool(), int(),
    float()), which on a GPU would make the CPU wait instead of queueing the next step; the one
    exception is AuxK's dead count (aux_loss). Counted by wrapping those methods. (Adam's .item()
    calls read its step counter, a CPU tensor: no wait, and not counted.)"""
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__"):
        def wrap(t, _orig=getattr(torch.Tensor, name)):
            if sys._getframe(1).f_code.co_filename == c2r.__file__:
                calls.append(t)
            return _orig(t)
        monkeypatch.setattr(torch.Tensor, name, wrap)
    per = {}
    on_step = lambda step, opt, log: per.setdefault(step, len(calls))
    c2r.train(make(kind, c2r_lambda=1.0, nbr_every=3, steps=12, log_every=100, **kw), batches(), progress=False,
              on_step=on_step)
    assert [per[s] - per[s - 1] for s in range(2, 11)] == [per_step] * 9


def test_batchtopk_threshold_kept_when_nothing_fires():
    sae = make("batchtopk", steps=3, log_every=1)
    sae.threshold.fill_(0.25)
    sae.b_enc_F.data.fill_(-1e4)                      # every pre-activation negative: no code > 0
    c2r.train(sae, batches(), progress=False, start=1)
    assert sae.threshold.item() == 0.25


def test_checkpoint_roundtrip(tmp_path):
    sae, _ = c2r.train(make("batchtopk", steps=10), batches(), progress=False)
    path = tmp_path / "sae.pt"
    c2r.save(sae, path, step=10)
    torch.load(path, weights_only=True)                   # plain tensors and values only
    assert [p.name for p in tmp_path.iterdir()] == ["sae.pt"]   # no temp file left behind
    sae2, extra = c2r.load(path)
    assert extra == {"step": 10} and sae2.cfg == sae.cfg
    x = torch.randn(7, 8)
    assert torch.equal(sae.encode(x), sae2.encode(x)) and torch.equal(sae(x)[0], sae2(x)[0])
    for name, v in sae.state_dict().items():     # the statistics too: threshold, dead-latent counters
        assert torch.equal(sae2.state_dict()[name], v), name


def test_checkpoint_keeps_dtype(tmp_path):
    """load() used to copy every checkpoint into a new fp32 SAE (and onto the CPU whatever
    map_location said): a float64 SAE came back float32."""
    sae = make("topk").double()
    c2r.save(sae, tmp_path / "sae.pt")
    back, _ = c2r.load(tmp_path / "sae.pt")
    assert back.W_dec_FD.dtype == torch.float64 and back.tokens_since_fired.dtype == torch.long
    for name, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], v), name


def test_train_in_the_sae_dtype():
    """Batches are cast to the SAE's dtype: a bf16 SAE used to fail on an fp32 x bf16 matmul,
    and a float64 SAE saw its batches rounded to fp32."""
    for kind in ("relu", "batchtopk"):
        sae, log = c2r.train(make(kind, c2r_lambda=1.0, steps=3).to(torch.bfloat16), batches(), progress=False)
        assert sae.W_dec_FD.dtype == torch.bfloat16 and math.isfinite(log[-1]["loss"])
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 3
    sae, _ = c2r.train(make("topk", steps=1, lr=1e-12).double(), iter([x]), progress=False)
    torch.testing.assert_close(sae.b_dec_D.data, c2r.geometric_median(x), atol=1e-10, rtol=0)


def test_metrics_by_hand():
    x = torch.tensor([[1.0, 0], [3.0, 0]])
    assert c2r.fvu(x, x).item() == 0
    assert c2r.fvu(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)
    acts = torch.tensor([[0.0, 2, 0], [1.0, 3, 0]])
    assert c2r.l0(acts).item() == 1.5
    assert c2r.dead_fraction(acts).item() == pytest.approx(1 / 3)


def test_resume_mid_period_is_exact(tmp_path):
    """A run stopped mid-way through a period of the rolling search (R = 3, stopped after step 3 of
    0..7) and resumed from its checkpoint ends with exactly the weights of the uninterrupted run."""
    cfg = dict(kind="batchtopk", c2r_lambda=1.0, nbr_every=3, nbr_cands=2, steps=8, lr=3e-2)
    data = [next(batches(seed=s)) for s in range(8)]
    full, _ = c2r.train(make(**cfg), iter(data), progress=False)

    def stop_at_4(step, opt, log):
        if step == 3:
            c2r.save(sae, tmp_path / "ck.pt", step=4, opt=opt.state_dict())
            raise KeyboardInterrupt
    sae = make(**cfg)
    with pytest.raises(KeyboardInterrupt):
        c2r.train(sae, iter(data), progress=False, on_step=stop_at_4)
    sae, extra = c2r.load(tmp_path / "ck.pt")
    assert (sae.nbr_F >= 0).all() and (sae.nbr_cand_FM >= 0).all()    # the candidate lists come back too
    sae, _ = c2r.train(sae, iter(data[4:]), progress=False, start=4, opt_state=extra["opt"])
    for (name, a), b in zip(full.state_dict().items(), sae.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_without_candidates_loads(tmp_path):
    """A checkpoint written before the rolling search (no nbr_cand_FM) loads, and resumes: with
    R > 1 its first step searches every row."""
    c2r.save(make("topk", c2r_lambda=1.0, nbr_every=4), tmp_path / "old.pt")
    obj = torch.load(tmp_path / "old.pt", weights_only=True)
    del obj["state"]["nbr_cand_FM"], obj["sha256"]
    torch.save(dict(obj, sha256=c2r.digest(obj)), tmp_path / "old.pt")
    sae, _ = c2r.load(tmp_path / "old.pt")
    assert (sae.nbr_cand_FM == -1).all()
    c2r.train(sae, batches(), progress=False, start=5)
    assert (sae.nbr_cand_FM >= 0).all()


@pytest.mark.parametrize("steps", [10, 30, 37, 1000])
def test_lr_schedule_never_above_lr(steps):
    """Warmup of a fraction of steps that is not a whole number of steps (0.05 * 30 = 1.5)
    used to overshoot: lr_at(1) was 2 / 1.5 = 1.33 lr."""
    cfg = c2r.Config(steps=steps, lr=1.0)
    lrs = [c2r.lr_at(s, cfg) for s in range(steps)]
    assert max(lrs) == 1.0 and min(lrs) > 0
    assert all(a <= b for a, b in zip(lrs, lrs[1:steps // 2]))                      # warmup: non-decreasing
    assert all(a >= b for a, b in zip(lrs[steps // 2:], lrs[steps // 2 + 1:]))     # decay: non-increasing
    flat = c2r.Config(steps=steps, lr=1.0, warmup=0.0, decay=0.0)                  # no division by 0
    assert [c2r.lr_at(s, flat) for s in range(steps)] == [1.0] * steps
