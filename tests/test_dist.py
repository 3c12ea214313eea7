"""More than one GPU: c2r.train and train_gpt2.py under torch.distributed, here on the CPU with the
gloo backend and 2 processes. One spawn runs all of a test's checks in both ranks and writes what
they found to files; the tests read those files. Tiny sizes: a few seconds per spawn."""

import itertools
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import c2r
from conftest import neighbours_reference

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

RANKS = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """fn(rank, *args) in RANKS fresh processes that share a gloo process group (as torchrun's
    environment variables would set it up), on a free port of this machine."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(RANKS))
    mp.spawn(worker, (env, fn, args), nprocs=RANKS, join=True)


def worker(rank, env, fn, args):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# c2r.train and the sharded search: one spawn runs both ranks' parts of the tests below

KINDS = ("relu", "topk", "batchtopk", "matryoshka")


def config(kind):
    # C²R on, the table refreshed every 2nd step, AuxK on from the 3rd step (dead_tokens = 2 batches)
    return c2r.Config(d_model=8, n_latents=32, kind=kind, k=3, c2r_lambda=1.0, nbr_every=2, steps=8,
                      dead_tokens=32, log_every=1, lr=1e-2, prefixes=(4, 12) if kind == "matryoshka" else ())


def global_batches(steps=8, B=16, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
            for _ in range(steps)]


def c2r_ranks(rank, out):
    found = {}
    for kind in KINDS:      # each rank trains on its half of every global batch
        half = [x.chunk(RANKS)[rank] for x in global_batches()]
        sae, _ = c2r.train(c2r.SAE(config(kind)).double(), half, progress=False)
        found[kind] = dict(sae.state_dict())
    W = torch.randn(96, 16, generator=torch.Generator().manual_seed(3))
    near = lambda a, b: c2r.search_rows_(W, torch.zeros(96, 1, dtype=torch.long), a, b, block=20)[a:b, 0]
    pairs = lambda a, b: torch.stack([torch.arange(a, b), torch.arange(a, b) * 10 + rank], 1)   # who did which
    for lo, hi in [(0, 96), (10, 53), (95, 96), (40, 40)]:
        found[f"{lo}:{hi}"] = c2r.sharded(near, lo, hi)
    torch.save(dict(found, W=W, pairs=c2r.sharded(pairs, 3, 10)), os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks_found(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    spawn(c2r_ranks, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(RANKS)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_train_the_one_process_sae(kind, ranks_found, monkeypatch):
    """Every step decides the same on both ranks (BatchTopK over the global batch, its threshold,
    the dead-latent counters, AuxK's normaliser, the C²R norms, the neighbour table, b_dec's start,
    the gradient): the two ranks end bit-identical, and equal to one process trained on the whole
    batches up to the rounding of summing in another order (float64: 1e-12)."""
    dead, aux_loss = [], c2r.aux_loss
    monkeypatch.setattr(c2r, "aux_loss", lambda sae, x, x_hat, pre, dead_F: dead.append(int(dead_F.sum())) or
                        aux_loss(sae, x, x_hat, pre, dead_F))
    one, _ = c2r.train(c2r.SAE(config(kind)).double(), global_batches(), progress=False)
    r0, r1 = (found[kind] for found in ranks_found)
    for name, want in one.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name                 # the ranks agree exactly
        torch.testing.assert_close(r0[name], want, rtol=1e-12, atol=1e-12, msg=name)
    assert kind == "relu" or max(dead) > 0                            # AuxK did run, on dead latents
    assert (kind in ("batchtopk", "matryoshka")) == (one.threshold > 0)   # and BatchTopK's threshold
    assert torch.equal(r0["nbr_F"], one.nbr_F) and torch.equal(r0["tokens_since_fired"], one.tokens_since_fired)


def test_sharded_search_equals_the_one_process_search(ranks_found):
    r0, r1 = ranks_found
    W = r0["W"]
    for key in ("0:96", "10:53", "95:96", "40:40"):
        lo, hi = map(int, key.split(":"))
        assert torch.equal(r0[key], r1[key]), key                     # both ranks hold the whole table
        assert torch.equal(r0[key], c2r.search_rows_(W, torch.zeros(96, 1, dtype=torch.long), lo, hi)[lo:hi, 0]), key
        assert torch.equal(r0[key], neighbours_reference(W)[lo:hi]), key
    assert torch.equal(r0["0:96"], c2r.nearest_neighbours(W))         # = the one-process symmetric search
    # rows 3..9: rank 0 searched 3..6, rank 1 7..9 (the table is gathered in row order, padding dropped)
    assert r0["pairs"].tolist() == [[i, 10 * i + (i >= 7)] for i in range(3, 10)]


def test_no_process_group_no_collectives(monkeypatch):
    """Without a process group the helpers are the one-process code: nothing is gathered."""
    monkeypatch.setattr(dist, "all_gather", lambda *a: pytest.fail("all_gather without a process group"))
    monkeypatch.setattr(dist, "all_reduce", lambda *a: pytest.fail("all_reduce without a process group"))
    assert c2r.world() == (0, 1)
    t = torch.arange(3)
    assert c2r.gather(t) is t and torch.equal(c2r.sharded(lambda a, b: torch.arange(a, b), 2, 5), t + 2)
    c2r.train(c2r.SAE(config("batchtopk")).double(), global_batches(), progress=False)


# -----------------------------------------------------------------------------
# train_gpt2.py under 2 ranks: a tiny random model on random tokens

def gpt2_args(model_dir, out, *extra):
    import train_gpt2
    return train_gpt2.parse_args(["--model", model_dir, "--random-init", "--data", "random", "--layer", "1",
                                  "--ctx", "16", "--tokens", "2048", "--batch", "256", "--eval-tokens", "120",
                                  "--n-latents", "64", "--k", "4", "--buffer", "600", "--model-batch", "4",
                                  "--probe-words", "0", "--device", "cpu", "--quiet", "--out", str(out),
                                  "--runs", "c2r: c2r_lambda=5", *extra])


def gpt2_ranks(rank, model_dir, root):
    import lm
    import train_gpt2
    lm.SHARD_BYTES = 2 * 32 * 60 * 2            # shards of 2 model batches: both ranks harvest some
    real_write, real_shuffled = c2r.atomic_write, lm.shuffled
    if rank == 1:           # rank 1 writes nothing but its cache shards
        c2r.atomic_write = lambda path, w: real_write(path, w) if "acts_" in str(path) else pytest.fail(
            f"rank 1 wrote {path}")
    cached, _ = train_gpt2.run(gpt2_args(model_dir, f"{root}/cached", "--cache", f"{root}/cache2"))

    def dying(*a):          # every rank's stream ends at step 5, after the checkpoint of step 4
        yield from itertools.islice(real_shuffled(*a), 5)
        raise KeyboardInterrupt
    lm.shuffled = dying
    with pytest.raises(KeyboardInterrupt):
        train_gpt2.run(gpt2_args(model_dir, f"{root}/resumed", "--act-dtype", "float16", "--ckpt-every", "4"))
    lm.shuffled = real_shuffled
    resumed, _ = train_gpt2.run(gpt2_args(model_dir, f"{root}/resumed", "--act-dtype", "float16", "--ckpt-every",
                                          "4", "--resume"))
    assert (cached is None) == (resumed is None) == (rank == 1)    # rank 0 reports alone
    if rank == 0:
        json.dump(dict(steps=resumed["timing"]["c2r"]["steps"], ranks=cached["run"]["ranks"]),
                  open(f"{root}/rank0.json", "w"))


def test_train_gpt2_under_two_ranks(tmp_path):
    """Two ranks, each its share of the tokens: rank 0 alone writes (checkpoints, results, SAEs).
    A run from the cache (both ranks harvest it, alternate shards) and a live float16 run killed
    after its checkpoint and resumed end with the same SAE: each rank reads from the cache the
    model batches it harvests live, and --resume replays each rank's stream."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "model")
    spawn(gpt2_ranks, str(tmp_path / "model"), str(tmp_path))
    assert json.load(open(tmp_path / "rank0.json")) == dict(steps=4, ranks=2)
    (a, _), (b, _) = (c2r.load(tmp_path / run / "c2r.pt") for run in ("cached", "resumed"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=1e-6, msg=k)
    for run in ("cached", "resumed"):
        assert (tmp_path / run / "results.json").exists() and (tmp_path / run / "c2r.ckpt.pt").exists()
    assert len(json.load(open(tmp_path / "cache2" / "manifest.json"))["shards"]) >= 2     # rank 1 harvested too
    import train_gpt2         # each rank read its share of the stream: one process cannot continue it exactly
    with pytest.raises(ValueError, match="another configuration: ranks was 2, now 1"):
        train_gpt2.run(gpt2_args(str(tmp_path / "model"), tmp_path / "resumed", "--act-dtype", "float16",
                                 "--ckpt-every", "4", "--resume"))
