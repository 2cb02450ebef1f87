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
  * Trial scoring is vectorised and chunked; EER is computed exactly as the original (roc_curve +
    brentq).
  * Checkpoints and text outputs are written atomically (temporary file, then rename).
"""

import json
import os
import random
import tempfile
import warnings

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

SAMPLE_RATE = 16000


class DataError(Exception):
    """Bad or missing input data; the message is one line naming the file, key or flag."""


class SilentAudioError(DataError):
    """An empty or all-zero waveform: it cannot be peak-normalised."""


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


def read_wav(path):
    """Read a 16 kHz mono wav as the original does: float64, divided by its peak, cast to float32."""
    try:
        x, sr = sf.read(path, dtype="float64")
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if x.ndim != 1:
        raise DataError(f"{path}: {x.shape[1]} channels, expected mono")
    if sr != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} Hz")
    peak = np.max(np.abs(x)) if x.size else 0.0
    if peak == 0:
        raise SilentAudioError(f"{path}: empty or all-zero audio")
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
    number of DataLoader workers, and the same again when a run is resumed. Set ``epoch`` before
    creating each epoch's DataLoader iterator.
    """

    def __init__(self, keys, base_dir, labels, nb_samp, seed=0):
        self.keys, self.base_dir, self.labels, self.nb_samp = keys, base_dir, labels, nb_samp
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        # A silent file is skipped (with a warning) in favour of the next utterance in the list.
        for offset in range(len(self.keys)):
            key = self.keys[(index + offset) % len(self.keys)]
            try:
                x = read_wav(os.path.join(self.base_dir, key))
            except SilentAudioError as e:
                warnings.warn(f"skipping {e}")
                continue
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return crop_or_tile(x, self.nb_samp, rng), self.labels[speaker_of(key)], key
        raise DataError(f"{self.base_dir}: every training file is empty or silent")


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


@torch.no_grad()
def embed_utterances(model, keys, base_dir, nb_samp, window_size, device="cpu", nb_worker=0,
                     segments_per_batch=32, progress=True, desc="TTA embeddings"):
    """TTA embeddings (mean over segments of ``model.embed``) of ``keys`` read from ``base_dir``.

    Segments of several utterances are packed into one forward of up to ``segments_per_batch``
    windows; audio is read in ``nb_worker`` DataLoader workers. Returns ``(embeddings, skipped)``:
    a dict utterance id (no ``.wav``) -> float32 numpy vector, and the keys of silent files.
    """
    net = model.module if isinstance(model, nn.DataParallel) else model
    was_training = net.training
    net.eval()
    loader = DataLoader(TTASet(keys, base_dir, nb_samp, window_size), batch_size=1,
                        num_workers=nb_worker, collate_fn=_first)
    embeddings, skipped = {}, []
    pending, pending_keys, pending_counts = [], [], []

    def flush():
        codes = net.embed(torch.cat(pending).to(device)).float().cpu()
        for key, part in zip(pending_keys, torch.split(codes, pending_counts)):
            embeddings[utt_id(key)] = part.mean(0).numpy()
        pending.clear(), pending_keys.clear(), pending_counts.clear()

    for segments, key in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if len(segments) == 0:
            skipped.append(key)
            continue
        pending.append(segments), pending_keys.append(key), pending_counts.append(len(segments))
        if sum(pending_counts) >= segments_per_batch:
            flush()
    if pending:
        flush()
    net.train(was_training)
    return embeddings, skipped


def embed_utterance(model, wav, window_size=11810, device="cpu"):
    """TTA embedding of one utterance (a wav path or a 1-D waveform array), for notebooks."""
    net = model.module if isinstance(model, nn.DataParallel) else model
    x = read_wav(wav) if isinstance(wav, (str, os.PathLike)) else np.asarray(wav, dtype=np.float32)
    segments = torch.from_numpy(np.ascontiguousarray(tta_segments(x, net.nb_samp, window_size)))
    was_training = net.training
    net.eval()
    with torch.no_grad():
        code = net.embed(segments.to(device)).mean(0).cpu().numpy()
    net.train(was_training)
    return code


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
            keys_a.append(utt_id(parts[1]))
            keys_b.append(utt_id(parts[2]))
    if not labels:
        raise DataError(f"{path}: no trials")
    return np.array(labels), keys_a, keys_b


def check_keys(needed, available, what):
    """Raise DataError with the count and the first few of ``needed`` keys not in ``available``."""
    missing = sorted(set(needed) - set(available))
    if missing:
        raise DataError(f"{len(missing)} {what} have no audio/embedding, e.g. {', '.join(missing[:5])}")


def cosine_scores(embeddings, keys_a, keys_b, chunk=100_000):
    """Cosine similarity per trial (the original's ``np.dot(a, b) / (|a| |b|)``), vectorised.

    Each unique embedding is normalised once; trials are scored in chunks so memory stays bounded.
    """
    ids = sorted(set(keys_a) | set(keys_b))
    index = {k: i for i, k in enumerate(ids)}
    matrix = np.stack([np.asarray(embeddings[k], dtype=np.float64) for k in ids])
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.all(np.isfinite(matrix)) or np.any(norms == 0):
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(matrix).all(1) | (norms[:, 0] == 0))]
        raise DataError(f"{len(bad)} embeddings are non-finite or zero, e.g. {', '.join(bad[:5])}")
    matrix /= norms
    ia = np.fromiter((index[k] for k in keys_a), dtype=np.int64, count=len(keys_a))
    ib = np.fromiter((index[k] for k in keys_b), dtype=np.int64, count=len(keys_b))
    scores = np.empty(len(ia))
    for s in range(0, len(ia), chunk):
        scores[s:s + chunk] = np.einsum("ij,ij->i", matrix[ia[s:s + chunk]], matrix[ib[s:s + chunk]])
    return scores


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
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
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
