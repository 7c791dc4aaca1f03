"""The block library shared by several processes: each block trained once, one valid entry per
block, no reader ever sees half an entry, and what a crashed writer leaves behind is retrained."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model

from lbsearch.distill import BlockLibrary, TransferConfig
from lbsearch.plan import LayerSpec

L4 = LayerSpec(kind="lswa", window=4, sinks=1, feature_dim=8)
L8 = LayerSpec(kind="lswa", window=8, sinks=1, feature_dim=8)
PAIRS = [(1, L4), (2, L4), (3, L8)]
CONFIG = TransferConfig(steps=150)  # about a second per block: long enough for the writers to overlap


def library(root, config: TransferConfig = CONFIG) -> BlockLibrary:
    return BlockLibrary(root, "tiny", "d0", config)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and two threads crawl on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def ensure_in_child(root: str, reverse: bool, barrier, results) -> None:
    """A worker process: ensure the same blocks as the other one, starting at the same moment."""
    torch.set_num_threads(1)
    pairs = PAIRS[::-1] if reverse else PAIRS
    model = tiny_model("llama")
    barrier.wait(timeout=120)
    trained = library(root).ensure(model, pairs, calibration(), progress=False)
    results.put([(t["layer"], t["spec"]) for t in trained])


@pytest.mark.slow  # two spawned processes importing torch and transformers: 40 s on a busy 2-core machine
def test_two_processes_ensuring_the_same_blocks_train_each_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=ensure_in_child, args=(str(tmp_path), reverse, barrier, results))
             for reverse in (False, True)]
    for p in procs:
        p.start()
    lib = library(tmp_path)
    paths = [lib.path(i, s) for i, s in PAIRS]
    seen, reads = set(), 0
    while any(p.is_alive() for p in procs):  # a reader beside the writers: whole entries or nothing
        for path, (layer, spec) in zip(paths, PAIRS):
            if path.exists():
                assert lib.get(layer, spec) is not None, f"{path.name}: visible but not a valid entry"
                seen.add(layer)
            reads += 1
        lib.index()
        time.sleep(0.01)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    trained = results.get(timeout=10) + results.get(timeout=10)
    assert sorted(trained) == sorted((i, s.token()) for i, s in PAIRS)  # every block once, by one of them
    index = lib.index()
    assert set(index) == {lib.key(i, s) for i, s in PAIRS}  # one entry per block
    assert sorted(e["layer"] for e in index.values()) == [1, 2, 3]
    assert all(lib.get(i, s) is not None for i, s in PAIRS)
    assert not list((tmp_path / "blocks").glob(".*.tmp"))  # no temporary file left behind
    assert reads > 0 and seen  # the reader did overlap the writers


def test_what_a_crashed_writer_leaves_is_ignored_and_retrained(tmp_path):
    model, blocks = tiny_model("llama"), calibration()
    lib = library(tmp_path, TransferConfig(steps=20))
    (layer, spec), other = PAIRS[0], PAIRS[1]
    assert len(lib.ensure(model, [(layer, spec), other], blocks, progress=False)) == 2
    path = lib.path(layer, spec)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a truncated entry
    (path.parent / f".{path.name}.abc123.tmp").write_bytes(whole[:100])  # a writer killed before its rename
    assert lib.get(layer, spec) is None and lib.metrics(layer, spec) is None
    assert list(lib.index()) == [lib.key(*other)]  # listed: only the valid entry, no traceback
    assert lib.missing([(layer, spec), other]) == [(layer, spec)]
    retrained = lib.ensure(model, [(layer, spec), other], blocks, progress=False)
    assert [(r["layer"], r["spec"]) for r in retrained] == [(layer, spec.token())]
    assert lib.get(layer, spec) is not None and len(lib.index()) == 2


def test_a_writer_killed_while_holding_a_block_lock_does_not_block_the_others(tmp_path):
    lib = library(tmp_path, TransferConfig(steps=20))
    lock = str(lib.path(*PAIRS[0])) + ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", lock],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    from filelock import FileLock

    with FileLock(lock, timeout=10):  # released by the kernel with the dead process
        pass
    assert len(lib.ensure(tiny_model("llama"), PAIRS[:1], calibration(), progress=False)) == 1
    assert lib.get(*PAIRS[0]) is not None
