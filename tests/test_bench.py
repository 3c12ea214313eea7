"""bench.py runs end to end at a tiny size (it times nothing that is asserted: speed is never
tested); its chunked C²R, written from the authors' description, is C²R when one chunk holds all."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
from conftest import c2r_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_tiny(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--threads", "1", "--d-model", "16",
                        "--n-latents", "64", "--batch", "32", "--k", "4", "--steps", "2", "--warmup", "1",
                        "--nbr-every", "2", "--err-steps", "3", "--c2r-latents", "64", "--parts-latents", "64",
                        "--out", str(out),
                        "--rows", "ours + C²R", "dense + chunked C²R"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())["results"]
    assert [r["row"] for r in res] == ["ours + C²R", "dense + chunked C²R", "c2r_loss", "parts"]
    for r in res[:3]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r.get("steps", 2) == 2
    parts = res[3]    # the rolling search's pieces at R = 2: the look-ahead runs, half the rows searched
    assert "error" not in parts, parts
    assert (parts["R"], parts["m"], parts["h"], parts["rows"]) == (2, 16, 64, 32)    # h: all 64 (< 256)
    assert all(parts[k] > 0 for k in ("heading_ms", "search_ms", "rerank_ms", "penalty_ms", "check_ms"))
    pair = res[0]     # timed against its twin without C²R, then its penalty error over --err-steps steps
    assert pair["ratio"] > 0 and pair["R"] == 2 and pair["h"] == 64 and pair["err_steps"] == [3, 5]
    assert 0 <= pair["err_mean"] <= pair["err_max"] < 0.5
    assert "interleaved" in p.stdout and "from the exact one" in p.stdout


def test_chunked_c2r_with_one_chunk_is_c2r():
    g = torch.Generator().manual_seed(0)
    acts = F.relu(torch.randn(16, 40, generator=g, dtype=torch.float64))
    W = torch.randn(40, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bench.chunked_c2r(acts, W, alpha=1.0), c2r_reference(acts, W))


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch", "0"], ["--k", "0"], ["--nbr-every", "-1"],
                                  ["--nbr-cands", "0"], ["--nbr-hot", "-1"], ["--block", "0"], ["--err-steps", "-1"],
                                  ["--d-model", "0"], ["--c2r-reps", "0"], ["--warmup", "-1"],
                                  ["--n-latents", "1"], ["--c2r-latents", "64", "0"],
                                  ["--parts-latents", "1"], ["--lr", "0"]])
def test_bad_flags_stop_at_once(argv, capsys):
    """An explicit 0 used to be taken for 'not given' (`a.steps or 10`) and quietly replaced."""
    with pytest.raises(SystemExit) as e:
        bench.parse(["--device", "cpu", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_default_period_follows_the_lr():
    """The step table times the default R at the lr it would train with: --lr, else
    dictionary_learning's 2e-4 / sqrt(F / 16384), so R = 7 / 8 / 10 / 14 at 4,096 / 8,192 /
    16,384 / 65,536 latents."""
    a, _ = bench.parse(["--device", "cpu"])
    assert [bench.step_config(a, n, True, 1).nbr_period() for n in (512, 4096, 8192, 16384, 65536)] == [1, 7, 8, 10, 14]
    a, _ = bench.parse(["--device", "cpu", "--lr", "1e-3"])
    assert bench.step_config(a, 65536, True, 1).nbr_period() == 4
    a, _ = bench.parse(["--device", "cpu", "--lr", "1e-3", "--nbr-every", "7"])
    assert bench.step_config(a, 65536, True, 1).nbr_period() == 7


def test_refresh_ivf_probing_every_cluster_is_the_slice():
    """results/refresh.py's clustered search (refresh.md, sixth pass) meets every row when it probes
    every cluster, so its table is the rolling slice's, step for step, on a drifting decoder; probing
    fewer clusters it misses some. A check on its per-cluster merge, not a timing."""
    sys.path.insert(0, os.path.join(ROOT, "results"))
    import refresh
    g = torch.Generator().manual_seed(0)
    W = F.normalize(torch.randn(96, 12, generator=g), dim=1)
    roll, one, all4, few = (refresh.strategy(s, 96) for s in ("roll:4:16", "ivf:4:1:1", "ivf:4:4:4", "ivf:4:8:1"))
    exact_hits, few_hits = 0, 0
    for t in range(12):
        W = F.normalize(W + 0.05 * torch.randn(W.shape, generator=g), dim=1)
        want = roll(W, t)
        assert torch.equal(one(W, t), want) and torch.equal(all4(W, t), want)
        exact = W @ W.T
        exact.fill_diagonal_(-float("inf"))
        exact_hits += (want == exact.argmax(1)).sum().item()
        few_hits += (few(W, t) == exact.argmax(1)).sum().item()
    assert few_hits < exact_hits, (few_hits, exact_hits)


def test_refresh_low_precision_search_reranks_to_exact():
    """refresh.py's roll:R:m:bf16|f8 (refresh.md, seventh pass) search on rows rounded as a GPU's
    matmul would round them; with every other latent among the m candidates the fp32 re-ranking makes
    the table exact whatever the rounding, and with m = 1 fp8 cosines miss near-ties that fp32 finds."""
    sys.path.insert(0, os.path.join(ROOT, "results"))
    import refresh
    g = torch.Generator().manual_seed(0)
    W = F.normalize(torch.randn(96, 256, generator=g), dim=1)
    full = [refresh.strategy(s, 96) for s in ("roll:4:95", "roll:4:95:bf16", "roll:4:95:f8")]
    one, one8 = refresh.strategy("roll:4:1", 96), refresh.strategy("roll:4:1:f8", 96)
    hits, hits8 = 0, 0
    for t in range(8):
        W = F.normalize(W + 0.05 * torch.randn(W.shape, generator=g), dim=1)
        exact = W @ W.T
        exact = exact.fill_diagonal_(-float("inf")).argmax(1)
        for f in full:
            assert torch.equal(f(W, t), exact)
        hits, hits8 = hits + (one(W, t) == exact).sum().item(), hits8 + (one8(W, t) == exact).sum().item()
    assert hits8 < hits, (hits8, hits)


def test_refresh_two_lists():
    """results/refresh.py's roll:R:m:two:r (refresh.md, seventh pass): with m = 16 the re-ranked sub-list
    is the whole list, so the table is roll:R:16's step for step; with every other latent kept and
    the sub-list renewed every step it is exact; renewed every 3rd step it misses some."""
    sys.path.insert(0, os.path.join(ROOT, "results"))
    import refresh
    g = torch.Generator().manual_seed(1)
    W = F.normalize(torch.randn(96, 256, generator=g), dim=1)
    roll, same, every, third = (refresh.strategy(s, 96) for s in
                                ("roll:4:16", "roll:4:16:two:3", "roll:4:95:two:1", "roll:4:95:two:3"))
    hits = 0
    for t in range(9):
        W = F.normalize(W + 0.05 * torch.randn(W.shape, generator=g), dim=1)
        exact = (W @ W.T).fill_diagonal_(-float("inf")).argmax(1)
        assert torch.equal(same(W, t), roll(W, t)) and torch.equal(every(W, t), exact)
        hits += (third(W, t) == exact).sum().item()
    assert hits < 9 * 96, hits


def test_refresh_priority_search_renews_busy_rows_often_and_every_row():
    """results/refresh.py's act:... schedule (refresh.md, eleventh pass): b distinct rows a step, the
    busy rows (large w) renewed more often than the silent ones by about (w ratio)^(1/power) (the
    silent ones weigh the floor, a tenth of the mean w), and every row renewed again and again."""
    sys.path.insert(0, os.path.join(ROOT, "results"))
    import refresh
    n, b = 64, 4
    w = torch.cat([torch.full((8,), 512.0), torch.zeros(56)])       # 8 busy rows, 56 silent
    ratios = []
    for power in (2, 3):
        age, last, periods = torch.zeros(n), torch.zeros(n), [[] for _ in range(n)]
        for t in range(1, 601):
            age += 1
            rows = refresh.pick(w, age, b, power)
            assert len(rows.unique()) == b
            for r in rows.tolist():
                periods[r].append(t - last[r].item())
                last[r] = t
            age[rows] = 0
        assert min(len(p) for p in periods) >= 10
        busy, silent = (sum(sum(p[-10:]) / 10 for p in ps) / len(ps) for ps in (periods[:8], periods[8:]))
        ratios.append(silent / busy)
        want = ((512 + 6.4) / 6.4) ** (1 / power)     # periods are whole steps: within 25 %
        assert 0.75 * want < ratios[-1] < 1.25 * want, (power, busy, silent, want)
    assert ratios[1] < ratios[0]
