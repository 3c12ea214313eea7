"""The fast paths of c2r.train equal the plain, dense ones (README, Speed).

The TopK kinds train on sparse codes: sparse_codes + decode_sparse (embedding_bag) instead of
decode(activate(pre)), code_norms instead of vector_norm of the dense codes, AuxK decoded with
embedding_bag, and the rolling neighbour search with re-ranked candidates. (relu trains on the
dense path, which is its own reference.) Speed is measured in bench.py, never asserted here."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import c2r
from conftest import c2r_reference, candidates_reference, neighbours_reference, rerank_reference

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


@pytest.mark.parametrize("unit_rows", [False, True])
def test_search_rows_is_the_exact_top_m(unit_rows):
    """A slice of rows gets its m most similar other latents (in index order); the other rows are untouched."""
    W = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = F.normalize(W, dim=1) if unit_rows else W
    C = torch.full((40, 5), -1)
    c2r.search_rows_(W, C, 7, 29, block=4, unit_rows=unit_rows)
    assert torch.equal(C[7:29], candidates_reference(W, 5)[7:29].sort(dim=1).values)
    assert (C[:7] == -1).all() and (C[29:] == -1).all()


def test_search_rows_refuses_more_candidates_than_other_latents():
    """m = n - 1 lists every other latent; m = n would list a row as its own candidate (cosine 1,
    so rerank would make it its own neighbour): refused by name, as m = 0 is."""
    W = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    C = c2r.search_rows_(W, torch.full((16, 15), -1), 0, 16)
    assert all(set(C[i].tolist()) == set(range(16)) - {i} for i in range(16))
    for m in (16, 17, 0):
        with pytest.raises(ValueError, match=f"search_rows_: {m} candidates a row"):
            c2r.search_rows_(W, torch.full((16, m), -1), 0, 16)


def test_rerank_is_the_argmax_over_the_candidates():
    """Latent i's neighbour is the most similar of its candidates and of the latents that list i
    (a loop, rerank_reference). Hand-built: latent 1's list lacks its twin 0, but 0's lists 1."""
    g = torch.Generator().manual_seed(1)
    for n, m in ((50, 4), (50, 1), (9, 8)):
        W = torch.randn(n, 6, generator=g, dtype=torch.float64)
        C = torch.stack([torch.randperm(n - 1, generator=g)[:m] for _ in range(n)])
        C = (C + (C >= torch.arange(n)[:, None]).long()).sort(dim=1).values      # other latents, in index order
        assert torch.equal(c2r.rerank(W, C), rerank_reference(W, C)), (n, m)
    W = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    assert c2r.rerank(W, torch.tensor([[1], [2], [3], [2]])).tolist() == [1, 0, 1, 2]
    # exact ties (three equal rows), in the own list and among the offers: the lowest index wins
    ties = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.float64)
    assert c2r.rerank(ties, torch.tensor([[1, 2], [2, 3], [1, 3], [0, 1]])).tolist() == [1, 0, 0, 0]
    with pytest.raises(RuntimeError, match="never searched|-1"):     # lists never filled: refused, not read
        c2r.rerank(W, torch.full((4, 2), -1))
    # hot latents: every latent is offered its closest of them, and they get their exact neighbour
    for n, m, h in ((50, 3, 5), (50, 1, 49), (9, 2, 9)):
        W = torch.randn(n, 6, generator=g, dtype=torch.float64)
        C = torch.stack([torch.randperm(n - 1, generator=g)[:m] for _ in range(n)])
        C = (C + (C >= torch.arange(n)[:, None]).long()).sort(dim=1).values
        hot = torch.randperm(n, generator=g)[:h]
        got = c2r.rerank(W, C, hot_H=hot)
        assert torch.equal(got, rerank_reference(W, C, hot.tolist())), (n, m, h)
        assert torch.equal(got[hot], neighbours_reference(W)[hot])
        assert h < n - 1 or torch.equal(got, neighbours_reference(W))     # all but one hot: exact
    assert c2r.rerank(ties, torch.tensor([[3], [3], [3], [2]]), hot_H=torch.tensor([2, 1])).tolist() == [1, 0, 0, 0]
    # every other latent a candidate (m = F - 1): the exact search, however old the lists
    W = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert torch.equal(c2r.rerank(W, candidates_reference(torch.randn(50, 6, generator=g), 49).sort(1).values),
                       neighbours_reference(W))


@pytest.mark.parametrize("F_,R", [(24, 1), (24, 5), (24, 24), (10, 16)])
def test_rolling_slices_cover_every_row_once_per_period(F_, R, monkeypatch):
    """In train(), the rows searched at steps p*R .. p*R + R-1 are every row exactly once (a fresh
    SAE's first step searches them all, to fill its lists)."""
    calls, orig = [], c2r.search_rows_
    monkeypatch.setattr(c2r, "search_rows_", lambda W, C, lo, hi, **kw: calls.append((lo, hi)) or orig(W, C, lo, hi, **kw))
    cfg = c2r.Config(d_model=4, n_latents=F_, kind="topk", k=2, c2r_lambda=1.0, nbr_every=R, steps=2 * R + 1)
    c2r.train(c2r.SAE(cfg), iter(torch.randn(2 * R + 1, 8, 4).unbind()), progress=False)
    assert len(calls) == 2 * R + 1 and calls[0] == (0, F_)
    calls[0] = (0, F_ // R)                    # step 0 searched its slice 0 along with all the others
    for p in range(2):
        rows = torch.cat([torch.arange(lo, hi) for lo, hi in calls[p * R: (p + 1) * R]])
        assert torch.equal(rows.sort().values, torch.arange(F_))


@pytest.mark.filterwarnings("ignore:.*neighbour table is")     # m = 2, 3 are meant to go stale
@pytest.mark.parametrize("R,m,ahead,h", [(1, 4, 1.0, 0), (3, 23, 1.0, 0), (3, 2, 1.0, 0), (3, 2, 0.0, 0),
                                         (4, 3, 2.5, 0), (3, 2, 1.0, 3), (4, 3, 2.5, 5), (1, 4, 1.0, 5)])
def test_table_in_train(R, m, ahead, h):
    """Inside train(), step t uses each latent's m best candidates from the last search of its row
    (its slice, searched on the rows moved on H = (R - 1) * ahead steps of Adam's update of that
    step), the latents whose candidates hold it and, for R > 1, the h busiest latents of the batch
    (largest a_i, met both ways), re-ranked on the decoder of step t. So R = 1
    (every row every step, H = 0) is the exact argmax at every step, and so is m = F - 1, whatever
    R. The log's nbr_err is the table's C²R terms against the exact table's (all 24 rows: < 512)."""
    cfg = c2r.Config(d_model=8, n_latents=24, kind="topk", k=2, c2r_lambda=1.0, nbr_every=R, nbr_cands=m,
                     nbr_ahead=ahead, nbr_hot=h, steps=9, lr=3e-2, log_every=1, warmup=0.0, decay=0.0)
    sae, states, xs, used, adam = c2r.SAE(cfg), [], [], [], [None]
    g = torch.Generator().manual_seed(0)

    def batches():    # sees the SAE just before each step
        while True:
            states.append({k: v.clone() for k, v in sae.state_dict().items()})
            xs.append(torch.randn(16, 8, generator=g))
            yield xs[-1]

    def on_step(t, opt, log):
        used.append(sae.nbr_F.clone())
        adam.append({k: v.clone() for k, v in opt.state[sae.W_dec_FD].items()})   # what step t + 1 sees

    _, log = c2r.train(sae, batches(), progress=False, on_step=on_step)
    ref, stale, C, H = c2r.SAE(cfg).train(), 0, None, (R - 1) * ahead
    for row in log:
        t = row["step"]
        ref.load_state_dict(states[t])
        if t == 0:   # train() sets b_dec from the first batch
            ref.b_dec_D.data.copy_(c2r.geometric_median(xs[0]))
        W, st = ref.W_dec_FD.detach(), adam[t]
        P = W if st is None else F.normalize(W - H * cfg.lr * (st["exp_avg"] / (1 - 0.9 ** st["step"])) / (
            (st["exp_avg_sq"] / (1 - 0.999 ** st["step"])).sqrt() + 1e-8), dim=1)     # Adam's next step, H times
        fresh, top = neighbours_reference(W), candidates_reference(P, m).sort(dim=1).values
        rows = torch.arange(24) if t == 0 else torch.arange(t % R * 24 // R, (t % R + 1) * 24 // R)
        C = top if C is None else C.index_copy(0, rows, top[rows])       # slice t % R renewed, the rest kept
        vals, _, cols = ref.sparse_codes(ref.pre_acts(xs[t]))
        hot = c2r.code_norms(vals, cols, 24).topk(h).indices.tolist() if R > 1 else []     # as train() picks them
        table = rerank_reference(W, C, hot)
        assert torch.equal(used[t], table)
        if m == 23 or R == 1:
            assert torch.equal(used[t], fresh)
        stale += not torch.equal(used[t], fresh)
        acts = ref.activate(ref.pre_acts(xs[t]))
        a = torch.linalg.vector_norm(acts, dim=0)
        expect = c2r.c2r_penalty(a, W, table, alpha=cfg.c2r_alpha)
        assert row["c2r"] == pytest.approx(expect.item(), rel=1e-5)
        exact = c2r.c2r_penalty(a, W, fresh, alpha=cfg.c2r_alpha)
        assert row["nbr_err"] == pytest.approx(abs(expect / exact - 1).item(), abs=1e-6)
    if m == 2 and h == 0:
        assert stale > 0   # at this lr a neighbour does leave the 2 kept candidates: the check bites
        assert max(r["nbr_err"] for r in log) > 1e-3        # and nbr_err sees it


def test_heading_is_adams_step_repeated():
    """heading(W, opt, H) is W moved on by Adam's last step H more times, renormalised (Adam's last
    step is lr times the update heading reads from its state): after 1 step, where the bias
    corrections cancel, and after 40 with random gradients, for each of torch's Adam
    implementations, and AdamW's without weight decay. H = 0, or no step yet, is W itself; a step
    count k given is the state's. An optimizer with no Adam state (SGD with momentum) gets W."""
    W = torch.nn.Parameter(torch.randn(6, 5))
    sgd = torch.optim.SGD([W], lr=1e-2, momentum=0.9)
    W.grad = torch.randn(6, 5)
    sgd.step()
    assert sgd.state[W] and torch.equal(c2r.heading(W, sgd, 3.0), W.detach())
    for impl in (dict(), dict(foreach=True), dict(foreach=False), dict(fused=True), dict(AdamW=True)):
        W0 = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=1)
        W = torch.nn.Parameter(W0.clone())
        Opt = torch.optim.AdamW if impl.pop("AdamW", False) else torch.optim.Adam
        kw = dict(weight_decay=0.0) if Opt is torch.optim.AdamW else {}
        opt = Opt([torch.nn.Parameter(torch.zeros(3)), W], lr=1e-2, **impl, **kw)    # W in any group
        assert torch.equal(c2r.heading(W, opt, 3.0), W.detach())             # no state yet
        opt.state[W] = dict(step=torch.tensor(0.0), exp_avg=torch.zeros(6, 5), exp_avg_sq=torch.zeros(6, 5))
        assert torch.equal(c2r.heading(W, opt, 3.0), W.detach())             # a state of step 0: none yet
        del opt.state[W]
        g = torch.Generator().manual_seed(1)
        for t in range(40):
            W_prev = W.detach().clone()
            W.grad = torch.randn(6, 5, generator=g) + 0.5                     # a drift, and noise
            opt.step()
            if t in (0, 39):
                assert torch.equal(c2r.heading(W, opt, 0.0), W.detach())
                for H in (1.0, 4.0):
                    want = F.normalize(W.detach() + H * (W.detach() - W_prev), dim=1)
                    assert torch.allclose(c2r.heading(W, opt, H), want, atol=1e-6), (impl, t, H)
                    # train() passes the step count it keeps: the same numbers as the state's own
                    assert torch.equal(c2r.heading(W, opt, H, k=t + 1), c2r.heading(W, opt, H))


def test_heading_of_a_transposed_decoder():
    """A [D, F] decoder (nn.Linear's weight) passed as W_dec.T, as the README says, gets the same
    look-ahead as a [F, D] one: its moments are read transposed. Square too (F = D: only the strides
    tell W.T from W). A copy of the rows is no parameter of the optimizer's: no look-ahead."""
    for D, Fn in ((5, 6), (5, 5)):
        V = torch.nn.Parameter(F.normalize(torch.randn(Fn, D, generator=torch.Generator().manual_seed(0)),
                                           dim=1).T.contiguous())               # [D, F]
        opt = torch.optim.Adam([V], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            V_prev = V.detach().clone()
            V.grad = torch.randn(D, Fn, generator=g) + 0.5
            opt.step()
        want = F.normalize((V.detach() + 4.0 * (V.detach() - V_prev)).T, dim=1)
        assert torch.allclose(c2r.heading(V.T, opt, 4.0), want, atol=1e-6), (D, Fn)
        if D == Fn:       # and the square parameter itself, not transposed
            want = F.normalize(V.detach() + 4.0 * (V.detach() - V_prev), dim=1)
            assert torch.allclose(c2r.heading(V, opt, 4.0), want, atol=1e-6)
        assert torch.equal(c2r.heading(V.T.clone(), opt, 4.0), V.T.detach())


def test_table_error_samples_rows_evenly():
    """nbr_err checks 512 rows spread evenly over the dictionary (every F // 512-th, from step %
    (F // 512)): 0 for the exact table, the naive sum over those rows for a wrong one."""
    cfg = c2r.Config(d_model=6, n_latents=1030, kind="topk", k=2, c2r_lambda=1.0)
    sae = c2r.SAE(cfg)
    W = sae.W_dec_FD.detach()
    a = torch.rand(1030, generator=torch.Generator().manual_seed(0))
    sae.nbr_F.copy_(neighbours_reference(W))
    assert c2r.table_error(sae, a, 5).item() == 0
    assert c2r.table_error(sae, torch.zeros(1030), 5).item() == 0        # no active latents: nothing to miss
    cos = W @ W.T
    cos.fill_diagonal_(-float("inf"))
    second = cos.topk(2, dim=1).indices[:, 1]          # every latent given its runner-up
    sae.nbr_F.copy_(second)
    rows, exact = torch.arange(1, 1030, 2), neighbours_reference(W)     # step 5: rows 1, 3, 5, ...
    term = lambda i, j: (a[i] + a[j]) * max(W[i] @ W[j], 0) ** 2      # noqa: E731
    want = sum(term(i, second[i]) for i in rows) / sum(term(i, exact[i]) for i in rows) - 1
    assert c2r.table_error(sae, a, 5).item() == pytest.approx(abs(want.item()), rel=1e-4)


def fit_toy(kind, **over):
    """(FVU on held-out toy data, log) of an SAE trained 150-200 steps on a small toy (train_toy's)."""
    import train_toy
    toy = train_toy.Toy()
    data = train_toy.ToyData(toy)
    x_eval, _ = data.sample(4096, torch.Generator().manual_seed(1))
    cfg = c2r.Config(**{**dict(d_model=toy.d_model, n_latents=64, kind=kind, k=4, c2r_lambda=0.1, steps=150,
                               lr=3e-3, dead_tokens=256 * 20, seed=0), **over})
    sae, log = c2r.train(c2r.SAE(cfg), data.batches(256, 0), progress=False)
    with torch.no_grad():
        return c2r.fvu(x_eval, sae(x_eval)[0]).item(), log


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_toy_fvu_fast_equals_plain(kind, monkeypatch):
    """Train on a small toy with the fast path, then with the plain dense path (the same loop,
    with decode_sparse and code_norms swapped for dense decode and vector_norm): same FVU."""
    fast, log_fast = fit_toy(kind)

    def dense_decode(self, vals, rows, cols, B):
        acts = torch.zeros(B, self.cfg.n_latents, dtype=vals.dtype).index_put((rows, cols), vals)
        return self.decode(acts)

    def dense_norms(vals, cols, n):
        one_per_row = torch.zeros(len(vals), n, dtype=vals.dtype).index_put((torch.arange(len(vals)), cols), vals)
        return torch.linalg.vector_norm(one_per_row, dim=0)

    monkeypatch.setattr(c2r.SAE, "decode_sparse", dense_decode)
    monkeypatch.setattr(c2r, "code_norms", dense_norms)
    plain, log_plain = fit_toy(kind)
    assert 0 < fast < 0.5                       # it learned something
    assert fast == pytest.approx(plain, rel=0.02, abs=1e-3)
    assert log_fast[-1]["c2r"] == pytest.approx(log_plain[-1]["c2r"], rel=0.02, abs=1e-5)


@pytest.mark.parametrize("kind", FAST_KINDS + ("relu",))
def test_bf16_training_matches_fp32(kind):
    """Config.bf16 runs the forward and loss under bf16 autocast, a fresh autocast each step (fp32
    weights, gradients, Adam; the search in bf16, its re-ranking and the look-ahead in fp32). On a
    small toy it must land where fp32 lands. (Wrapping the whole of train() in one autocast instead
    keeps the bf16 weights of step 0: far off, so refused.) R = 4: the rolling search runs."""
    over = dict(l1_coeff=0.3, nbr_every=4, steps=200)
    (fp32, log32), (bf16, log16) = fit_toy(kind, **over), fit_toy(kind, bf16=True, **over)
    assert 0 < fp32 < 0.5
    assert bf16 == pytest.approx(fp32, rel=0.1, abs=2e-3)
    assert log32[-1]["nbr_err"] < 0.01 and log16[-1]["nbr_err"] < 0.01     # the table stays near exact in both
    with pytest.raises(ValueError, match="Config.bf16"), torch.autocast("cpu", dtype=torch.bfloat16):
        fit_toy(kind, **over)


def test_bf16_hot_latents_then_fp32_rerank_are_exact():
    """Under bf16 autocast the hot latents' matmul can rank a near-tie the wrong way round (0.9985
    and 0.9990 come out 1.0 and 0.996 here), so each latent takes up to 4 of them, both ways, for
    the fp32 re-ranking: the exact neighbour of latent 0 (latent 2) is found though 0's own list is
    useless, and 0, itself hot, finds its exact neighbour among all latents."""
    W = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    for j, c in ((2, 0.9990), (1, 0.9985), (3, 0.9982)):      # latent 0's neighbours: 2, then 1, 3, nearly tied
        u = F.normalize(W[j] - (W[j] @ W[0]) * W[0], dim=0)
        W[j] = c * W[0] + (1 - c * c) ** 0.5 * u
    useless = torch.tensor([[11]] * 11 + [[10]])                # nobody lists 0, 1, 2 or 3
    want = neighbours_reference(W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = W @ W.T
        for hot in ([1, 2, 3], [0, 5]):
            got = c2r.rerank(W, useless, hot_H=torch.tensor(hot))
            assert got[0] == want[0] == 2, hot
    assert cos.dtype == torch.bfloat16 and cos[0, 1] > cos[0, 2]     # bf16 ranks them the wrong way round


def test_bf16_search_then_fp32_rerank_is_exact():
    """Under bf16 autocast the search's cosines round a near-tie together (0.9995 and 0.9998 are
    both 1.0 in bf16); re-ranking the top m in fp32 still finds the exact neighbour."""
    W = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    for j, c in ((1, 0.9998), (2, 0.9995)):      # latent 0's neighbours: 1, then 2, nearly tied
        u = F.normalize(W[j] - (W[j] @ W[0]) * W[0], dim=0)
        W[j] = c * W[0] + (1 - c * c) ** 0.5 * u
    want = neighbours_reference(W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = W @ W.T
        got = c2r.rerank(W, c2r.search_rows_(W, torch.full((12, 4), -1), 0, 12))
    assert cos.dtype == torch.bfloat16 and cos[0, 1] == cos[0, 2]   # bf16 cannot tell them apart
    assert want[0] == 1 and torch.equal(got, want)


def test_train_ranks_its_search_in_bf16_only_where_bf16_is_fast(monkeypatch):
    """A CPU without AVX512-BF16 or AMX emulates bf16 matmuls, 6.5x slower than fp32 (refresh.md,
    eighteenth pass): train() ranks its search in bf16 at R > 1 only where bf16_is_fast says it
    pays, and never at R = 1 (the exact definition)."""
    assert c2r.bf16_is_fast(torch.device("meta")) is False
    seen, real = [], c2r.search_rows_
    monkeypatch.setattr(c2r, "search_rows_", lambda *a, **k: seen.append(k["bf16"]) or real(*a, **k))
    x = torch.randn(3 * 32, 16, generator=torch.Generator().manual_seed(0))
    for fast, R in ((True, 4), (False, 4), (True, 1)):
        monkeypatch.setattr(c2r, "bf16_is_fast", lambda dev: fast)
        cfg = c2r.Config(d_model=16, n_latents=64, k=4, c2r_lambda=1, nbr_every=R, steps=3, log_every=1)
        seen.clear()
        c2r.train(c2r.SAE(cfg), x.split(32), progress=False)
        assert seen == [fast and R > 1] * 3, (fast, R)


def test_bf16_search_measures_its_best_again_in_fp32():
    """search_rows_(bf16=True), or under bf16 autocast, ranks in bf16 and measures each row's 4m best
    again in fp32: the same candidates as an fp32 search, also where more than m near-ties round to
    one bf16 value (latent 0's neighbours 1..6 at cosines 0.8991..0.8996, all 0.8984 in bf16), where
    a bf16 top-m alone keeps any m of them (so train() lost the true neighbour late in a run)."""
    g = torch.Generator().manual_seed(0)
    W = F.normalize(torch.randn(40, 16, generator=g), dim=1) * 0.3
    W[:7] = 0
    W[0, 0] = 1
    for j in range(1, 7):      # cos(w_0, w_j) = 0.899 + 1e-4 j; cos(w_i, w_j) ~ 0.81 for 1 <= i < j <= 6
        c = 0.899 + 1e-4 * j
        W[j, 0], W[j, j] = c, (1 - c * c) ** 0.5
    W = F.normalize(W, dim=1)
    want = c2r.search_rows_(W, torch.zeros(40, 2, dtype=torch.long), 0, 40)
    assert want[0].tolist() == [5, 6]
    Wb = W.bfloat16()
    assert len(set((Wb @ Wb.T)[0, 1:7].tolist())) == 1      # bf16 cannot rank them
    got = c2r.search_rows_(W, torch.zeros(40, 2, dtype=torch.long), 0, 40, bf16=True)
    assert torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):     # blocks of 16: slices that start past row 0
        got = c2r.search_rows_(W, torch.zeros(40, 2, dtype=torch.long), 0, 40, block=16)
    assert torch.equal(got, want)
    W = F.normalize(torch.randn(300, 24, generator=g), dim=1)     # and on random rows, in slices
    C, Cb = torch.zeros(300, 5, dtype=torch.long), torch.zeros(300, 5, dtype=torch.long)
    c2r.search_rows_(W, C, 0, 300, block=64)
    c2r.search_rows_(W, Cb, 0, 300, block=64, bf16=True)
    assert torch.equal(C, Cb)


@pytest.mark.parametrize("R", [1, 32])
def test_train_warns_when_the_table_is_far_off(R):
    """A table that gives a penalty more than 10 % off the exact one is a different loss: train()
    says so once, naming nbr_every, when two checks running say so. Here 32 steps a period and one
    candidate (no hot set) at a high lr go far off by step 10; R = 1 is exact and never warns."""
    cfg = c2r.Config(d_model=8, n_latents=64, kind="topk", k=4, c2r_lambda=1.0, nbr_every=R, nbr_cands=1,
                     nbr_ahead=0.0, nbr_hot=0, steps=30, lr=3e-2, log_every=10)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, log = c2r.train(c2r.SAE(cfg), (torch.randn(64, 8, generator=g) for _ in range(30)), progress=False)
    far = [str(x.message) for x in w if "neighbour table" in str(x.message)]
    if R == 1:
        assert far == [] and max(r["nbr_err"] for r in log) == 0
    else:
        assert len(far) == 1 and "nbr_every" in far[0] and max(r["nbr_err"] for r in log) > 0.1


def test_one_far_check_alone_does_not_warn(monkeypatch):
    """One 512-row check is noisy: a single check over 10 % between good ones says nothing; the
    second of two running does, once, at its step."""
    errs = iter([0.0, 0.2, 0.0, 0.2, 0.3, 0.0, 0.2, 0.2])
    monkeypatch.setattr(c2r, "table_error", lambda *a, **k: torch.tensor(next(errs)))
    cfg = c2r.Config(d_model=8, n_latents=16, kind="topk", k=2, c2r_lambda=1.0, nbr_every=2, steps=8, log_every=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c2r.train(c2r.SAE(cfg), (torch.randn(8, 8) for _ in range(8)), progress=False)
    far = [str(x.message) for x in w if "neighbour table" in str(x.message)]
    assert len(far) == 1 and far[0].startswith("step 4: ") and "30.0%" in far[0]


@pytest.mark.parametrize("n,m,dtype", [(8192, 16, torch.float32), (8192 + 37, 16, torch.float32),
                                       (20000, 3, torch.float64), (8191, 16, torch.float32),
                                       (9000, 16, torch.bfloat16), (300, 1, torch.float32)])
def test_top_m_is_topk(n, m, dtype):
    """top_m picks the m largest of each row by the runs with the largest maxima (and the columns
    past the last whole run): the same values as topk, and the same columns where values differ
    (bf16 has ties); with -inf entries (the search's diagonal) and planted near-duplicates that
    crowd one run. Narrow rows (8191 < 8 m 64, 300) take topk itself."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(40, n, generator=g).to(dtype)
    x[torch.arange(40), torch.arange(40) * 7] = -float("inf")
    x[0, 100:120] = 50.0 + torch.arange(20, dtype=dtype)     # all of row 0's best in one run
    x[1, -5:] = 60.0                                          # row 1's best in the tail
    got, want = c2r.top_m(x, m), x.topk(m, dim=1).indices
    torch.testing.assert_close(x.gather(1, got).sort(dim=1).values, x.gather(1, want).sort(dim=1).values,
                               rtol=0, atol=0)
    if dtype != torch.bfloat16:
        assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
