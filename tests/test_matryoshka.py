"""The Matryoshka BatchTopK kind: nested prefix losses, composing with C²R."""

import copy

import pytest
import torch

import c2r
from conftest import c2r_reference


def cfg(**kw):
    base = dict(d_model=8, n_latents=24, kind="matryoshka", k=3, steps=20, log_every=1, seed=0)
    return c2r.Config(**{**base, **kw})


def sparse(acts_BF):
    """Dense codes -> the (values, rows, latents) of SAE.sparse_codes, rows ascending."""
    rows, cols = acts_BF.nonzero(as_tuple=True)
    return acts_BF[rows, cols], rows, cols


def data(n=6, B=32, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g) for _ in range(n)]


def test_prefixes_normalised_and_validated():
    assert cfg().prefixes == (24,)                       # none given: one prefix, the whole dictionary
    assert cfg(prefixes=[4, 12]).prefixes == (4, 12, 24)  # n_latents is always the last prefix
    assert cfg(prefixes=(4, 24)).prefixes == (4, 24)
    for bad in [(0, 8), (8, 4), (4, 4), (30,)]:
        with pytest.raises(ValueError, match="prefixes"):
            cfg(prefixes=bad)
    with pytest.raises(ValueError, match="only apply to kind='matryoshka'"):
        c2r.Config(kind="batchtopk", prefixes=(4,))


def test_one_prefix_is_the_plain_loss():
    sae = c2r.SAE(cfg()).train()
    x = data()[0]
    x_hat, acts, _ = sae(x)
    losses = c2r.prefix_losses(sae, x, *sparse(acts))
    assert losses.shape == (1,)
    torch.testing.assert_close(losses[0], (x_hat - x).pow(2).sum(-1).mean())
    # ... so training a one-prefix Matryoshka SAE is training a BatchTopK SAE, step for step
    m, _ = c2r.train(c2r.SAE(cfg()), data(20), progress=False)
    b, _ = c2r.train(c2r.SAE(cfg(kind="batchtopk")), data(20), progress=False)
    for (name, p), q in zip(m.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_each_prefix_uses_only_its_latents():
    torch.manual_seed(0)
    sae = c2r.SAE(cfg(prefixes=(3, 10))).double().train()
    with torch.no_grad():
        sae.b_dec_D.normal_()
    x = torch.randn(16, 8, dtype=torch.float64)
    acts = torch.relu(torch.randn(16, 24, dtype=torch.float64))
    vals, rows, cols = sparse(acts)
    vals.requires_grad_()
    losses = c2r.prefix_losses(sae, x, vals, rows, cols)
    for i, m in enumerate(sae.cfg.prefixes):
        ref = (acts[:, :m] @ sae.W_dec_FD[:m] + sae.b_dec_D - x).pow(2).sum(-1).mean()   # dense, naive
        torch.testing.assert_close(losses[i], ref)
        g_vals, g_W = torch.autograd.grad(losses[i], (vals, sae.W_dec_FD), retain_graph=True)
        assert (g_vals[cols >= m] == 0).all() and (g_W[m:] == 0).all()   # later latents: no say at all
        assert (g_vals[cols < m] != 0).all() and (g_W[:m][(acts[:, :m] > 0).any(0)] != 0).any(1).all()
    # and the last prefix is the whole SAE's reconstruction
    torch.testing.assert_close(losses[-1], (sae.decode(acts) - x).pow(2).sum(-1).mean())


def test_composes_with_c2r():
    """Step 0's logged loss is exactly mean(prefix losses) + lambda * C²R on the full code."""
    conf = cfg(prefixes=(4, 12), c2r_lambda=0.7, aux_coeff=0.0)
    sae = c2r.SAE(conf)
    ref = copy.deepcopy(sae).train()
    xs = data()
    ref.b_dec_D.data.copy_(c2r.geometric_median(xs[0]))
    _, acts, _ = ref(xs[0])
    want = c2r.prefix_losses(ref, xs[0], *sparse(acts)).mean() + 0.7 * c2r_reference(acts, ref.W_dec_FD)
    _, log = c2r.train(sae, xs + data(14, seed=1), progress=False)
    assert log[0]["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_checkpoint_keeps_prefixes(tmp_path):
    sae = c2r.SAE(cfg(prefixes=(2, 6)))
    c2r.save(sae, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["config"]["prefixes"] == (2, 6, 24)
    back, _ = c2r.load(tmp_path / "m.pt")
    assert back.cfg == sae.cfg


def test_empty_prefix_and_inference_threshold():
    sae = c2r.SAE(cfg(prefixes=(3, 10))).train()
    x = data()[0]
    acts = torch.relu(torch.randn(32, 24))
    acts[:, :3] = 0                                    # nothing kept in the first prefix
    losses = c2r.prefix_losses(sae, x, *sparse(acts))
    torch.testing.assert_close(losses[0], (sae.b_dec_D - x).pow(2).sum(-1).mean())
    # at inference Matryoshka is BatchTopK: the learned threshold, not the batch's top k*B
    sae.eval()
    sae.threshold.fill_(0.3)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.3))
