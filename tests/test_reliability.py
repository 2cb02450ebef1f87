"""Reliability: runs killed anywhere resume exactly, full disks and read-only folders, corrupt files,
bad audio, bad trial lists, bad flags, concurrent runs. Every fault is real: processes die by
SIGKILL, files are truncated or filled with garbage, writes fail with the OSError the system gives
(raised at the write by utils' RAWNET_FAULT test hook where a real disk cannot be filled).

The kill schedules are drawn from a seed printed by the test (and in its assertion messages);
``RELIABILITY_SEED=N`` replays one."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate_pretrained_RawNet2 as ev
import train_RawNet2 as train
import utils
from conftest import tiny_run_flags
from reliability_tools import (EVALUATE, TRAIN, assert_same, assert_same_run, best_epochs, check_run_folder,
                               files_under, load, run_forked, run_script, script_env, temporaries,
                               when_seen)
from utils import DataError

EPOCHS = 3
MIN_KILLS = 10


def seed_of_this_run():
    seed = int(os.environ.get("RELIABILITY_SEED", random.SystemRandom().randrange(10 ** 6)))
    print(f"kill schedule seed {seed} (replay with RELIABILITY_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted run (a real process). While it runs, a second training with the same -name
    is started: it must refuse (the outcome is checked by test_second_run_with_the_same_name_is_refused)."""
    save_dir = tmp_path_factory.mktemp("reference")
    flags = tiny_run_flags(tiny_corpus, save_dir, epochs=EPOCHS)
    start = time.time()
    with subprocess.Popen([sys.executable, TRAIN, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=script_env()) as proc:
        lock = save_dir / "run" / utils.LOCK_NAME
        while not lock.exists() and proc.poll() is None:
            time.sleep(0.05)
        try:
            train.main(train.parse_args(flags))
            second = None
        except DataError as e:
            second = str(e)
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    run = str(save_dir / "run")
    first_epoch_s = os.path.getmtime(os.path.join(run, "results", "eval_epoch0.txt")) - start
    return {"run": run, "flags": flags, "pid": proc.pid, "second": second, "first_epoch_s": first_epoch_s,
            "eers": open(os.path.join(run, "eers.txt")).read().splitlines()}


def test_second_run_with_the_same_name_is_refused(reference):
    assert reference["second"] is not None, "the second run was not refused"
    assert re.fullmatch(rf"{re.escape(reference['run'])} is in use by pid {reference['pid']} on \S+ \(since "
                        rf"[\d: -]+\), lock .*\.lock: wait for it to end, or choose another -name",
                        reference["second"]), reference["second"]
    assert not os.path.exists(os.path.join(reference["run"], utils.LOCK_NAME))  # released at the end


def kill_point(rng, run, ref):
    """A kill point that this process will reach: inside a training step or the evaluation of an
    epoch it runs, after a random time, or inside one of the writes it will make (before the rename,
    or with half of the bytes written). Returns (description, RAWNET_FAULT, kill_when)."""
    completed = check_run_folder(run, ref["run"])
    remaining = EPOCHS - 1 - completed
    k = rng.randint(1, remaining)
    kind = rng.choice(["step", "evaluation", "time", "write", "write"])
    if kind == "step":
        delay = rng.uniform(0, 0.3)
        return f"step of epoch {completed + k} (+{delay:.2f} s)", None, when_seen(rf"epoch {completed + k}:", 1, delay)
    if kind == "evaluation":
        delay = rng.uniform(0, 0.05)
        return f"evaluation of epoch {completed + k} (+{delay:.2f} s)", None, when_seen("TTA eval", k, delay)
    if kind == "time":
        delay = rng.uniform(0, 2.0)
        return f"after {delay:.2f} s", None, lambda err, elapsed: elapsed >= delay
    writes = [f"results/eval_epoch*.txt#{k}", f"eers.txt#{k}", f"last.pt#{k}", "args.json"]
    best_left = [e for e in best_epochs(ref["eers"]) if e > completed]
    if best_left:
        n = rng.randint(1, len(best_left))
        writes += [f"models/TA_*.pt#{n}", f"models/best_opt_eval.pt#{n}"]
    if completed < 0:
        writes.append("f_params.txt")
    fault = f"{rng.choice(['kill', 'torn'])}@{rng.choice(writes)}"
    return fault, fault, None


def test_training_killed_anywhere_resumes_exactly(reference, tmp_path):
    seed = seed_of_this_run()
    rng = random.Random(seed)
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    run = str(tmp_path / "run")
    kills, log = 0, []
    while kills < MIN_KILLS and len(log) < 3 * MIN_KILLS:
        what, fault, kill_when = kill_point(rng, run, reference)
        resume = ["-resume"] if os.path.exists(os.path.join(run, "args.json")) else []
        code, _, err = run_forked(train.cli, flags + resume, fault=fault, kill_when=kill_when)
        log.append(f"{what}: exit {code}")
        assert code in (0, -9), f"seed {seed}, {log}: {err[-2000:]}"
        kills += code == -9
        check_run_folder(run, reference["run"])
    assert kills >= MIN_KILLS, f"seed {seed}: {log}"
    print("\n".join(log))
    code, _, err = run_forked(train.cli, flags + ["-resume"])
    assert code == 0, f"seed {seed}, {log}: {err[-2000:]}"
    assert not temporaries(run), f"seed {seed}, {log}"
    assert_same_run(run, reference["run"])
