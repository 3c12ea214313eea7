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
    return tt.parser().parse_args(["--n-latents", "60", "--steps", "300", "--batch", "256", "--n-eval", "2048",
                                   "--nbr-every", "1", *argv])


def test_c2r_lowers_absorption_end_to_end():
    toy = tt.Toy()
    base = [tt.run("relu", 0.0, s, args(), toy)[0] for s in (0, 1)]
    reg = [tt.run("relu", 0.1, s, args(), toy)[0] for s in (0, 1)]
    for b, r in zip(base, reg):
        assert r["absorb"] < b["absorb"] and r["split"] < b["split"]


TINY = ["--steps", "20", "--seeds", "0", "--n-eval", "256", "--batch", "64", "--jobs", "1"]


def test_main_prints_table_in_100_columns_and_progress(capsys):
    rows = tt.main(["--kind", "topk", *TINY])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["kind", "λ", *tt.COLS] and len(rows) == 2
    assert max(map(len, lines)) <= 100
    assert lines[-2] == tt.LEGEND and lines[-1].startswith("mean±std over 1 seeds")
    # a progress line per finished job, on stderr: the table alone on stdout
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert [p.split("]")[0] for p in progress] == ["[1/2", "[2/2"]
    assert "topk k 4 λ 0.1 seed 0: absorb" in progress[1]


def test_progress_stays_short(monkeypatch, capsys):
    """However many jobs, about 20 progress lines, the last one for the last job."""
    monkeypatch.setattr(tt, "run_job", lambda job: dict(absorb=0.5, split=1.0, fvu=0.1))
    a = args()
    out = tt.run_all([("topk", 0.0, s, a, None) for s in range(111)], 1)
    assert len(out) == 111
    progress = capsys.readouterr().err.splitlines()
    assert 10 <= len(progress) <= 20 and progress[-1].startswith("[111/111] topk k 4 λ 0 seed 110:")


def test_jobs_in_parallel_give_the_same_rows_in_the_same_order():
    argv = ["--kind", "topk", "--steps", "5", "--seeds", "0", "--n-eval", "256", "--batch", "32"]
    one, two = tt.main(argv + ["--jobs", "1"]), tt.main(argv + ["--jobs", "2"])
    assert repr(one) == repr(two)                  # repr: a NaN metric equals itself there


def test_fvu_above_1_warns(capsys):
    """An SAE barely trained (one step at lr 1e-6) reconstructs worse than the mean: say so."""
    rows = tt.main(["--kind", "relu", "--c2r-lambda", "0", "--lr", "1e-6", "--steps", "1", "--seeds", "0",
                    "--n-eval", "512", "--batch", "64", "--jobs", "1"])
    fvu = rows[("relu", 0.0)][0]["fvu"]
    assert fvu > 1
    assert f"warning: relu l1-coeff 0.3 λ 0 seed 0: final FVU {fvu:.3f} > 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--n-eval", "0"], "--n-eval"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--n-latents", "0"], "--n-latents"),
    (["--k", "0"], "--k"),
    (["--k", "81"], "k=81"),                                      # more than the 80 latents
    (["--sweep", "--k", "50"], "k=100"),                          # the sweep goes up to 2 * --k
    (["--c2r-lambda", "-0.1"], "--c2r-lambda"),
    (["--c2r-lambda", "nan"], "--c2r-lambda"),
    (["--lr", "-0.001"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--l1-coeff", "-1"], "--l1-coeff"),
    (["--l1-coeff", "nan"], "--l1-coeff"),
    (["--c2r-alpha", "0"], "--c2r-alpha"),
    (["--nbr-every", "-1"], "--nbr-every"),
    (["--jobs", "0"], "--jobs"),
    (["--seeds"], "--seeds"),
    (["--seeds", "0", "1", "0"], "--seeds"),
])
def test_bad_flags_stop_before_any_work(monkeypatch, capsys, argv, flag):
    monkeypatch.setattr(tt, "run_all", lambda *a: pytest.fail("trained before checking the flags"))
    with pytest.raises(SystemExit) as e:
        tt.main([*TINY, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "unrecognized" not in err, err


def test_unwritable_sweep_out_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tt, "run_all", lambda *a: pytest.fail("trained before checking --out"))
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as e:
        tt.main([*TINY, "--sweep", "--out", str(tmp_path / "file" / "sweep")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
