"""train_gpt2.py on a tiny random GPT-2 (2 layers, 64 dims) and a tokenizer written by the test:
no download, seconds on a CPU."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import c2r  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from train_toy import stability  # noqa: E402

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
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
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
                          "--buffer", "1000", "--model-batch", "8", "--probe-words", "200", "--max-k", "3",
                          "--device", "cpu", "--quiet", "--out", str(out), *extra])


def test_end_to_end_and_exact_reload(tiny, tmp_path):
    res, saes = tg.run(args_for(tiny, tmp_path))
    out = json.load(open(tmp_path / "results.json"))
    assert set(out["saes"]) == {"baseline", "c2r"} and "stability" not in out
    for name, r in out["saes"].items():
        assert 0 <= r["fvu"] < 1, name                 # it learned something
        assert 0 < r["l0"] and 0 <= r["dead"] <= 96
        assert r["ce_loss"] > 0 and "absorption" in r
    assert out["probe"]["letters_kept"] + out["probe"]["letters_dropped"] == 26
    # baseline and C²R differ only in lambda, and lambda did something
    assert not torch.equal(saes["baseline"].W_dec_FD, saes["c2r"].W_dec_FD)
    # reload: the saved SAE (scale folded in) gives identical outputs on raw activations
    _, _, model, tok = tiny
    x = tg.resid(model, tg.blocks_of(model), 1, torch.randint(len(tok), (4, 16)))[:, 1:].reshape(-1, 64)
    for name, sae in saes.items():
        back, extra = c2r.load(tmp_path / f"{name}.pt")
        raw = tg.fold(sae, extra["act_scale"])
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


def test_stability_second_runs_and_matching(tiny, tmp_path):
    """--stability: a second baseline and C²R SAE (another init, another token order, the same
    held-out tokens), and each pair's live latents matched as train_toy.stability does."""
    model_dir, text, model, tok = tiny
    res, saes = tg.run(args_for(tiny, tmp_path, "--probe-words", "0", "--stability"))
    out = json.load(open(tmp_path / "results.json"))
    assert set(out["saes"]) == {"baseline", "c2r", "baseline_run2", "c2r_run2"}
    for name in ("baseline", "c2r"):
        assert not torch.equal(saes[name].W_dec_FD, saes[name + "_run2"].W_dec_FD)
    # the numbers, recomputed from the saved SAEs on the held-out tokens
    ev, _ = tg.contexts(text, tok, 16, 20, len(tok))                 # --eval-tokens 300 = 20 contexts of 15
    x = tg.resid(model, tg.blocks_of(model), 1, ev)[:, 1:].reshape(-1, 64)
    for name in ("baseline", "c2r"):
        (a, _), (b, _) = c2r.load(tmp_path / f"{name}.pt"), c2r.load(tmp_path / f"{name}_run2.pt")
        live_a, live_b = (a.encode(x) != 0).any(0), (b.encode(x) != 0).any(0)
        st = out["stability"][name]
        assert st["live"] == [int(live_a.sum()), int(live_b.sum())] == [96 - out["saes"][n]["dead"]
                                                                         for n in (name, name + "_run2")]
        frac, cos, n = stability(a.W_dec_FD.detach(), b.W_dec_FD.detach(), live_a, live_b)
        assert st["method"] == "hungarian" and st["stab09_n"] == n
        assert st["stab09"] == pytest.approx(frac) and st["stab_cos"] == pytest.approx(cos)
    assert "cross-run stability" in tg.table(res)
    # the second runs saw the same held-out contexts but the training contexts in another order
    ev1, tr1 = tg.contexts(text, tok, 16, 20, len(tok), seed=0)
    ev2, tr2 = tg.contexts(text, tok, 16, 20, len(tok), seed=0, order=1000)
    n_tr = len(tg.read_tokens(text, tok)) // 15 - 20                 # one epoch of training contexts
    a, b = torch.stack([next(tr1) for _ in range(n_tr)]), torch.stack([next(tr2) for _ in range(n_tr)])
    assert torch.equal(ev1, ev2) and not torch.equal(a[:50], b[:50])
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))   # one epoch, reordered


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    full, _ = tg.run(args_for(tiny, tmp_path / "a", "--probe-words", "0"))
    # crash right after the first checkpoint of the C²R SAE (step 4 of 8)
    real_save, calls = c2r.save, []

    def crashing_save(sae, path, **extra):
        real_save(sae, path, **extra)
        calls.append(path)
        if str(path).endswith("c2r.ckpt.pt"):
            raise KeyboardInterrupt
    monkeypatch.setattr(c2r, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        tg.run(args_for(tiny, tmp_path / "b", "--probe-words", "0", "--ckpt-every", "4"))
    monkeypatch.setattr(c2r, "save", real_save)
    _, extra = c2r.load(tmp_path / "b" / "c2r.ckpt.pt")
    assert extra["step"] == 4
    resumed, saes = tg.run(args_for(tiny, tmp_path / "b", "--probe-words", "0", "--ckpt-every", "4", "--resume"))
    assert resumed["timing"]["c2r"]["steps"] == 4 and resumed["timing"]["baseline"]["steps"] == 0
    a, _ = c2r.load(tmp_path / "a" / "c2r.pt")
    b, _ = c2r.load(tmp_path / "b" / "c2r.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    assert resumed["saes"]["c2r"]["fvu"] == pytest.approx(full["saes"]["c2r"]["fvu"], rel=1e-5)


def test_hook_reads_residual_after_block(tiny):
    _, _, model, tok = tiny
    ids = torch.randint(len(tok), (3, 10))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states    # [embeddings, block 0, block 1 + ln_f]
    assert torch.equal(tg.resid(model, tg.blocks_of(model), 0, ids), hs[1])
    # and the forward pass really stops there: block 1 never runs
    ran = []
    h = model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    tg.resid(model, tg.blocks_of(model), 0, ids)
    h.remove()
    assert not ran


def test_ce_recovered_identity_and_zero(tiny):
    _, _, model, tok = tiny
    blocks, ids = tg.blocks_of(model), torch.randint(len(tok), (4, 12))
    clean, zero = tg.ce_loss(model, blocks, 0, ids), tg.ce_loss(model, blocks, 0, ids, lambda h: torch.zeros_like(h))
    assert abs(zero - clean) > 1e-3
    # an SAE that reconstructs exactly: latents +e_d and -e_d, ReLU: relu(x) - relu(-x) = x
    sae = c2r.SAE(c2r.Config(d_model=64, n_latents=128, kind="relu"))
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye], 0))
    ident = tg.ce_loss(model, blocks, 0, ids, lambda h: sae(h.reshape(-1, 64))[0].view_as(h))
    assert tg.ce_recovered(ident, clean, zero) == pytest.approx(1, abs=1e-4)
    assert tg.ce_recovered(zero, clean, zero) == 0
    noisy = tg.ce_loss(model, blocks, 0, ids, lambda h: h + 0.5 * torch.randn_like(h))
    assert tg.ce_recovered(noisy, clean, zero) < 1 - 1e-3


def planted(absorb):
    """Words of 3 letters (directions e0, e1, e2) plus noise; 4 'a' words also carry their own
    token direction e3..e6, as do 4 'b' words (e7..e10). An SAE with one latent per letter and
    one per token; with absorb=True each 'a' token latent has swallowed the letter direction
    (decoder (e0 + e_t)/sqrt2, and the 'a' latent is silent on those words)."""
    g = torch.Generator().manual_seed(0)
    D, E = 24, torch.eye(24)
    lab, tokdir = [], []
    for letter in range(3):
        for i in range(40):
            lab.append(letter)
            tokdir.append(3 + 4 * letter + i // 10 if letter < 2 and i % 10 == 0 else -1)
    lab = torch.tensor(lab)
    x = E[lab] + 0.05 * torch.randn(len(lab), D, generator=g) @ torch.diag((torch.arange(D) >= 11).float())
    for n, t in enumerate(tokdir):
        if t >= 0:
            x[n] += E[t]
    sae = c2r.SAE(c2r.Config(d_model=D, n_latents=11, kind="relu"))
    Wd, We, be = torch.zeros(11, D), torch.zeros(D, 11), torch.zeros(11)
    for i in range(11):
        Wd[i], We[:, i] = E[i], E[i]
    be[3:] = -0.5          # token latents fire only on their token
    if absorb:
        for t in range(3, 7):
            Wd[t] = (E[0] + E[t]) / 2 ** 0.5
            We[:, t] = (E[0] + E[t]) * 2 ** 0.5   # fires on 'a' + token only, and reconstructs it
            be[t] = -(2 ** 0.5)
            We[t, 0] = -1.0    # the 'a' latent is silenced by the absorbing token
    with torch.no_grad():
        sae.W_dec_FD.copy_(Wd), sae.W_enc_DF.copy_(We), sae.b_enc_F.copy_(be)
    # the same words serve as train and test: the metric, not generalisation, is under test
    lab26 = lab.clone()
    return sae.eval(), x, lab26


def test_absorption_planted_and_clean():
    rates = {}
    for absorb in (False, True):
        sae, x, lab = planted(absorb)
        W, b, f1 = tg.letter_probes(x, lab, x, lab)
        assert (f1[:3] > 0.95).all()
        rows = tg.absorption(sae, W, b, x, lab, x, lab, letters=[0, 1, 2], max_k=3)
        rates[absorb] = {r["letter"]: r for r in rows}
    for r in rates[False].values():          # clean: nothing absorbed, one main latent each
        assert r["full_absorption_rate"] == 0 and r["absorption_fraction"] == 0
        assert r["n_split"] == 1
    a = rates[True]["a"]
    assert a["main_latents"] == [0]
    assert a["full_absorption_rate"] == pytest.approx(4 / 40)          # the 4 planted words, found
    assert a["absorption_fraction"] == pytest.approx(4 / 40, abs=0.01)
    assert a["absorbing_latents"] == [3, 4, 5, 6]
    assert rates[True]["b"]["full_absorption_rate"] == 0             # b's tokens absorbed nothing
    assert rates[True]["c"]["full_absorption_rate"] == 0


def test_buffer_serves_every_activation_once_shuffled():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.arange(s, s + n, dtype=torch.float32)[:, None].expand(n, 3)
              for s, n in ((0, 70), (70, 50), (120, 90), (210, 33))]
    out = list(tg.shuffled(iter(chunks), n_buffer=100, batch=32, gen=g))
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
        raw, s = tg.fold(sae, 0.1), 0.1
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
    # a checkpoint written by another configuration is refused, with what differs
    tg.run(args_for(tiny, tmp_path / "r", "--probe-words", "0"))
    with pytest.raises(ValueError, match="another configuration.*n_latents"):
        tg.run(args_for(tiny, tmp_path / "r", "--probe-words", "0", "--resume", "--n-latents", "64"))


def test_streamed_dataset_contexts(tiny, monkeypatch):
    """The Hugging Face branch of --data, with a stand-in for `datasets` (no download): text or
    pre-tokenised documents are cut into BOS + (ctx - 1) token contexts, the first held out."""
    import sys
    import types
    _, _, _, tok = tiny
    docs = [{"text": " ".join(WORDS[i:i + 9])} for i in range(0, 45, 3)]
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(docs))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ev, tr = tg.contexts("someone/some-text", tok, ctx=8, n_eval=2, vocab_size=len(tok))
    first = [next(tr) for _ in range(3)]
    flat = [i for d in docs for i in tok(d["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]]
    got = torch.cat([r[1:] for r in [*ev, *first]]).tolist()
    assert ev.shape == (2, 8) and all(r[0] == tok.bos_token_id for r in [*ev, *first])
    assert got == flat[:len(got)]                       # in order, nothing skipped, eval first
    docs[:] = [{"input_ids": list(range(5 * k, 5 * k + 5))} for k in range(10)]
    ev, tr = tg.contexts("someone/tokenised", tok, ctx=8, n_eval=1, vocab_size=len(tok))
    assert ev[0, 1:].tolist() == list(range(7)) and next(tr)[1:].tolist() == list(range(7, 14))
