"""c2r.save / c2r.load on the files they meet in practice: damaged, foreign, corrupt, a full disk,
temp files left by a killed writer."""

import errno
import os
import random
import subprocess
import sys

import pytest
import torch

import c2r

torch.set_num_threads(1)


def saved(tmp_path, name="sae.pt", **extra):
    sae = c2r.SAE(c2r.Config(d_model=8, n_latents=32, kind="topk", k=3))
    path = tmp_path / name
    c2r.save(sae, path, step=3, **extra)
    return sae, path


class Foreign:          # a pickled object of some other program's class
    pass


def refused(path, match):
    with pytest.raises(ValueError) as e:
        c2r.load(path)
    msg = str(e.value)
    assert str(path) in msg and len(msg.splitlines()) == 1 and "weights_only" not in msg, msg
    assert e.value.__context__ is None or e.value.__suppress_context__    # no torch traceback chained on
    assert match in msg, msg


def test_damaged_and_foreign_files(tmp_path):
    _, good = saved(tmp_path)
    raw = good.read_bytes()
    cases = {"empty": (b"", "empty"), "half": (raw[:len(raw) // 2], "truncated or damaged"),
             # seeded: 1 in ~11 random files starts with pickle's PROTO byte (0x80) and reads as a damaged
             # legacy torch file ("truncated or damaged"), which made this case fail now and then
             "random": (random.Random(0).randbytes(4000), "not a c2r checkpoint"), "text": (b"d_model: 64\n", "not a c2r checkpoint")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(tmp_path / name, why)
    torch.save({"model": Foreign()}, tmp_path / "pickled.pt")
    refused(tmp_path / "pickled.pt", "not a c2r checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")       # loads, but it is not ours
    refused(tmp_path / "other.pt", "no config and state")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        c2r.load(tmp_path / "nowhere.pt")


def test_flipped_bytes_are_refused(tmp_path):
    """torch.load reads a tensor whose bytes were damaged without a word (it does not check the
    zip's CRCs): the checksum catches it. Bytes flipped elsewhere break the archive itself."""
    sae, path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.find(sae.W_dec_FD.detach().numpy().tobytes())
    assert at > 0
    for start, why in [(at + 100, "do not match the checksum"), (len(raw) // 2, "")]:
        bad = bytearray(raw)
        bad[start:start + 32] = bytes(b ^ 0xFF for b in bad[start:start + 32])
        (tmp_path / "bad.pt").write_bytes(bad)
        refused(tmp_path / "bad.pt", why)


def test_checksum_covers_weights_config_and_extras(tmp_path):
    _, path = saved(tmp_path, opt={"lr": 1e-3})
    for change in (lambda o: o["state"]["b_enc_F"].add_(1e-6), lambda o: o["config"].update(k=4),
                   lambda o: o.update(step=4), lambda o: o["opt"].update(lr=2e-3)):
        obj = torch.load(path, weights_only=True)
        change(obj)
        torch.save(obj, tmp_path / "edited.pt")
        refused(tmp_path / "edited.pt", "do not match the checksum")
    obj = torch.load(path, weights_only=True)           # untouched and saved again by torch: still sound
    torch.save(obj, tmp_path / "same.pt")
    assert c2r.load(tmp_path / "same.pt")[1] == {"step": 3, "opt": {"lr": 1e-3}}


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    sae, path = saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    del obj["sha256"]                                   # as c2r.save wrote them before it stored one
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="no checksum"):
        back, extra = c2r.load(path)
    assert extra == {"step": 3} and torch.equal(back.W_dec_FD, sae.W_dec_FD)


def test_invalid_config_in_a_checkpoint(tmp_path):
    _, path = saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["config"]["k"] = 99                             # more than n_latents
    obj.pop("sha256")
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="no checksum"), pytest.raises(ValueError, match=r"sae.pt: .*Config.k"):
        c2r.load(path)


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    sae, path = saved(tmp_path)
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="no space left") as e:
        c2r.save(sae, path)
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["sae.pt"]
    with pytest.raises(OSError, match=f"no space left.*{tmp_path / 'x.json'}"):
        c2r.atomic_write(tmp_path / "x.json", lambda tmp: full(None, open(tmp, "wb")))


def test_next_write_removes_temp_files_of_dead_writers(tmp_path):
    """A writer killed mid-write (SIGKILL, power cut) never runs atomic_write's cleanup: its temp
    file stayed forever. The next write into the folder removes this host's of dead pids, and
    leaves those of live ones (they may be writing right now), other hosts' (their pids mean
    nothing here) and other programs' `*.tmp<n>`."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ours = lambda name, pid: os.path.basename(c2r.tmp_name(name, pid))     # noqa: E731
    others = ["notes.tmp", f"report.tmp{dead}", f"sae.pt.c2r-tmp-otherhost-{dead}"]
    try:
        for name in [ours("sae.pt", dead), ours("results.json", dead), ours("sae.pt", alive.pid), *others]:
            (tmp_path / name).write_text("left behind")
        c2r.atomic_write(tmp_path / "x.txt", lambda tmp: open(tmp, "w").write("x"))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, ours("sae.pt", alive.pid), "x.txt"])
        saved(tmp_path)                                 # save() goes through atomic_write too
        assert (tmp_path / ours("sae.pt", alive.pid)).exists()
    finally:
        alive.kill()
        alive.wait()
    saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "sae.pt", "x.txt"])


def test_atomic_write_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    """os.replace alone can reach the disk before the file's data (a power cut then leaves an empty
    or half file under the old name): the temp file is fsynced first, then the folder."""
    events, real_replace = [], os.replace
    monkeypatch.setattr(c2r, "fsync", lambda p: events.append(("fsync", os.path.basename(p))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                      real_replace(a, b)))
    c2r.atomic_write(tmp_path / "x.txt", lambda tmp: open(tmp, "w").write("x"))
    tmp = os.path.basename(c2r.tmp_name(tmp_path / "x.txt"))
    assert events == [("fsync", tmp), ("replace", "x.txt"), ("fsync", tmp_path.name)]
    assert (tmp_path / "x.txt").read_text() == "x"
    monkeypatch.undo()
    c2r.fsync(tmp_path / "x.txt")                       # the real one, on a file and on a folder
    c2r.fsync(tmp_path)
