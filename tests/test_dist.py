"""More than one GPU: c2r.train and train_gpt2.py under torch.distributed, here on the CPU with the
gloo backend and 2 processes. One spawn runs all of a test's checks in both ranks and writes what
they found to files; the tests read those files. Tiny sizes: a few seconds per spawn."""

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
# c2r.train: 2 ranks, each with half of every batch, = 1 process on the whole batches

def config(kind):
    # C²R on, the table refreshed every 2nd step, AuxK on from the 3rd step (dead_tokens = 2 batches)
    return c2r.Config(d_model=8, n_latents=32, kind=kind, k=3, c2r_lambda=1.0, nbr_every=2, steps=8,
                      dead_tokens=32, log_every=1, lr=1e-2, prefixes=(4, 12) if kind == "matryoshka" else ())


def global_batches(steps=8, B=16, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
            for _ in range(steps)]


def train_share(rank, kind, out):
    half = [x.chunk(RANKS)[rank] for x in global_batches()]
    sae, log = c2r.train(c2r.SAE(config(kind)).double(), half, progress=False)
    torch.save(dict(sae.state_dict()), os.path.join(out, f"{kind}{rank}.pt"))


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_two_ranks_train_the_one_process_sae(kind, tmp_path):
    """Every step decides the same on both ranks (BatchTopK over the global batch, its threshold,
    the dead-latent counters, AuxK's normaliser, the C²R norms, the neighbour table, the step): the
    two ranks end bit-identical, and equal to one process trained on the whole batches up to the
    rounding of summing in another order (float64: 1e-12)."""
    spawn(train_share, kind, str(tmp_path))
    one, _ = c2r.train(c2r.SAE(config(kind)).double(), global_batches(), progress=False)
    r0, r1 = (torch.load(tmp_path / f"{kind}{r}.pt") for r in range(RANKS))
    for name, want in one.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name                 # the ranks agree exactly
        torch.testing.assert_close(r0[name], want, rtol=1e-12, atol=1e-12, msg=name)
    assert one.tokens_since_fired.max() >= 32 and one.threshold > 0   # AuxK and the threshold did run
    assert torch.equal(r0["nbr_F"], one.nbr_F) and torch.equal(r0["tokens_since_fired"], one.tokens_since_fired)


# -----------------------------------------------------------------------------
# the sharded search

def search_shares(rank, out):
    W = torch.randn(96, 16, generator=torch.Generator().manual_seed(3))
    near = lambda a, b: c2r.nearest_neighbours(W, rows=(a, b), block=20)
    pairs = lambda a, b: torch.stack([torch.arange(a, b), torch.arange(a, b) * 10 + rank], 1)   # who did which
    found = {f"{lo}:{hi}": c2r.sharded(near, lo, hi) for lo, hi in [(0, 96), (10, 53), (95, 96), (40, 40)]}
    torch.save(dict(W=W, **found, pairs=c2r.sharded(pairs, 3, 10)), os.path.join(out, f"search{rank}.pt"))


def test_sharded_search_equals_the_one_process_search(tmp_path):
    spawn(search_shares, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"search{r}.pt") for r in range(RANKS))
    W = r0["W"]
    for key in ("0:96", "10:53", "95:96", "40:40"):
        lo, hi = map(int, key.split(":"))
        assert torch.equal(r0[key], r1[key]), key                     # both ranks hold the whole table
        assert torch.equal(r0[key], c2r.nearest_neighbours(W, rows=(lo, hi))), key
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
