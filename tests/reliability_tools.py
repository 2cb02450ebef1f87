"""Tools of tests/test_reliability.py: scripts run as real processes (killed with SIGKILL at chosen
moments), faults injected through common.py's RAWNET_FAULT hook, comparisons of run folders, and the
seed of the kill schedules."""

import contextlib
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch._dynamo  # (torch.optim imports it on first use: once here, not in every forked run)

import common
import runs
from conftest import ROOT

TRAIN = os.path.join(ROOT, "train_RawNet2.py")
EVALUATE = os.path.join(ROOT, "evaluate_pretrained_RawNet2.py")

SEED_ENV = "RELIABILITY_SEED"
DEFAULT_SEED = 0  # the kill schedules of a plain test run: the same draws every time


def campaign_seed():
    """The seed of a kill schedule: DEFAULT_SEED, or ``RELIABILITY_SEED=N`` (replays the campaign of
    seed N), or ``RELIABILITY_SEED=random`` (a new seed each time). Printed with how to replay it."""
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        seed = DEFAULT_SEED
    elif value == "random":
        seed = random.SystemRandom().randrange(10**6)
    elif re.fullmatch(r"-?\d+", value):
        seed = int(value)
    else:
        pytest.fail(f"{SEED_ENV}={value}: must be an integer (a seed) or 'random'", pytrace=False)
    print(f"kill schedule seed {seed} (replay with {SEED_ENV}={seed})")
    return seed


@contextlib.contextmanager
def replayable(seed):
    """An assertion that fails inside names ``seed`` and how to replay its kill schedule."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"kill schedule seed {seed} (replay with {SEED_ENV}={seed}): {e}") from e


def script_env(fault=None, trace=None):
    """One thread (the same float reductions in every process), and the test hooks."""
    env = {k: v for k, v in os.environ.items() if k not in (common.FAULT_ENV, common.TRACE_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[common.FAULT_ENV] = fault
    if trace:
        env[common.TRACE_ENV] = str(trace)
    return env


def wait_until(condition, what, timeout=120):
    """Poll ``condition()`` until it is true (a state another process reaches); fail, saying ``what``
    was awaited, if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}, in vain", pytrace=False)
        time.sleep(0.01)  # the poll interval


def timed_out(command, timeout, err):
    """Fail for a process that was still running after ``timeout`` seconds (and has been killed)."""
    pytest.fail(f"{command} still running after {timeout} s (killed); its stderr ends: {err[-2000:]}",
                pytrace=False)


def run_script(script, flags, fault=None, trace=None, timeout=240):
    """Run ``script`` with ``flags``; the test fails if it runs longer than ``timeout`` seconds.
    Returns (returncode, stdout, stderr); -9 when it was killed (by the RAWNET_FAULT hook)."""
    with subprocess.Popen(
        [sys.executable, script, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(fault, trace),
        cwd=ROOT,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            timed_out(os.path.basename(script), timeout, proc.communicate()[1])
    return proc.returncode, out, err


def run_forked(cli, argv, fault=None, trace=None, kill_when=None, timeout=240):
    """Run a script's command-line entry ``cli(argv)`` in a forked child of this process: the script's
    code in a process of its own, without the seconds a fresh interpreter spends importing torch.
    The child is SIGKILLed as soon as ``kill_when(stderr so far, seconds since start)`` is true; the
    test fails if it runs longer than ``timeout`` seconds. Returns (exit code, -9 when killed; stdout;
    stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        out_path, err_path = os.path.join(folder, "out"), os.path.join(folder, "err")
        for path in (out_path, err_path):
            open(path, "w").close()
        sys.stdout.flush(), sys.stderr.flush()
        # Garbage of earlier tests (an onnxruntime session, say) is destroyed here, where its threads
        # exist; in the child, whose copy of it has no threads, its destructor would wait forever.
        gc.collect()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the test
            gc.freeze()  # nor does the child's collector destroy anything it inherited
            code = 70
            try:
                for name, value in ((common.FAULT_ENV, fault), (common.TRACE_ENV, trace)):
                    os.environ.pop(name, None)
                    if value:
                        os.environ[name] = str(value)
                common._fault_counts.clear()
                torch.set_num_threads(1)
                warnings.resetwarnings()  # as a fresh interpreter: printed to stderr, not recorded by pytest
                warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
                    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
                )
                sys.stdout = open(out_path, "a", buffering=1)  # noqa: SIM115 (the child's, until os._exit)
                sys.stderr = open(err_path, "a", buffering=1)  # noqa: SIM115
                os.dup2(sys.stdout.fileno(), 1), os.dup2(sys.stderr.fileno(), 2)
                try:
                    cli(argv)
                    code = 0
                except SystemExit as e:
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
                except BaseException:  # noqa: BLE001 (the child reports anything, then exits)
                    traceback.print_exc()
                sys.stdout.flush(), sys.stderr.flush()
            finally:
                os._exit(code)
        start = time.monotonic()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            elapsed = time.monotonic() - start
            if elapsed > timeout or (kill_when is not None and kill_when(text(err_path), elapsed)):
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                if elapsed > timeout:
                    timed_out(f"{cli.__module__}.{cli.__name__} {' '.join(map(str, argv))}", timeout,
                              text(err_path))
                break
            time.sleep(0.005)  # the poll interval of the child's exit and of kill_when
        return os.waitstatus_to_exitcode(status), text(out_path), text(err_path)


def when_seen(pattern, count=1, delay=0.0):
    """A ``kill_when`` of ``run_forked``: ``delay`` seconds after ``pattern`` (a regular expression)
    has appeared ``count`` times in the child's stderr (e.g. the progress bar of a training epoch)."""
    seen_at = []

    def kill_when(err, elapsed):
        if not seen_at and len(re.findall(pattern, err)) >= count:
            seen_at.append(elapsed)
        return bool(seen_at) and elapsed >= seen_at[0] + delay

    return kill_when


def text(path):
    with open(path) as f:
        return f.read()


def files_under(folder):
    """Relative paths of every file under ``folder``, sorted."""
    return sorted(
        os.path.relpath(os.path.join(path, name), folder)
        for path, _, names in os.walk(folder)
        for name in names
    )


def temporaries(folder):
    return [f for f in files_under(folder) if os.path.basename(f).startswith(common.TMP_PREFIX)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where):
    """Equal nested containers with bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def best_epochs(eers_lines):
    """Epochs that set a new best EER (each wrote models/TA_{E}_{eer}.pt)."""
    best, epochs = float("inf"), []
    for line in eers_lines:
        epoch, eer = int(line.split(",")[0][6:]), float(line.split(":")[-1])
        if eer < best:
            best, epochs = eer, [*epochs, epoch]
    return epochs


def without_save_dir(text):
    """f_params.txt without the lines that differ between runs of one recipe (folder, -resume)."""
    return [line for line in text.splitlines() if not line.startswith(("save_dir:", "resume:"))]


def check_run_folder(run, ref):
    """Every file of the run folder ``run`` (a run of the same flags as ``ref``, interrupted) is a
    complete version of what the uninterrupted ``ref`` wrote at some epoch; temporary files and a
    dead process's lock are allowed. Returns the last completed epoch (-1 for none)."""
    ref_eers = text(os.path.join(ref, "eers.txt")).splitlines()
    completed = -1
    for rel in files_under(run):
        path, name = os.path.join(run, rel), os.path.basename(rel)
        if name.startswith(common.TMP_PREFIX) or rel == runs.LOCK_NAME:
            continue
        if rel == "eers.txt":
            lines = text(path).splitlines()
            assert lines == ref_eers[: len(lines)], rel
        elif rel.startswith(("results" + os.sep, os.path.join("models", "TA_"))):
            assert os.path.exists(os.path.join(ref, rel)), f"{rel}: a file the uninterrupted run never wrote"
            if rel.endswith(".txt"):
                assert text(path) == text(os.path.join(ref, rel)), rel
            else:
                assert_same(load(path), load(os.path.join(ref, rel)), rel)
        elif rel == os.path.join("models", "best_opt_eval.pt"):
            assert set(load(path)) == {"state", "param_groups"}, rel
        elif rel == "last.pt":
            state = load(path)
            completed = state["epoch"]
            ta = [f for f in os.listdir(os.path.join(ref, "models")) if f.startswith(f"TA_{completed}_")]
            if ta:  # that epoch's weights are known from the uninterrupted run
                assert_same(state["model"], load(os.path.join(ref, "models", ta[0])), rel)
        elif rel == "args.json":
            assert json.loads(text(path))["d_args"], rel
        elif rel == "f_params.txt":
            assert without_save_dir(text(path)) == without_save_dir(text(os.path.join(ref, rel)))
        else:
            raise AssertionError(f"{rel}: unexpected file in the run folder")
    return completed


def assert_same_run(run, ref):
    """The finished run equals the uninterrupted one: same files, bit-identical weights and optimiser
    state, no temporary file, no lock."""
    assert files_under(run) == files_under(ref)
    for rel in files_under(ref):
        if rel.endswith(".txt"):
            a, b = (text(os.path.join(folder, rel)) for folder in (run, ref))
            assert (without_save_dir(a) == without_save_dir(b)) if rel == "f_params.txt" else a == b, rel
    for rel in [f for f in files_under(ref) if f.endswith(".pt")]:
        a, b = load(os.path.join(run, rel)), load(os.path.join(ref, rel))
        if rel == "last.pt":
            a, b = (
                {
                    k: v
                    for k, v in s.items()
                    if k in ("model", "optimizer", "scheduler", "epoch", "step", "best_eer", "rng")
                }
                for s in (a, b)
            )
        assert_same(a, b, rel)
