"""The fast paths of c2r.train equal the plain, dense ones (README, Speed).

The TopK kinds train on sparse codes: sparse_codes + decode_sparse (embedding_bag) instead of
decode(activate(pre)), code_norms instead of vector_norm of the dense codes, AuxK decoded with
embedding_bag, and a neighbour table refreshed every cfg.nbr_every steps. (relu trains on the
dense path, which is its own reference.) Speed is measured in bench.py, never asserted here."""

import pytest
import torch
import torch.nn.functional as F

import c2r
from conftest import c2r_reference, neighbours_reference

FAST_KINDS = ("topk", "batchtopk")


def make_sae(kind, n=48, d=12, seed=0):
    cfg = c2r.Config(d_model=d, n_latents=n, kind=kind, k=3, seed=seed)
    sae = c2r.SAE(cfg).double()
    sae.renorm_()           # unit rows in float64, as train() keeps them (the init is unit in fp32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # move off the tied init, so encoder and decoder gradients differ
        sae.W_enc_DF.add_(0.3 * torch.randn(sae.W_enc_DF.shape, generator=g, dtype=torch.float64))
        sae.b_enc_F.copy_(0.1 * torch.randn(n, generator=g, dtype=torch.float64))
        sae.b_dec_D.copy_(0.2 * torch.randn(d, generator=g, dtype=torch.float64))
    x = torch.randn(20, d, generator=g, dtype=torch.float64)
    return sae.train(), x


def losses(sae, x, alpha, dead_F, fast):
    """recon + AuxK + C²R of one training step, by the fast path (as train() computes them: sparse
    codes, embedding_bag, code_norms, the penalty on the unit-norm rows as they are) or by the
    plain dense one (dense codes, matmul decode, vector_norm, normalised rows, brute-force search)."""
    pre = sae.pre_acts(x)
    if fast:
        vals, rows, cols = sae.sparse_codes(pre)
        x_hat = sae.decode_sparse(vals, rows, cols, x.shape[0])
        c2r_ = c2r.c2r_penalty(c2r.code_norms(vals, cols, sae.cfg.n_latents), sae.W_dec_FD,
                               c2r.nearest_neighbours(sae.W_dec_FD, block=7), alpha=alpha, unit_rows=True)
        aux = c2r.aux_loss(sae, x, x_hat, pre, dead_F)
    else:
        acts = sae.activate(pre)
        x_hat = sae.decode(acts)
        c2r_ = c2r_reference(acts, sae.W_dec_FD, alpha)
        # AuxK as a dense matmul
        vals, idx = pre.masked_fill(~dead_F, -float("inf")).topk(sae.cfg.aux_k, dim=1)
        e = (x - x_hat).detach()
        e_hat = torch.zeros_like(pre).scatter(1, idx, F.relu(vals)) @ sae.W_dec_FD
        aux = (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean()
    recon = (x_hat - x).pow(2).sum(-1).mean()
    return recon, aux, c2r_


@pytest.mark.parametrize("kind", FAST_KINDS)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_fast_loss_and_grads_equal_dense(kind, alpha):
    sae, x = make_sae(kind)
    sae.cfg.aux_k = 5
    dead_F = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead_F[::4] = True
    out = {}
    for fast in (True, False):
        sae.zero_grad()
        parts = losses(sae, x, alpha, dead_F, fast)
        sum(parts).backward()
        out[fast] = [p.detach() for p in parts], {n: p.grad.clone() for n, p in sae.named_parameters()}
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert out[True][0][2] > 0 and out[True][0][1] > 0       # the terms compared are not trivially 0
    W = sae.W_dec_FD.detach()
    for name in ("W_enc_DF", "W_dec_FD", "b_enc_F", "b_dec_D"):
        g_fast, g_dense = out[True][1][name], out[False][1][name]
        if name == "W_dec_FD":    # what train() steps with: the part tangent to the unit sphere
            g_fast, g_dense = (g - (g * W).sum(1, keepdim=True) * W for g in (g_fast, g_dense))
        assert torch.isfinite(g_fast).all()
        assert g_dense.abs().max() > 0, name
        torch.testing.assert_close(g_fast, g_dense, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_sparse_codes_are_the_dense_codes(kind):
    sae, x = make_sae(kind, seed=3)
    pre = sae.pre_acts(x)
    vals, rows, cols = sae.sparse_codes(pre)
    assert (rows[1:] >= rows[:-1]).all()                        # decode_sparse's offsets need it
    dense = torch.zeros_like(pre)
    dense[rows, cols] = vals
    assert torch.equal(dense, sae.activate(pre))
    assert torch.equal(dense, sae(x)[1])                           # forward() is what users get
    assert len(vals) == sae.cfg.k * x.shape[0]
    torch.testing.assert_close(sae.decode_sparse(vals, rows, cols, x.shape[0]), sae.decode(dense))


def test_code_norms_gradcheck_and_silent_latents():
    g = torch.Generator().manual_seed(0)
    cols = torch.tensor([0, 2, 2, 5, 0, 5, 5])
    vals = (torch.rand(7, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: c2r.code_norms(v, cols, 7), (vals,))
    # a kept code of 0 (TopK picked a negative pre-activation) and latents never picked:
    # their norm is 0 and its gradient 0, not NaN, as vector_norm's
    v = torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64, requires_grad=True)
    a = c2r.code_norms(v, torch.tensor([1, 1, 3]), 5)
    a.sum().backward()
    assert torch.equal(a.detach(), torch.tensor([0, 0, 0, 1.5, 0], dtype=torch.float64))
    assert torch.equal(v.grad, torch.tensor([0, 0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("block", [1, 5, 64])
def test_blocked_search_equals_brute_force(block):
    W = torch.randn(50, 6, generator=torch.Generator().manual_seed(block))
    assert torch.equal(c2r.nearest_neighbours(W, block=block), neighbours_reference(W))


@pytest.mark.parametrize("R", [1, 3])
def test_refreshed_table_is_a_fresh_search(R):
    """Inside train(), step t uses the table searched at the last multiple of R, on the decoder
    of that step: so R=1 is the definition, and a refreshed table equals a fresh search."""
    cfg = c2r.Config(d_model=8, n_latents=24, kind="topk", k=2, c2r_lambda=1.0, nbr_every=R, steps=9,
                     lr=3e-2, log_every=1, warmup=0.0, decay=0.0)
    sae, states, xs = c2r.SAE(cfg), [], []
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            states.append({k: v.clone() for k, v in sae.state_dict().items()})
            xs.append(torch.randn(16, 8, generator=g))
            yield xs[-1]

    _, log = c2r.train(sae, batches(), progress=False)
    ref, stale = c2r.SAE(cfg).train(), 0
    for row in log:
        t = row["step"]
        ref.load_state_dict(states[t])
        if t == 0:   # train() sets b_dec from the first batch
            ref.b_dec_D.data.copy_(c2r.geometric_median(xs[0]))
        acts = ref.activate(ref.pre_acts(xs[t]))
        fresh = neighbours_reference(ref.W_dec_FD)
        table = neighbours_reference(states[t - t % R]["W_dec_FD"])
        if t % R == 0:
            assert torch.equal(table, fresh)
        stale += not torch.equal(table, fresh)
        expect = c2r.c2r_penalty(torch.linalg.vector_norm(acts, dim=0), ref.W_dec_FD, table, alpha=cfg.c2r_alpha)
        assert row["c2r"] == pytest.approx(expect.item(), rel=1e-5)
        if t % R == 0:     # a fresh table: the penalty is C²R itself
            assert row["c2r"] == pytest.approx(c2r_reference(acts, ref.W_dec_FD, cfg.c2r_alpha).item(), rel=1e-5)
    if R > 1:
        assert stale > 0   # at this lr the table does go stale between refreshes: the check bites


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_toy_fvu_fast_equals_plain(kind, monkeypatch):
    """Train on a small toy with the fast path, then with the plain dense path (the same loop,
    with decode_sparse and code_norms swapped for dense decode and vector_norm): same FVU."""
    import train_toy
    toy = train_toy.Toy()
    data = train_toy.ToyData(toy)
    x_eval, _ = data.sample(4096, torch.Generator().manual_seed(1))

    def fit():
        cfg = c2r.Config(d_model=toy.d_model, n_latents=64, kind=kind, k=4, c2r_lambda=0.1, steps=150,
                         lr=3e-3, dead_tokens=256 * 20, seed=0)
        sae, log = c2r.train(c2r.SAE(cfg), data.batches(256, 0), progress=False)
        with torch.no_grad():
            return c2r.fvu(x_eval, sae(x_eval)[0]).item(), log

    fast, log_fast = fit()

    def dense_decode(self, vals, rows, cols, B):
        acts = torch.zeros(B, self.cfg.n_latents, dtype=vals.dtype).index_put((rows, cols), vals)
        return self.decode(acts)

    def dense_norms(vals, cols, n):
        one_per_row = torch.zeros(len(vals), n, dtype=vals.dtype).index_put((torch.arange(len(vals)), cols), vals)
        return torch.linalg.vector_norm(one_per_row, dim=0)

    monkeypatch.setattr(c2r.SAE, "decode_sparse", dense_decode)
    monkeypatch.setattr(c2r, "code_norms", dense_norms)
    plain, log_plain = fit()
    assert 0 < fast < 0.5                       # it learned something
    assert fast == pytest.approx(plain, rel=0.02, abs=1e-3)
    assert log_fast[-1]["c2r"] == pytest.approx(log_plain[-1]["c2r"], rel=0.02, abs=1e-5)


@pytest.mark.parametrize("kind", FAST_KINDS + ("relu",))
def test_bf16_training_matches_fp32(kind):
    """Config.bf16 runs the forward and loss under bf16 autocast, a fresh autocast each step (fp32
    weights, gradients, Adam). On a small toy it must land where fp32 lands. (Wrapping the whole
    of train() in one autocast instead keeps the bf16 weights of step 0: far off, so refused.)"""
    import train_toy
    toy = train_toy.Toy()
    data = train_toy.ToyData(toy)
    x_eval, _ = data.sample(4096, torch.Generator().manual_seed(1))

    def fit(bf16):
        cfg = c2r.Config(d_model=toy.d_model, n_latents=64, kind=kind, k=4, l1_coeff=0.3, c2r_lambda=0.1,
                         steps=200, lr=3e-3, dead_tokens=256 * 20, seed=0, bf16=bf16)
        sae, _ = c2r.train(c2r.SAE(cfg), data.batches(256, 0), progress=False)
        with torch.no_grad():
            return c2r.fvu(x_eval, sae(x_eval)[0]).item()

    fp32, bf16 = fit(False), fit(True)
    assert 0 < fp32 < 0.5
    assert bf16 == pytest.approx(fp32, rel=0.1, abs=2e-3)
    with pytest.raises(ValueError, match="Config.bf16"), torch.autocast("cpu", dtype=torch.bfloat16):
        fit(False)
