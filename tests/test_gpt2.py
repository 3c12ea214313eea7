"""train_gpt2.py and lm.py on a tiny random GPT-2 (2 layers, 64 dims) and a tokenizer written by
the test: no download, seconds on a CPU."""

import dataclasses
import json
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import absorption  # noqa: E402
import c2r  # noqa: E402
import lm  # noqa: E402
import train_gpt2 as tg  # noqa: E402

torch.set_num_threads(1)

WORDS = ("apple ant arm axe bat bee bed box cat cow cup car dog den dot dig egg elk ear eel fox fig fan fog "
         "gum gap hat hen hog hut ink ivy jam jet kit kid log leg map mud net nut owl oak pig pan").split()


def tiny_tokenizer(folder, words=WORDS):
    """A real GPT-2 byte-level BPE tokenizer with a small vocabulary: the 256 byte symbols plus
    merges that make each ' word' of `words` a single token (tests/test_absorption.py uses it too)."""
    # GPT-2's byte -> symbol table: printable bytes stand for themselves, the rest move to 256+
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    sym, extra = [], 0
    for c in range(256):
        sym.append(chr(c) if c in keep else chr(256 + extra))
        extra += c not in keep
    vocab, merges = {s: i for i, s in enumerate(sym)}, []
    for w in words:
        cur = "Ġ"
        for ch in w:
            if cur + ch not in vocab:
                merges.append(f"{cur} {ch}")
                vocab[cur + ch] = len(vocab)
            cur += ch
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.GPT2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, text_file, model, tok): a 2-layer, 64-dim random GPT-2 saved as a local model."""
    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer(str(root / "tok"))
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=64, n_layer=2, n_head=2,
                                  bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g)) for _ in range(400))
    (root / "text.txt").write_text(text)
    return str(root / "model"), str(root / "text.txt"), model, tok


def args_for(tiny, out, *extra):
    model_dir, text, _, _ = tiny
    return tg.parse_args(["--model", model_dir, "--data", text, "--layer", "1", "--ctx", "16", "--tokens", "2048",
                          "--batch", "256", "--eval-tokens", "300", "--n-latents", "96", "--k", "4",
                          "--buffer", "1000", "--model-batch", "8", "--probe-words", "0",
                          "--device", "cpu", "--quiet", "--out", str(out), *extra])


def same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_end_to_end_and_exact_reload(tiny, tmp_path):
    res, saes = tg.run(args_for(tiny, tmp_path))
    out = json.load(open(tmp_path / "results.json"))
    assert set(out["saes"]) == {"baseline", "c2r"} and out["baseline"] == "baseline"
    assert out["configs"]["baseline"]["c2r_lambda"] == 0 and out["configs"]["c2r"]["c2r_lambda"] == 5
    for name, r in out["saes"].items():
        assert 0 <= r["fvu"] < 1, name                 # it learned something
        assert 0 < r["l0"] and 0 <= r["dead"] <= 96
        assert r["ce_loss"] > 0 and "absorption" not in r        # --probe-words 0: no absorption
    assert "| baseline |" in tg.table(res) and "n/a" in tg.table(res)
    # baseline and C²R differ only in lambda, and lambda did something
    assert not torch.equal(saes["baseline"].W_dec_FD, saes["c2r"].W_dec_FD)
    # reload: the saved SAE (scale folded in) gives identical outputs on raw activations
    _, _, model, tok = tiny
    x = lm.resid(model, lm.blocks_of(model), 1, torch.randint(len(tok), (4, 16)))[:, 1:].reshape(-1, 64)
    for name, sae in saes.items():
        back, extra = c2r.load(tmp_path / f"{name}.pt")
        raw = lm.fold(sae, extra["act_scale"])
        for a, b in zip(raw(x), back(x)):
            assert torch.equal(a, b)
        # ... and the folded SAE is the trained one, moved from scaled to raw activations
        s = extra["act_scale"]
        assert torch.allclose(raw(x)[0], sae(x * s)[0] / s, rtol=1e-4, atol=1e-5)
        # the SAELens layout holds the same weights in its [d_in, d_sae] / [d_sae, d_in] shapes
        from safetensors.torch import load_file
        w = load_file(tmp_path / f"{name}_saelens" / "sae_weights.safetensors")
        cfg = json.load(open(tmp_path / f"{name}_saelens" / "cfg.json"))
        assert cfg["d_in"] == 64 and cfg["d_sae"] == 96 and cfg["architecture"] == "jumprelu"
        assert torch.equal(w["W_enc"], back.W_enc_DF) and w["W_enc"].shape == (64, 96)
        assert torch.equal(w["W_dec"], back.W_dec_FD) and torch.equal(w["b_dec"], back.b_dec_D)
        # a JumpReLU with that threshold is our inference encoder
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        assert torch.equal(F.relu(pre) * (pre > w["threshold"]), back.encode(x))


def test_many_saes_on_the_same_batches(tiny, tmp_path):
    """--runs: one SAE per setting, all on the same batches. Two runs with the same settings under
    two names come out bit-identical; a run's seed moves the SAE's init alone; matryoshka gets
    its nested prefixes (with the whole dictionary as its only prefix it *is* BatchTopK)."""
    res, saes = tg.run(args_for(tiny, tmp_path, "--runs", "c2r_lambda=0", "twin: c2r_lambda=0", "seed=1",
                                "kind=matryoshka", "kind=matryoshka prefixes=96", "kind=batchtopk c2r_lambda=2"))
    assert list(saes) == ["lam0", "twin", "seed1", "matryoshka", "matryoshka_prefixes96", "batchtopk_lam2"]
    assert same_state(saes["lam0"], saes["twin"])
    assert not torch.equal(saes["lam0"].W_dec_FD, saes["seed1"].W_dec_FD)
    assert saes["matryoshka"].cfg.prefixes == (6, 12, 24, 48, 96)          # n_latents / 16, / 8, / 4, / 2, all
    assert c2r.load(tmp_path / "matryoshka.pt")[0].cfg.prefixes == (6, 12, 24, 48, 96)
    assert not torch.equal(saes["matryoshka"].W_dec_FD, saes["lam0"].W_dec_FD)
    plain = saes["matryoshka_prefixes96"]
    assert plain.cfg.prefixes == (96,) and torch.equal(plain.W_dec_FD, saes["lam0"].W_dec_FD)
    for name in saes:
        assert os.path.exists(tmp_path / f"{name}.ckpt.pt") and os.path.exists(tmp_path / f"{name}.pt")
    # runs that differ in their seed alone are one point of the figure, mean ± std over them
    groups = {tuple(g["runs"]): g for g in res["groups"]}
    assert set(groups) == {("lam0", "twin", "seed1"), ("matryoshka",), ("matryoshka_prefixes96",), ("batchtopk_lam2",)}
    fvus = [res["saes"][n]["fvu"] for n in ("lam0", "twin", "seed1")]
    assert groups[("lam0", "twin", "seed1")]["fvu"] == pytest.approx([np.mean(fvus), np.std(fvus)])
    assert groups[("batchtopk_lam2",)]["method"] == "BatchTopK+C²R"
    assert groups[("matryoshka",)]["method"] == "Matryoshka"
    assert "mean ± std over seeds" in tg.table(res)


def test_absorption_call_site(tiny, tmp_path, monkeypatch):
    """absorption.prepare once (the model's part), score per SAE (on the SAE for raw activations),
    bootstrap_diff of each SAE against the first baseline (c2r_lambda=0, wherever it is listed)."""
    _, _, model, tok = tiny
    calls = []

    def prepare(tok_, resid_fn, *, device, **opts):
        ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
        assert tok_ is not None and torch.equal(resid_fn(ids), lm.resid(model, lm.blocks_of(model), 1, ids))
        calls.append(("prepare", opts.get("seed", 42), opts["max_words"]))
        return dict(key="d")

    def score(sae, data):
        calls.append(("score", sae.cfg.c2r_lambda, sae.cfg.seed))
        value = {(5.0, 0): 0.25, (0.0, 0): 0.5, (0.0, 1): 0.75, (0.0, 2): None}[sae.cfg.c2r_lambda, sae.cfg.seed]
        return dict(mean_absorption_fraction=value, mean_full_absorption=0.0, mean_split_latents=1.0)

    def bootstrap_diff(a, b):
        calls.append(("diff", a["mean_absorption_fraction"], b["mean_absorption_fraction"]))
        return dict(absorption_fraction=dict(diff=0.5, ci95=[0.25, 0.75]))
    monkeypatch.setitem(sys.modules, "absorption", types.SimpleNamespace(
        prepare=prepare, score=score, bootstrap_diff=bootstrap_diff, MIN_WORDS=absorption.MIN_WORDS,
        N_ICL=absorption.N_ICL))
    res, saes = tg.run(args_for(tiny, tmp_path, "--probe-words", "60", "--runs", "c2r_lambda=5", "base: c2r_lambda=0",
                                "seed=1", "seed=2"))
    assert calls[0] == ("prepare", 42, 60) and [c[0] for c in calls].count("prepare") == 1   # SAEBench's seed
    assert [c for c in calls if c[0] == "score"] == [("score", 5.0, 0), ("score", 0.0, 0), ("score", 0.0, 1),
                                                     ("score", 0.0, 2)]
    assert [c for c in calls if c[0] == "diff"] == [("diff", 0.25, 0.5), ("diff", 0.75, 0.5), ("diff", None, 0.5)]
    assert res["baseline"] == "base" and "vs_baseline" not in res["saes"]["base"]
    out = json.load(open(tmp_path / "results.json"))
    assert out["saes"]["lam5"]["absorption"]["mean_absorption_fraction"] == 0.25
    assert out["saes"]["seed2"]["absorption"]["mean_absorption_fraction"] is None      # n/a stays n/a
    text = tg.table(res)
    assert "| 0.2500 |" in text and "+0.5000 [+0.2500, +0.7500]" in text
    g = {tuple(g["runs"]): g for g in res["groups"]}
    assert g[("base", "seed1", "seed2")]["absorption"] is None and g[("lam5",)]["absorption"] == [0.25, 0]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 0
    # with --cache, the model's part is kept beside the activations and never recomputed
    calls.clear()
    cache = ["--probe-words", "60", "--cache", str(tmp_path / "cache"), "--runs", "c2r_lambda=0"]
    tg.run(args_for(tiny, tmp_path / "c1", *cache))
    tg.run(args_for(tiny, tmp_path / "c2", *cache))
    assert [c[0] for c in calls] == ["prepare", "score", "score"]
    assert torch.load(tmp_path / "cache" / "absorption_60_50.pt", weights_only=True) == dict(key="d")


def test_absorption_for_real(tiny, tmp_path):
    """absorption.py itself on the tiny model: too few letters pass its probes here, so every
    mean is None, shown as n/a, and the run goes on."""
    pytest.importorskip("absorption")
    pytest.importorskip("sklearn")
    res, _ = tg.run(args_for(tiny, tmp_path, "--probe-words", "100", "--probe-epochs", "1"))
    out = json.load(open(tmp_path / "results.json"))
    for name, r in out["saes"].items():
        assert r["absorption"]["letters_kept"] + r["absorption"]["letters_dropped"] == 26
        assert r["absorption"]["mean_absorption_fraction"] is None
    assert out["saes"]["c2r"]["vs_baseline"]["absorption_fraction"] is None
    assert "| n/a |" in tg.table(res)


def test_cache_trains_the_same_saes_as_the_live_model(tiny, tmp_path, monkeypatch):
    """--cache: the first run harvests the float16 activations to disk, a later run reads them
    back instead of running the model; both train exactly the SAEs that the live model gives
    with --act-dtype float16. The cache holds the training stream, never a held-out context."""
    model_dir, text, model, tok = tiny
    _, live = tg.run(args_for(tiny, tmp_path / "live", "--act-dtype", "float16"))
    _, fp32 = tg.run(args_for(tiny, tmp_path / "fp32"))
    res1, first = tg.run(args_for(tiny, tmp_path / "a", "--cache", str(tmp_path / "cache")))
    monkeypatch.setattr(lm, "harvest", lambda *a, **k: pytest.fail("the model ran for training activations"))
    res2, second = tg.run(args_for(tiny, tmp_path / "b", "--cache", str(tmp_path / "cache")))
    assert res2["timing"]["baseline"]["source"] == "cache" and res1["scale"] == res2["scale"]
    for name in live:
        assert same_state(live[name], first[name]) and same_state(live[name], second[name]), name
        assert not same_state(live[name], fp32[name])          # the rounding is real, and it is documented
    man = json.load(open(tmp_path / "cache" / "manifest.json"))
    acts = np.concatenate([np.load(tmp_path / "cache" / f"acts_{i:05d}.npy") for i in range(len(man["shards"]))])
    assert acts.dtype == np.float16 and len(acts) == man["tokens"] == lm.rows_needed(8, 256, 1000, 120)
    ev, rows = lm.contexts(text, tok, 16, 20, len(tok))
    blocks = lm.blocks_of(model)
    x = torch.cat([lm.resid(model, blocks, 1, torch.stack([next(rows) for _ in range(8)]))[:, 1:].reshape(-1, 64)
                   for _ in range(len(acts) // 120)])
    assert torch.equal(torch.from_numpy(acts), x.half())
    x_ev = lm.resid(model, blocks, 1, ev)[:, 1:].half().numpy()            # context by context: [20, 15 * 64]
    assert not {r.tobytes() for r in x_ev.reshape(20, -1)} & {r.tobytes() for r in acts.reshape(-1, 15 * 64)}
    assert man["layer"] == 1 and man["ctx"] == 16 and man["held_out_contexts"] == 20 and man["scale"] == res1["scale"]


def test_cache_refuses_other_settings_and_incomplete_caches(tiny, tmp_path):
    cache = tmp_path / "cache"
    tg.run(args_for(tiny, tmp_path / "a", "--cache", str(cache)))
    with pytest.raises(ValueError, match="other settings.*layer 1 there, 0 here"):
        tg.run(args_for(tiny, tmp_path / "b", "--cache", str(cache), "--layer", "0"))
    with pytest.raises(ValueError, match="other settings.*seed 0 there, 3 here"):
        tg.run(args_for(tiny, tmp_path / "b", "--cache", str(cache), "--seed", "3"))
    with pytest.raises(ValueError, match="stores float16"):
        tg.run(args_for(tiny, tmp_path / "b", "--cache", str(cache), "--act-dtype", "float32"))
    settings = json.load(open(cache / "settings.json"))
    n = json.load(open(cache / "manifest.json"))["tokens"]
    assert len(lm.open_cache(str(cache), settings, n)) == 1
    with pytest.raises(ValueError, match=f"holds {n} activations, this run needs {n + 1}"):
        lm.open_cache(str(cache), settings, n + 1)
    a = np.load(cache / "acts_00000.npy")
    b = a.copy()
    b[7, 3] = -b[7, 3] if b[7, 3] else 1                            # one value flipped, the shape kept
    np.save(cache / "acts_00000.npy", b)
    with pytest.raises(ValueError, match="acts_00000.npy is damaged: its contents do not match the sha256"):
        tg.run(args_for(tiny, tmp_path / "c", "--cache", str(cache)))
    np.save(cache / "acts_00000.npy", a)
    man = json.load(open(cache / "manifest.json"))
    del man["sha256"]                                               # a cache from before the checksums
    (cache / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(UserWarning, match="no checksums"):
        assert len(lm.open_cache(str(cache), settings, n)) == 1
    np.save(cache / "acts_00000.npy", a[:-1])                       # a shard that is not the manifest's
    with pytest.raises(ValueError, match="not the one the manifest lists"):
        tg.run(args_for(tiny, tmp_path / "c", "--cache", str(cache)))
    os.unlink(cache / "manifest.json")                               # a harvest that never finished
    with pytest.raises(ValueError, match="incomplete"):
        lm.open_cache(str(cache), settings, n)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a cache"):
        tg.run(args_for(tiny, tmp_path / "d", "--cache", str(tmp_path / "junk")))


def test_interrupted_harvest_resumes(tiny, tmp_path, monkeypatch):
    """A harvest killed after 5 shards leaves no manifest; the rerun harvests only what is missing
    and ends with the very cache (and SAEs) of an uninterrupted harvest. A run that needs more
    tokens extends a finished cache."""
    monkeypatch.setattr(lm, "SHARD_BYTES", 2 * 64 * 120)            # one model batch (8 x 15 tokens) a shard
    _, whole = tg.run(args_for(tiny, tmp_path / "a", "--cache", str(tmp_path / "whole")))
    real_save, real_harvest, n_saved = np.save, lm.harvest, []

    def dying_save(f, a):
        if len(n_saved) == 5:
            raise KeyboardInterrupt
        n_saved.append(1)
        real_save(f, a)
    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tg.run(args_for(tiny, tmp_path / "b", "--cache", str(tmp_path / "cut")))
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(os.listdir(tmp_path / "cut")) == [f"acts_{i:05d}.npy" for i in range(5)] + ["settings.json"]
    half = c2r.tmp_name(tmp_path / "cut" / "acts_00005.npy", 999)
    open(half, "wb").write(b"half a shard")                           # as a killed process leaves it
    chunks = []

    def counting_harvest(*a, **k):
        for c in real_harvest(*a, **k):
            chunks.append(len(c))
            yield c
    monkeypatch.setattr(lm, "harvest", counting_harvest)
    _, resumed = tg.run(args_for(tiny, tmp_path / "b", "--cache", str(tmp_path / "cut")))
    man = json.load(open(tmp_path / "whole" / "manifest.json"))
    cut = json.load(open(tmp_path / "cut" / "manifest.json"))
    assert cut["shards"] == man["shards"] == [120] * 24 and cut["sha256"] == man["sha256"]    # the same bytes
    assert not os.path.exists(half) and not [f for f in os.listdir(tmp_path / "cut") if "tmp" in f]
    assert len(chunks) == 1 + 24 - 5                                  # the scale's batch, then the missing shards
    for i in range(24):
        assert np.array_equal(np.load(tmp_path / "whole" / f"acts_{i:05d}.npy"),
                              np.load(tmp_path / "cut" / f"acts_{i:05d}.npy"))
    for name in whole:
        assert same_state(whole[name], resumed[name])
    chunks.clear()
    tg.run(args_for(tiny, tmp_path / "c", "--cache", str(tmp_path / "cut"), "--tokens", "4096"))
    assert json.load(open(tmp_path / "cut" / "manifest.json"))["tokens"] == lm.rows_needed(16, 256, 1000, 120)
    assert len(chunks) == 1 + lm.rows_needed(16, 256, 1000, 120) // 120 - 24


def test_float16_rounding_refuses_overflow():
    x = torch.tensor([[1 / 3, -1000.7, 65504.0]])
    (r,) = lm.rounded(iter([x]))
    assert r.dtype == torch.float32 and torch.equal(r, x.half().float()) and not torch.equal(r, x)
    with pytest.raises(ValueError, match="70,000 is beyond float16"):
        list(lm.rounded(iter([torch.tensor([[1.0, -70000.0]])])))


def test_rows_needed_is_what_the_buffer_pulls():
    for steps, batch, n_buffer, chunk in [(8, 256, 1000, 120), (5, 100, 50, 30), (7, 64, 64, 64), (3, 1000, 10, 7)]:
        pulled = []

        def chunks():
            while True:
                pulled.append(chunk)
                yield torch.zeros(chunk, 1)
        it = lm.shuffled(chunks(), n_buffer, batch, torch.Generator())
        for _ in range(steps):
            assert len(next(it)) == batch
        assert sum(pulled) == lm.rows_needed(steps, batch, n_buffer, chunk)


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    full, _ = tg.run(args_for(tiny, tmp_path / "a"))
    # crash right after the first checkpoint of the C²R SAE (step 4 of 8)
    real_save = c2r.save

    def crashing_save(sae, path, **extra):
        real_save(sae, path, **extra)
        if str(path).endswith("c2r.ckpt.pt"):
            raise KeyboardInterrupt
    monkeypatch.setattr(c2r, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        tg.run(args_for(tiny, tmp_path / "b", "--ckpt-every", "4"))
    monkeypatch.setattr(c2r, "save", real_save)
    _, extra = c2r.load(tmp_path / "b" / "c2r.ckpt.pt")
    assert extra["step"] == 4
    resumed, saes = tg.run(args_for(tiny, tmp_path / "b", "--ckpt-every", "4", "--resume"))
    assert resumed["timing"]["c2r"]["steps"] == 4 and resumed["timing"]["baseline"]["steps"] == 0
    a, _ = c2r.load(tmp_path / "a" / "c2r.pt")
    b, _ = c2r.load(tmp_path / "b" / "c2r.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k            # bit-identical, as the README says
    assert resumed["saes"]["c2r"]["fvu"] == pytest.approx(full["saes"]["c2r"]["fvu"], rel=1e-5)
    with pytest.raises(ValueError, match="another configuration.*n_latents"):
        tg.run(args_for(tiny, tmp_path / "b", "--resume", "--n-latents", "64"))


def test_resumed_log_repeats_the_last_check(tiny, tmp_path, monkeypatch):
    """44 steps, a log row every 2 and a check of the neighbour table at each: a run resumed from
    step 43 (after the last check) logs the same rows as one never stopped, the last row's nbr_err
    included (it repeats the check of step 42, which only the checkpoint's log holds)."""
    flags = ["--tokens", str(44 * 256), "--ckpt-every", "43", "--runs", "c2r_lambda=5"]
    tg.run(args_for(tiny, tmp_path / "a", *flags))
    real_save = c2r.save

    def crashing_save(sae, path, **extra):
        real_save(sae, path, **extra)
        raise KeyboardInterrupt
    monkeypatch.setattr(c2r, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        tg.run(args_for(tiny, tmp_path / "b", *flags))
    monkeypatch.setattr(c2r, "save", real_save)
    tg.run(args_for(tiny, tmp_path / "b", *flags, "--resume"))
    (_, a), (_, b) = c2r.load(tmp_path / "a" / "lam5.pt"), c2r.load(tmp_path / "b" / "lam5.pt")
    assert a["log"][-1]["step"] == 43 and a["log"][-1]["nbr_err"] is not None
    assert b["log"] == a["log"]


@dataclasses.dataclass
class Documented:
    a: int = 1                  # the a
    # a section comment, not b's
    b: str = "#x"               # b's text, which goes on
                                # on the next line [units]
    c: float = 0.5
    """c's docstring,
    on two lines"""
    d: tuple = ()
    e: bool = False  # e


def test_flags_are_config_fields(capsys):
    """Every c2r.Config field but those the script sets is a flag of the same name, type and
    default (but the LM-sized n_latents, k and bf16), helped by the field's documentation."""
    assert lm.field_docs(Documented) == {"a": "the a", "b": "b's text, which goes on on the next line [units]",
                                         "c": "c's docstring, on two lines", "d": "", "e": "e"}
    docs, src = lm.field_docs(c2r.Config), open(c2r.__file__).read()
    args = tg.parse_args([])
    for f in dataclasses.fields(c2r.Config):
        line = next(ln for ln in src.splitlines() if ln.startswith(f"    {f.name}: "))
        if "#" in line:
            assert line.split("#", 1)[1].strip() in docs[f.name], f.name
        if f.name not in tg.SET_HERE:
            want = dict(n_latents=24576, k=32, bf16=True).get(f.name, f.default)
            assert getattr(args, f.name) == want and type(getattr(args, f.name)) is type(want), f.name
    with pytest.raises(SystemExit):
        tg.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("n_latents", "l1_coeff", "nbr_every", "c2r_lambda"):
        assert "--" + name.replace("_", "-") in help_text and " ".join(docs[name].split()) in help_text
    a = tg.parse_args(["--c2r-lambda", "2", "--prefixes", "4,8", "--no-bf16", "--kind", "relu"])
    assert (a.c2r_lambda, a.prefixes, a.bf16, a.kind) == (2.0, (4, 8), False, "relu")
    with pytest.raises(SystemExit):
        tg.parse_args(["--kind", "gated"])


def test_runs_names_overrides_and_errors():
    runs = tg.parse_runs(["c2r_lambda=0", "c2r_lambda=5", "kind=matryoshka", "kind=matryoshka c2r_lambda=5", "k=8",
                          "seed=1", "mine: lr=0.01 prefixes=4,8 bf16=false"])
    assert list(runs) == ["lam0", "lam5", "matryoshka", "matryoshka_lam5", "k8", "seed1", "mine"]
    assert runs["matryoshka_lam5"] == dict(kind="matryoshka", c2r_lambda=5.0)
    assert runs["mine"] == dict(lr=0.01, prefixes=(4, 8), bf16=False) and runs["k8"] == dict(k=8)
    for bad, msg in [("c2r_lamda=5", "'c2r_lamda=5' is not field=value.*c2r_lambda"),
                     ("k=eight", "'eight' is not a valid k"),
                     ("d_model=3", "'d_model=3' is not field=value"), ("k", "'k' is not field=value"),
                     ("bf16=maybe", "not a valid bf16")]:
        with pytest.raises(ValueError, match=msg):
            tg.parse_runs([bad])
    with pytest.raises(ValueError, match="'k8' is taken"):
        tg.parse_runs(["k=8", "k=8"])
    with pytest.raises(ValueError, match="no file name"):
        tg.parse_runs(["a/b: k=8"])
    for key in tg.TIMING:            # results.json's timing holds these beside each run's: refused by name
        with pytest.raises(ValueError, match=f"'{key}' is a key of results.json's timing"):
            tg.parse_runs([f"{key}: c2r_lambda=0"])
    args, dev = tg.parse_args(["--prefixes", "100,200"]), torch.device("cpu")
    cfg = tg.config_for(args, "m", dict(kind="matryoshka"), 64, 10, dev)
    assert cfg.prefixes == (100, 200, 24576) and (cfg.d_model, cfg.steps, cfg.log_every) == (64, 10, 1)
    assert tg.config_for(args, "b", {}, 64, 10, dev).prefixes == ()      # the flag is for the matryoshka runs
    cfg = tg.config_for(tg.parse_args([]), "m", dict(kind="matryoshka"), 64, 100, dev)
    assert cfg.prefixes == (1536, 3072, 6144, 12288, 24576) and cfg.bf16 is False     # bf16 is CUDA's only
    with pytest.raises(ValueError, match="run 'z'.*k"):
        tg.config_for(args, "z", dict(k=0), 64, 10, dev)
    with pytest.raises(ValueError, match="prefixes"):
        tg.config_for(args, "p", dict(prefixes=(4,)), 64, 10, dev)


def test_hook_reads_residual_after_block(tiny):
    _, _, model, tok = tiny
    ids = torch.randint(len(tok), (3, 10))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states    # [embeddings, block 0, block 1 + ln_f]
    assert torch.equal(lm.resid(model, lm.blocks_of(model), 0, ids), hs[1])
    # and the forward pass really stops there: block 1 never runs
    ran = []
    h = model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    lm.resid(model, lm.blocks_of(model), 0, ids)
    h.remove()
    assert not ran


def test_ce_recovered_identity_and_zero(tiny):
    _, _, model, tok = tiny
    blocks, ids = lm.blocks_of(model), torch.randint(len(tok), (4, 12))
    clean, zero = lm.ce_loss(model, blocks, 0, ids), lm.ce_loss(model, blocks, 0, ids, lambda h: torch.zeros_like(h))
    assert abs(zero - clean) > 1e-3
    # an SAE that reconstructs exactly: latents +e_d and -e_d, ReLU: relu(x) - relu(-x) = x
    sae = c2r.SAE(c2r.Config(d_model=64, n_latents=128, kind="relu"))
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye], 0))
    ident = lm.ce_loss(model, blocks, 0, ids, lambda h: sae(h.reshape(-1, 64))[0].view_as(h))
    assert tg.ce_recovered(ident, clean, zero) == pytest.approx(1, abs=1e-4)
    assert tg.ce_recovered(zero, clean, zero) == 0
    noisy = lm.ce_loss(model, blocks, 0, ids, lambda h: h + 0.5 * torch.randn_like(h))
    assert tg.ce_recovered(noisy, clean, zero) < 1 - 1e-3


def test_buffer_serves_every_activation_once_shuffled():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.arange(s, s + n, dtype=torch.float32)[:, None].expand(n, 3)
              for s, n in ((0, 70), (70, 50), (120, 90), (210, 33))]
    out = list(lm.shuffled(iter(chunks), n_buffer=100, batch=32, gen=g))
    assert all(len(b) == 32 for b in out[:-1]) and 0 < len(out[-1]) <= 32
    ids = torch.cat(out)[:, 0]
    assert torch.equal(ids.sort().values, torch.arange(243.))       # none lost, none twice
    assert not torch.equal(ids, torch.arange(243.))                  # shuffled
    # with two refills, the first served batch mixes the first fill's chunks
    assert ids[:32].max() >= 70 and ids[:32].min() < 70


def test_fold_moves_sae_to_raw_scale():
    x = 7.0 * torch.randn(64, 16)
    for kind in c2r.KINDS:
        sae = c2r.SAE(c2r.Config(d_model=16, n_latents=40, kind=kind, k=4))
        with torch.no_grad():
            sae.b_enc_F.normal_(), sae.b_dec_D.normal_(), sae.threshold.fill_(0.3)
        sae.eval()
        raw, s = lm.fold(sae, 0.1), 0.1
        x_hat, acts, _ = raw(x)
        x_hat_s, acts_s, _ = sae(x * s)
        assert torch.allclose(x_hat, x_hat_s / s, atol=1e-4) and torch.allclose(acts, acts_s / s, atol=1e-4)


def test_bad_input(tiny, tmp_path):
    model_dir, text, _, _ = tiny
    with pytest.raises(ValueError, match="no such model directory"):
        tg.run(args_for(tiny, tmp_path, "--model", str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no such file or folder"):
        tg.run(args_for(tiny, tmp_path, "--data", str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="out of range"):
        tg.run(args_for(tiny, tmp_path, "--layer", "2"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        tg.run(args_for(tiny, tmp_path, "--data", str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="less than one batch"):
        tg.run(args_for(tiny, tmp_path, "--tokens", "100"))
    with pytest.raises(ValueError, match="unknown_field"):          # before the model is even loaded
        tg.run(args_for(tiny, tmp_path, "--model", str(tmp_path / "nope"), "--runs", "unknown_field=1"))


def test_streamed_dataset_contexts(tiny, monkeypatch):
    """The Hugging Face branch of --data, with a stand-in for `datasets` (no download): text or
    pre-tokenised documents are cut into BOS + (ctx - 1) token contexts, the first held out."""
    import sys
    import types
    _, _, _, tok = tiny
    docs = [{"text": " ".join(WORDS[i:i + 9])} for i in range(0, 45, 3)]
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(docs))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ev, tr = lm.contexts("someone/some-text", tok, ctx=8, n_eval=2, vocab_size=len(tok))
    first = [next(tr) for _ in range(3)]
    flat = [i for d in docs for i in tok(d["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]]
    got = torch.cat([r[1:] for r in [*ev, *first]]).tolist()
    assert ev.shape == (2, 8) and all(r[0] == tok.bos_token_id for r in [*ev, *first])
    assert got == flat[:len(got)]                       # in order, nothing skipped, eval first
    docs[:] = [{"input_ids": list(range(5 * k, 5 * k + 5))} for k in range(10)]
    ev, tr = lm.contexts("someone/tokenised", tok, ctx=8, n_eval=1, vocab_size=len(tok))
    assert ev[0, 1:].tolist() == list(range(7)) and next(tr)[1:].tolist() == list(range(7, 14))



def test_resume_refuses_changed_inputs(tiny, tmp_path):
    """A checkpoint carries a fingerprint of the text and model files: --resume refuses a changed,
    added or removed file, naming it, and resumes when they are back as they were."""
    model_dir, text, model, tok = tiny
    (tmp_path / "text").mkdir()
    a = tmp_path / "text" / "a.txt"
    a.write_text(open(text).read())
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    go = lambda *extra: tg.run(args_for(tiny, tmp_path / "out", "--data", str(tmp_path / "text"), "--model",
                                        str(tmp_path / "m"), "--runs", "c2r_lambda=0", *extra))
    go()
    orig = a.read_text()
    a.write_text(orig.replace("apple", "bat"))
    with pytest.raises(ValueError, match=r"--resume: .*a\.txt changed since the checkpoint .*lam0\.ckpt\.pt "
                                         r"was written \(size .*sha256"):
        go("--resume")
    a.write_text(orig)
    (tmp_path / "text" / "new.txt").write_text("cat dog\n")
    with pytest.raises(ValueError, match=r"a file was added to --data: .*new\.txt"):
        go("--resume")
    os.unlink(tmp_path / "text" / "new.txt")
    w = tmp_path / "m" / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 1                                       # one bit of one weight
    w.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"model\.safetensors changed"):
        go("--resume")
    blob[-1] ^= 1
    w.write_bytes(bytes(blob))
    res, _ = go("--resume")                             # all as it was: it resumes (nothing left to train)
    assert res["timing"]["lam0"]["steps"] == 0
    ck = tmp_path / "out" / "lam0.ckpt.pt"                # a checkpoint from before fingerprints: refused too
    sae, extra = c2r.load(ck)
    c2r.save(sae, ck, **{k: v for k, v in extra.items() if k != "inputs"})
    with pytest.raises(ValueError, match=r"the checkpoint .*lam0\.ckpt\.pt does not record .*predates fingerprints"):
        go("--resume")


def test_resume_and_cache_refuse_a_changed_tokenizer(tiny, tmp_path):
    """A --tokenizer folder's files are fingerprinted too (the same text becomes other tokens):
    --resume and --cache refuse an edited merges.txt, naming it, and a checkpoint that predates
    tokenizer fingerprints is refused by name."""
    tok_dir = tmp_path / "tok"
    tiny_tokenizer(str(tok_dir))
    go = lambda *extra: tg.run(args_for(tiny, tmp_path / "out", "--tokenizer", str(tok_dir), "--cache",
                                        str(tmp_path / "c"), "--runs", "c2r_lambda=0", *extra))
    go()
    merges = tok_dir / "merges.txt"
    orig = merges.read_text()
    lines = orig.splitlines(True)
    merges.write_text("".join(lines[:1] + lines[1::2]))           # every other merge gone: other tokens
    with pytest.raises(ValueError, match=r"--cache .*merges\.txt changed since the cache was written"):
        go()
    with pytest.raises(ValueError, match=r"--resume: .*merges\.txt changed since the checkpoint"):
        tg.run(args_for(tiny, tmp_path / "out", "--tokenizer", str(tok_dir), "--runs", "c2r_lambda=0", "--resume"))
    merges.write_text(orig)
    ck = tmp_path / "out" / "lam0.ckpt.pt"
    sae, extra = c2r.load(ck)
    extra["inputs"] = {k: v for k, v in extra["inputs"].items() if k != "tokenizer"}
    c2r.save(sae, ck, **extra)
    with pytest.raises(ValueError, match=r"does not record its tokenizer files"):
        go("--resume")


def test_cache_refuses_other_text(tiny, tmp_path):
    _, text, _, _ = tiny
    a = tmp_path / "a.txt"
    a.write_text(open(text).read())
    go = lambda: tg.run(args_for(tiny, tmp_path / "out", "--data", str(a), "--cache", str(tmp_path / "c"),
                                 "--runs", "c2r_lambda=0"))
    go()
    a.write_text(open(text).read().replace("apple", "bat"))
    with pytest.raises(ValueError, match=r"--cache .*other settings .*a\.txt changed since the cache was written"):
        go()


def test_data_must_be_regular_utf8_text(tiny, tmp_path):
    import signal
    _, _, _, tok = tiny
    bad = {"latin1.txt": "café olé ".encode("latin-1") * 50, "utf16.txt": "cat dog ".encode("utf-16") * 50,
           "binary.txt": bytes(range(256)) * 4, "nul.txt": b"cat\0dog " * 50}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=rf"{name} is not (UTF-8 )?text"):
            lm.contexts(str(tmp_path / name), tok, 8, 1, len(tok))
    signal.alarm(20)                                    # a FIFO opened for reading would block forever
    try:
        os.mkfifo(tmp_path / "fifo.txt")
        with pytest.raises(ValueError, match="fifo.txt.*not a regular file"):
            lm.contexts(str(tmp_path / "fifo.txt"), tok, 8, 1, len(tok))
        (tmp_path / "d").mkdir()
        os.mkfifo(tmp_path / "d" / "pipe.txt")
        with pytest.raises(ValueError, match="no regular .txt files"):
            lm.contexts(str(tmp_path / "d"), tok, 8, 1, len(tok))
        (tmp_path / "d" / "ok.txt").write_text(" ".join(WORDS) * 5)
        assert lm.data_files(str(tmp_path / "d")) == [str(tmp_path / "d" / "ok.txt")]
        ev, _ = lm.contexts(str(tmp_path / "d"), tok, 8, 1, len(tok))
        assert ev.shape == (1, 8)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--ctx", "1"), ("--model-batch", "0"),
                                        ("--ckpt-every", "0"), ("--tokens", "nan"), ("--tokens", "inf"),
                                        ("--tokens", "0"), ("--eval-tokens", "-5"), ("--buffer", "nan"),
                                        ("--layer", "-1"), ("--probe-words", "-1"), ("--batch", "2.5"),
                                        ("--probe-words", "1"), ("--probe-words", str(absorption.MIN_WORDS - 1))])
def test_bad_flags_exit_2(tiny, tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        args_for(tiny, tmp_path, flag, value)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_probe_words_bound_is_the_splits(tiny):
    """--probe-words' least value, MIN_WORDS (51), is the fewest words whose smaller (test) split
    holds a word and N_ICL = 10 others to prompt it with: 50 fails in absorption's own split, 51
    does not; a tokenizer with too few words is refused by name."""
    tok, rng = tiny[3], random.Random(0)
    words = [f" w{i}" for i in range(absorption.MIN_WORDS)]
    absorption.split_prompts(words, rng)
    with pytest.raises(ValueError):
        absorption.split_prompts(words[:-1], rng)
    with pytest.raises(ValueError, match=f"at least {absorption.MIN_WORDS} single-token words.*got 40"):
        absorption.prepare(tok, None, device="cpu", max_words=40)      # before any model work


def test_random_run_looks_up_no_hub_tokenizer(monkeypatch):
    """--random-init on --data random needs no tokenizer: none is looked up on the Hub (the
    README's "no download" command), unless --tokenizer names one."""
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("a tokenizer was looked up"))
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: cfg)
    _, tok = lm.load_model("someone/model", random_init=True, hub_tokenizer=False)
    assert tok is None


def test_flags_checked_before_the_model_loads(tiny, tmp_path, monkeypatch):
    real = lm.load_model
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "file").write_text("")
    for extra, msg in [(("--out", ""), "--out is empty"),
                       (("--out", str(tmp_path / "file" / "sub")), "--out .*not a writable"),
                       (("--runs", "c2r_lambda=0", "k=0"), "run 'k0'.*k"), (("--runs", "lr=nan"), "lr"),
                       (("--tokens", "100"), "less than one batch")]:
        with pytest.raises(ValueError, match=msg):
            tg.run(args_for(tiny, tmp_path / "out", *extra))
    monkeypatch.setattr(lm, "load_model", real)      # these need the model's config, but not its weights
    no_weights = lambda *a, **k: pytest.fail("the weights loaded before the check")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match="--ctx 2000 is beyond the model's 1024 positions"):
        tg.run(args_for(tiny, tmp_path / "out", "--ctx", "2000"))
    with pytest.raises(ValueError, match=r"--layer 2 is out of range: the model has 2 blocks \(0..1\)"):
        tg.run(args_for(tiny, tmp_path / "out", "--layer", "2"))


def test_warnings_reach_stderr_even_quiet(tiny, tmp_path, monkeypatch, capsys):
    """--resume with no checkpoint, and an SAE whose held-out FVU is above 1 (here its decoder
    wrecked after training), are said on stderr under --quiet too."""
    real_fold = lm.fold

    def wrecked(sae, scale):
        out = real_fold(sae, scale)
        with torch.no_grad():
            out.b_dec_D.add_(100.0)
        return out
    monkeypatch.setattr(lm, "fold", wrecked)
    res, _ = tg.run(args_for(tiny, tmp_path, "--resume", "--runs", "c2r_lambda=0"))
    err = capsys.readouterr().err
    assert "lam0: --resume found no checkpoint" in err
    assert res["saes"]["lam0"]["fvu"] > 1 and "warning: SAE 'lam0' has FVU" in err
