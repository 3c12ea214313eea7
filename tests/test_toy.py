"""The toy's generator and exact metrics on hand-built dictionaries with known answers."""

import pytest
import torch
import torch.nn.functional as F

import train_toy as tt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return tt.ToyData(tt.Toy(seed=0))


@pytest.fixture(scope="module")
def sample(data):
    return data.sample(4000, torch.Generator().manual_seed(0))


def test_generator(data, sample):
    x, f = sample
    t = data.toy
    torch.testing.assert_close(x, f @ data.G_GD)
    P = data.parents
    kids = f[:, data.children.flatten()].view(-1, t.n_parents, t.n_children)
    assert ((kids > 0).any(2) <= (f[:, P] > 0)).all()             # a child only with its parent
    assert ((kids > 0).sum(2) <= 1).all()                          # at most one child at a time
    on = f[f > 0]
    assert on.min() >= t.mag_lo and on.max() <= t.mag_hi
    assert (f[:, P] > 0).float().mean().item() == pytest.approx(t.p_parent, abs=0.02)
    x2, f2 = data.sample(4000, torch.Generator().manual_seed(0))   # seeded and deterministic
    assert torch.equal(f, f2)
    # default toy: orthonormal directions, so projections are exact
    torch.testing.assert_close(data.G_GD @ data.G_GD.T, torch.eye(t.n_features), atol=1e-5, rtol=0)


def test_toy_without_independent_features():
    """n_indep=0 used to zero every feature: f[:, -0:] is all of f, not none of it."""
    toy = tt.Toy(n_indep=0)
    x, f = tt.ToyData(toy).sample(2000, torch.Generator().manual_seed(0))
    assert f.shape == (2000, toy.n_features)
    assert (f[:, :toy.n_parents] > 0).float().mean().item() == pytest.approx(toy.p_parent, abs=0.03)
    kids = f[:, toy.n_parents:].view(-1, toy.n_parents, toy.n_children)
    assert (kids > 0).any(2).float().mean().item() == pytest.approx(toy.p_parent * toy.p_child, abs=0.03)


def test_true_dictionary_scores_perfectly(data, sample):
    _, f = sample
    full, part = tt.absorption(data, data.G_GD, f, f)
    assert full == 0 and part == pytest.approx(0, abs=1e-6)
    assert tt.splitting(data.G_GD, data.G_GD, torch.ones(data.toy.n_features, dtype=torch.bool)) == 1.0
    assert tt.recovery(data.G_GD, data.G_GD) == pytest.approx((1.0, 1.0))


def absorbed(data, f):
    """A dictionary where each child's latent is child+parent, and the parent's latent is
    silent whenever a child fires: the textbook fully absorbed SAE."""
    W = data.G_GD.clone()
    acts = f.clone()
    for p in data.parents.tolist():
        for c in data.children[p].tolist():
            W[c] = F.normalize(data.G_GD[c] + data.G_GD[p], dim=0)
            on = f[:, c] > 0
            acts[on, p] = 0
            acts[on, c] = (f[on, c, None] * data.G_GD[c] + f[on, p, None] * data.G_GD[p]).norm(dim=1)
    return W, acts


def test_fully_absorbed_dictionary(data, sample):
    _, f = sample
    W, acts = absorbed(data, f)
    assert tt.recovery(W, data.G_GD)[1] < 1                        # children no longer recovered
    full, part = tt.absorption(data, W, acts, f)
    assert full == 1.0 and part == pytest.approx(1.0)
    # a composite (cos 0.71 to its parent) counts towards the parent: 1 + n_children latents
    t = data.toy
    alive = torch.ones(t.n_features, dtype=torch.bool)
    want = (t.n_parents * (1 + t.n_children) + t.n_parents * t.n_children + t.n_indep) / t.n_features
    assert tt.splitting(W, data.G_GD, alive) == pytest.approx(want)


def test_half_absorbed_parent(data, sample):
    """The parent's latent fires at half strength and the child's latent (child+parent
    direction) carries the other half of the parent: full absorption 0, partial exactly 1/2."""
    _, f = sample
    W, acts = data.G_GD.clone(), f.clone()
    for p in data.parents.tolist():
        for c in data.children[p].tolist():
            W[c] = F.normalize(data.G_GD[c] + data.G_GD[p], dim=0)
            on = f[:, c] > 0
            acts[on, p] = f[on, p] / 2
            acts[on, c] = f[on, p] / 2 * 2 ** 0.5        # projection on the parent: f_p / 2
    full, part = tt.absorption(data, W, acts, f)
    assert full == 0 and part == pytest.approx(0.5)


def test_duplicate_latent_raises_splitting(data):
    n = data.toy.n_features
    W = torch.cat([data.G_GD, data.G_GD[:1]])                       # feature 0 twice
    assert tt.splitting(W, data.G_GD, torch.ones(n + 1, dtype=torch.bool)) == pytest.approx((n + 1) / n)
    alive = torch.ones(n + 1, dtype=torch.bool)
    alive[-1] = False                                               # a dead copy does not count
    assert tt.splitting(W, data.G_GD, alive) == 1.0


def args(*argv):
    return tt.parser().parse_args(["--width", "60", "--steps", "300", "--batch", "256", "--n-eval", "2048",
                                   "--nbr-every", "1", *argv])


def test_c2r_lowers_absorption_end_to_end():
    toy = tt.Toy()
    base = [tt.run("relu", 0.0, s, args(), toy) for s in (0, 1)]
    reg = [tt.run("relu", 0.1, s, args(), toy) for s in (0, 1)]
    for b, r in zip(base, reg):
        assert r["absorb"] < b["absorb"] and r["split"] < b["split"]


def test_main_prints_table(capsys):
    rows = tt.main(["--kind", "topk", "--steps", "20", "--seeds", "0", "--n-eval", "256", "--batch", "64",
                    "--jobs", "1"])
    out = capsys.readouterr().out
    assert "absorb" in out and "split" in out and len(rows) == 2
