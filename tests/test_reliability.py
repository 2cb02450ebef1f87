"""Reliability: runs killed anywhere resume exactly, full disks and read-only folders, corrupt files,
bad audio, bad trial lists, bad flags, concurrent runs. Every fault is real: processes die by
SIGKILL, files are truncated or filled with garbage, writes fail with the OSError the system gives
(raised at the write by common.py's RAWNET_FAULT test hook where a real disk cannot be filled).

The kill schedules are drawn from a fixed seed (reliability_tools.DEFAULT_SEED), printed by the test
and named in its assertion messages; ``RELIABILITY_SEED=N`` replays the campaign of seed N,
``RELIABILITY_SEED=random`` draws a new seed. A kill timed in seconds (into a training step or an
evaluation, or after a delay) lands where the machine's speed puts it: two runs of one seed follow
the same schedule up to the first such kill that ends otherwise (the process done before it, say)."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import common
import evaluate_pretrained_RawNet2 as ev
import runs
import scoring
import train_RawNet2 as train
import utils
from common import DataError
from conftest import tiny_run_flags
from reliability_tools import (
    DEFAULT_SEED,
    EVALUATE,
    TRAIN,
    assert_same_run,
    best_epochs,
    campaign_seed,
    check_run_folder,
    files_under,
    load,
    replayable,
    run_forked,
    run_script,
    script_env,
    temporaries,
    text,
    wait_until,
    when_seen,
)

EPOCHS = 3
MIN_KILLS = 10


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted run (a real process). While it runs, a second training with the same -name
    is started: it must refuse (the outcome is checked by test_second_run_with_the_same_name_is_refused)."""
    save_dir = tmp_path_factory.mktemp("reference")
    flags = tiny_run_flags(tiny_corpus, save_dir, epochs=EPOCHS)
    start = time.time()
    with subprocess.Popen(
        [sys.executable, TRAIN, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(),
    ) as proc:
        lock = save_dir / "run" / runs.LOCK_NAME
        wait_until(lambda: lock.exists() or proc.poll() is not None, f"the first training to take {lock}")
        if proc.poll() is not None:
            pytest.fail(f"the first training ended before a second started: {proc.communicate()[1][-2000:]}")
        try:
            train.main(train.parse_args(flags))
            second = None
        except DataError as e:
            second = str(e)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    run = str(save_dir / "run")
    first_epoch_s = os.path.getmtime(os.path.join(run, "results", "eval_epoch0.txt")) - start
    return {
        "run": run,
        "flags": flags,
        "pid": proc.pid,
        "second": second,
        "first_epoch_s": first_epoch_s,
        "eers": text(os.path.join(run, "eers.txt")).splitlines(),
    }


def test_second_run_with_the_same_name_is_refused(reference):
    assert reference["second"] is not None, "the second run was not refused"
    assert re.fullmatch(
        rf"{re.escape(reference['run'])} is in use by pid {reference['pid']} on \S+ \(since "
        rf"[\d: -]+\), lock .*\.lock: wait for it to end, or choose another -name",
        reference["second"],
    ), reference["second"]
    assert not os.path.exists(os.path.join(reference["run"], runs.LOCK_NAME))  # released at the end


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
        return (
            f"step of epoch {completed + k} (+{delay:.2f} s)",
            None,
            when_seen(rf"epoch {completed + k}:", 1, delay),
        )
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


def test_kill_schedules_have_a_fixed_seed_unless_one_is_asked_for(monkeypatch, capsys):
    monkeypatch.delenv("RELIABILITY_SEED", raising=False)
    assert campaign_seed() == campaign_seed() == DEFAULT_SEED
    monkeypatch.setenv("RELIABILITY_SEED", "4321")
    assert campaign_seed() == 4321
    assert "kill schedule seed 4321 (replay with RELIABILITY_SEED=4321)" in capsys.readouterr().out
    monkeypatch.setenv("RELIABILITY_SEED", "random")
    assert len({campaign_seed() for _ in range(3)}) > 1  # three draws out of 10^6
    monkeypatch.setenv("RELIABILITY_SEED", "seven")
    with pytest.raises(pytest.fail.Exception, match="^RELIABILITY_SEED=seven: must be an integer"):
        campaign_seed()


def test_a_failing_kill_campaign_names_its_seed():
    with pytest.raises(AssertionError, match=r"^kill schedule seed 17 \(replay with RELIABILITY_SEED=17\): "
                                             r"only 3 kills$"):
        with replayable(17):
            raise AssertionError("only 3 kills")


def never_ends(argv):
    signal.pause()  # until the SIGKILL


def test_a_run_past_its_timeout_fails_the_test_rather_than_passing_for_a_kill():
    with pytest.raises(pytest.fail.Exception, match=r"^test_reliability.never_ends -x still running after "
                                                    r"0.2 s \(killed\)"):
        run_forked(never_ends, ["-x"], timeout=0.2)


def test_a_state_never_reached_fails_the_wait_by_name():
    with pytest.raises(pytest.fail.Exception, match=r"^waited 0.05 s for the lock, in vain$"):
        wait_until(lambda: False, "the lock", timeout=0.05)


@pytest.mark.slow
def test_training_killed_anywhere_resumes_exactly(reference, tmp_path):
    seed = campaign_seed()
    with replayable(seed):
        training_campaign(random.Random(seed), reference, tmp_path)


def training_campaign(rng, reference, tmp_path):
    """At least MIN_KILLS trainings killed at points drawn with ``rng``, each resumed; then every run
    folder ends equal to the uninterrupted ``reference``."""
    kills, log, attempts = 0, [], []

    def new_run():  # a fresh run folder, used when a run got to its end before enough kills
        folder = tmp_path / f"attempt{len(attempts)}"
        attempts.append((str(folder / "run"), [str(folder) if f == os.path.dirname(reference["run"]) else f
                                           for f in reference["flags"]]))

    new_run()
    while kills < MIN_KILLS and len(log) < 3 * MIN_KILLS:
        run, flags = attempts[-1]
        if check_run_folder(run, reference["run"]) == EPOCHS - 1:
            new_run()
            run, flags = attempts[-1]
        what, fault, kill_when = kill_point(rng, run, reference)
        resume = ["-resume"] if os.path.exists(os.path.join(run, "args.json")) else []
        code, _, err = run_forked(train.cli, flags + resume, fault=fault, kill_when=kill_when)
        log.append(f"{what}: exit {code}")
        assert code in (0, -9), f"{log}: {err[-2000:]}"
        kills += code == -9
        check_run_folder(run, reference["run"])
    assert kills >= MIN_KILLS, log
    print("\n".join(log))
    for run, flags in attempts:
        code, _, err = run_forked(train.cli, flags + ["-resume"])
        assert code == 0, f"{log}: {err[-2000:]}"
        assert not temporaries(run), log
        assert_same_run(run, reference["run"])


# --- the optimiser state sits beside its parameters ------------------------------------------------


def optimiser_devices(optimizer):
    # Adam keeps its step counter on the CPU by design; every other state tensor follows its parameter
    return {v.device.type for s in optimizer.state.values() for k, v in s.items() if k != "step"}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_loaded_optimiser_state_is_on_the_parameters_device(reference):
    # The meta device stands in for a GPU: state left on the CPU (loaded before the model moved) shows.
    run = reference["run"]
    ta = next(f for f in os.listdir(os.path.join(run, "models")) if f.startswith("TA_"))
    args = train.parse_args(
        reference["flags"]
        + [
            "-load_model",
            "-load_model_dir",
            os.path.join(run, "models", ta),
            "-load_model_opt_dir",
            os.path.join(run, "models", "best_opt_eval.pt"),
        ]
    )
    state = train.build_training(args, train.model_args(args, 6), torch.device("meta"))
    assert {p.device.type for p in state.model.parameters()} == {"meta"}
    assert optimiser_devices(state.optimizer) == {"meta"}
    state = train.build_training(
        train.parse_args(reference["flags"]), train.model_args(args, 6), torch.device("meta")
    )
    state.load(os.path.join(run, "last.pt"))  # -resume
    assert optimiser_devices(state.optimizer) == {"meta"} and state.epoch == EPOCHS - 1


# --- extraction killed anywhere -----------------------------------------------------------------


@pytest.fixture(scope="module")
def extraction(reference, tiny_corpus, tmp_path_factory):
    """A VoxCeleb1 layout with dev_wav/ (24 files) and eval_wav/ (12), the reference run's best
    weights, and an uninterrupted extraction by a real process with no trial list at hand."""
    root = tmp_path_factory.mktemp("extraction")
    db = root / "VoxCeleb1"
    shutil.copytree(os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav"), db / "eval_wav")
    shutil.copytree(os.path.join(tiny_corpus, "VoxCeleb2", "wav"), db / "dev_wav")
    models = os.path.join(reference["run"], "models")
    checkpoint = os.path.join(models, next(f for f in sorted(os.listdir(models)) if f.startswith("TA_")))

    def flags(embd_dir, *extra):
        return [
            "-extract",
            "-model_dir",
            checkpoint,
            "-DB",
            str(db),
            "-window_size",
            "1000",
            "-nb_worker",
            "0",
            "-device",
            "cpu",
            "-embd_dir",
            str(embd_dir),
            "-eer_file",
            str(root / "eers.txt"),
            "-trial_dir",
            str(root / "no_trials") + "/",
            *extra,
        ]

    code, out, err = run_script(EVALUATE, flags(root / "ref"))
    return {
        "root": root,
        "db": db,
        "checkpoint": checkpoint,
        "flags": flags,
        "ref": root / "ref",
        "keys": {s: utils.list_utterances(str(db / f"{s}_wav")) for s in ("dev", "eval")},
        "exit": code,
        "out": out,
        "err": err,
    }


def test_extraction_without_trial_lists_says_so_and_succeeds(extraction):
    assert extraction["exit"] == 0, extraction["err"][-2000:]
    assert ("note: no trial list found in " + str(extraction["root"] / "no_trials") + "/") in extraction[
        "out"
    ]
    assert "embeddings written, nothing scored" in extraction["out"]
    assert sorted(os.listdir(extraction["ref"])) == ["TTA_vox1_dev.pk", "TTA_vox1_eval.pk"]


def logged(folder, subset):
    """Utterances of ``subset`` in the partial-extraction logs of ``folder``."""
    partial = os.path.join(folder, ".partial")
    return len(ev.load_partial(partial, subset)[0]) if os.path.isdir(partial) else 0


@pytest.mark.slow
def test_extraction_killed_anywhere_resumes_without_recomputing(extraction, tmp_path):
    seed = campaign_seed()
    with replayable(seed):
        extraction_campaign(random.Random(seed), extraction, tmp_path)


def extraction_campaign(rng, extraction, tmp_path):
    """At least 8 extractions killed at points drawn with ``rng``, each resumed: every utterance
    computed about once, and the files of the uninterrupted extraction in the end."""
    total = {s: len(k) for s, k in extraction["keys"].items()}
    kills, log, attempt = 0, [], 0
    while kills < 8 and len(log) < 24:
        # one output folder per attempt: an attempt ends when a run gets to its end (exit 0)
        out, trace = tmp_path / f"embd{attempt}", tmp_path / f"trace{attempt}.txt"
        code, attempt_kills, after_end = None, 0, 0
        while kills < 8 and len(log) < 24 and code != 0:
            done = {s: logged(out, s) for s in total}
            left = [s for s in total if done[s] < total[s]]
            files = ["TTA_vox1_dev.pk", "TTA_vox1_eval.pk"] + (
                [] if (out / ".partial").is_dir() else ["fingerprint.json"]
            )
            kind = rng.choice(["record", "record", "progress", "file"]) if left else "file"
            fault, kill_when = f"{rng.choice(['kill', 'torn'])}@{rng.choice(files)}", None
            if kind == "record":
                subset = rng.choice(left)
                record = rng.randint(1, total[subset] - done[subset])
                fault = f"{rng.choice(['kill', 'torn'])}@{subset}_*.log#{record}"
            elif kind == "progress":
                delay = rng.uniform(0, 0.3)
                fault, kill_when = None, when_seen(f"TTA {left[0]}", 1, delay)
            code, _, err = run_forked(
                ev.cli, extraction["flags"](out), trace=trace, kill_when=kill_when, fault=fault
            )
            log.append(f"{fault or f'while embedding {left[0]} (+{delay:.2f} s)'}: exit {code}")
            assert code in (0, -9), f"{log}: {err[-2000:]}"
            kills += code == -9
            attempt_kills += code == -9
            if code == -9 and not (out / ".partial").exists() and all(
                    (out / f).exists() for f in ("TTA_vox1_dev.pk", "TTA_vox1_eval.pk")):
                after_end += 1  # killed after its end, its logs (partly) deleted: extracted anew
        if code != 0:
            code, _, err = run_forked(ev.cli, extraction["flags"](out), trace=trace)
            assert code == 0, f"{log}: {err[-2000:]}"
        computed = text(trace).split()[1::2]
        assert sorted(set(computed)) == sorted(extraction["keys"]["dev"] + extraction["keys"]["eval"])
        # each kill loses at most the one utterance in flight (a kill after the end: all of them)
        bound = sum(total.values()) * (1 + after_end) + attempt_kills
        assert len(computed) <= bound, log
        assert sorted(os.listdir(out)) == ["TTA_vox1_dev.pk", "TTA_vox1_eval.pk"], log
        for name in os.listdir(out):
            assert (out / name).read_bytes() == (extraction["ref"] / name).read_bytes(), name
        attempt += 1
    print("\n".join(log))
    assert kills >= 8, log


def test_extraction_killed_while_deleting_its_logs_computes_nothing_again(extraction, tmp_path,
                                                                        monkeypatch):
    out, trace = tmp_path / "embd", tmp_path / "trace.txt"
    rmtree = shutil.rmtree

    def killed_in_cleanup(path, *args, **kwargs):
        if str(path).endswith(".partial.done"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_in_cleanup)
    code, _, _ = run_forked(ev.cli, extraction["flags"](out), trace=trace)
    assert code == -9 and (out / ".partial.done").is_dir()
    monkeypatch.undo()
    code, stdout, err = run_forked(ev.cli, extraction["flags"](out), trace=trace)
    assert code == 0, err[-2000:]
    assert "already done" in stdout
    computed = text(trace).split()[1::2]
    assert sorted(computed) == sorted(extraction["keys"]["dev"] + extraction["keys"]["eval"])  # once each
    assert sorted(os.listdir(out)) == ["TTA_vox1_dev.pk", "TTA_vox1_eval.pk"]
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (extraction["ref"] / name).read_bytes(), name


def test_extraction_resumed_on_other_audio_starts_over(extraction, tmp_path):
    out, trace = tmp_path / "embd", tmp_path / "trace.txt"
    code, _, _ = run_forked(ev.cli, extraction["flags"](out), fault="kill@dev_*.log#5", trace=trace)
    assert code == -9 and logged(out, "dev") >= 4
    other = tmp_path / "VoxCeleb1"  # the same files under another -DB: the logs cannot tell them apart
    shutil.copytree(extraction["db"], other)
    code, stdout, err = run_forked(ev.cli, extraction["flags"](out, "-DB", str(other)), trace=trace)
    assert code == 0, err[-2000:]
    assert "made with another model or settings: starting over" in stdout
    every = extraction["keys"]["dev"] + extraction["keys"]["eval"]
    computed = text(trace).split()[1::2]
    assert len(computed) > len(every) and sorted(computed[-len(every):]) == sorted(every)
    for name in os.listdir(extraction["ref"]):
        assert (out / name).read_bytes() == (extraction["ref"] / name).read_bytes(), name


# --- full disks, read-only folders, a file where a folder should be -------------------------------


def one_error_line(err, *fragments):
    """stderr is exactly one ``error: ...`` line (no traceback) holding each fragment."""
    progress = r"\d+%\||\d+/\d+ \[|it/s|s/it"  # tqdm's bars, redrawn with carriage returns
    plan = r"^RawNet2 fast path \("  # the fast path's one-line plan notes
    lines = [line for line in re.split(r"[\r\n]", err)
             if line.strip() and not re.search(progress, line) and not re.match(plan, line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "fault,path,reason",
    [
        ("enospc@last.pt#2", "last.pt", "No space left on device"),
        ("eacces@eers.txt#2", "eers.txt", "Permission denied"),
        ("erofs@models/TA_*.pt", "models/TA_0_", "Read-only file system"),
        ("enospc@models/best_opt_eval.pt", "models/best_opt_eval.pt", "No space left on device"),
        ("enospc@results/eval_epoch*.txt#2", "results/eval_epoch1.txt", "No space left on device"),
        ("erofs@args.json", "args.json", "Read-only file system"),
    ],
)
@pytest.mark.slow
def test_write_failures_in_training_are_one_line_and_lose_nothing(reference, tmp_path, fault, path, reason):
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    flags[flags.index("-epoch") + 1] = "2"
    run = tmp_path / "run"
    code, _, err = run_forked(train.cli, flags, fault=fault)
    assert code == 1
    one_error_line(err, os.path.join(run, path), reason, "not written")
    assert not temporaries(run)
    if (run / "last.pt").exists():  # the epoch before stays loadable
        assert load(run / "last.pt")["epoch"] == 0
    for checkpoint in run.glob("models/*.pt"):
        load(checkpoint)
    code, _, err = run_forked(train.cli, flags + ["-resume"])
    assert code == 0, err[-2000:]
    assert (run / "eers.txt").read_text().splitlines() == reference["eers"][:2]
    assert not temporaries(run) and load(run / "last.pt")["epoch"] == 1


def test_a_file_where_the_results_folder_should_be_is_one_line(reference, tmp_path):
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results").write_text("not a folder")
    code, _, err = run_forked(train.cli, flags)
    assert code == 1
    one_error_line(err, tmp_path / "run" / "results", "not written")
    assert files_under(tmp_path / "run") == ["results"]  # no file written


def test_write_failures_in_extraction_keep_what_is_done(extraction, tmp_path):
    out, trace = tmp_path / "embd", tmp_path / "trace.txt"
    code, _, err = run_forked(ev.cli, extraction["flags"](out), fault="enospc@TTA_vox1_eval.pk", trace=trace)
    assert code == 1
    one_error_line(err, out / "TTA_vox1_eval.pk", "No space left on device")
    assert not temporaries(out) and (out / ".partial").is_dir() and not (out / "TTA_vox1_eval.pk").exists()
    os.remove(trace)
    code, _, err = run_forked(ev.cli, extraction["flags"](out), trace=trace)
    assert code == 0 and not trace.exists()  # nothing computed again
    for name in ("TTA_vox1_dev.pk", "TTA_vox1_eval.pk"):
        assert (out / name).read_bytes() == (extraction["ref"] / name).read_bytes()
    code, _, err = run_forked(ev.cli, extraction["flags"](tmp_path / "log"), fault="erofs@dev_*.log#3")
    assert code == 1
    one_error_line(err, tmp_path / "log" / ".partial" / "dev_00001.log", "Read-only file system")
    assert logged(tmp_path / "log", "dev") == 2


def test_eer_file_on_a_full_disk_is_one_line(extraction, tiny_corpus, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    trials = os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt")
    code, out, err = run_forked(
        ev.cli, ["-embd_dir", str(extraction["ref"]), "-trials", trials, "-eer_file", "/dev/full"]
    )  # a real ENOSPC on every write
    assert code == 1 and "veri_test evaluation EER: " in out
    one_error_line(err, "/dev/full", "No space left on device")


# --- corrupt and truncated files ---------------------------------------------------------------------


def truncated(path):
    data = Path(path).read_bytes()
    return data[: len(data) // 2]


CORRUPTIONS = {
    "truncated": truncated,
    "empty": lambda path: b"",
    "random bytes": lambda path: np.random.default_rng(0).bytes(5000),
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_last_pt_is_one_line_and_changes_nothing(reference, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    (run / "last.pt").write_bytes(CORRUPTIONS[how](run / "last.pt"))
    before = {f: (run / f).read_bytes() for f in files_under(run)}
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    code, _, err = run_forked(train.cli, flags + ["-resume"])
    assert code == 1
    one_error_line(err, run / "last.pt", "checkpoint to resume from is truncated or corrupt")
    assert {f: (run / f).read_bytes() for f in files_under(run)} == before


def test_resume_of_a_run_killed_at_its_first_write_starts_it(reference, tmp_path):
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    code, _, _ = run_forked(train.cli, flags, fault="kill@f_params.txt")
    assert code == -9 and not os.path.exists(tmp_path / "run" / "f_params.txt")
    code, out, err = run_forked(train.cli, flags + ["-resume"])
    assert code == 0, err[-2000:]
    assert "has no completed epoch (no last.pt) to continue: starting at epoch 0" in out
    assert_same_run(str(tmp_path / "run"), reference["run"])
    code, _, err = run_forked(train.cli, ["other" if f == "run" else f for f in flags]
                              + ["-resume"])  # a -name that never ran: one line, nothing started
    assert code == 1 and "-resume: " in err and "no completed epoch to continue from" in err


def test_a_last_pt_with_the_plans_older_releases_kept_still_resumes(reference, tmp_path):
    """Older releases kept the fast path's measured plans in last.pt ("plans"); such a file resumes,
    and the entry has no effect."""
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    run = tmp_path / "run"
    code, _, _ = run_forked(train.cli, flags, fault="kill@results/eval_epoch*.txt#2")
    assert code == -9 and load(run / "last.pt")["epoch"] == 0
    state = load(run / "last.pt")
    plan = {"front_end": "fft", "blocks": "fast", "gru": "fast"}
    state["plans"] = {"0123abcd": {"identity": {"device": "cpu"}, "plan": plan}}
    torch.save(state, run / "last.pt")
    code, _, err = run_forked(train.cli, flags + ["-resume"])
    assert code == 0, err[-2000:]
    assert_same_run(str(run), reference["run"])


@pytest.mark.parametrize("resume", [[], ["-resume"]])
def test_a_run_that_lost_its_last_pt_is_never_started_over(reference, tmp_path, resume):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    os.remove(run / "last.pt")
    before = {f: (run / f).read_bytes() for f in files_under(run)}
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    code, _, err = run_forked(train.cli, flags + resume)
    assert code == 1
    one_error_line(err, run / "last.pt", f"eers.txt lists epochs up to {EPOCHS - 1}: restore last.pt")
    assert {f: (run / f).read_bytes() for f in files_under(run)} == before


def test_last_pt_of_another_kind_or_other_flags_is_one_line(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    torch.save({"weights": torch.zeros(3)}, run / "last.pt")
    code, _, err = run_forked(train.cli, flags + ["-resume"])
    one_error_line(err, run / "last.pt", "not a last.pt of train_RawNet2.py (it lacks args, best_eer")
    shutil.copy(os.path.join(reference["run"], "last.pt"), run / "last.pt")
    other = flags + ["-resume", "-m_gru_node", "24"]
    code, _, err = run_forked(train.cli, other)
    assert code == 1
    one_error_line(err, run / "last.pt", "the model does not fit these flags", "size mismatch")


@pytest.mark.parametrize("flag", ["-load_model_dir", "-load_model_opt_dir"])
def test_corrupt_starting_point_is_one_line(reference, tmp_path, flag):
    models = os.path.join(reference["run"], "models")
    files = {
        "-load_model_dir": os.path.join(models, next(f for f in os.listdir(models) if f.startswith("TA_"))),
        "-load_model_opt_dir": os.path.join(models, "best_opt_eval.pt"),
    }
    files[flag] = str(tmp_path / "broken.pt")
    (tmp_path / "broken.pt").write_bytes(truncated(os.path.join(reference["run"], "last.pt")))
    flags = [
        str(tmp_path / "out") if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]
    ]
    code, _, err = run_forked(
        train.cli,
        flags
        + [
            "-load_model",
            "-load_model_dir",
            files["-load_model_dir"],
            "-load_model_opt_dir",
            files["-load_model_opt_dir"],
        ],
    )
    assert code == 1
    one_error_line(err, tmp_path / "broken.pt", flag, "truncated or corrupt")
    assert not (tmp_path / "out" / "run").exists()


def test_corrupt_checkpoint_and_embeddings_in_evaluation_are_one_line(extraction, tiny_corpus, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(truncated(extraction["checkpoint"]))
    code, _, err = run_forked(
        ev.cli,
        [
            "-verify",
            *[os.path.join(extraction["db"], "eval_wav", k) for k in extraction["keys"]["eval"][:2]],
            "-model_dir",
            str(broken),
            "-window_size",
            "1000",
            "-device",
            "cpu",
        ],
    )
    assert code == 1
    one_error_line(err, broken, "not a loadable PyTorch checkpoint")
    trials = os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt")
    for how, make in CORRUPTIONS.items():
        embd = tmp_path / how.replace(" ", "_")
        embd.mkdir()
        (embd / "TTA_vox1_eval.pk").write_bytes(make(extraction["ref"] / "TTA_vox1_eval.pk"))
        code, _, err = run_forked(
            ev.cli, ["-embd_dir", str(embd), "-trials", trials, "-eer_file", str(tmp_path / "e")]
        )
        assert code == 1, how
        one_error_line(err, embd / "TTA_vox1_eval.pk")
    embd = tmp_path / "npy"
    run_forked(ev.cli, extraction["flags"](embd, "-format", "npy"))
    (embd / "TTA_vox1_eval.npy").write_bytes(truncated(embd / "TTA_vox1_eval.npy"))
    code, _, err = run_forked(
        ev.cli,
        ["-embd_dir", str(embd), "-format", "npy", "-trials", trials, "-eer_file", str(tmp_path / "e")],
    )
    assert code == 1
    one_error_line(err, embd / "TTA_vox1_eval.npy")


def test_corrupt_partial_extraction_log_is_one_line(extraction, tmp_path):
    out = tmp_path / "embd"
    run_forked(ev.cli, extraction["flags"](out), fault="kill@eval_*.log#5")
    log = next((out / ".partial").glob("eval_*.log"))
    data = bytearray(log.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the first, complete record
    log.write_bytes(bytes(data))
    code, _, err = run_forked(ev.cli, extraction["flags"](out))
    assert code == 1
    one_error_line(err, log, "record 1 is corrupt", f"delete {out / '.partial'} to start the extraction over")


# --- bad audio -----------------------------------------------------------------------------------
# One table: case -> behaviour in training, in -extract, in -verify. "read": read correctly (a finite
# embedding, a finite loss); "skip": left out with a counted warning; "ignored": not an utterance;
# any other string: the run stops with one line naming the file and holding that text.

NON_ASCII = "00009_äöü_日本.wav"
AUDIO_CASES = {
    "truncated header": ("cannot read audio",) * 3,
    "zero-length file": ("cannot read audio",) * 3,
    "random bytes": ("cannot read audio",) * 3,
    "8 kHz": ("sample rate 8000 Hz, expected 16000 Hz",) * 2 + ("read",),  # -verify converts
    "44.1 kHz": ("sample rate 44100 Hz, expected 16000 Hz",) * 2 + ("read",),
    "stereo": ("2 channels, expected mono",) * 2 + ("read",),
    "24-bit PCM": ("read",) * 3,
    "float32 beyond +-1": ("read",) * 3,
    "NaN samples": ("NaN or infinite samples",) * 3,
    "inf samples": ("NaN or infinite samples",) * 3,
    "all-zero audio": ("skip", "skip", "empty or all-zero audio"),
    "shorter than one window": ("read",) * 3,
    "folder named .wav": ("ignored", "ignored", "a folder, not a regular file"),
    "FIFO": ("a FIFO, not a regular file",) * 3,
    "broken symlink": ("No such file or directory",) * 3,
    "symlink loop": ("Too many levels of symbolic links",) * 3,
    "non-ASCII file name": ("read",) * 3,
}


def tone(n=8000):
    rng = np.random.default_rng(1)
    return 0.3 * np.sin(2 * np.pi * 150 * np.arange(n) / 16000) + 0.05 * rng.standard_normal(n)


def write_audio_case(case, folder):
    """Write the file of ``case`` into ``folder``; returns its path."""
    path = os.path.join(folder, NON_ASCII if case == "non-ASCII file name" else "00009.wav")
    os.makedirs(folder, exist_ok=True)
    x = tone()
    if case == "truncated header":
        sf.write(path, x, 16000, subtype="PCM_16")
        Path(path).write_bytes(Path(path).read_bytes()[:30])
    elif case == "zero-length file":
        Path(path).write_bytes(b"")
    elif case == "random bytes":
        Path(path).write_bytes(np.random.default_rng(2).bytes(4000))
    elif case in ("8 kHz", "44.1 kHz"):
        sf.write(path, x, {"8 kHz": 8000, "44.1 kHz": 44100}[case], subtype="PCM_16")
    elif case == "stereo":
        sf.write(path, np.stack([x, x[::-1]], 1), 16000, subtype="PCM_16")
    elif case == "24-bit PCM":
        sf.write(path, x, 16000, subtype="PCM_24")
    elif case == "float32 beyond +-1":
        sf.write(path, 3 * x, 16000, subtype="FLOAT")
    elif case in ("NaN samples", "inf samples"):
        x[100] = np.nan if case == "NaN samples" else np.inf
        sf.write(path, x, 16000, subtype="FLOAT")
    elif case == "all-zero audio":
        sf.write(path, np.zeros(8000), 16000, subtype="PCM_16")
    elif case == "shorter than one window":
        sf.write(path, x[:1000], 16000, subtype="PCM_16")  # nb_samp 4000: tiled
    elif case == "folder named .wav":
        os.mkdir(path)
    elif case == "FIFO":
        os.mkfifo(path)  # a read would wait for a writer forever
    elif case == "broken symlink":
        os.symlink(path + ".missing", path)
    elif case == "symlink loop":
        os.symlink(path, path)
    else:
        sf.write(path, x, 16000, subtype="PCM_16")
    return path


def test_audio_read_correctly_equals_the_samples_written(tmp_path):
    # independent of utils' float64 path: integer / float samples as written, divided by their peak
    ints = sf.read(write_audio_case("24-bit PCM", tmp_path / "a"), dtype="int32")[0].astype(np.float64)
    np.testing.assert_allclose(
        utils.read_wav(str(tmp_path / "a" / "00009.wav")), ints / np.abs(ints).max(), atol=1e-7
    )
    floats = np.float32(3 * tone()).astype(np.float64)
    np.testing.assert_allclose(
        utils.read_wav(write_audio_case("float32 beyond +-1", tmp_path / "b")),
        floats / np.abs(floats).max(),
        atol=1e-7,
    )
    ints = sf.read(write_audio_case("non-ASCII file name", tmp_path / "c"), dtype="int16")[0].astype(
        np.float64
    )
    np.testing.assert_allclose(
        utils.read_wav(str(tmp_path / "c" / NON_ASCII)), ints / np.abs(ints).max(), atol=1e-7
    )


def audio_tree(src, dst, cases):
    """A copy of the wav tree ``src`` with each case's file in a video folder of its own."""
    shutil.copytree(src, dst)
    speaker = min(os.listdir(dst))
    os.symlink("..", os.path.join(dst, speaker, "vid00000000", "loop"))  # a folder link loop: listed once
    return {
        case: write_audio_case(case, os.path.join(dst, speaker, f"case{i:04d}"))
        for i, case in enumerate(cases)
    }


def stopping(column):
    return [c for c, behaviour in AUDIO_CASES.items() if behaviour[column] not in ("read", "skip", "ignored")]


def passing(column):
    return [c for c, behaviour in AUDIO_CASES.items() if behaviour[column] in ("read", "skip", "ignored")]


@pytest.mark.slow
def test_bad_audio_in_verify(extraction, tmp_path):
    good = os.path.join(extraction["db"], "eval_wav", extraction["keys"]["eval"][0])
    flags = ["-model_dir", extraction["checkpoint"], "-window_size", "1000", "-device", "cpu"]
    for case, (_, _, expected) in AUDIO_CASES.items():
        path = write_audio_case(case, tmp_path / case.replace(" ", "_"))
        code, out, err = run_forked(ev.cli, ["-verify", path, good, *flags], timeout=60)
        if expected == "read":
            assert code == 0, (case, err[-2000:])
            assert np.isfinite(float(re.search(r"cosine score (\S+)", out).group(1))), case
        else:
            assert code == 1, case
            one_error_line(err, path, expected)


@pytest.mark.slow
def test_bad_audio_in_extraction(extraction, tmp_path):
    for case in stopping(1):
        db = tmp_path / case.replace(" ", "_")
        path = audio_tree(extraction["db"] / "eval_wav", db / "eval_wav", [case])[case]
        code, _, err = run_forked(ev.cli, extraction["flags"](db / "embd", "-DB", str(db)), timeout=60)
        assert code == 1, case
        one_error_line(err, path, AUDIO_CASES[case][1])
    cases = passing(1)
    db = tmp_path / "passing"
    paths = audio_tree(extraction["db"] / "eval_wav", db / "eval_wav", cases)
    code, out, err = run_forked(ev.cli, extraction["flags"](db / "embd", "-DB", str(db)), timeout=60)
    assert code == 0, err[-2000:]
    embeddings = scoring.load_embeddings(str(db / "embd" / "TTA_vox1_eval.pk"))
    read = [c for c in cases if AUDIO_CASES[c][1] == "read"]
    assert len(embeddings) == len(extraction["keys"]["eval"]) + len(read)  # the looped folder listed once
    assert all(np.isfinite(v).all() for v in embeddings.values())
    ids = {common.utt_id(os.path.relpath(paths[c], db / "eval_wav")) for c in read}
    assert ids <= set(embeddings)
    assert f"warning: {sum(AUDIO_CASES[c][1] == 'skip' for c in cases)} silent/empty files" in out


@pytest.mark.slow
def test_bad_audio_in_training(reference, tiny_corpus, tmp_path):
    def corpus_with(cases, name):
        root = tmp_path / name
        os.makedirs(root)
        os.symlink(os.path.join(tiny_corpus, "VoxCeleb1"), root / "VoxCeleb1")
        return root, audio_tree(
            os.path.join(tiny_corpus, "VoxCeleb2", "wav"), root / "VoxCeleb2" / "wav", cases
        )

    for case in stopping(0):
        root, paths = corpus_with([case], case.replace(" ", "_"))
        code, _, err = run_forked(
            train.cli, tiny_run_flags(str(root), tmp_path / "out" / root.name), timeout=60
        )
        assert code == 1, case
        one_error_line(err, paths[case], AUDIO_CASES[case][0])
    root, paths = corpus_with(passing(0), "passing")
    code, _, err = run_forked(train.cli, tiny_run_flags(str(root), tmp_path / "out", epochs=1), timeout=120)
    assert code == 0, err[-2000:]
    last = load(tmp_path / "out" / "run" / "last.pt")
    read = sum(AUDIO_CASES[c][0] == "read" for c in passing(0))
    assert (
        last["step"] == (24 + read + 1) // 4
    )  # the silent file is listed, its crops taken from the next one
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert "skipping " in err and "empty or all-zero audio" in err


# --- bad trial lists -------------------------------------------------------------------------------


def clean_trials(keys):
    return [
        f"{int(a.split('/')[0] == b.split('/')[0])} {a}.wav {b}.wav"
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
    ]


def with_line(lines, lineno, text):
    return lines[: lineno - 1] + [text] + lines[lineno:]


# case -> (file bytes from the clean lines, expected): "same" (the clean list's EER), "as listed"
# (every line scored, duplicates included), or the text of the one-line error.
TRIAL_CASES = {
    "CRLF line ends": (lambda ls: "\r\n".join(ls).encode() + b"\r\n", "same"),
    "UTF-8 byte-order mark": (lambda ls: b"\xef\xbb\xbf" + "\n".join(ls).encode(), "same"),
    "tabs": (lambda ls: "\n".join(line.replace(" ", "\t") for line in ls).encode(), "same"),
    "blank lines": (lambda ls: "\n".join(["", *ls[:5], "   ", *ls[5:], "", ""]).encode(), "same"),
    "no final newline": (lambda ls: "\n".join(ls).encode(), "same"),
    ".wav on one side only": (
        lambda ls: "\n".join(line.replace(".wav ", " ", 1) for line in ls).encode(),
        "same",
    ),
    "duplicate trials": (lambda ls: "\n".join(ls + ls[:7]).encode(), "as listed"),
    "extra column": (
        lambda ls: "\n".join(with_line(ls, 3, ls[2] + " 0.5")).encode(),
        ":3: expected '<1|0> <keyA> <keyB>'",
    ),
    "label 2": (
        lambda ls: "\n".join(with_line(ls, 2, "2" + ls[1][1:])).encode(),
        ":2: expected '<1|0> <keyA> <keyB>'",
    ),
    "label 1.0": (lambda ls: "\n".join(with_line(ls, 4, "1.0" + ls[3][1:])).encode(), ":4: expected"),
    "label 'target'": (lambda ls: "\n".join(with_line(ls, 1, "target" + ls[0][1:])).encode(), ":1: expected"),
    "two columns": (lambda ls: "\n".join(with_line(ls, 5, ls[4].rsplit(" ", 1)[0])).encode(), ":5: expected"),
    "non-UTF-8 bytes": (
        lambda ls: "\n".join(ls[:5]).encode() + b"\n1\xff" + ls[5][1:].encode(),
        ":6: expected",
    ),
    "empty file": (lambda ls: b"", ": no trials"),
    "only blank lines": (lambda ls: b"\n \n\t\n", ": no trials"),
    "key without embedding": (
        lambda ls: "\n".join([*ls, "1 id19999/v/00001.wav id19999/v/00002.wav"]).encode(),
        "2 trial keys of ",
    ),
}


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    """Embeddings of 4 speakers x 3 utterances, and the clean trial list over them."""
    folder = tmp_path_factory.mktemp("trials")
    rng = np.random.default_rng(5)
    keys = [f"id1{s:04d}/vid{s:08d}/{u:05d}" for s in range(4) for u in range(3)]
    centres = rng.standard_normal((4, 8))
    embeddings = {
        k: (centres[i // 3] + 0.9 * rng.standard_normal(8)).astype(np.float32) for i, k in enumerate(keys)
    }
    scoring.save_embeddings(embeddings, str(folder / "TTA_vox1_eval.pk"))
    return folder, embeddings, clean_trials(keys)


def expected_eer(lines, embeddings):
    """Per trial: label and the original's np.dot cosine, then the original EER method."""
    labels, scores = [], []
    for line in lines:
        label, a, b = line.split()
        x, y = (
            embeddings[a.removesuffix(".wav")].astype(np.float64),
            embeddings[b.removesuffix(".wav")].astype(np.float64),
        )
        labels.append(int(label)), scores.append(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return scoring.compute_eer(np.array(labels), np.array(scores))[0]


@pytest.mark.parametrize("case", TRIAL_CASES)
def test_bad_trial_lists(scored_set, tmp_path, case):
    folder, embeddings, lines = scored_set
    make, expected = TRIAL_CASES[case]
    path = tmp_path / "list.txt"
    path.write_bytes(make(lines))
    flags = ["-embd_dir", str(folder), "-trials", str(path), "-eer_file", str(tmp_path / "eers.txt")]
    if expected in ("same", "as listed"):
        eer = run_forked(ev.cli, flags)  # (exit code and output checked below, in-process for the number)
        assert eer[0] == 0, eer[2][-2000:]
        result = ev.main(ev.parse_args(flags))["list"]["eer"]
        listed = lines + lines[:7] if expected == "as listed" else lines
        assert result == pytest.approx(expected_eer(listed, embeddings), abs=1e-12)
        if expected == "as listed":
            assert result != pytest.approx(expected_eer(lines, embeddings), abs=1e-6)  # the duplicates count
    else:
        with pytest.raises(DataError) as error:
            ev.main(ev.parse_args(flags))
        message = str(error.value)
        assert (
            "\n" not in message and expected in message and (str(path) in message or "trial keys" in message)
        )


# --- bad flags ---------------------------------------------------------------------------------------

FLAG_CASES = [  # (flags replacing the tiny run's, start of the one-line error)
    (["-bs", "0"], "-bs 0: must be at least 1"),
    (["-bs", "-4"], "-bs -4: must be at least 1"),
    (["-bs", "1000000000"], "-bs 1000000000: larger than the 24 training utterances"),
    (["-nb_samp", "10", "-m_nb_samp", "10"], "-nb_samp 10: must be from 2437"),
    (["-nb_samp", "0"], "-nb_samp 0: must be at least 1"),
    (["-nb_samp", "100000000000", "-m_nb_samp", "100000000000"], "-nb_samp 100000000000: must be from"),
    (["-m_nb_samp", "8000"], "-m_nb_samp (8000) must equal -nb_samp (4000)"),
    (["-lr", "-1"], "-lr -1.0: must be a positive number"),
    (["-lr", "0"], "-lr 0.0: must be a positive number"),
    (["-lr", "nan"], "-lr nan: must be a positive number"),
    (["-lr", "inf"], "-lr inf: must be a positive number"),
    (["-wd", "-1"], "-wd -1.0: must be a number >= 0"),
    (["-window_size", "4000"], "-window_size (4000) must be smaller than -nb_samp (4000)"),
    (["-window_size", "-1"], "-window_size -1: must not be negative"),
    (
        ["-m_filts", "[8,[8,8],[8,16]]"],
        "-m_filts [8, [8, 8], [8, 16]]: must be [sinc, [in, out], [in, out], [in, out]]",
    ),
    (["-m_filts", "[8,[8,8],[8,-16],[16,16]]"], "-m_filts [8, [8, 8], [8, -16], [16, 16]]: must be"),
    (["-m_filts", "[8,[8,8],[8,'a'],[16,16]]"], "-m_filts [8, [8, 8], [8, 'a'], [16, 16]]: must be"),
    (
        ["-m_filts", "[8,[4,4],[4,16],[16,16]]"],
        "-m_filts [8, [4, 4], [4, 16], [16, 16]]: channels must chain",
    ),
    (["-epoch", "0"], "-epoch 0: must be at least 1"),
    (["-epoch", "-3"], "-epoch -3: must be at least 1"),
    (["-nb_worker", "-1"], "-nb_worker -1: must not be negative"),
    (["-m_gru_node", "0"], "-m_gru_node 0: must be at least 1"),
    (["-m_nb_fc_node", "-1"], "-m_nb_fc_node -1: must be at least 1"),
    (["-m_first_conv", "0"], "-m_first_conv 0: must be at least 1"),
    (["-m_nb_gru_layer", "0"], "-m_nb_gru_layer 0: must be at least 1"),
    (["-m_in_channels", "2"], "-m_in_channels 2: the sinc front end takes one channel"),
    (["-dist_timeout", "0"], "-dist_timeout 0: must be at least 1"),
    (["-make_val_trial", "-nb_val_trial", "0"], "-nb_val_trial 0: must be at least 2"),
    (["-load_model"], "-load_model needs -load_model_dir"),
]


@pytest.mark.parametrize("new,message", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags_are_one_line_and_write_nothing(tiny_corpus, tmp_path, new, message):
    flags = dict(
        zip(
            tiny_run_flags(tiny_corpus, tmp_path / "out")[::2],
            tiny_run_flags(tiny_corpus, tmp_path / "out")[1::2],
        )
    )
    argv = [x for k, v in flags.items() if k not in new for x in (k, v)] + new
    with pytest.raises(DataError) as error:
        train.main(train.parse_args(argv))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_folder_flags_that_name_files(tiny_corpus, tmp_path):
    (tmp_path / "a_file").write_text("")
    for flag in ("-save_dir", "-DB", "-DB_vox2"):
        argv = tiny_run_flags(tiny_corpus, tmp_path / "out")
        argv[argv.index(flag) + 1] = str(tmp_path / "a_file")
        with pytest.raises(DataError, match=rf"^{flag} {tmp_path / 'a_file'}: is a file, not a folder$"):
            train.main(train.parse_args(argv))
    assert not (tmp_path / "out").exists()


def test_unparsable_flags_name_the_flag(capsys):
    for argv, flag in ((["-m_filts", "[8,[8,8]"], "-m_filts"), (["-bs", "four"], "-bs")):
        with pytest.raises(SystemExit) as stop:
            train.parse_args(["-name", "x", *argv])
        assert stop.value.code == 2 and f"argument {flag}/-{flag}: " in capsys.readouterr().err


# --- concurrent runs -----------------------------------------------------------------------------------


def die_holding_the_lock(argv):
    with runs.folder_lock(argv[0], "test"):
        os.kill(os.getpid(), 9)


def test_stale_lock_of_a_killed_run_is_taken_over(reference, tmp_path):
    run = tmp_path / "run"
    code, _, _ = run_forked(die_holding_the_lock, [str(run)])
    assert code == -9
    holder = json.loads(text(run / runs.LOCK_NAME))
    flags = [str(tmp_path) if f == os.path.dirname(reference["run"]) else f for f in reference["flags"]]
    flags[flags.index("-epoch") + 1] = "1"
    code, out, err = run_forked(train.cli, flags)
    assert code == 0, err[-2000:]
    assert f"note: {run / runs.LOCK_NAME}: stale lock of pid {holder['pid']} on {holder['host']}" in out
    assert not (run / runs.LOCK_NAME).exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-window_size", "-1"], "-window_size -1: must not be negative"),
        (["-bs", "0"], "-bs 0: must be at least 1"),
        (["-nb_worker", "-2"], "-nb_worker -2: must not be negative"),
        (["-asnorm_top_n", "0"], "-asnorm_top_n 0: must be at least 1"),
        (["-verify", "a.wav", "b.wav", "-threshold", "nan"], "-threshold nan: must be a finite number"),
    ],
)
def test_bad_evaluation_flags_are_one_line(tmp_path, argv, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        ev.main(ev.parse_args(["-embd_dir", str(tmp_path), *argv]))


def test_missing_embedding_folder_is_named(tmp_path):
    code, _, err = run_forked(ev.cli, ["-embd_dir", str(tmp_path / "DIR_THAT_DOES_NOT_EXIST") + "/"])
    assert code == 1
    one_error_line(
        err,
        f"{tmp_path}/DIR_THAT_DOES_NOT_EXIST/: folder not found (-embd_dir: the folder of "
        f"TTA_vox1_dev.pk and TTA_vox1_eval.pk)",
    )


# --- settings that segmentation, devices, names and resumes cannot use; outputs that would clash ------


def small_last_pt(path, window_size=1000):
    """A random tiny RawNet2 (nb_samp 4000) saved as a last.pt recording -window_size."""
    from model_RawNet2 import RawNet2

    d_args = {"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]], "nb_fc_node": 16,
              "gru_node": 16, "nb_gru_layer": 1, "nb_samp": 4000, "nb_classes": 5}
    torch.manual_seed(0)
    state = RawNet2(d_args).state_dict()
    torch.save({"model": state, "d_args": d_args, "args": {"window_size": window_size}}, path)
    return str(path)


@pytest.mark.parametrize("window_size", ["4000", "5000", "100000"])
def test_window_size_not_below_the_segment_length_is_one_line(tmp_path, window_size):
    checkpoint = small_last_pt(tmp_path / "last.pt")
    wav = str(tmp_path / "a.wav")
    sf.write(wav, tone(20000), 16000)
    message = f"-window_size {window_size}: must be from 0 to 3999, below the segment length nb_samp 4000"
    for flags in (["-verify", wav, wav], ["-extract", "-wav_list", str(tmp_path / "l.txt")]):
        (tmp_path / "l.txt").write_text(wav + "\n")
        code, _, err = run_forked(ev.cli, [*flags, "-model_dir", checkpoint, "-window_size", window_size,
                                           "-device", "cpu", "-embd", str(tmp_path / "e.pk")])
        assert code == 1
        one_error_line(err, message)
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "l.txt", "last.pt"]


def test_export_refuses_a_window_size_its_segments_cannot_use(tmp_path):
    import export_RawNet2

    checkpoint = small_last_pt(tmp_path / "last.pt")
    out = str(tmp_path / "x" / "net")
    code, _, err = run_forked(export_RawNet2.cli, ["-model_dir", checkpoint, "-out", out, "-window_size",
                                                   "4000", "-formats", "pt2"])
    assert code == 1
    one_error_line(err, "-window_size 4000: must be from 0 to 3999")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind,fault,reason", [("pt2", "enospc", "No space left on device"),
                                               ("pt2", "eacces", "Permission denied"),
                                               ("onnx", "enospc", "No space left on device")])
@pytest.mark.slow
def test_export_write_failures_are_one_line_and_leave_no_partial_file(tmp_path, kind, fault, reason):
    import export_RawNet2

    if kind == "onnx":
        pytest.importorskip("onnxscript")
    checkpoint = small_last_pt(tmp_path / "last.pt")
    out = str(tmp_path / "x" / "net")
    code, _, err = run_forked(export_RawNet2.cli, ["-model_dir", checkpoint, "-out", out, "-formats", kind,
                                                   "-check", "False"], fault=f"{fault}@net.{kind}")
    assert code == 1
    one_error_line(err, tmp_path / "x" / f"net.{kind}", reason, "not written")
    assert os.listdir(tmp_path / "x") == []


def test_export_into_a_file_where_its_folder_should_be_is_one_line(tmp_path):
    import export_RawNet2

    checkpoint = small_last_pt(tmp_path / "last.pt")
    (tmp_path / "x").write_text("a file")
    out = str(tmp_path / "x" / "net")
    code, _, err = run_forked(export_RawNet2.cli, ["-model_dir", checkpoint, "-out", out, "-formats", "pt2",
                                                   "-check", "False"])
    assert code == 1
    one_error_line(err, tmp_path / "x" / "net.pt2", "not written")


@pytest.mark.parametrize("device,message", [("gpu", "-device gpu: not a device (cpu, cuda, cuda:N)"),
                                            ("cuda:99", "-device cuda:99: "),
                                            ("cuda:-1", "-device cuda:-1: not a device")])
def test_a_device_that_cannot_run_the_network_is_one_line(tmp_path, device, message):
    wav = str(tmp_path / "a.wav")
    sf.write(wav, tone(), 16000)
    code, _, err = run_forked(ev.cli, ["-verify", wav, wav, "-model_dir", small_last_pt(tmp_path / "last.pt"),
                                       "-device", device])
    assert code == 1
    line = one_error_line(err, message)
    if device == "cuda:99":
        visible = f"CUDA GPUs are visible, cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        assert line.endswith(("no CUDA GPU is visible here (use -device cpu)", visible)), line


def test_a_truncated_wav_index_is_rebuilt_with_a_note(tiny_corpus, tmp_path, capsys):
    wav_dir = tmp_path / "wav"
    shutil.copytree(os.path.join(tiny_corpus, "VoxCeleb2", "wav"), wav_dir)
    keys = utils.list_utterances(str(wav_dir))
    index = utils.wav_index(keys, str(wav_dir), nb_worker=1, progress=False)
    cache = tmp_path / "wav_index.npz"
    cache.write_bytes(truncated(cache))
    assert utils.wav_index(keys, str(wav_dir), nb_worker=1, progress=False) == index
    assert f"note: {cache}: unreadable wav index (" in capsys.readouterr().out
    assert utils.wav_index(keys, str(wav_dir), nb_worker=1, progress=False) == index  # cached again
    assert "unreadable" not in capsys.readouterr().out
    frames = {k: len(sf.read(wav_dir / k)[0]) for k in keys}  # independent: every file read whole
    assert {k: f for k, (f, _) in index.items()} == frames


@pytest.mark.parametrize("name", ["", " ", "../escaped", "a/b", ".", ".."])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(tiny_corpus, tmp_path, name):
    argv = tiny_run_flags(tiny_corpus, tmp_path / "out")
    argv[argv.index("-name") + 1] = name
    with pytest.raises(DataError, match=rf"^-name {re.escape(name)}: must be a plain folder name"):
        train.main(train.parse_args(argv))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "escaped")


@pytest.mark.parametrize("flags,message", [
    (["-lr", "0.1"], "-lr 0.1: this run was trained with -lr 0.001, which -resume restores from "),
    (["-optimizer", "SGD"], "-optimizer SGD: this run was trained with -optimizer Adam"),
    (["-do_lr_decay", "False"], "-do_lr_decay False: this run was trained with -do_lr_decay True"),
    (["-wd", "0"], "-wd 0.0: this run was trained with -wd 0.0001"),
])
def test_resume_with_a_flag_that_last_pt_restores_is_one_line(tiny_corpus, tmp_path, flags, message):
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    recorded = vars(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path / "out")))
    torch.save({"model": {}, "args": recorded}, run / "last.pt")
    args = train.parse_args(tiny_run_flags(tiny_corpus, tmp_path / "out") + ["-resume", *flags])
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        train.decide_resume(args, str(run))
    same = train.parse_args(tiny_run_flags(tiny_corpus, tmp_path / "out") + ["-resume"])
    assert train.decide_resume(same, str(run)) is True


def test_two_trial_lists_of_one_file_name_write_two_score_files(scored_set, tmp_path):
    folder, embeddings, lines = scored_set
    for sub, part in (("a", lines[:20]), ("b", lines[20:])):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "trials.txt").write_text("\n".join(part) + "\n")
    flags = ["-embd_dir", str(folder), "-eer_file", str(tmp_path / "eers.txt"), "-score_dir",
             str(tmp_path / "S"), "-trials", *(str(tmp_path / sub / "trials.txt") for sub in "ab")]
    results = ev.main(ev.parse_args(flags))
    assert sorted(os.listdir(tmp_path / "S")) == ["a_trials.txt", "b_trials.txt"]
    assert results["a/trials"]["eer"] == pytest.approx(expected_eer(lines[:20], embeddings), abs=1e-12)
    assert results["b/trials"]["eer"] == pytest.approx(expected_eer(lines[20:], embeddings), abs=1e-12)
    assert len((tmp_path / "S" / "b_trials.txt").read_text().splitlines()) == len(lines) - 20
    twice = re.escape(str(tmp_path / "a" / "trials.txt"))
    with pytest.raises(DataError, match=f"^-trials: {twice} is given twice$"):
        ev.main(ev.parse_args(flags + [str(tmp_path / "a" / "trials.txt")]))


def test_a_list_whose_scores_would_overwrite_the_asnorm_scores_of_another_is_refused(scored_set, tmp_path):
    folder, _, lines = scored_set
    for name in ("t.txt", "t_asnorm.txt"):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    flags = ["-embd_dir", str(folder), "-score_dir", str(tmp_path / "S"), "-asnorm", "-cohort",
             str(folder / "TTA_vox1_eval.pk"), "-trials", str(tmp_path / "t.txt"),
             str(tmp_path / "t_asnorm.txt")]
    with pytest.raises(DataError, match="^-trials: two lists would write the same output file t_asnorm"):
        ev.main(ev.parse_args(flags))
    assert not (tmp_path / "S").exists()
