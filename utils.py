"""Shared pieces of the RawNet2 reproduction: data, segmentation, scoring, training helpers.

Follows the authors' ``utils.py`` / ``trainer`` of github.com/Jungjee/RawNet (python/RawNet2); the
facts are in ../shared/SPEC.md. Everything numeric here is checked by tests against an independent
computation.

Deliberate differences from the original code:
  * Utterance lists are sorted, so class labels do not depend on the file system's walk order.
  * Bad audio is reported instead of silently poisoning numbers: a wav that is not 16 kHz mono raises
    ``DataError`` naming the file; an empty or all-zero wav (the original divides by zero and gets
    NaN) is skipped with a warning.
  * TTA evaluation feeds all segments of many utterances through the network in one batch (the
    original feeds one segment at a time); in eval mode this is the same math.
  * Trial scoring is vectorised and chunked (``EmbeddingTable``), accumulated in float64 (the
    original's per-trial ``np.dot`` works in float32); EER is computed exactly as the original
    (roc_curve + brentq). minDCF and AS-norm are added for back-end studies.
  * Embedding pickles are untrusted input: ``load_pickle`` admits only containers, strings, numbers
    and numpy arrays (the original calls ``pickle.load``, which runs any code a pickle names).
  * Checkpoints and text outputs are written atomically (temporary file, then rename).
"""

import argparse
import itertools
import json
import multiprocessing
import operator
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import fast_RawNet2

SAMPLE_RATE = 16000


class DataError(Exception):
    """Bad or missing input data; the message is one line naming the file, key or flag."""


class SilentAudioError(DataError):
    """An empty or all-zero waveform: it cannot be peak-normalised."""


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


BOOL_FLAG = dict(type=str2bool, nargs="?", const=True)  # add(name, default=..., **BOOL_FLAG)


def arg_group(parser, title):
    """``add(name, **kw)`` for an argparse group: each flag as ``-name`` (the original's single dash)
    and ``--name``."""
    group = parser.add_argument_group(title)
    return lambda name, **kw: group.add_argument(f"-{name}", f"--{name}", **kw)


# ---------------------------------------------------------------------------------------------
# Utterance lists, labels, audio

def list_utterances(wav_dir):
    """Sorted keys ``<spk>/<video>/<NNNNN>.wav`` of every wav under ``wav_dir`` (original key rule:
    the last two folder names plus the file name)."""
    if not os.path.isdir(wav_dir):
        raise DataError(f"{wav_dir}: folder not found (it should hold <speaker>/<video>/<NNNNN>.wav files)")
    keys = []
    for path, _, files in os.walk(wav_dir, followlinks=True):
        base = "/".join(os.path.normpath(path).split(os.sep)[-2:])
        keys.extend(f"{base}/{f}" for f in files if f.endswith(".wav"))
    if not keys:
        raise DataError(f"{wav_dir}: no .wav files found (expected <speaker>/<video>/<NNNNN>.wav)")
    return sorted(keys)


def speaker_of(key):
    return key.split("/")[0]


def speaker_labels(keys):
    """Speaker -> class index, in order of first appearance in ``keys``."""
    labels = {}
    for key in keys:
        labels.setdefault(speaker_of(key), len(labels))
    return labels


def utt_id(key):
    """Canonical utterance id: the key without ``.wav`` (the pickled embeddings' form)."""
    return key[:-4] if key.endswith(".wav") else key


def _read_checked(path, **kwargs):
    """float64 samples of a 16 kHz mono wav (``kwargs``: soundfile's start/frames); DataError else."""
    try:
        x, sr = sf.read(path, dtype="float64", **kwargs)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if x.ndim != 1:
        raise DataError(f"{path}: {x.shape[1]} channels, expected mono")
    if sr != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} Hz")
    return x


def read_wav(path):
    """Read a 16 kHz mono wav as the original does: float64, divided by its peak, cast to float32."""
    x = _read_checked(path)
    peak = np.max(np.abs(x)) if x.size else 0.0
    if peak == 0:
        raise SilentAudioError(f"{path}: empty or all-zero audio")
    return (x / peak).astype(np.float32)


def _index_entry(path):
    x = _read_checked(path)
    return len(x), float(np.max(np.abs(x))) if x.size else 0.0


def _stamp(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def wav_index(keys, base_dir, nb_worker=2, progress=True):
    """Length (frames) and peak |sample| of every utterance, so that training reads only each
    crop's frames (``read_crop``). Built once, in ``nb_worker`` processes, and cached atomically
    beside the wav folder as ``<folder>_index.npz``; a file whose size or modification time changed
    since is indexed again. Returns a dict key -> (frames, peak)."""
    cache = os.path.normpath(base_dir) + "_index.npz"
    stamps = {k: _stamp(os.path.join(base_dir, k)) for k in keys}
    index = {}
    if os.path.exists(cache):
        with np.load(cache) as data:
            for key, frames, peak, size, mtime in zip(data["keys"].tolist(), data["frames"].tolist(),
                                                      data["peaks"].tolist(), data["sizes"].tolist(),
                                                      data["mtimes"].tolist()):
                index[key] = (frames, peak, (size, mtime))
    todo = [k for k in keys if k not in index or index[k][2] != stamps[k]]
    if todo:
        paths = [os.path.join(base_dir, k) for k in todo]
        with multiprocessing.get_context("fork").Pool(max(1, nb_worker)) as pool:
            entries = list(tqdm(pool.imap(_index_entry, paths, chunksize=64), total=len(paths),
                                desc=f"indexing {base_dir}", disable=not progress, leave=False))
        index.update((k, (frames, peak, stamps[k])) for k, (frames, peak) in zip(todo, entries))
        names = sorted(index)
        columns = {"keys": np.array(names), "frames": np.array([index[k][0] for k in names]),
                   "peaks": np.array([index[k][1] for k in names]),
                   "sizes": np.array([index[k][2][0] for k in names]),
                   "mtimes": np.array([index[k][2][1] for k in names])}
        try:
            _atomic(cache, lambda f: np.savez(f, **columns))
        except OSError as e:
            warnings.warn(f"{cache}: cannot cache the wav index ({e}); it will be rebuilt next time")
    return {k: index[k][:2] for k in keys}


def read_crop(path, frames, peak, nb_samp, rng):
    """The training crop of ``crop_or_tile(read_wav(path), nb_samp, rng)``, reading only its frames:
    ``frames`` and ``peak`` come from ``wav_index``. Same start, same float64 division by the peak,
    same float32 cast, so the same array."""
    if peak == 0:
        raise SilentAudioError(f"{path}: empty or all-zero audio")
    if frames <= nb_samp:
        return crop_or_tile(read_wav(path), nb_samp, rng)
    start = int(rng.integers(0, frames - nb_samp))
    x = _read_checked(path, start=start, frames=nb_samp)
    if len(x) != nb_samp:
        raise DataError(f"{path}: shorter than its wav index says (file changed during training?)")
    return (x / peak).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cropping and test-time augmentation (TTA) segments

def crop_or_tile(x, nb_samp, rng=None):
    """Training crop: a random ``nb_samp`` window, start uniform in [0, len - nb_samp) (upper bound
    excluded, as the original's ``np.random.randint``), drawn from the numpy Generator ``rng``;
    a shorter waveform is tiled (repeated) and cut to ``nb_samp``."""
    n = len(x)
    if n > nb_samp:
        start = int(rng.integers(0, n - nb_samp))
        return x[start:start + nb_samp]
    if n < nb_samp:
        return np.tile(x, nb_samp // n + 1)[:nb_samp]
    return x


def tta_segments(x, nb_samp, window_size):
    """TTA segments of one waveform, shape (n, nb_samp). Consecutive segments overlap by
    ``window_size`` samples; the last segment is right-aligned (the final nb_samp samples)."""
    n = len(x)
    if n <= nb_samp:
        return crop_or_tile(x, nb_samp)[None]
    step = nb_samp - window_size
    count = (n - window_size) // step + 1
    starts = [i * step for i in range(count - 1)] + [n - nb_samp]
    return np.stack([x[s:s + nb_samp] for s in starts])


class TrainSet(Dataset):
    """Random crops of training utterances; yields (waveform, label, key).

    The crop of item ``i`` is drawn from a generator seeded by ``(seed, epoch, i)``: the same for any
    number of DataLoader workers, and the same again when a run is resumed. The epoch comes with the
    item (``(epoch, i)``, from EpochSampler; persistent workers hold their own copy of the dataset)
    or, for a plain index, from the ``epoch`` attribute.
    """

    def __init__(self, keys, base_dir, labels, nb_samp, seed=0, index=None):
        self.keys, self.base_dir, self.labels, self.nb_samp = keys, base_dir, labels, nb_samp
        self.seed, self.epoch = seed, 0
        self.index = index  # from wav_index: read only the crop's frames (same array)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        # A silent file is skipped (with a warning) in favour of the next utterance in the list.
        for offset in range(len(self.keys)):
            key = self.keys[(index + offset) % len(self.keys)]
            path = os.path.join(self.base_dir, key)
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                if self.index is None:
                    x = crop_or_tile(read_wav(path), self.nb_samp, rng)
                else:
                    x = read_crop(path, *self.index[key], self.nb_samp, rng)
            except SilentAudioError as e:
                warnings.warn(f"skipping {e}")
                continue
            return x, self.labels[speaker_of(key)], key
        raise DataError(f"{self.base_dir}: every training file is empty or silent")


class EpochSampler(Sampler):
    """The indices of ``sampler`` (e.g. a DistributedSampler) as ``(epoch, index)`` pairs for
    TrainSet, so that one DataLoader with persistent workers serves every epoch."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class TTASet(Dataset):
    """All TTA segments of each utterance; yields (segments (n, nb_samp), key). A silent utterance
    yields zero segments, so the consumer can skip and list it."""

    def __init__(self, keys, base_dir, nb_samp, window_size):
        self.keys, self.base_dir = keys, base_dir
        self.nb_samp, self.window_size = nb_samp, window_size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        key = self.keys[index]
        try:
            x = read_wav(os.path.join(self.base_dir, key))
        except SilentAudioError:
            return torch.zeros(0, self.nb_samp), key
        return torch.from_numpy(tta_segments(x, self.nb_samp, self.window_size)), key


def _first(batch):
    return batch[0]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_amp_warned = set()


def amp_autocast(device, amp="bf16"):
    """The autocast context of ``-amp`` (training) and ``-bf16`` (extraction): "none" or False is a
    no-op, "bf16" or True bfloat16 autocast, "fp16" float16 autocast. RawNet2 keeps its sinc front
    end in float32 inside (see ``RawNet2.embed``). Opt-in: it changes the numbers slightly. On a CPU
    without native bfloat16 (no AVX-512 BF16 or AMX) bf16 is emulated and measured slower than
    float32 (bench/README.md): one line says so, once per process."""
    amp = {True: "bf16", False: "none"}.get(amp, amp)
    device_type = torch.device(device).type
    if amp == "bf16" and device_type == "cpu" and not fast_RawNet2.cpu_has_native_bf16() and not _amp_warned:
        _amp_warned.add(amp)
        if is_main_process():
            tqdm.write("warning: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag): bf16 runs "
                       "emulated and slower than float32 here; leave -amp/-bf16 off for speed", file=sys.stderr)
    return torch.autocast(device_type, dtype=AMP_DTYPES.get(amp), enabled=amp != "none")


def backward_step(loss, optimizer, scaler=None):
    """Gradients of ``loss`` and one optimiser step; with fp16's scaler, the loss is scaled so that
    small gradients do not flush to zero (and a step with inf/NaN gradients is skipped)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@torch.no_grad()
def iter_embeddings(model, keys, base_dir, nb_samp, window_size, device="cpu", nb_worker=0,
                    segments_per_batch=None, bf16=False):
    """Yield ``(key, embedding)`` for each of ``keys`` read from ``base_dir``, as soon as it is done.

    The embedding is the TTA embedding (mean over segments of ``model.embed``) as a float32 numpy
    vector, or None for a silent/empty file. Segments of several utterances are packed into forwards
    of ``segments_per_batch`` windows (a long utterance is split over several); None measures the
    fastest size on the first forwards and caches it (``fast_RawNet2.SegmentPlan``; fewer than
    ``fast_RawNet2.PLAN_MIN_UTTERANCES`` keys measure nothing). Each file is
    read once, in ``nb_worker`` DataLoader workers while the model runs. In eval mode every
    segment's embedding is independent of its batch-mates, so packing changes no number.
    """
    net = model.module if isinstance(model, nn.DataParallel) else model
    was_training = net.training
    net.eval()
    # A short job does not pay for measuring plans: cached ones, else the one-segment reference.
    measure = len(keys) >= fast_RawNet2.PLAN_MIN_UTTERANCES
    plan = fast_RawNet2.SegmentPlan(net, device, bf16, segments_per_batch, measure=measure)
    loader = DataLoader(TTASet(keys, base_dir, nb_samp, window_size), batch_size=1,
                        num_workers=nb_worker, collate_fn=_first)
    pending, pending_keys, pending_counts = [], [], []

    def forward(batch):
        start = time.perf_counter()
        code = net.embed(batch.to(device)).float().cpu()  # (.cpu() waits for the device)
        plan.observe(len(batch), time.perf_counter() - start)
        return code

    def flush():
        with amp_autocast(device, bf16), fast_RawNet2.measuring(measure):
            codes = torch.cat([forward(batch) for batch in torch.split(torch.cat(pending), plan.size)])
        done = [(key, part.mean(0).numpy()) for key, part in
                zip(pending_keys, torch.split(codes, pending_counts))]
        pending.clear(), pending_keys.clear(), pending_counts.clear()
        return done

    try:
        for segments, key in loader:
            if len(segments) == 0:
                yield key, None
                continue
            if pending and sum(pending_counts) + len(segments) > plan.size:
                yield from flush()
            pending.append(segments), pending_keys.append(key), pending_counts.append(len(segments))
        if pending:
            yield from flush()
    finally:
        net.train(was_training)


def embed_utterances(model, keys, base_dir, nb_samp, window_size, device="cpu", nb_worker=0,
                     segments_per_batch=None, progress=True, desc="TTA embeddings", bf16=False):
    """TTA embeddings of ``keys`` read from ``base_dir`` (see ``iter_embeddings``). Returns
    ``(embeddings, skipped)``: a dict utterance id (no ``.wav``) -> float32 numpy vector, and the
    keys of silent files."""
    embeddings, skipped = {}, []
    stream = iter_embeddings(model, keys, base_dir, nb_samp, window_size, device, nb_worker,
                             segments_per_batch, bf16)
    for key, code in tqdm(stream, total=len(keys), desc=desc, disable=not progress, leave=False):
        if code is None:
            skipped.append(key)
        else:
            embeddings[utt_id(key)] = code
    return embeddings, skipped


@torch.no_grad()
def embed_utterance(model, wav, window_size=11810, device="cpu", segments_per_batch=32, bf16=False):
    """TTA embedding of one utterance (a wav path or a 1-D waveform array), for notebooks:

        model = model_RawNet2.load_pretrained("Pre-trained_model/rawnet2_best_weights.pt")
        code = utils.embed_utterance(model, "a.wav")   # (1024,) float32

    A long recording is fed ``segments_per_batch`` segments at a time, so memory stays bounded.
    """
    net = model.module if isinstance(model, nn.DataParallel) else model
    x = read_wav(wav) if isinstance(wav, (str, os.PathLike)) else np.asarray(wav, dtype=np.float32)
    segments = torch.from_numpy(np.ascontiguousarray(tta_segments(x, net.nb_samp, window_size)))
    was_training = net.training
    net.eval()
    try:
        with amp_autocast(device, bf16):
            codes = [net.embed(batch.to(device)).float().cpu()
                     for batch in torch.split(segments, segments_per_batch)]
    finally:
        net.train(was_training)
    return torch.cat(codes).mean(0).numpy()


# ---------------------------------------------------------------------------------------------
# Trials, scoring, EER

def read_trials(path):
    """Parse a trial list: lines ``<1|0> <keyA> <keyB>``. Returns (labels int array, keysA, keysB)
    with keys in canonical form (no ``.wav``)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: trial list not found (lines '<1|0> <spk>/<video>/<NNNNN>.wav <spk>/<video>/<NNNNN>.wav')")
    labels, keys_a, keys_b = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: expected '<1|0> <keyA> <keyB>', got {line.strip()!r}")
            labels.append(int(parts[0]))
            keys_a.append(parts[1].removesuffix(".wav"))  # utt_id, inlined: 2.3M calls for Vox1-E + H
            keys_b.append(parts[2].removesuffix(".wav"))
    if not labels:
        raise DataError(f"{path}: no trials")
    return np.array(labels), keys_a, keys_b


def check_keys(needed, available, what):
    """Raise DataError with the count and the first few of ``needed`` keys not in ``available``."""
    missing = sorted(set(needed) - set(available))
    if missing:
        raise DataError(f"{len(missing)} {what} have no audio/embedding, e.g. {', '.join(missing[:5])}")


class EmbeddingTable:
    """Embeddings indexed for scoring: key -> row number, each row's vector (referenced, not copied,
    so a 150k x 1,024 set costs no second 600 MB) and its float64 L2 norm, computed once. Trials are
    then scored by row numbers, a chunk at a time."""

    def __init__(self, embeddings, chunk=4096):
        self.keys = list(embeddings)
        self.index = dict(zip(self.keys, range(len(self.keys))))
        self.vectors = [np.asarray(embeddings[k]) for k in self.keys]
        self.dim = len(self.vectors[0])
        self.dtype = np.result_type(*{v.dtype for v in self.vectors})
        self.norms = np.empty(len(self.keys))
        for s in range(0, len(self.keys), chunk):
            block = self.gather(np.arange(s, min(s + chunk, len(self.keys))))
            self.norms[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))

    def gather(self, rows, out=None):
        """The vectors of ``rows`` as a (len(rows), dim) array, written into ``out`` when given."""
        flat = None if out is None else out.reshape(-1)[:len(rows) * self.dim]
        return np.concatenate([self.vectors[i] for i in rows.tolist()], out=flat,
                              dtype=None if out is not None else self.dtype).reshape(len(rows), self.dim)

    def lookup(self, keys):
        """Row number of each key, -1 for a key without embedding."""
        if not keys:
            return np.zeros(0, dtype=np.int64)
        try:  # itemgetter does every lookup in C: ~2x faster than a map over dict.get
            return np.atleast_1d(np.array(operator.itemgetter(*keys)(self.index), dtype=np.int64))
        except KeyError:
            return np.fromiter(map(self.index.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))

    def check_finite(self, rows):
        """DataError naming the keys of any non-finite (NaN/inf) or zero-norm embedding in ``rows``."""
        used = np.zeros(len(self.keys), dtype=bool)
        used[rows] = True
        bad = np.flatnonzero(used & (~np.isfinite(self.norms) | (self.norms == 0)))
        if len(bad):
            names = [self.keys[i] for i in bad]
            raise DataError(f"{len(names)} embeddings are non-finite or zero, e.g. {', '.join(names[:5])}")

    def rows(self, keys, what="trial keys"):
        """Row number of each key; DataError with the count and a few examples if any is unknown,
        or naming the keys of non-finite or zero-norm embeddings."""
        rows = self.lookup(keys)
        if np.any(rows < 0):
            check_keys(keys, self.index, what)
        self.check_finite(rows)
        return rows

    def cosine(self, rows_a, rows_b, chunk=512):
        """Cosine similarity of row pairs, ``dot(a, b) / (|a| |b|)`` accumulated in float64.

        Memory stays bounded: two ``chunk`` x dim buffers, never a trials x dim matrix.
        """
        buf_a, buf_b = np.empty((chunk, self.dim), self.dtype), np.empty((chunk, self.dim), self.dtype)
        scores = np.empty(len(rows_a))
        for s in range(0, len(rows_a), chunk):
            a, b = rows_a[s:s + chunk], rows_b[s:s + chunk]
            dots = np.einsum("ij,ij->i", self.gather(a, buf_a), self.gather(b, buf_b), dtype=np.float64)
            scores[s:s + chunk] = dots / (self.norms[a] * self.norms[b])
        return scores


def cosine_scores(embeddings, keys_a, keys_b, chunk=512):
    """Cosine similarity per trial (the original's ``np.dot(a, b) / (|a| |b|)``), vectorised: each
    needed embedding is stacked once, then trials are scored in chunks (``EmbeddingTable``). The
    float64 scores equal a float64 per-trial loop to ~1e-15."""
    needed = dict.fromkeys(keys_a)
    needed.update(dict.fromkeys(keys_b))
    check_keys(needed, embeddings, "trial keys")
    table = EmbeddingTable({k: embeddings[k] for k in needed})
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
        scores = (table.gather(r).astype(np.float64) @ unit_cohort) / table.norms[r, None]  # (chunk, C)
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


def compute_eer(labels, scores):
    """Equal error rate (fraction) and its threshold, by the original method: ROC from
    ``sklearn.metrics.roc_curve``, then brentq on 1 - x - tpr(x) with tpr linearly interpolated."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise DataError("EER is undefined: the trials hold only targets or only non-targets")
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    threshold = float(interp1d(fpr, thresholds)(eer))
    return float(eer), threshold


def compute_min_dcf(labels, scores, p_target, c_miss=1.0, c_fa=1.0):
    """Minimum normalised detection cost and its threshold (NIST SRE evaluation plans):

        C_det(t) = C_miss * P_miss(t) * P_target + C_fa * P_fa(t) * (1 - P_target)
        minDCF   = min_t C_det(t) / min(C_miss * P_target, C_fa * (1 - P_target))

    with P_miss(t) the fraction of targets scored below t and P_fa(t) that of non-targets at or
    above t, over every operating point of the ROC (accept none ... accept all). ``p_target`` may
    be a list: then lists of (minDCF, threshold) pairs come back, from one ROC.
    """
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise DataError("minDCF is undefined: the trials hold only targets or only non-targets")
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    results = []
    for p in np.atleast_1d(p_target):
        cost = c_miss * (1 - tpr) * p + c_fa * fpr * (1 - p)
        best = int(np.argmin(cost))
        results.append((float(cost[best] / min(c_miss * p, c_fa * (1 - p))), float(thresholds[best])))
    return results if np.ndim(p_target) else results[0]


def make_validation_trials(keys, nb_trial, rng):
    """Random validation trials (original ``make_validation_trial``): half targets (two different
    utterances of a random speaker), half non-targets (utterances of two random speakers)."""
    by_spk = {}
    for key in keys:
        by_spk.setdefault(speaker_of(key), []).append(key)
    speakers = sorted(by_spk)
    multi = [s for s in speakers if len(by_spk[s]) >= 2]
    if not multi or len(speakers) < 2:
        raise DataError("validation trials need at least two speakers, one with two utterances")
    lines = []
    for spk in rng.choice(multi, size=nb_trial // 2, replace=True):
        a, b = rng.choice(by_spk[spk], size=2, replace=False)
        lines.append(f"1 {a} {b}")
    for _ in range(nb_trial // 2):
        sa, sb = rng.choice(speakers, size=2, replace=False)
        lines.append(f"0 {rng.choice(by_spk[sa])} {rng.choice(by_spk[sb])}")
    return lines


# ---------------------------------------------------------------------------------------------
# Training helpers

def init_weights(module):
    """Original initialisation, applied with ``model.apply``: Linear -> Xavier-uniform weight and
    bias 1e-4; any other module with a ``weight`` except BatchNorm (i.e. Conv1d) -> Kaiming-normal
    with a = 0.01; everything else keeps PyTorch's defaults."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        module.bias.data.fill_(0.0001)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        pass
    elif isinstance(getattr(module, "weight", None), torch.Tensor):
        nn.init.kaiming_normal_(module.weight, a=0.01)


def keras_lr_decay(step, decay=1e-4):
    """Keras' time-based decay: the learning-rate factor after ``step`` optimiser steps."""
    return 1.0 / (1.0 + decay * step)


def param_groups(model, weight_decay):
    """Weight decay for every parameter except those whose name contains 'bn' (original rule)."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "bn" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if "bn" in n], "weight_decay": 0.0}]


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_states():
    """Every RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------
# Atomic writes

def _atomic(path, write):
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


def save_atomic(obj, path):
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text, path):
    _atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(obj, path):
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_pickle_atomic(obj, path):
    _atomic(path, lambda f: pickle.dump(obj, f, protocol=4))


def write_npy_atomic(array, path):
    _atomic(path, lambda f: np.save(f, array, allow_pickle=False))


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


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for untrusted files: plain containers, strings and numbers, and numpy arrays."""

    def find_class(self, module, name):
        if module.startswith("numpy.core.") or module == "numpy.core":
            module = "numpy._core" + module[len("numpy.core"):]  # the numpy 1.x name of the same module
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def load_pickle(path):
    """Unpickle ``path`` with ``RestrictedUnpickler``; DataError (one line) if it is refused or broken."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not loaded, {e}: embedding pickles may only hold a dict of "
                        f"utterance keys to numpy arrays") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def check_embeddings(obj, path):
    """Validate a loaded embedding dict (keys -> 1-D real vectors of one size) and return it with
    canonical keys (no ``.wav``) and float32 values."""
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a non-empty dict of utterance keys to embeddings, got {type(obj).__name__}")
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


def load_embeddings(path):
    """Embeddings from a pickle (``.pk``, loaded with ``RestrictedUnpickler``) or from a ``.npy``
    matrix plus its key list (``npy_keys_path``). Returns dict utterance id -> float32 vector."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: embedding file not found")
    if not path.endswith(".npy"):
        return check_embeddings(load_pickle(path), path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain .npy matrix ({e})") from None
    keys_path = npy_keys_path(path)
    if not os.path.isfile(keys_path):
        raise DataError(f"{keys_path}: key list of {path} not found")
    with open(keys_path) as f:
        keys = f.read().split()
    if matrix.ndim != 2 or len(keys) != len(matrix):
        raise DataError(f"{path}: matrix of shape {matrix.shape} does not match {len(keys)} keys in {keys_path}")
    return check_embeddings(dict(zip(keys, matrix)), path)


def save_embeddings(embeddings, path):
    """Write embeddings atomically as the released pickles (dict key -> float32 vector) or, for a
    ``.npy`` path, as a float32 matrix with rows in sorted key order plus its key list."""
    keys = sorted(embeddings)
    if not path.endswith(".npy"):
        write_pickle_atomic({k: np.asarray(embeddings[k], dtype=np.float32) for k in keys}, path)
        return
    write_text_atomic("".join(k + "\n" for k in keys), npy_keys_path(path))
    write_npy_atomic(np.stack([np.asarray(embeddings[k], dtype=np.float32) for k in keys]), path)


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): no-ops in a single process

def rank_and_world():
    """(rank, world size) of this process: from the process group, else torchrun's environment."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process():
    return rank_and_world()[0] == 0


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(model):
    """Copy rank 0's buffers (batch-norm running statistics) to every process, as DDP does at the
    start of each training forward; needed before evaluating in eval mode on every process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_gather_embeddings(embeddings, skipped):
    """Merge every process's share of (embeddings dict, skipped keys); identity in one process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, skipped
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (embeddings, skipped))
    merged, all_skipped = {}, []
    for emb, skip in shares:
        merged.update(emb)
        all_skipped.extend(skip)
    return merged, sorted(all_skipped)
