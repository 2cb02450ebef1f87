"""Basics shared by every script that need no PyTorch: the error type and its one-line message, the
original's single-dash flags, the two forms of utterance keys, and atomic file writes.

They live apart from utils.py so that scoring (scoring.py, evaluate_pretrained_RawNet2.py without
-extract) starts without importing PyTorch.
"""

import argparse
import ast
import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import pickle
import platform
import re
import signal
import sys
import tempfile

import numpy as np


class DataError(Exception):
    """Bad or missing input data; the message is one line naming the file, key or flag."""


class TrainingError(DataError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line naming where."""


def error_line(error):
    """``error: <message>`` in one line. Errors raised in DataLoader workers arrive wrapped with the
    worker's traceback: keep its last line, without the exception's class name."""
    return "error: " + re.sub(r"^[\w.]*Error: ", "", str(error).strip().splitlines()[-1])


def run_cli(main, interrupted="interrupted", say=sys.exit):
    """Run a script's ``main()`` and return what it returns. A user's mistake, a ``DataError`` (an
    ``OutputError`` or ``TrainingError`` included) or an OSError naming its file (a permission, a full
    disk, a folder given as a file), ends in one ``error: ...`` line passed to ``say`` (by default
    ``sys.exit``: the line on stderr, exit 1); Ctrl-C exits with the ``interrupted`` line. Anything
    else is a bug and keeps its traceback."""
    try:
        return main()
    except DataError as e:
        say(error_line(e))
    except OSError as e:
        if e.filename is None:
            raise
        say(f"error: {e.filename}: {e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit(interrupted)


def str2bool(v):
    """argparse type of the original's boolean flags: ``-mg False``, ``-mg true``, or bare ``-mg``."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def literal_list(v):
    """argparse type of a list flag such as ``-m_filts [128,[128,128],[128,256],[256,256]]`` (the
    original used type=list, which splits the string into characters)."""
    try:
        value = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected a Python list literal, got {v!r}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a list, got {v!r}")
    return value


BOOL_FLAG = {"type": str2bool, "nargs": "?", "const": True}  # add(name, default=..., **BOOL_FLAG)


# The implementations of each stage of the network that -fast can name (fast_RawNet2.IMPLEMENTATIONS
# holds them; a test keeps the two in step).
FAST_CHOICES = {"front_end": ("reference", "fast", "fft", "fold"), "blocks": ("reference", "fast"),
                "gru": ("reference", "fast")}


def parse_fast(value):
    """The ``-fast`` flag: True (each stage as fast_RawNet2's fixed rule picks), False (the plain
    network of model_RawNet2.py), or overrides of the rule as ``stage=name`` pairs
    ("front_end=fft,blocks=reference") -> {stage: name}. "auto" is read as True."""
    if isinstance(value, (bool, dict)):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "t", "y", "on", "auto"):
        return True
    if text in ("false", "no", "0", "f", "n", "off"):
        return False
    overrides = {}
    for part in text.split(","):
        stage, _, name = (p.strip() for p in part.partition("="))
        stage = stage.replace("-", "_")
        if name not in FAST_CHOICES.get(stage, ()):
            choices = "; ".join(f"{s}={'|'.join(names)}" for s, names in FAST_CHOICES.items())
            raise argparse.ArgumentTypeError(
                f"expected True, False or stage=name pairs ({choices}), got {part!r}")
        overrides[stage] = name
    return overrides


# add("m_first_conv", **CHECKPOINT_SINC_FLAG): for the scripts that load a checkpoint
CHECKPOINT_SINC_FLAG = {"type": int, "default": None,
                        "help": "sinc filter length the checkpoint was trained with (default: what a last.pt "
                                "records, else 251; a plain state_dict does not store it)"}


# Flags of the same meaning in several scripts, each defined once: add(name, **FLAG). A script whose
# flag of the same name means something else (another default on purpose, another kind of worker)
# defines its own beside a comment saying why.

# add("model_dir", **MODEL_DIR_FLAG): evaluate_pretrained_RawNet2.py, export_RawNet2.py
MODEL_DIR_FLAG = {"type": str, "default": "Pre-trained_model/rawnet2_best_weights.pt",
                  "help": "checkpoint: the released weights, a TA_*.pt state_dict or a last.pt of "
                          "train_RawNet2.py"}

# add("window_size", **CHECKPOINT_WINDOW_FLAG): for the scripts that load a checkpoint
CHECKPOINT_WINDOW_FLAG = {"type": int, "default": None,
                          "help": "overlap in samples between consecutive TTA segments (default: the value "
                                  "a last.pt of train_RawNet2.py or an ONNX export records, else 11810)"}

# add("name", **RUN_NAME_FLAG), add("save_dir", **SAVE_DIR_FLAG), add("resume", **RESUME_FLAG): the
# training scripts
RUN_NAME_FLAG = {"type": str, "required": True,
                 "help": "experiment name: outputs go to <save_dir>/<name>/"}
SAVE_DIR_FLAG = {"type": str, "default": "DNNs/", "help": "folder holding experiment folders"}
RESUME_FLAG = {"action": "store_true",
               "help": "continue <save_dir>/<name>/ from its last completed epoch (last.pt)"}

# add("progress", **PROGRESS_FLAG)
PROGRESS_FLAG = {**BOOL_FLAG, "default": True, "help": "show progress bars"}

# add("strict", **STRICT_FLAG): the scripts that read many audio files of a user's collection
STRICT_FLAG = {**BOOL_FLAG, "default": False,
               "help": "stop at the first audio file that cannot be used (default: skip it, count it and "
                       "list it with its reason)"}

# add("amsgrad", **AMSGRAD_FLAG): the training scripts
AMSGRAD_FLAG = {**BOOL_FLAG, "default": True, "help": "AMSGrad variant of Adam"}

# add("eval_wav", **EVAL_WAV_FLAG): the VoxCeleb1 test utterances
EVAL_WAV_FLAG = {"type": str, "default": "eval_wav/", "help": "test utterances (Vox1-O), inside -DB"}


# add("fast", **FAST_FLAG): a bare -fast means True
FAST_FLAG = {"type": parse_fast, "nargs": "?", "const": True, "default": True,
             "help": "fast path of fast_RawNet2.py, the same math in another order: True runs each stage "
                     "(front end, residual blocks, GRU) as its fixed rule picks from the device, CPU class, "
                     "shapes and dtype (one line per plan says which); False the plain network of "
                     "model_RawNet2.py; stage=name pairs override the rule, e.g. "
                     "front_end=fft,blocks=reference (front_end: reference|fast|fft|fold; blocks, gru: "
                     "reference|fast)"}


def arg_group(parser, title):
    """``add(name, **kw)`` for an argparse group: each flag as ``-name`` (the original's single dash)
    and ``--name``, its ``--help`` line ending in its default unless it has none to show (None, an
    empty string, a required flag) or its help text says it already."""
    group = parser.add_argument_group(title)

    def add(name, **kw):
        text = kw.get("help")
        if text and kw.get("default") not in (None, "") and not kw.get("required") and "default" not in text:
            kw["help"] = text + " (default: %(default)s)"
        return group.add_argument(f"-{name}", f"--{name}", **kw)

    return add


def usable_cores():
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory():
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves each allocation of 32 MiB or more (a full-rate front-end map, a block's
    activations) with its own mmap and unmaps it when freed, so every training step or forward
    touches fresh pages again: a page fault per 4 KiB, a large share of a CPU training step
    (bench/train_step.py measures the step with glibc's malloc as is). With mmap off and the heap
    never trimmed, the second step reuses the pages of the first; the price is that the process keeps
    its peak heap. Does nothing except on glibc, or where ``RAWNET2_MALLOC=default`` is set. Returns
    whether the setting was applied.
    """
    if os.environ.get("RAWNET2_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def speaker_of(key):
    return key.split("/")[0]


def utt_id(key):
    """Canonical utterance id: the key without ``.wav`` (the pickled embeddings' form)."""
    return key.removesuffix(".wav")


# ---------------------------------------------------------------------------------------------
# Atomic writes

# Test hook: RAWNET_FAULT="ACTION@PATTERN[#N]" (several separated by commas) injects a real fault into
# the N-th write (default the first) of this process to a file whose path ends in PATTERN (fnmatch
# wildcards). ACTION: "kill" (SIGKILL once the temporary file is complete, before the rename), "torn"
# (SIGKILL after half of the bytes), or "enospc" / "eacces" / "erofs" (that OSError after half of the
# bytes). Unset, it costs one environment lookup per write. RAWNET_TRACE=FILE appends one line per
# ``trace`` event (e.g. each embedding computed) to FILE.
FAULT_ENV, TRACE_ENV = "RAWNET_FAULT", "RAWNET_TRACE"
FAULT_ERRNOS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "erofs": errno.EROFS}
_fault_counts = {}
TMP_PREFIX = ".tmp-"  # temporary files of the atomic writer, beside their destination


class OutputError(DataError, OSError):
    """An output could not be written (disk full, read-only folder, a file where a folder should be);
    the message names the path. The file's previous version, if any, is unchanged."""


def planned_fault(path):
    """The RAWNET_FAULT action planned for this write of ``path``, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        action, _, rest = item.partition("@")
        pattern, _, nth = rest.partition("#")
        if fnmatch.fnmatch(path, "*" + pattern):
            _fault_counts[item] = _fault_counts.get(item, 0) + 1
            if _fault_counts[item] == int(nth or 1):
                return action
    return None


def write_faulty(f, data, action, path):
    """Write half of ``data``, then the fault ``action`` (or, for "kill", the rest)."""
    f.write(data[:len(data) // 2])
    f.flush()
    if action == "torn":
        os.kill(os.getpid(), signal.SIGKILL)
    if action in FAULT_ERRNOS:
        code = FAULT_ERRNOS[action]
        raise OSError(code, os.strerror(code), path)
    f.write(data[len(data) // 2:])


def trace(event):
    """Test hook: append ``event`` as a line to the file named by RAWNET_TRACE (if set)."""
    target = os.environ.get(TRACE_ENV)
    if target:
        with open(target, "a") as f:
            f.write(event + "\n")


def output_error(path, error, consequence="its previous version, if any, is unchanged"):
    """OutputError naming ``path`` for an OSError met while writing it."""
    reason = error.strerror or str(error)
    if error.filename not in (None, path):
        reason += f": {error.filename}"
    return OutputError(f"{path}: not written ({reason}); {consequence}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the folder of ``path`` for the block (or a program it runs) to write;
    when the block ends, the file is synced and renamed over ``path``, so that a reader never sees a
    partial file. When the block raises, the temporary file is removed and ``path`` is unchanged. An
    OSError becomes an ``OutputError`` naming ``path``. The only temp-and-rename writer: every atomic
    write goes through it, so the RAWNET_FAULT hook reaches them all."""
    fault = planned_fault(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + os.path.basename(path))
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            if fault is not None:  # test hook: the complete file cut to half of its bytes
                inject_fault(fd, fault, path)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(path, e) from None
        raise


def inject_fault(fd, action, path):
    """The RAWNET_FAULT ``action`` on a complete temporary file open as ``fd``: "kill" leaves it whole;
    "torn" and the OSErrors leave half of its bytes first."""
    if action != "kill":
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
    if action in FAULT_ERRNOS:
        code = FAULT_ERRNOS[action]
        raise OSError(code, os.strerror(code), path)
    os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path, write):
    """Write ``path`` through ``write(binary file)`` (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text_atomic(text, path):
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(obj, path):
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_pickle_atomic(obj, path):
    write_atomic(path, lambda f: pickle.dump(obj, f, protocol=4))


def write_npy_atomic(array, path):
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def write_lines(path, lines):
    """``lines``, each ending in a line break, written atomically."""
    write_text_atomic("".join(line + "\n" for line in lines), path)


def append_line(path, line, consequence="the lines before it are kept"):
    """Append ``line`` to the text file ``path`` (made if absent) in one write of a file opened for
    appending, as the original appends its EER lines: runs appending to one file keep each other's
    lines. An OSError becomes an ``OutputError`` naming ``path`` and ``consequence``."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise output_error(path, e, consequence) from None


def remove_temporaries(folder):
    """Delete the atomic writer's temporary files left under ``folder`` by a killed process (call
    only while no other process writes there). Returns how many were removed."""
    removed = 0
    for path, _, files in os.walk(folder):
        for name in files:
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(path, name))
                removed += 1
    return removed


