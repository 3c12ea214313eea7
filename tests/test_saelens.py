"""lm.save_saelens against SAELens itself: each exported kind, loaded by sae_lens.SAE.load_from_disk,
encodes and decodes as our SAE does, and its metadata says how it was trained."""

import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (pip install sae-lens): "
                                                  "the SAELens export is checked against it")
pytest.importorskip("safetensors")

import c2r  # noqa: E402
import lm  # noqa: E402

torch.set_num_threads(1)
RUN = dict(model="tiny-gpt2", layer=1, ctx=16, data="text.txt")


@pytest.mark.filterwarnings("ignore:\\s*This SAE has non-empty model_from_pretrained_kwargs")
@pytest.mark.parametrize("kind,arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                       ("matryoshka", "jumprelu")])
def test_saelens_loads_our_export(kind, arch, tmp_path):
    torch.manual_seed(0)
    cfg = c2r.Config(d_model=16, n_latents=48, kind=kind, k=4, steps=6, log_every=3,
                     prefixes=(12, 48) if kind == "matryoshka" else ())
    x_D = torch.randn(512, 16) * torch.linspace(0.2, 2, 16)
    sae, _ = c2r.train(c2r.SAE(cfg), x_D.split(64)[:6], progress=False)
    ours = lm.fold(sae.eval(), 2.0)          # as train_gpt2.py exports it: scale folded in
    lm.save_saelens(ours, tmp_path / "sl", RUN)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    assert theirs.cfg.architecture() == arch
    x = torch.randn(256, 16) * 3
    with torch.no_grad():
        a, b = ours.encode(x), theirs.encode(x)
        # the same float32 operations in the same order ((x - b_dec) @ W_enc + b_enc, then the
        # activation; codes @ W_dec + b_dec): bit-equal, not merely close
        assert torch.equal(a, b), (a - b).abs().max()
        assert torch.equal(a != 0, b != 0)               # no code flips between zero and non-zero
        assert (a != 0).any() and (a == 0).any()         # and the check had both to compare
        assert torch.equal(ours.decode(a), theirs.decode(b))
    meta = theirs.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.hook_layer == 1 and meta.context_size == 16
    assert meta.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert tuple(meta.seqpos_slice) == (1, None) and meta.prepend_bos is True and meta.model_name == "tiny-gpt2"
    saved = json.load(open(tmp_path / "sl" / "cfg.json"))
    assert saved["sae_lens_version"] == sae_lens.__version__ == saved["metadata"]["sae_lens_version"]
    if arch == "topk":
        assert theirs.cfg.k == 4
