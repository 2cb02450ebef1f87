"""Scoring of speaker embeddings with NumPy only: trial lists, embedding files, cosine scores and
AS-norm, EER and minDCF. Nothing here imports PyTorch, so a scoring run starts in a fraction of a
second.

The numbers are those of the authors' evaluate_pretrained_RawNet2.py (github.com/Jungjee/RawNet):
  * Cosine similarity per trial, ``dot(a, b) / (|a| |b|)``. The original computes each trial's dot
    product in float32; here it is accumulated in float64 (bench/score.py prints both EERs).
  * EER by the original method: the ROC of ``sklearn.metrics.roc_curve``, then ``scipy.optimize.brentq``
    on ``1 - x - tpr(x)``, tpr linearly interpolated (``scipy.interpolate.interp1d``). Both are
    re-implemented here in NumPy, operation for operation, so the EERs are the same floats
    (tests/test_scoring.py checks them bit for bit against scikit-learn and SciPy).
Added for back-end studies: minDCF (NIST SRE), AS-norm. Embedding pickles are untrusted input: they
are read with an unpickler that admits only containers, strings, numbers and numpy arrays (the
original calls ``pickle.load``, which runs any code a pickle names).
"""

import concurrent.futures
import contextlib
import gc
import itertools
import math
import operator
import os
import pickle

import numpy as np

# Private, for want of a public name: numpy's array pickles call this function by this path, so the
# unpickler below must admit exactly it and recognise it (tests/test_layout.py fails if numpy moves it).
from numpy._core.multiarray import _reconstruct

from common import (
    DataError,
    usable_cores,
    utt_id,
    write_npy_atomic,
    write_pickle_atomic,
    write_text_atomic,
)

# Threads scoring trials: the gathers are bound by memory bandwidth, which a few cores fill.
SCORING_THREADS = min(4, usable_cores())
TRIAL_LINE = "'<1|0> <spk>/<video>/<NNNNN>.wav <spk>/<video>/<NNNNN>.wav'"


# ---------------------------------------------------------------------------------------------
# Trial lists

def read_trial_list(path):
    """Parse a trial list: lines ``<1|0> <keyA> <keyB>`` (blank lines are skipped). Keys are taken
    in canonical form (no ``.wav``), and each distinct key once: returns ``(labels, keys, index_a,
    index_b)``, trial ``i`` comparing ``keys[index_a[i]]`` with ``keys[index_b[i]]``.

    A list whose lines all have the same layout (VoxCeleb's do) is parsed as a byte matrix, without
    a Python step per line; any other list line by line, with the same result.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: trial list not found (lines {TRIAL_LINE})")
    with open(path, "rb") as f:
        data = f.read()
    parsed = _parse_fixed_layout(data)
    labels, keys, index_a, index_b = parsed if parsed is not None else _parse_lines(path)
    if not len(labels):
        raise DataError(f"{path}: no trials")
    keys = list(map(utt_id, keys))
    if len(set(keys)) < len(keys):  # a key written both with and without .wav: one utterance
        canonical = {}
        remap = np.array([canonical.setdefault(k, len(canonical)) for k in keys], dtype=np.int64)
        keys, index_a, index_b = list(canonical), remap[index_a], remap[index_b]
    return labels, keys, index_a, index_b


def read_trials(path):
    """``(labels int array, keysA, keysB)`` of a trial list (see ``read_trial_list``), keys as lists."""
    labels, keys, index_a, index_b = read_trial_list(path)
    keys = np.array(keys, dtype=object)
    return labels, keys[index_a].tolist(), keys[index_b].tolist()


def _parse_lines(path):
    labels, keys_a, keys_b = [], [], []
    # utf-8-sig: a leading byte-order mark is no part of line 1; undecodable bytes show up in the error
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                hint = " (a key cannot hold whitespace: rename the file)" if len(parts) > 3 else ""
                raise DataError(f"{path}:{lineno}: expected '<1|0> <keyA> <keyB>', "
                                f"got {line.strip()!r}{hint}")
            labels.append(int(parts[0]))
            keys_a.append(parts[1])
            keys_b.append(parts[2])
    codes = {}
    index = np.array([codes.setdefault(k, len(codes)) for k in keys_a + keys_b], dtype=np.int64)
    return np.array(labels, dtype=np.int64), list(codes), index[:len(labels)], index[len(labels):]


_KEY_HASH_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1's 64-bit prime


def _parse_fixed_layout(data):
    """``_parse_lines`` for a list whose every line is ``<0|1> <keyA> <keyB>\\n`` with keys of one
    length per column, as a (lines, line length) byte matrix; None for any other list."""
    if not data.endswith(b"\n"):
        data += b"\n"
    width = data.find(b"\n") + 1
    gap_a = data.find(b" ", 2)
    if width < 6 or len(data) % width or not 2 < gap_a < width - 2:
        return None
    lines = np.frombuffer(data, np.uint8).reshape(-1, width)
    label, key_a, key_b = lines[:, 0], lines[:, 2:gap_a], lines[:, gap_a + 1:-1]
    if (not np.all((label == ord("0")) | (label == ord("1"))) or not np.all(lines[:, 1] == ord(" "))
            or not np.all(lines[:, gap_a] == ord(" ")) or not np.all(lines[:, -1] == ord("\n"))
            or _outside_printable_ascii(key_a) or _outside_printable_ascii(key_b)):
        return None
    n = len(lines)
    padded = np.zeros((2 * n, -(-max(key_a.shape[1], key_b.shape[1]) // 8) * 8), np.uint8)  # 8-byte words
    padded[:n, :key_a.shape[1]] = key_a
    padded[n:, :key_b.shape[1]] = key_b
    words = padded.view(np.uint64)
    code = words[:, 0].copy()
    for j in range(1, words.shape[1]):  # a 64-bit hash of each key, checked below
        code = code * _KEY_HASH_MULTIPLIER ^ words[:, j]
    codes, index = np.unique(code, return_inverse=True)
    first = np.empty(len(codes), np.int64)
    first[index] = np.arange(2 * n)  # one key of each code
    first_words = words[first]
    if any(not np.array_equal(first_words[:, j][index], words[:, j]) for j in range(words.shape[1])):
        return None  # two keys with one hash: line by line
    keys = [k.decode() for k in padded[first].view(f"S{padded.shape[1]}")[:, 0].tolist()]
    return (label - ord("0")).astype(np.int64), keys, index[:n], index[n:]


def _outside_printable_ascii(block):
    """Whether a uint8 array holds a byte outside '!'..'~' (whitespace, controls, NUL, non-ASCII)."""
    return bool(np.any(block - np.uint8(33) > 93))


def check_keys(needed, available, what):
    """Raise DataError with the count and the first few of ``needed`` keys not in ``available``."""
    missing = sorted(set(needed) - set(available))
    if missing:
        raise DataError(f"{len(missing)} {what} have no audio/embedding, e.g. {', '.join(missing[:5])}")


def trials_without(trials, skipped):
    """``trials`` (labels, keysA, keysB) without those that use a key of ``skipped`` (files that gave
    no embedding, such as silent ones), and how many were dropped."""
    labels, keys_a, keys_b = trials
    bad = {utt_id(k) for k in skipped}
    keep = np.array([a not in bad and b not in bad for a, b in zip(keys_a, keys_b)], dtype=bool)
    if keep.all():
        return trials, 0
    kept = (labels[keep], [k for k, m in zip(keys_a, keep) if m], [k for k, m in zip(keys_b, keep) if m])
    return kept, int((~keep).sum())


# ---------------------------------------------------------------------------------------------
# Embedding files: pickles (the released format) and .npy matrix + key list

# The only globals an embedding pickle may name: what numpy needs to rebuild arrays (numpy 1.x
# pickles say numpy.core, numpy 2.x pickles numpy._core). Anything else, e.g. os.system or
# builtins.eval in a crafted pickle, is refused before it can run.
_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


def _latin1_bytes(text, encoding):
    """What protocols 0-2 pickle bytes as (Python 2 had no bytes type): ``_codecs.encode(text,
    "latin1")``, the only encoding admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for untrusted files: plain containers, strings and numbers, and numpy arrays."""

    def find_class(self, module, name):
        if module.startswith("numpy.core.") or module == "numpy.core":
            module = "numpy._core" + module[len("numpy.core"):]  # the numpy 1.x name of the same module
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


@contextlib.contextmanager
def _gc_paused():
    """No garbage-collection passes while a pickle creates ~10^5 objects that all stay alive (they
    would scan the growing heap again and again)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_pickle(path, unpickler=RestrictedUnpickler):
    """Unpickle ``path`` with ``unpickler`` (a ``RestrictedUnpickler``); DataError (one line) if it
    is refused or broken."""
    try:
        with open(path, "rb") as f, _gc_paused():
            return unpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not loaded, {e}: embedding pickles may only hold a dict of "
                        f"utterance keys to numpy arrays") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


class _PickledArray:
    """A numpy array as ``_ArrayUnpickler`` leaves it: the arguments of numpy's rebuild
    (``_reconstruct(ndarray, shape, typecode)``) and the state it would then be given,
    ``(version, shape, dtype, fortran order, raw bytes)``. Nothing is allocated or copied yet."""

    __slots__ = ("args", "state")

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state

    def array(self):
        """The array numpy would have unpickled (numpy's errors for what it would refuse)."""
        array = _reconstruct(*getattr(self, "args", ()))  # (none, if made without its arguments)
        state = getattr(self, "state", None)
        if state is not None:
            array.__setstate__(state)
        return array


class _ArrayUnpickler(RestrictedUnpickler):
    """``RestrictedUnpickler`` that leaves each array pickled by protocols 3 and 4 (~10^5 of them in an
    embedding file) as a ``_PickledArray``: the raw bytes are then copied once, into one matrix,
    instead of once into an array per vector and again into the matrix."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        return _PickledArray if found is _reconstruct else found


_FLOAT32 = np.dtype(np.float32)


def check_embeddings(obj, path):
    """Validate a loaded embedding dict (keys -> 1-D real vectors of one size) and return it with
    canonical keys (no ``.wav``) and float32 values."""
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a non-empty dict of utterance keys to embeddings, "
                        f"got {type(obj).__name__}")
    values = list(obj.values())
    if (set(map(type, obj)) == {str} and set(map(type, values)) == {np.ndarray} and values[0].ndim == 1
            and {(v.dtype, v.shape) for v in values} == {(_FLOAT32, values[0].shape)}):
        return dict(zip(map(utt_id, obj), values))  # the usual case, checked as a whole
    out, dim = {}, None
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise DataError(f"{path}: entry {key!r} is not a string key with a numpy array value")
        if value.ndim != 1 or value.dtype.kind not in "fiu" or (dim is not None and len(value) != dim):
            raise DataError(f"{path}: entry {key!r} is a {value.dtype} array of shape {value.shape}, "
                            f"expected 1-D real vectors of one size")
        dim = len(value)
        out[utt_id(key)] = value.astype(np.float32, copy=False)
    return out


def npy_keys_path(path):
    """The key list that goes with an embedding matrix ``X.npy``: ``X_keys.txt``, one key per row."""
    return path[:-len(".npy")] + "_keys.txt"


def _vector_bytes(obj):
    """The raw bytes of each vector of an unpickled embedding dict (``_ArrayUnpickler``) whose keys
    are strings and whose values are all 1-D float32 arrays of one size, as numpy pickles them;
    None for anything else."""
    if not isinstance(obj, dict) or not obj or set(map(type, obj)) != {str}:
        return None
    arrays = list(obj.values())
    if set(map(type, arrays)) != {_PickledArray}:
        return None
    try:  # one layout for all: numpy's rebuild arguments, its state but the raw bytes, their size
        layouts = {(a.args, len(a.state), a.state[:4], type(a.state[4]), len(a.state[4])) for a in arrays}
    except (TypeError, IndexError, AttributeError):
        return None
    if len(layouts) != 1:
        return None
    args, size, (version, shape, dtype, fortran), raw_type, raw_size = layouts.pop()
    if not (args == (np.ndarray, (0,), b"b") and size == 5 and type(version) is int and version == 1
            and type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and shape[0] > 0
            and isinstance(dtype, np.dtype) and dtype == _FLOAT32 and isinstance(fortran, bool)
            and raw_type is bytes and raw_size == 4 * shape[0]):
        return None  # anything numpy writes otherwise, or would refuse: rebuilt by numpy itself
    return [a.state[4] for a in arrays]


def _embedding_rows(path):
    """``(keys, dim, parts)`` of an embedding file: canonical keys, and float32 buffers (one per
    vector, or the whole matrix) whose bytes joined are the rows of its matrix (``_join_rows``)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: embedding file not found")
    if path.endswith(".npy"):
        keys, matrix = _read_npy(path)
        return list(map(utt_id, keys)), matrix.shape[1], [np.ascontiguousarray(matrix, np.float32)]
    obj = load_pickle(path, _ArrayUnpickler)
    raw = _vector_bytes(obj)
    if raw is not None:  # the usual case, checked as a whole
        return list(map(utt_id, obj)), len(raw[0]) // 4, raw
    if isinstance(obj, dict):
        try:
            obj = {k: v.array() if isinstance(v, _PickledArray) else v for k, v in obj.items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    embeddings = check_embeddings(obj, path)
    vectors = list(embeddings.values())
    if not len(vectors[0]):
        raise DataError(f"{path}: the embeddings are empty vectors")
    return list(embeddings), len(vectors[0]), [np.ascontiguousarray(v) for v in vectors]


def _read_npy(path):
    """Keys and matrix of a ``.npy`` embedding matrix and its key list (``npy_keys_path``)."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise DataError(f"{path}: not a plain .npy matrix ({e})") from None
    if not isinstance(matrix, np.ndarray):  # a .npz archive
        raise DataError(f"{path}: a .npz archive, expected a plain .npy matrix (numpy.save)")
    keys_path = npy_keys_path(path)
    if not os.path.isfile(keys_path):
        raise DataError(f"{keys_path}: key list of {path} not found")
    # one key per line; a key may hold spaces; a UTF-8 byte-order mark is no part of the first
    try:
        with open(keys_path, encoding="utf-8-sig") as f:
            keys = [line.removesuffix("\r") for line in f.read().split("\n") if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{keys_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if matrix.ndim != 2 or len(keys) != len(matrix):
        raise DataError(f"{path}: matrix of shape {matrix.shape} does not match {len(keys)} keys "
                        f"in {keys_path}")
    if matrix.dtype.kind not in "fiu" or not matrix.size:
        raise DataError(f"{path}: a {matrix.dtype} matrix of shape {matrix.shape}, expected real "
                        f"numbers")
    return keys, matrix


def _join_rows(parts, dim):
    """One writable float32 matrix of ``dim`` columns from buffers holding its rows in order: a
    single copy."""
    return np.frombuffer(bytearray().join(parts), np.float32).reshape(-1, dim)


def check_finite_rows(path, keys, finite, consequence=""):
    """DataError naming ``path`` and the first keys whose row is not ``finite`` (a bool per key)."""
    bad = np.flatnonzero(~np.asarray(finite))
    if len(bad):
        names = ", ".join(keys[i] for i in bad[:5])
        raise DataError(f"{path}: {len(bad)} embeddings hold NaN or infinite values, "
                        f"e.g. {names}{consequence}")


def load_embeddings(path):
    """Embeddings from a pickle (``.pk``, loaded with ``RestrictedUnpickler``'s restrictions) or
    from a ``.npy`` matrix plus its key list (``npy_keys_path``). Returns dict utterance id ->
    float32 vector (rows of one matrix); a key given twice takes its last vector. NaN or infinite
    values are refused, naming the keys."""
    keys, dim, parts = _embedding_rows(path)
    matrix = _join_rows(parts, dim)
    check_finite_rows(path, keys, np.isfinite(matrix).all(axis=1))
    return dict(zip(keys, matrix))


def save_embeddings(embeddings, path):
    """Write embeddings atomically as the released pickles (dict key -> float32 vector) or, for a
    ``.npy`` path, as a float32 matrix with rows in sorted key order plus its key list. None, or any
    with NaN or infinite values, is refused: nothing is written."""
    keys = sorted(embeddings)
    if not keys:
        raise DataError(f"{path}: not written: no embeddings")
    check_finite_rows(path, keys, [np.isfinite(embeddings[k]).all() for k in keys], "; not written")
    if not path.endswith(".npy"):
        write_pickle_atomic({k: np.asarray(embeddings[k], dtype=np.float32) for k in keys}, path)
        return
    write_text_atomic("".join(k + "\n" for k in keys), npy_keys_path(path))
    write_npy_atomic(np.stack([np.asarray(embeddings[k], dtype=np.float32) for k in keys]), path)


# ---------------------------------------------------------------------------------------------
# Cosine scores, AS-norm

class EmbeddingTable:
    """Embeddings indexed for scoring: key -> row of a float32 matrix, and each row's float64 L2
    norm, computed once. Trials are then scored by row numbers, a chunk at a time. A key given twice
    takes its last vector (as merging dicts does)."""

    def __init__(self, keys, matrix, chunk=256):
        self.keys, self.matrix = list(keys), np.ascontiguousarray(matrix, dtype=np.float32)
        self.index = dict(zip(self.keys, range(len(self.keys))))
        self.norms = np.empty(len(self.matrix))

        def norms(start):
            block = self.matrix[start:start + chunk]
            self.norms[start:start + chunk] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))

        with concurrent.futures.ThreadPoolExecutor(SCORING_THREADS) as pool:
            list(pool.map(norms, range(0, len(self.matrix), chunk)))

    @classmethod
    def from_dict(cls, embeddings):
        return cls(embeddings, np.array(list(embeddings.values())))

    @classmethod
    def read(cls, paths):
        """The embeddings of every file of ``paths`` (``load_embeddings``), later files winning."""
        keys, parts, dim, ends = [], [], None, []
        for path in paths:
            file_keys, file_dim, file_parts = _embedding_rows(path)
            if dim is not None and file_dim != dim:
                raise DataError(f"{path}: {file_dim}-dimensional embeddings, {paths[0]} holds "
                                f"{dim}-dimensional ones")
            dim = file_dim
            keys += file_keys
            parts += file_parts
            ends.append(len(keys))
        table = cls(keys, _join_rows(parts, dim))
        for path, start, end in zip(paths, [0, *ends], ends):  # (a non-finite value: a non-finite norm)
            check_finite_rows(path, keys[start:end], np.isfinite(table.norms[start:end]))
        return table

    def lookup(self, keys):
        """Row number of each key, -1 for a key without embedding."""
        if not keys:
            return np.zeros(0, dtype=np.int64)
        try:  # itemgetter does every lookup in C, faster than a map over dict.get
            return np.atleast_1d(np.array(operator.itemgetter(*keys)(self.index), dtype=np.int64))
        except KeyError:
            return np.fromiter(map(self.index.get, keys, itertools.repeat(-1)), dtype=np.int64,
                               count=len(keys))

    def check_finite(self, rows):
        """DataError naming the keys of any non-finite (NaN/inf) or zero-norm embedding in ``rows``."""
        used = np.zeros(len(self.matrix), dtype=bool)
        used[rows] = True
        bad = np.flatnonzero(used & (~np.isfinite(self.norms) | (self.norms == 0)))
        if len(bad):
            bad = set(bad.tolist())
            names = sorted(k for k, r in self.index.items() if r in bad)
            raise DataError(f"{len(names)} embeddings are non-finite or zero, e.g. {', '.join(names[:5])}")

    def rows(self, keys, what="trial keys"):
        """Row number of each key; DataError with the count and a few examples if any is unknown,
        or naming the keys of non-finite or zero-norm embeddings."""
        rows = self.lookup(keys)
        if np.any(rows < 0):
            check_keys(keys, self.index, what)
        self.check_finite(rows)
        return rows

    def cosine(self, rows_a, rows_b, chunk=128, threads=None):
        """Cosine similarity of row pairs, ``dot(a, b) / (|a| |b|)``, the dot products of the float32
        vectors accumulated in float64.

        The trials are split over ``threads`` (default: up to ``SCORING_THREADS``; NumPy's gathers and
        sums run without the GIL), each scoring ``chunk`` trials at a time in two ``chunk`` x dim
        buffers: memory stays bounded.
        """
        rows_a, rows_b = np.asarray(rows_a, dtype=np.int64), np.asarray(rows_b, dtype=np.int64)
        rows = np.concatenate([rows_a, rows_b])
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.matrix)):
            raise IndexError("row numbers outside the table")
        scores = np.empty(len(rows_a))

        def score(span):
            buf_a, buf_b = (np.empty((chunk, self.matrix.shape[1]), np.float32) for _ in range(2))
            for s in range(span.start, span.stop, chunk):
                a, b = rows_a[s:min(s + chunk, span.stop)], rows_b[s:min(s + chunk, span.stop)]
                # mode="clip": no bounds check per row (done above), no temporary array
                vec_a = np.take(self.matrix, a, axis=0, out=buf_a[:len(a)], mode="clip")
                vec_b = np.take(self.matrix, b, axis=0, out=buf_b[:len(a)], mode="clip")
                dots = np.einsum("ij,ij->i", vec_a, vec_b, dtype=np.float64)
                scores[s:s + len(a)] = dots / (self.norms[a] * self.norms[b])

        threads = threads or min(SCORING_THREADS, max(1, len(rows_a) // (64 * chunk)))
        bounds = np.linspace(0, len(rows_a), threads + 1).astype(int)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(score, [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]))
        return scores


def cosine_scores(embeddings, keys_a, keys_b, chunk=128):
    """Cosine similarity per trial (the original's ``np.dot(a, b) / (|a| |b|)``, in float64) of a
    dict of embeddings: each needed embedding is stacked once (``EmbeddingTable``)."""
    needed = dict.fromkeys(keys_a)
    needed.update(dict.fromkeys(keys_b))
    check_keys(needed, embeddings, "trial keys")
    table = EmbeddingTable.from_dict({k: embeddings[k] for k in needed})
    return table.cosine(table.rows(keys_a), table.rows(keys_b), chunk)


def cohort_statistics(table, rows, cohort, top_n, chunk=2048):
    """Adaptive s-norm statistics: for each of ``rows`` of the ``EmbeddingTable``, the mean and
    standard deviation of its ``top_n`` highest cosine scores against the ``cohort`` embeddings
    (Matejka et al., Interspeech 2017). Returns ``(mean, std)`` arrays aligned with ``rows``."""
    cohort = np.asarray(cohort, dtype=np.float64)
    cohort_norms = np.linalg.norm(cohort, axis=1)
    if not np.all(np.isfinite(cohort_norms)) or np.any(cohort_norms == 0):
        raise DataError("the AS-norm cohort holds non-finite or zero embeddings")
    unit_cohort = (cohort / cohort_norms[:, None]).T  # (dim, C)
    top_n = min(top_n, cohort.shape[0])
    mean, std = np.empty(len(rows)), np.empty(len(rows))
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        scores = (table.matrix[r].astype(np.float64) @ unit_cohort) / table.norms[r, None]  # (chunk, C)
        top = -np.partition(-scores, top_n - 1, axis=1)[:, :top_n]
        mean[s:s + chunk], std[s:s + chunk] = top.mean(1), top.std(1)
    return mean, std


def asnorm_scores(scores, table, rows_a, rows_b, cohort, top_n=300):
    """Adaptive symmetric normalisation (AS-norm1, Matejka et al. 2017) of raw cosine ``scores``
    of the trials ``(rows_a, rows_b)`` of an ``EmbeddingTable``:
    ``0.5 * ((s - mu_a) / sigma_a + (s - mu_b) / sigma_b)``, each side's statistics taken over its
    ``top_n`` closest cohort embeddings (``cohort_statistics``)."""
    used, inverse = np.unique(np.concatenate([rows_a, rows_b]), return_inverse=True)
    mean, std = cohort_statistics(table, used, cohort, top_n)
    if np.any(std == 0):
        raise DataError("AS-norm: a cohort score spread is zero (cohort too small or duplicated)")
    ia, ib = inverse[:len(rows_a)], inverse[len(rows_a):]
    scores = np.asarray(scores, dtype=np.float64)
    return 0.5 * ((scores - mean[ia]) / std[ia] + (scores - mean[ib]) / std[ib])


# ---------------------------------------------------------------------------------------------
# Metrics

def _check_two_classes(labels, metric):
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{metric}: trial labels must be 0 or 1")
    if labels.min() == labels.max():
        raise DataError(f"{metric} is undefined: the trials hold only targets or only non-targets")
    return labels


def _roc_counts(labels, scores):
    """False and true positives at each distinct score, highest first, and the scores: the counts of
    sklearn's ``roc_curve``, by the same operations in the same order."""
    scores = np.asarray(scores)
    if not np.all(np.isfinite(scores)):
        raise DataError("scores hold NaN or infinite values")
    order = np.argsort(scores, kind="stable")[::-1]  # descending; the order within ties changes nothing
    scores, targets = scores[order], (np.asarray(labels)[order] == 1).astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last trial of each distinct score
    tps = np.cumsum(targets)[ends]
    return 1 + ends.astype(np.float64) - tps, tps, scores[ends]


def _roc_rates(fps, tps, thresholds, drop_intermediate):
    if drop_intermediate and len(fps) > 2:  # drop the points collinear with both neighbours
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds.astype(np.float64)]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_curve(labels, scores, drop_intermediate=True):
    """``sklearn.metrics.roc_curve(labels, scores, pos_label=1, drop_intermediate=...)`` in NumPy, the
    same operations in the same order: ``(fpr, tpr, thresholds)``, one point per distinct score
    (highest first) after a first point (0, 0) at threshold inf."""
    return _roc_rates(*_roc_counts(labels, scores), drop_intermediate)


BRENTQ_RTOL = 4 * np.finfo(float).eps  # scipy.optimize.brentq's default rtol


def brentq(f, a, b, xtol=2e-12, rtol=BRENTQ_RTOL, maxiter=100):
    """Root of ``f`` in [a, b] by Brent's method, step for step as ``scipy.optimize.brentq`` (its C
    implementation, with its default tolerances), so that the root is the same float."""
    x_pre, x_cur = float(a), float(b)
    f_pre, f_cur = float(f(x_pre)), float(f(x_cur))
    if f_pre == 0:
        return x_pre
    if f_cur == 0:
        return x_cur
    if math.copysign(1, f_pre) == math.copysign(1, f_cur):
        raise ValueError("f(a) and f(b) must have different signs")
    x_blk = f_blk = s_pre = s_cur = 0.0
    for _ in range(maxiter):
        if f_pre != 0 and f_cur != 0 and math.copysign(1, f_pre) != math.copysign(1, f_cur):
            x_blk, f_blk = x_pre, f_pre
            s_pre = s_cur = x_cur - x_pre
        if abs(f_blk) < abs(f_cur):  # keep the best estimate in x_cur
            x_pre, x_cur, x_blk = x_cur, x_blk, x_cur
            f_pre, f_cur, f_blk = f_cur, f_blk, f_cur
        delta = (xtol + rtol * abs(x_cur)) / 2
        s_bis = (x_blk - x_cur) / 2
        if f_cur == 0 or abs(s_bis) < delta:
            return x_cur
        if abs(s_pre) > delta and abs(f_cur) < abs(f_pre):
            if x_pre == x_blk:  # secant step
                s_try = -f_cur * (x_cur - x_pre) / (f_cur - f_pre)
            else:  # inverse quadratic step
                d_pre = (f_pre - f_cur) / (x_pre - x_cur)
                d_blk = (f_blk - f_cur) / (x_blk - x_cur)
                s_try = -f_cur * (f_blk * d_blk - f_pre * d_pre) / (d_blk * d_pre * (f_blk - f_pre))
            if 2 * abs(s_try) < min(abs(s_pre), 3 * abs(s_bis) - delta):
                s_pre, s_cur = s_cur, s_try
            else:
                s_pre = s_cur = s_bis
        else:
            s_pre = s_cur = s_bis
        x_pre, f_pre = x_cur, f_cur
        x_cur += s_cur if abs(s_cur) > delta else (delta if s_bis > 0 else -delta)
        f_cur = float(f(x_cur))
    raise RuntimeError(f"brentq: no convergence after {maxiter} iterations, value is {x_cur}")


def _eer(fpr, tpr, thresholds):
    eer = brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0)
    return float(eer), float(np.interp(eer, fpr, thresholds))


def compute_eer(labels, scores):
    """Equal error rate (fraction) and its threshold, by the original method: the ROC of
    ``roc_curve``, then ``brentq`` on 1 - x - tpr(x), tpr linearly interpolated in fpr (what
    ``scipy.interpolate.interp1d`` computes for these float64 points: ``np.interp``)."""
    return _eer(*roc_curve(_check_two_classes(labels, "EER"), scores))


def _min_dcf(fpr, tpr, thresholds, p_target, c_miss, c_fa):
    results = []
    for p in np.atleast_1d(p_target):
        cost = c_miss * (1 - tpr) * p + c_fa * fpr * (1 - p)
        best = int(np.argmin(cost))
        results.append((float(cost[best] / min(c_miss * p, c_fa * (1 - p))), float(thresholds[best])))
    return results if np.ndim(p_target) else results[0]


def compute_min_dcf(labels, scores, p_target, c_miss=1.0, c_fa=1.0):
    """Minimum normalised detection cost and its threshold (NIST SRE evaluation plans):

        C_det(t) = C_miss * P_miss(t) * P_target + C_fa * P_fa(t) * (1 - P_target)
        minDCF   = min_t C_det(t) / min(C_miss * P_target, C_fa * (1 - P_target))

    with P_miss(t) the fraction of targets scored below t and P_fa(t) that of non-targets at or
    above t, over every operating point of the ROC (accept none ... accept all). ``p_target`` may
    be a list: then lists of (minDCF, threshold) pairs come back, from one ROC.
    """
    labels = _check_two_classes(labels, "minDCF")
    return _min_dcf(*roc_curve(labels, scores, drop_intermediate=False), p_target, c_miss, c_fa)


def eer_and_min_dcf(labels, scores, p_targets):
    """``(compute_eer(...), compute_min_dcf(labels, scores, p_targets))`` from one sort of the scores."""
    counts = _roc_counts(_check_two_classes(labels, "EER"), scores)
    return (_eer(*_roc_rates(*counts, drop_intermediate=True)),
            _min_dcf(*_roc_rates(*counts, drop_intermediate=False), list(p_targets), 1.0, 1.0))
