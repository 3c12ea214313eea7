"""Cross-run latent matching: the exact assignment and the stability score."""

import itertools

import numpy as np
import pytest
import torch

from train_toy import assign, stability


def brute(S):
    n, m = S.shape
    return max(sum(S[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def test_assign_is_exact():
    rng = np.random.default_rng(0)
    for t in range(200):
        n = int(rng.integers(1, 6))
        S = rng.normal(size=(n, int(rng.integers(n, 7))))
        if t % 3 == 0:
            S = np.round(S)                                 # ties
        col = assign(S)
        assert len(set(col.tolist())) == n                  # one to one
        assert S[np.arange(n), col].sum() == pytest.approx(brute(S), abs=1e-9)
    with pytest.raises(ValueError, match="no more rows than columns"):
        assign(np.zeros((3, 2)))


def test_assign_agrees_with_scipy():
    opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for n, m in [(50, 50), (40, 70)]:
        S = rng.normal(size=(n, m))
        r, c = opt.linear_sum_assignment(S, maximize=True)
        assert S[np.arange(n), assign(S)].sum() == pytest.approx(S[r, c].sum(), abs=1e-9)


def test_permuted_copy_matches_perfectly():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 16, generator=g)
    perm = torch.randperm(64, generator=g)
    assert stability(W, 3.0 * W[perm]) == pytest.approx((1.0, 1.0, 64))   # row norms do not matter
    alive = torch.rand(64, generator=g) > 0.3
    assert stability(W, W[perm], alive, alive[perm]) == pytest.approx((1.0, 1.0, int(alive.sum())))


def cos_distribution(D, grid=200_001):
    """cos(u, v) of independent uniform unit vectors in D dims has density ∝ (1 - t^2)^((D-3)/2)."""
    t = np.linspace(-1, 1, grid)
    pdf = (1 - t ** 2).clip(min=0) ** ((D - 3) / 2)
    cdf = np.cumsum(pdf)
    return t, cdf / cdf[-1]


def test_unrelated_dictionaries_score_chance():
    n, D = 64, 24
    t, cdf = cos_distribution(D)
    # chance, computed: each latent's best cosine over n unrelated latents is a max of n draws,
    # E[max] = 1 - ∫ F(t)^n dt, and no one-to-one matching can beat every row's best
    dt = t[1] - t[0]
    e_max = 1 - (cdf ** n).sum() * dt
    p09 = 1 - np.interp(0.9, t, cdf)                                  # P(cos >= 0.9) for one pair
    assert n * n * p09 < 1e-3             # expected chance pairs at cosine >= 0.9: so none here
    g = torch.Generator().manual_seed(0)
    fracs, means = [], []
    for _ in range(5):
        frac, mean, _ = stability(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g))
        fracs.append(frac)
        means.append(mean)
    assert max(fracs) == 0.0
    # above what a pairing that ignores the geometry gets (expectation 0, sd 1/sqrt(D n)) ...
    assert min(means) > 5 / np.sqrt(D * n)
    # ... and below the row-wise best, as it must be for unrelated dictionaries
    assert max(means) < e_max
    print(f"chance: E[best cosine] = {e_max:.3f}, matched mean cosines {np.round(means, 3)}")
