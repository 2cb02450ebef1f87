"""What a run leaves on disk and reads back: ``torch.save`` atomically, record logs (extraction
progress that survives a kill), checked ``torch.load`` of checkpoints, and folder locks. Apart from
utils.py's data loading, since training, extraction and export all use them.
"""

import contextlib
import fcntl
import io
import json
import os
import pickle
import signal
import socket
import time
import zipfile

import torch

import model_RawNet2
from common import DataError, output_error, planned_fault, write_atomic, write_faulty
from scoring import RestrictedUnpickler


def save_atomic(obj, path):
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    write_atomic(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# Record logs (per-utterance extraction progress)

def append_record(f, obj, path):
    """Append ``obj`` to the record log ``f`` (a binary file opened for appending on ``path``): one
    length-prefixed pickle, flushed to the operating system, so a killed process loses at most the
    record it was writing (``read_records`` leaves a torn last record out)."""
    data = pickle.dumps(obj, protocol=4)
    record = len(data).to_bytes(8, "little") + data
    fault = planned_fault(path)
    try:
        if fault is None:
            f.write(record)
        else:
            write_faulty(f, record, fault, path)
        f.flush()
        if fault == "kill":  # test hook: killed right after a complete record
            os.kill(os.getpid(), signal.SIGKILL)
    except OSError as e:
        raise output_error(path, e, "the records before this one are kept") from None


def read_records(path):
    """The complete records of a log written by ``append_record``, each unpickled with
    ``RestrictedUnpickler``; a torn last record (its writer was killed) is left out."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos + 8 <= len(data):
        end = pos + 8 + int.from_bytes(data[pos:pos + 8], "little")
        if end > len(data):
            break
        try:
            records.append(RestrictedUnpickler(io.BytesIO(data[pos + 8:end])).load())
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError) as e:
            raise DataError(f"{path}: record {len(records) + 1} is corrupt "
                            f"({type(e).__name__}: {e})") from None
        pos = end
    return records


# ---------------------------------------------------------------------------------------------
# Checkpoints and locks

def non_finite_tensors(obj, where=""):
    """Names (key paths from ``where``) of the floating-point tensors holding NaN or inf in ``obj``,
    a tensor or nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [where] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [name for key, value in items
            for name in non_finite_tensors(value, f"{where}.{key}" if where else str(key))]


def load_torch_file(path, what, mmap=False):
    """``torch.load(path, weights_only=True)`` onto the CPU. A missing, truncated or corrupt file, one
    holding objects other than tensors and plain containers, or (unless ``mmap``: tensors left on
    disk, for reading a few entries) one with NaN or infinite tensors, is a DataError naming the file
    and ``what`` it was read for."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    corrupt = f"{path}: {what} is truncated or corrupt, not a loadable PyTorch checkpoint"
    if mmap and not zipfile.is_zipfile(path):  # (torch.load would only say that it cannot map it)
        raise DataError(f"{corrupt} (not a PyTorch archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):  # a complete torch.save archive, of other objects
            raise DataError(f"{path}: {what} holds objects other than tensors and plain containers "
                            f"(torch.load with weights_only=True refused it)") from None
        raise DataError(f"{corrupt} (not a PyTorch archive)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{corrupt} ({reason})") from None
    bad = [] if mmap else non_finite_tensors(obj)
    if bad:
        raise DataError(f"{path}: {what} holds NaN or infinite values in {len(bad)} tensors "
                        f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
    return obj


def load_network(path, what, d_args=None):
    """The RawNet2 of a checkpoint file, in eval mode: the released weights, a TA_*.pt state_dict or
    a last.pt of train_RawNet2.py (``load_torch_file``, then ``model_RawNet2.model_from_checkpoint``
    with ``d_args``). A file that holds no RawNet2 is a DataError naming it."""
    obj = load_torch_file(path, what)
    try:
        return model_RawNet2.model_from_checkpoint(obj, path, d_args)
    except ValueError as e:  # (its messages name the file and what does not fit)
        raise DataError(str(e)) from None


def load_into(module, state, path, what):
    """``module.load_state_dict(state)``; a state of another layout is one line naming ``path``."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())  # load_state_dict lists every mismatch on lines of its own
        reason = reason if len(reason) <= 200 else reason[:200] + " ..."
        raise DataError(f"{path}: the {what} does not fit these flags ({reason}); "
                        f"use the model flags it was trained with (its run's args.json)") from None


LOCK_NAME = ".lock"
# How often, 0.2 s apart, a lock whose holder has died is tried again while its children exit (30 s)
LOCK_RETRIES = 150


def _lock_holder(fd):
    """The holder recorded in an open lock file (dict pid, host, since), or None if it names none."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode())
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "since"} <= set(holder) else None


def _holder_gone(holder):
    """Whether the recorded holder is known to be dead (a pid of this host that no longer runs)."""
    if holder is None or holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def folder_lock(folder, hint):
    """Hold ``<folder>/.lock`` while the block runs, so that a second process refuses to write into
    the same folder. The lock is an advisory ``flock``: the kernel releases it when its holder dies,
    so a lock file left by a killed process (or by the dead attempt of a restarted torchrun job) is
    stale and taken over with a note. The file names its holder (pid, host, start time) for the
    refusal, which ends with ``hint``. A folder made for the lock and left empty is removed again."""
    path = os.path.join(folder, LOCK_NAME)
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise output_error(path, e, "nothing was written") from None
    retries = LOCK_RETRIES
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if _holder_gone(holder) and retries > 0:
                retries -= 1
                time.sleep(0.2)  # the holder is dead; its child processes are still exiting
                continue
            who = (f"pid {holder['pid']} on {holder['host']} (since {holder['since']})" if holder
                   else "another process")
            raise DataError(f"{folder} is in use by {who}, lock {path}: {hint}") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    previous = _lock_holder(fd)
    if previous is not None:
        print(f"note: {path}: stale lock of pid {previous['pid']} on {previous['host']} (no longer "
              f"running) taken over")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    try:
        yield
    finally:
        os.remove(path)  # removed while still held: a waiting process then opens a new file
        os.close(fd)
        if created and not os.listdir(folder):
            os.rmdir(folder)
