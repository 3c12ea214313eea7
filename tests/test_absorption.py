"""absorption.py: hand-built cases with known answers, and parity with SAEBench 0.6.0's own
functions on the same inputs (skipped where sae_bench is not installed). Tiny tokenizer and toy
"models" built here: no download, seconds on a CPU."""

import json
import random
import statistics
import string
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn", reason="absorption's k-sparse probes are scikit-learn's LogisticRegression")

import absorption as ab  # noqa: E402
import c2r  # noqa: E402
from test_gpt2 import tiny_tokenizer as gpt2_tokenizer  # noqa: E402

torch.set_num_threads(1)


def tiny_tokenizer(folder, n_per_letter=8, seed=0):
    """test_gpt2's GPT-2 byte-level BPE tokenizer, with n_per_letter random ' word's per letter,
    ' has', ' the', ' first', ' letter' and each ' X' one token (so all prompts have one length)."""
    g = random.Random(seed)
    words = {"has", "the", "first", "letter"}
    for l in ab.LETTERS:
        while sum(w[0] == l for w in words) < n_per_letter:
            w = l + "".join(g.choice(ab.LETTERS) for _ in range(g.randint(2, 4)))
            words.add(w.capitalize() if g.random() < 0.2 else w)
    tok = gpt2_tokenizer(folder, sorted(words | set(string.ascii_letters)))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def letter_table(tok):
    """[V] letter of each token whose text is a word (-1 otherwise)."""
    lab = torch.full((len(tok),), -1)
    for i in range(len(tok)):
        s = tok.convert_ids_to_tokens(i)
        w = tok.convert_tokens_to_string([s])
        if w.strip().isascii() and w.strip().isalpha():
            lab[i] = ab.letter_of(w)
    return lab


MARK = 0.1


def planted(tok, marked):
    """A context-free toy model: the activation at a word token is e_letter, plus a small marker
    MARK * e_(26 + j) if it is the j-th of the token ids `marked`. D = 26 + len(marked).
    Returns (resid_fn, E [V, D])."""
    lab, V = letter_table(tok), len(tok)
    E = torch.zeros(V, 26 + len(marked))
    E[lab >= 0, lab[lab >= 0]] = 1.0
    E[marked, 26 + torch.arange(len(marked))] = MARK
    return (lambda ids: E[ids]), E


def planted_sae(E, marked, absorbing, n_dead=400):
    """26 letter latents (encoder and decoder e_l); one latent per marked token j, which, if
    absorbing[j], fires 1 on it (encoder: its marker) and silences the letter latent (decoder: the
    token's activation, letter + marker), and otherwise never fires; n_dead latents that never
    fire. (The dead ones are for SAEBench's L1 probe: 50 Adam steps at lr <= 1e-2 move a weight by
    ~0.08 at most, so among few latents nn.Linear's init U(+-1/sqrt(F)) would rank them; among a
    few hundred, what they do ranks them.)"""
    D, M = E.shape[1], len(marked)
    W_enc = torch.zeros(D, 26 + M + n_dead)
    W_enc[:26, :26] = torch.eye(26)
    W_enc[26:, 26:26 + M] = torch.eye(M) / MARK
    W_enc[26:, :26] = -2.0 / MARK * absorbing[:, None].float()
    b_enc = torch.cat([torch.zeros(26), (~absorbing).float() * -2.0, torch.full((n_dead,), -2.0)])
    W_dead = torch.randn(n_dead, D, generator=torch.Generator().manual_seed(0))
    return sae_from(W_enc, torch.cat([torch.eye(D)[:26], E[marked], W_dead]), b_enc)


def sae_from(W_enc_DF, W_dec_FD, b_enc_F=None):
    """A c2r relu SAE with these weights (decoder rows made unit-norm)."""
    D, Fn = W_enc_DF.shape
    sae = c2r.SAE(c2r.Config(d_model=D, n_latents=Fn, kind="relu", steps=1))
    with torch.no_grad():
        sae.W_enc_DF.copy_(W_enc_DF)
        sae.W_dec_FD.copy_(F.normalize(W_dec_FD, dim=1))
        sae.b_enc_F.copy_(b_enc_F if b_enc_F is not None else torch.zeros(Fn))
        sae.b_dec_D.zero_()
    return sae.eval()


# -----------------------------------------------------------------------------
# hand-built cases


def test_absorb_hand_cases():
    """One probe direction e0; latents: 0 main (cos 1), 1 absorber (cos 0.6), 2 unaligned,
    3 weakly aligned (cos 0.05: counts for full absorption, not for the fraction), 4-8 five small
    absorbers (cos 0.6)."""
    D = 4
    W_dec = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0], [0.05, (1 - 0.05 ** 2) ** 0.5, 0, 0]]
                         + [[0.6, 0, 0.8, 0]] * 5)
    x = torch.tensor([1.0, 0, 0, 0])
    c = lambda *acts: torch.tensor([list(acts) + [0.0] * (9 - len(acts))])
    cases = [  # (codes, x, expected fraction, expected full)
        (c(1.0), x, 0.0, False),                         # the main latent does it all
        (c(0, 1 / 0.6), x, 1.0, True),                   # one absorber does it all
        (c(0.3, 0.7 / 0.6), x, 0.7, False),              # shared 30/70: fraction 0.7, main fires
        (c(0.7, 0.3 / 0.6), x, 0.0, False),              # absorber carries < 40 %: none
        (c(0, 0, 0, 1 / 0.05), x, 0.0, True),            # weakly aligned: full but no fraction
        (c(0, 1 / 0.6), -x, 0.0, False),                 # negative probe projection: never
        (c(0, 0, 0, 0, *[0.1 / 0.6] * 5), x, 0.0, False),   # 5 x 10 %: only 3 count, 30 % < 40 %
        (c(0.5, 0, 0, 0, *[0.2 / 0.6] * 5), x, 0.5, False),  # main 0.5, 3 x 0.2 capped at the 0.5 left
    ]
    for A, xx, frac, full in cases:
        fr, fu = ab.absorb(A, xx[None], torch.tensor([2.0, 0, 0, 0]), W_dec, [0])
        assert fr.item() == pytest.approx(frac, abs=1e-6) and fu.item() == full, (A, fr, fu)


@pytest.fixture(scope="module")
def planted_data(tok):
    """prepare() on the planted model, every test word marked. (Test words only: SAEBench's L1
    probe, 50 Adam steps on a toy this small, would rank a marked training word's token latent
    with the letter latent, which would then not be every letter's main latent.)"""
    _, _, w_te, _ = ab.split_prompts(ab.alpha_words(tok), random.Random(1))
    marked = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in w_te])
    resid_fn, E = planted(tok, marked)
    return ab.prepare(tok, resid_fn, device="cpu", seed=1, probe_epochs=10), E, marked


@pytest.fixture(scope="module")
def scored(planted_data):
    """score() of three planted SAEs: no token latent absorbing, every other one, all."""
    data, E, marked = planted_data
    M = len(marked)
    kinds = dict(clean=torch.zeros(M, dtype=torch.bool), half=torch.arange(M) % 2 == 0,
                 all=torch.ones(M, dtype=torch.bool))
    return {k: (ab.score(planted_sae(E, marked, a), data, bootstrap=200), a) for k, a in kinds.items()}


def test_prepare_on_planted_model(tok, planted_data):
    data, E, _ = planted_data
    words = ab.alpha_words(tok)
    assert sorted(data["words_tr"] + data["words_te"]) == sorted(words)
    assert len(data["words_tr"]) == int(0.8 * len(words))
    assert data["kept"] == list(range(26)) and min(data["probe_f1"]) > 0.9      # a clean letter signal
    # the absorption pass: the kept letters' true positives, read at the word
    ids = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in data["words_te"]])
    assert torch.equal(data["x_abs"], E[ids[data["abs_word"]]])
    assert torch.equal(data["abs_letter"], data["y_te"][data["abs_word"]])


def test_clean_dictionary_scores_zero(scored):
    """One latent per letter, the others never fire: no absorption, one main latent each, exactly."""
    res = scored["clean"][0]
    assert res["mean_absorption_fraction"] == 0.0 and res["mean_full_absorption"] == 0.0
    assert res["mean_split_latents"] == 1.0 and res["ci95"]["absorption_fraction"] == [0.0, 0.0]
    for r in res["letters"]:
        assert r["main_latents"] == [ab.LETTERS.index(r["letter"])] and r["main_f1"] == 1.0
    json.dumps(res)


def test_all_absorbed_scores_one(scored):
    """Every test word's letter latent silenced, its own token latent carrying the letter: every
    word fully absorbed (the main latent, found on the training words, never fires on them)."""
    res = scored["all"][0]
    assert res["mean_absorption_fraction"] == 1.0 and res["mean_full_absorption"] == 1.0
    assert all(r["main_latents"] == [ab.LETTERS.index(r["letter"])] for r in res["letters"])


def test_half_absorbed_known_answer(planted_data, scored):
    """Every other test word absorbed: exactly those are fully absorbed (fraction 1), the others
    not at all, so each letter scores its share of absorbed words."""
    data, _, _ = planted_data
    res, absorbing = scored["half"]
    absorbed = absorbing[data["x_abs"][:, 26:].argmax(1)]            # by construction
    exp = statistics.mean(absorbed[data["abs_letter"] == l].double().mean().item() for l in data["kept"])
    assert 0.3 < exp < 0.7
    assert res["mean_absorption_fraction"] == pytest.approx(exp, abs=1e-12)
    assert res["mean_full_absorption"] == pytest.approx(exp, abs=1e-12)
    assert res["per_word"]["full_absorption"] == absorbed.int().tolist()
    assert res["per_word"]["absorption_fraction"] == absorbed.double().tolist()
    assert res["ci95"]["absorption_fraction"][0] < exp < res["ci95"]["absorption_fraction"][1]


def test_too_few_letters_is_none_not_zero(tok):
    """Only 10 letters have a direction: 16 probes fail the bar, no score (None), never 0."""
    lab = letter_table(tok)
    resid_fn, E = planted(tok, torch.arange(len(tok))[lab >= 0])
    E[:, 10:26] = 0                                          # letters k..z: nothing to find
    data = ab.prepare(tok, resid_fn, device="cpu", seed=3, probe_epochs=5)
    assert len(data["x_abs"]) == 0
    res = ab.score(sae_from(torch.eye(E.shape[1])[:, :26], torch.eye(E.shape[1])[:26]), data)
    assert res["mean_absorption_fraction"] is None and res["mean_full_absorption"] is None
    assert res["letters_kept"] < ab.MIN_LETTERS and res["letters_dropped"] == 26 - res["letters_kept"]
    assert ab.bootstrap_diff(res, res)["absorption_fraction"] is None
    json.dumps(res)


def test_bootstrap_diff(scored):
    clean, half = scored["clean"][0], scored["half"][0]
    same = ab.bootstrap_diff(half, half, n=200)
    assert same["absorption_fraction"] == dict(diff=0.0, ci95=[0.0, 0.0])     # paired: no noise at all
    d = ab.bootstrap_diff(half, clean, n=2000)
    for k, mean in (("absorption_fraction", "mean_absorption_fraction"), ("full_absorption", "mean_full_absorption")):
        assert d[k]["diff"] == pytest.approx(half[mean])
        assert 0 < d[k]["ci95"][0] < d[k]["diff"] < d[k]["ci95"][1] < 1     # a real gap: the interval excludes 0
    with pytest.raises(ValueError, match="different data"):
        ab.bootstrap_diff(clean, dict(clean, data_key="x"))


def test_read_is_the_word_of_the_full_prompt(tok):
    """read() runs each prompt only up to its word, in padded batches: the same activation as
    the full prompt read at -6 (causal model)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    resid_fn = lambda ids: model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    words = ab.alpha_words(tok)
    rng = random.Random(0)
    prompts = [ab.icl_prompt(w, words, rng) for w in words[:5]] + ["\nab has the first letter:"]
    got = ab.read(tok, resid_fn, prompts, "cpu", batch=4)
    for p, g in zip(prompts, got):
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids])
        with torch.no_grad():
            want = resid_fn(ids)[0, ab.WORD_POS]
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# parity with SAEBench's own functions


@pytest.fixture(scope="module")
def sb():
    pytest.importorskip("sae_bench", reason="SAEBench (pip install --no-deps sae-bench==0.6.0) is not installed: "
                                            "no parity check")
    from sae_bench.evals.absorption import common, feature_absorption, k_sparse_probing, main, probing, prompting, vocab
    return SimpleNamespace(common=common, fa=feature_absorption, ks=k_sparse_probing, main=main, probing=probing,
                           prompting=prompting, vocab=vocab)


class IdOrder:
    """The tokenizer as SAEBench reads it, its vocab in id order (a fast tokenizer's own dict order
    changes from one process to the next)."""
    def __init__(self, tok):
        self.tok, self.vocab = tok, dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))

    def convert_tokens_to_string(self, t):
        return self.tok.convert_tokens_to_string(t)


class TLStub:
    """What SAEBench's absorption code uses of a HookedTransformer, around a toy resid_fn:
    to_tokens as TransformerLens does it (the BOS string prepended, right padding)."""
    def __init__(self, tok, resid_fn, layer, D):
        self.tok, self.resid_fn, self.hook = tok, resid_fn, f"blocks.{layer}.hook_resid_post"
        self.tokenizer, self.cfg = IdOrder(tok), SimpleNamespace(model_name="toy", d_model=D)

    def to_tokens(self, text):
        from transformer_lens.utils import get_input_with_manually_prepended_bos
        return self.tok(get_input_with_manually_prepended_bos(self.tok.bos_token, text), return_tensors="pt",
                        padding=True)["input_ids"]

    def run_with_cache(self, text, names_filter):
        with torch.no_grad():
            return None, {self.hook: self.resid_fn(self.to_tokens(text))}


class SBSAE:
    """What SAEBench reads of a SAELens SAE, around ours."""
    def __init__(self, sae, layer):
        self.sae, self.W_enc, self.W_dec = sae, sae.W_enc_DF, sae.W_dec_FD
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.cfg = SimpleNamespace(d_sae=sae.cfg.n_latents, hook_layer=layer)

    def encode(self, x):
        return self.sae.encode(x)


def test_words_match_saebench(sb, tok):
    assert sorted(ab.alpha_words(tok)) == sorted(sb.vocab.get_alpha_tokens(tok))
    assert ab.alpha_words(tok) == sb.vocab.get_alpha_tokens(IdOrder(tok))


def test_prompts_match_saebench(sb, tok):
    """The split and every prompt, drawn from the same seeded RNG: identical strings."""
    words = ab.alpha_words(tok)
    random.seed(5)
    tr, te = sb.probing.create_dataset_probe_training(
        vocab=words, formatter=sb.prompting.first_letter_formatter(), num_prompts_per_token=1,
        base_template=ab.TEMPLATE, prepend_separator_to_first_example=True)
    calc = sb.fa.FeatureAbsorptionCalculator(model=None, icl_word_list=words, max_icl_examples=10,
                                             base_template=ab.TEMPLATE, word_token_pos=-6)
    again = [p.base for p in calc._build_prompts(words[:30])]
    rng = random.Random(5)
    w_tr, p_tr, w_te, p_te = ab.split_prompts(words, rng)
    assert p_tr == [p.base for p, _ in tr] and p_te == [p.base for p, _ in te]
    assert [ab.letter_of(w) for w in w_tr + w_te] == [c for _, c in tr + te]
    assert [ab.icl_prompt(w, words, rng) for w in words[:30]] == again


def test_probe_training_matches_saebench(sb):
    """The ground-truth probe (batch 64, weight decay 1e-4) and the L1 probe (batch 4096, L1 0.01,
    weight decay 1e-6) from the same seed: the same weights. Same ops on the same data in the same
    order, so equal up to float rounding (atol 1e-6; they come out bit-identical here)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g), torch.arange(300) % 26
    x[torch.arange(300), y % 16] += 2.0
    Y = F.one_hot(y, 26)
    cpu = torch.device("cpu")
    theirs = (  # as train_linear_probe_for_task and train_k_sparse_probes call them
        lambda: sb.probing.train_multi_probe(x, Y, num_probes=26, batch_size=64, num_epochs=4, lr=1e-2,
                                             weight_decay=1e-4, show_progress=False, device=cpu),
        lambda: sb.ks.train_sparse_multi_probe(x, Y, device=cpu, l1_decay=0.01, batch_size=4096, num_epochs=4,
                                               show_progress=False))
    for fit, ours in zip(theirs, (dict(batch=64, wd=1e-4), dict(batch=4096, wd=1e-6, l1=0.01))):
        torch.manual_seed(7)
        p = fit()
        torch.manual_seed(7)
        W, b = ab.train_probe(x, Y, epochs=4, **ours)
        torch.testing.assert_close(W, p.weights.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(b, p.biases.detach(), atol=1e-6, rtol=0)


def test_pipeline_matches_saebench(sb, tok, tmp_path, monkeypatch):
    """SAEBench's own pipeline (probe data, ground-truth probe, k-sparse probing, feature splits,
    the absorption calculator, its aggregation) on a context-dependent toy model and a c2r SAE,
    against prepare() + score(). Tolerances: probe weights and F1 to 1e-6 (same float32 ops, same
    seeds and batch order); per-word absorption fractions to 1e-6 (the same float32 projections,
    summed in another layout: a few float32 ulps); main latents, letters kept and full-absorption
    flags exactly (continuous random data never sits on a threshold)."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    V, D, L, seed = len(tok), 40, 0, 11
    lab = letter_table(tok)
    E = 0.3 * torch.randn(V, D, generator=g)
    E[lab >= 0, lab[lab >= 0]] += 3.0
    C = 0.5 * torch.randn(V, D, generator=g)
    resid_fn = lambda ids: E[ids] + C[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
    Fn = 80
    W_dec = torch.randn(Fn, D, generator=g)
    W_dec[torch.arange(Fn), torch.arange(Fn) % 26] += 2.0 * (torch.arange(Fn) < 60)
    sae = sae_from(0.6 * F.normalize(W_dec, dim=1).T, W_dec, torch.full((Fn,), -0.35))
    monkeypatch.setattr(ab, "MAX_K", 3)             # SAEBench's max_k_value, 10 by default: time
    data = ab.prepare(tok, resid_fn, device="cpu", seed=seed, batch=16)
    res = ab.score(sae, data, bootstrap=0)

    stub, sbsae, kw = TLStub(tok, resid_fn, L, D), SBSAE(sae, L), dict(probes_dir=tmp_path / "probes")
    random.seed(seed)
    torch.manual_seed(seed)
    sb.common.train_and_save_probes(stub, layers=[L], base_template=ab.TEMPLATE, pos_idx=-6, device="cpu", **kw)
    probe = sb.common.load_probe("toy", L, tmp_path / "probes", torch.float32, "cpu")
    torch.testing.assert_close(data["W"], probe.weights.detach(), atol=1e-6, rtol=0)
    torch.manual_seed(seed)
    metrics = sb.ks.run_k_sparse_probing_experiment(
        stub, sbsae, L, "toy", max_k_value=3, prompt_template=ab.TEMPLATE, prompt_token_pos=-6, device="cpu",
        experiment_dir=tmp_path / "ks", force=True, verbose=False, **kw)
    raw = sb.fa.run_feature_absortion_experiment(
        stub, sbsae, L, "toy", max_k_value=3, prompt_template=ab.TEMPLATE, prompt_token_pos=-6, device="cpu",
        experiment_dir=tmp_path / "fa", sparse_probing_experiment_dir=tmp_path / "ks", force=True, **kw)
    agg = sb.main._aggregate_results_df(raw)

    f1_probe = metrics.set_index("letter")["f1_probe"]
    assert [res["probe_f1"][c] for c in ab.LETTERS] == pytest.approx(list(f1_probe[list(ab.LETTERS)]), abs=1e-6)
    kept = [c for c in ab.LETTERS if f1_probe[c] > 0.6]
    assert [r["letter"] for r in res["letters"]] == kept and len(kept) >= ab.MIN_LETTERS
    split = metrics.set_index("letter")["split_feats"]
    for r in res["letters"]:
        assert r["main_latents"] == list(split[r["letter"]])
        row = metrics[metrics["letter"] == r["letter"]].iloc[0]
        f1_k = [row[f"f1_sparse_sae_{k + 1}"] for k in range(len(r["k_sparse_f1"]))]
        assert r["k_sparse_f1"] == pytest.approx(f1_k, abs=1e-6)
    raw = raw[raw["letter"].isin(kept)]
    assert len(raw) == len(res["per_word"]["letter"])
    assert list(raw["token"]) == [data["words_te"][i] for i in res["per_word"]["word"]]
    assert res["per_word"]["full_absorption"] == [int(v) for v in raw["is_full_absorption"]]
    assert res["per_word"]["absorption_fraction"] == pytest.approx(list(raw["absorption_fraction"]), abs=1e-6)
    agg = agg[agg["letter"].isin(kept)]
    assert res["mean_absorption_fraction"] == pytest.approx(statistics.mean(agg["mean_absorption_fraction"]), abs=1e-6)
    assert res["mean_full_absorption"] == pytest.approx(statistics.mean(agg["full_absorption_rate"]), abs=1e-9)
    assert res["mean_split_latents"] == statistics.mean(agg["num_split_feats"])
    # not a vacuous match: the toy has absorption of both kinds, and words where it is partial
    fr = torch.tensor(res["per_word"]["absorption_fraction"])
    assert ((fr > 0) & (fr < 1)).any() and (fr == 1).any() and sum(res["per_word"]["full_absorption"]) > 0
    assert any(r["n_split"] > 1 for r in res["letters"])          # the F1-jump rule took a second latent
