"""torchrun / DistributedDataParallel on CPU (gloo): parity with DataParallel's math, sharded
evaluation, rank-0-only writes, elastic restart, and the batch-size check."""

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import common
import distributed
import runs
import scoring
import train_RawNet2 as train
import utils
from conftest import ROOT, tiny_run_flags
from model_RawNet2 import RawNet2, load_pretrained

ENTRY = os.path.join(ROOT, "tests", "torchrun_entry.py")


def torchrun(flags, nproc=2, max_restarts=0, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", ENTRY] + flags
    # On CPU with gloo, on any machine: with CUDA visible each process would take GPU LOCAL_RANK,
    # which a one-GPU machine lacks. Own process group, so that a run that hangs is killed with all
    # its workers.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env=env) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # torchrun starts its workers in sessions of their own
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", flags[flags.index("-save_dir") + 1]])
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def reference_params(corpus, flags, world=2):
    """One process stepping the same global batches, the batch split in `world` chunks for batch norm
    (what nn.DataParallel does on `world` GPUs), loss averaged over the chunks. SGD with momentum 0.9."""
    args = train.parse_args(flags)
    utils.seed_everything(args.seed)
    train_dir = os.path.join(args.DB_vox2, args.dev_wav)
    keys = utils.list_utterances(train_dir)
    labels = utils.speaker_labels(keys)
    model = RawNet2(train.model_args(args, len(labels)))
    model.apply(utils.init_weights)
    opt = torch.optim.SGD(utils.param_groups(model, args.wd), lr=args.lr, weight_decay=args.wd, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=utils.keras_lr_decay)
    data = utils.TrainSet(keys, train_dir, labels, args.nb_samp, seed=args.seed)
    per_rank = args.bs // world
    model.train()
    for epoch in range(args.epoch):
        data.epoch = epoch
        shards = []
        for r in range(world):
            sampler = DistributedSampler(data, num_replicas=world, rank=r, shuffle=True, seed=args.seed)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        for b in range(len(shards[0]) // per_rank):
            loss = 0
            for shard in shards:
                items = [data[i] for i in shard[b * per_rank:(b + 1) * per_rank]]
                x = torch.stack([torch.from_numpy(item[0]) for item in items])
                y = torch.tensor([item[1] for item in items])
                loss = loss + F.cross_entropy(model(x), y) / world
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


@pytest.mark.slow
def test_ddp_matches_split_batch_reference_and_only_rank0_writes(tiny_corpus, tmp_path):
    # SGD: its update is linear in the gradient, so float rounding stays at rounding level (Adam
    # turns the ~0 gradients of conv biases followed by batch norm into +-lr steps of random sign).
    # 3 steps of 4 crops per process: the tiny model's last batch norm sees one time step per crop,
    # so much smaller chunks or many more steps make training chaotic (rounding grows visibly).
    flags = (tiny_run_flags(tiny_corpus, tmp_path, epochs=1)
             + ["-optimizer", "SGD", "-lr", "0.0005", "-bs", "8"])
    log = tmp_path / "log"
    log.mkdir()
    proc = torchrun(flags, env={"ENTRY_SAVE_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 24 // 8
    reference = reference_params(tiny_corpus, flags)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(state["model"][name], param.detach(), rtol=1e-5, atol=1e-5, msg=name)
    # checkpoints written by rank 0 only
    assert not (log / "rank1.txt").exists()
    assert any(p.endswith("last.pt") for p in (log / "rank0.txt").read_text().split())


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process(tiny_corpus, tmp_path):
    flags = tiny_run_flags(tiny_corpus, tmp_path, epochs=1)
    proc = torchrun(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_pretrained(tmp_path / "run" / "last.pt")
    args = train.parse_args(flags)
    eval_dir = os.path.join(args.DB, args.eval_wav)
    keys = utils.list_utterances(eval_dir)
    trials = scoring.read_trials(os.path.join(args.DB, "veri_test.txt"))
    eer, scores, labels = train.evaluate(model, keys, eval_dir, trials, args, torch.device("cpu"), "eval")
    written = np.loadtxt(tmp_path / "run" / "results" / "eval_epoch0.txt")
    np.testing.assert_allclose(written[:, 0], scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(written[:, 1], labels)
    line = (tmp_path / "run" / "eers.txt").read_text().strip()
    assert line == f"epoch:0, TA_eval_eer:{eer:.4f}"


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_finishes_all_epochs(tiny_corpus, tmp_path):
    flags = tiny_run_flags(tiny_corpus, tmp_path, epochs=3)
    # One restart is enough: each attempt joins under a key-value prefix of its own (before that,
    # a restarted group sometimes read the dead attempt's gloo addresses and failed or hung).
    proc = torchrun(flags, max_restarts=1, env={"ENTRY_KILL_AT_EPOCH": "1"}, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "Connection refused" not in proc.stderr
    lines = (tmp_path / "run" / "eers.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch:0", "epoch:1", "epoch:2"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_batch_not_divisible_by_world_size_is_one_line(tiny_corpus, tmp_path):
    flags = tiny_run_flags(tiny_corpus, tmp_path, epochs=1)
    flags[flags.index("-bs") + 1] = "5"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_RawNet2.py")] + flags,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: -bs 5 is not divisible by the world size 2 "
                                   "(the global batch is split evenly over processes)")
    under_torchrun = torchrun(flags)
    assert under_torchrun.returncode != 0
    assert under_torchrun.stderr.count("error: -bs 5 is not divisible by the world size 2") == 1


@pytest.mark.slow
def test_resume_with_a_different_world_size(tiny_corpus, tmp_path):
    train.main(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path, epochs=1)))
    proc = torchrun(tiny_run_flags(tiny_corpus, tmp_path, epochs=2) + ["-resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "after epoch 0" in proc.stdout
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["world_size"] == 2 and state["step"] == 24 // 4 * 2
    lines = (tmp_path / "run" / "eers.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch:0", "epoch:1"]


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_device(index):  # what CUDA says on a machine with one GPU
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    expected = (r"^local process 1 has no GPU of its own: 1 visible on this node; start at most 1 per node "
                r"\(torchrun --nproc_per_node=1\)")
    with pytest.raises(common.DataError, match=expected):
        train.setup_device(train.parse_args(["-name", "x"]))


# --- the wav index: built by whichever process locks it first, in no collective; resumable --------

def copied_train_dir(corpus, tmp_path):
    shutil.copytree(os.path.join(corpus, "VoxCeleb2", "wav"), tmp_path / "wav")
    return str(tmp_path / "wav")


def test_the_index_is_built_without_a_collective(tiny_corpus, tmp_path, monkeypatch):
    def collective():
        raise AssertionError("a collective: bounded by -dist_timeout")

    monkeypatch.setattr(distributed, "barrier", collective)
    monkeypatch.setenv("RANK", "1")  # not rank 0, and the first to need the index
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_dir = copied_train_dir(tiny_corpus, tmp_path)
    keys = utils.list_utterances(train_dir)
    data = argparse.Namespace(train_keys=keys, train_dir=train_dir, labels=utils.speaker_labels(keys))
    loader, _ = train.make_loader(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path)), data,
                                  torch.device("cpu"))
    assert set(loader.dataset.index) == set(keys) and os.path.exists(train_dir + "_index.npz")


def test_a_process_waiting_for_the_index_lock_reads_what_its_holder_built(tiny_corpus, tmp_path):
    train_dir = copied_train_dir(tiny_corpus, tmp_path)
    keys = utils.list_utterances(train_dir)
    results = []
    with open(train_dir + "_index.log", "ab") as held:  # another process is building the index
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: results.append(utils.wav_index(keys, train_dir, 1, False)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()  # it waits for the lock
        built = {k: (12345, 0.5, utils._stamp(os.path.join(train_dir, k))) for k in keys}
        utils._save_index(train_dir + "_index.npz", built)  # what the holder built (marked values)
        os.remove(train_dir + "_index.log")
    waiter.join(timeout=60)
    assert results == [{k: (12345, 0.5) for k in keys}]  # read, not built again


def test_an_interrupted_index_build_continues_where_it_stopped(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "INDEX_CHUNK", 4)
    train_dir = copied_train_dir(tiny_corpus, tmp_path)
    keys = utils.list_utterances(train_dir)
    appended, append = [], runs.append_record

    class Interrupted(Exception):
        pass

    def interrupted_at_the_third_chunk(f, chunk, path):
        if len(appended) == 2:
            raise Interrupted
        appended.append(chunk)
        append(f, chunk, path)

    monkeypatch.setattr(runs, "append_record", interrupted_at_the_third_chunk)
    with pytest.raises(Interrupted):
        utils.wav_index(keys, train_dir, 1, False)
    assert [len(chunk) for chunk in runs.read_records(train_dir + "_index.log")] == [4, 4]
    monkeypatch.setattr(runs, "append_record", append)
    # file 1 is in the log: garbage of its size and time shows whether it is read again
    first = os.path.join(train_dir, keys[0])
    audio, _ = sf.read(first)
    stat = os.stat(first)
    with open(first, "r+b") as f:
        f.write(b"\0" * stat.st_size)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = utils.wav_index(keys, train_dir, 1, False)
    assert index[keys[0]] == (len(audio), float(np.abs(audio).max())) and set(index) == set(keys)
    assert not os.path.exists(train_dir + "_index.log")
