"""Basics shared by every script that need no PyTorch: the error type and its one-line message, the
original's single-dash flags, the two forms of utterance keys, and atomic file writes.

They live apart from utils.py so that scoring (scoring.py, evaluate_pretrained_RawNet2.py without
-extract) starts without importing PyTorch.
"""

import argparse
import json
import os
import pickle
import re
import tempfile

import numpy as np


class DataError(Exception):
    """Bad or missing input data; the message is one line naming the file, key or flag."""


def error_line(error):
    """``error: <message>`` in one line. Errors raised in DataLoader workers arrive wrapped with the
    worker's traceback: keep its last line, without the exception's class name."""
    return "error: " + re.sub(r"^[\w.]*Error: ", "", str(error).strip().splitlines()[-1])


def str2bool(v):
    """argparse type of the original's boolean flags: ``-mg False``, ``-mg true``, or bare ``-mg``."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


BOOL_FLAG = {"type": str2bool, "nargs": "?", "const": True}  # add(name, default=..., **BOOL_FLAG)


def arg_group(parser, title):
    """``add(name, **kw)`` for an argparse group: each flag as ``-name`` (the original's single dash)
    and ``--name``."""
    group = parser.add_argument_group(title)
    return lambda name, **kw: group.add_argument(f"-{name}", f"--{name}", **kw)


def speaker_of(key):
    return key.split("/")[0]


def utt_id(key):
    """Canonical utterance id: the key without ``.wav`` (the pickled embeddings' form)."""
    return key.removesuffix(".wav")


# ---------------------------------------------------------------------------------------------
# Atomic writes

def write_atomic(path, write):
    """Write ``path`` through ``write(binary file)``: a temporary file in the same folder, synced, then
    renamed over ``path``, so that a reader never sees a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text, path):
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(obj, path):
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_pickle_atomic(obj, path):
    write_atomic(path, lambda f: pickle.dump(obj, f, protocol=4))


def write_npy_atomic(array, path):
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


