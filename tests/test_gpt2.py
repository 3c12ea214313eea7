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

torch.set_num_threads(1)

WORDS = ("apple ant arm axe bat bee bed box cat cow cup car dog den dot dig egg elk ear eel fox fig fan fog "
         "gum gap hat hen hog hut ink ivy jam jet kit kid log leg map mud net nut owl oak pig pan").split()


def tiny_tokenizer(folder):
    """A real GPT-2 byte-level BPE tokenizer with a small vocabulary: the 256 byte symbols plus
    merges that make each ' word' of WORDS a single token."""
    # GPT-2's byte -> symbol table: printable bytes stand for themselves, the rest move to 256+
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    sym, extra = [], 0
    for c in range(256):
        sym.append(chr(c) if c in keep else chr(256 + extra))
        extra += c not in keep
    vocab, merges = {s: i for i, s in enumerate(sym)}, []
    for w in WORDS:
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
