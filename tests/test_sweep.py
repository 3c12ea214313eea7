"""`train_toy.py --sweep` writes its table, and its figure where matplotlib is installed."""

import sys

import pytest

import train_toy

TINY = ["--sweep", "--steps", "10", "--seeds", "0", "--batch", "64", "--n-eval", "256", "--n-latents", "16",
        "--jobs", "1"]


def test_sweep_writes_table_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "sweep"
    rows = train_toy.main(TINY + ["--out", str(out)])
    text = (tmp_path / "figs" / "sweep.txt").read_text()
    methods = {key[0] for key in rows}
    assert methods == {"BatchTopK", "BatchTopK+C2R", "Matryoshka", "Matryoshka+C2R", "C2R-lambda", "ReLU",
                       "ReLU+C2R"}
    assert all(m in text for m in methods)
    lines = text.splitlines()            # a header, a rule, a title per method, its rows, the legend
    assert len(lines) == 2 + len(methods) + len(rows) + 1 and max(map(len, lines)) <= 100
    png = (tmp_path / "figs" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sweep_without_matplotlib_still_writes_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now raises ImportError
    out = tmp_path / "sweep"
    rows = train_toy.main(TINY + ["--out", str(out)])
    assert (tmp_path / "sweep.txt").read_text().count("\n") == 2 + 7 + len(rows) + 1
    assert not (tmp_path / "sweep.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_compare_reports_stability():
    rows = train_toy.main(["--compare", "--steps", "10", "--seeds", "0", "--batch", "64", "--n-eval", "256",
                           "--n-latents", "16", "--jobs", "1"])
    assert {key[0] for key in rows} == {"toy ours", "toy nabeshima"}
    assert {key[1] for key in rows} == {"batchtopk", "matryoshka"}
    for (m,) in rows.values():
        assert 0 <= m["stab09"] <= 1 and -1 <= m["stab_cos"] <= 1 and m["stab09_n"] >= 0
