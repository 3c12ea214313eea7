"""README's "Use C²R in your trainer": the C²R block of c2r.py pasted alone, and the two recipes,
read out of README.md and run exactly as written on stand-in SAEs."""

import ast
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import c2r
from conftest import c2r_reference

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_recipe(title):
    """The first python block after `title` in README.md: the recipes are tested as the README shows them."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(re.escape(title) + r".*?```python\n(.*?)```", text, re.S)
    assert m, f"README.md has lost its {title} recipe"
    return m[1]


RECIPE_DENSE = readme_recipe("**Dense codes**")
RECIPE_SPARSE = readme_recipe("**Sparse codes**")


def rolling_recipe():
    """The sparse recipe with README's "At scale" lines in place of its periodic search, as it says."""
    roll = readme_recipe("**At scale**")
    search = "    if nbr_F is None or step % R == 0:\n        nbr_F = nearest_neighbours(sae.W_dec)\n"
    norms = next(line for line in RECIPE_SPARSE.splitlines(True) if line.lstrip().startswith("a_F = "))
    assert search in RECIPE_SPARSE and norms in RECIPE_SPARSE
    sparse = RECIPE_SPARSE.replace(search, "").replace(norms, norms + roll)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    imports = re.search(r"\*\*At scale\*\*.*?`(from c2r import [^`]+)`", readme, re.S)[1]     # as README says
    return imports + "\n" + sparse


RECIPE_ROLL = rolling_recipe()


class DenseSAE(torch.nn.Module):
    """A stand-in for someone else's ReLU SAE: W_dec [F, D] (as SAELens and sparsify store it)."""
    def __init__(self, D=8, Fn=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_dec = torch.nn.Parameter(F.normalize(torch.randn(Fn, D, generator=g), dim=1))
        self.W_enc = torch.nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(Fn))

    def encode(self, x_BD):
        return F.relu(x_BD @ self.W_enc + self.b_enc)

    def decode(self, acts_BF):
        return acts_BF @ self.W_dec


class TopKSAE(DenseSAE):
    """... and a TopK one that keeps its codes as (values, indices) [B, k], as sparsify does."""
    k = 3

    def encode(self, x_BD):
        vals_BK, idx_BK = (x_BD @ self.W_enc + self.b_enc).topk(self.k, dim=1)
        return F.relu(vals_BK), idx_BK

    def decode(self, vals_BK, idx_BK):
        return self.dense(vals_BK, idx_BK) @ self.W_dec

    def dense(self, vals_BK, idx_BK):
        return torch.zeros(len(vals_BK), self.W_dec.shape[0]).scatter(1, idx_BK, vals_BK)


def data(steps, B=64, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g) * 2 + 1 for _ in range(steps)]


def run(recipe, sae, steps, lr, monkeypatch, lam=None, start=0):
    """Runs the recipe on sae (its loop's step counter from `start`, as a resumed trainer's);
    returns its namespace and the rows it searched, a list per search."""
    searches = []
    search, rows = c2r.nearest_neighbours, c2r.search_rows_
    monkeypatch.setattr(c2r, "nearest_neighbours",
                        lambda W, **kw: searches.append(range(len(W))) or search(W, **kw))
    monkeypatch.setattr(c2r, "search_rows_", lambda W, C, lo, hi, **kw: searches.append(range(lo, hi))
                        or rows(W, C, lo, hi, **kw))
    if lam is not None:                                   # the baseline: the same recipe with lambda = 0
        assert recipe.count("= 0.1, 10") == 1
        recipe = recipe.replace("= 0.1, 10", f"= {lam}, 10")
    if start:
        assert recipe.count("enumerate(batches)") == 1
        recipe = recipe.replace("enumerate(batches)", f"enumerate(batches, start={start})")
    ns = dict(sae=sae, opt=torch.optim.Adam(sae.parameters(), lr=lr), batches=data(steps))
    exec(recipe, ns)
    return ns, searches


RECIPES = [(RECIPE_DENSE, DenseSAE), (RECIPE_SPARSE, TopKSAE), (RECIPE_ROLL, TopKSAE)]


class WideTopKSAE(TopKSAE):
    """Wider than the rolling recipe's 256 busiest latents, so its candidate lists matter."""
    def __init__(self, seed=0):
        super().__init__(D=8, Fn=600, seed=seed)


@pytest.mark.parametrize("start", [0, 7])
@pytest.mark.parametrize("recipe,SAE", RECIPES + [(RECIPE_ROLL, WideTopKSAE)],
                         ids=["dense", "sparse", "rolling", "rolling-wide"])
def test_recipe_value_is_c2r(recipe, SAE, start, monkeypatch):
    """With the weights held still (lr = 0) the recipe's C²R term is C²R of the last batch's codes
    (the rolling search's too: its lists are exact on a still decoder), also in a loop whose step
    counter does not start at 0 (a resumed run): the first step searches whatever its number."""
    sae = SAE()
    ns, searches = run(recipe, sae, 3, 0.0, monkeypatch, start=start)
    assert list(searches[0]) == list(range(sae.W_dec.shape[0]))
    codes = sae.encode(ns["x_BD"])
    acts_BF = codes if SAE is DenseSAE else sae.dense(*codes)
    recon = (acts_BF @ sae.W_dec - ns["x_BD"]).pow(2).sum(-1).mean()
    want = c2r_reference(acts_BF, sae.W_dec).item()
    assert want > 0
    assert (ns["loss"] - recon).item() == pytest.approx(0.1 * want, rel=1e-5)


@pytest.mark.parametrize("recipe,SAE", RECIPES, ids=["dense", "sparse", "rolling"])
def test_recipe_trains_and_lowers_c2r(recipe, SAE, monkeypatch):
    """25 steps: the table is searched at steps 0, 10, 20 only (rolling: every row at step 0, then
    a tenth of them a step, in turn), and C²R ends lower than in the same run without it."""
    ends = []
    n = SAE().W_dec.shape[0]
    for lam in (None, 0.0):
        sae = SAE()
        _, searches = run(recipe, sae, 25, 1e-2, monkeypatch, lam)
        if recipe is RECIPE_ROLL:
            assert [list(r) for r in searches] == [list(range(n))] + [
                list(range(t % 10 * n // 10, (t % 10 + 1) * n // 10)) for t in range(1, 25)]
        else:
            assert searches == [range(n)] * 3
        x = data(1, B=512, seed=1)[0]
        with torch.no_grad():
            codes = sae.encode(x)
            ends.append(c2r_reference(codes if SAE is DenseSAE else sae.dense(*codes), sae.W_dec).item())
    assert ends[0] < 0.97 * ends[1], ends


def block_of(path):
    text = open(path).read()
    m = re.search(r"^# --- begin C²R \(paste this block\) ---\n(.*?)^# --- end C²R ---$", text, re.S | re.M)
    assert m, "c2r.py has lost its begin/end C²R markers"
    return m[1]


def test_pasted_block_alone_is_c2r():
    """The block, cut out of c2r.py as text and run in an empty namespace (it imports only math,
    warnings, torch and torch.nn.functional itself), gives c2r.py's values, gradients and rolling search, and
    warns of nothing (c2r.py sets no global warning filter for it)."""
    block = block_of(c2r.__file__)
    imports = [ast.unparse(n) for n in ast.parse(block).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == ["import math", "import warnings", "import torch", "import torch.nn.functional as F"]
    ns = {}
    exec(block, ns)
    assert {"c2r_loss", "c2r_penalty", "nearest_neighbours", "code_norms", "search_rows_", "rerank",
            "heading", "bf16_is_fast"} <= ns.keys()

    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6, generator=g, dtype=torch.float64)
    acts = F.relu(torch.randn(16, 40, generator=g, dtype=torch.float64))
    for alpha in (1.0, 0.5):
        out = []
        for mod in (ns, vars(c2r)):
            a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
            val = mod["c2r_loss"](a, w, alpha=alpha)
            val.backward()
            out.append((val.detach(), a.grad, w.grad))
        for x, y in zip(*out):
            assert torch.equal(x, y)
        torch.testing.assert_close(out[0][0], c2r_reference(acts, W, alpha))

    rows, cols = acts.nonzero(as_tuple=True)
    out = []
    for mod in (ns, vars(c2r)):
        v, w = acts[rows, cols].clone().requires_grad_(), W.clone().requires_grad_()
        nbr = mod["nearest_neighbours"](w, block=7)
        val = mod["c2r_penalty"](mod["code_norms"](v, cols, 40), w, nbr)
        val.backward()
        out.append((val.detach(), v.grad, w.grad, nbr))
    for x, y in zip(*out):
        assert torch.equal(x, y)
    torch.testing.assert_close(out[0][0], c2r_reference(acts, W))

    # train()'s cheaper search, pasted: a slice of rows' candidates, then the re-ranking (a sparse
    # CSR sampled matmul, which torch calls beta: the block hushes that warning itself)
    got = []
    for mod in (ns, vars(c2r)):
        cand = torch.full((40, 4), -1)
        for lo in range(0, 40, 10):
            mod["search_rows_"](W, cand, lo, lo + 10, block=7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got.append((cand, mod["rerank"](W, cand, hot_H=torch.tensor([3, 17]))))
        assert not caught, [str(w.message) for w in caught]
    for x, y in zip(*got):
        assert torch.equal(x, y)
    assert torch.equal(got[0][1], c2r.nearest_neighbours(W))     # every row just searched: exact
