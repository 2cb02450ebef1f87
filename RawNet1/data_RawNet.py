"""RawNet1 data: int16-scale pre-emphasised waveforms stored one ``.npy`` per utterance, training crops,
whole-utterance embeddings, the speaker split for validation, trial lists.

Storage (written by ``pre_process_waveforms.py``): ``<folder>/<spk>/<video>/<NNNNN>.npy`` (float32,
memory-mapped for random access) and ``<folder>/index.json`` (utterance key -> samples, the skipped
files, the source folder), written last so an index means a complete folder.

Deliberate differences from the original code: utterance lists are sorted (labels do not depend on
the file system's order); crops are drawn from a generator seeded by (seed, phase, epoch, item), so a
run does not depend on the worker count and resumes exactly; silent or empty files are skipped and
listed instead of producing NaN.
"""

import json
import os
import warnings

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import scoring
import utils
from utils import DataError, SilentAudioError

PRE_EMPHASIS = 0.97
INDEX = "index.json"


def read_int16(path):
    """A 16 kHz mono wav as float32 at int16 scale (the Keras code's input scale, no normalisation)."""
    try:
        x, sr = sf.read(path, dtype="int16")
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if x.ndim != 1:
        raise DataError(f"{path}: {x.shape[1]} channels, expected mono")
    if sr != utils.SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {utils.SAMPLE_RATE} Hz")
    if x.size < 2 or not np.any(x):
        raise SilentAudioError(f"{path}: empty or all-zero audio")
    return x.astype(np.float32)


def pre_emphasis(x, coef=PRE_EMPHASIS):
    """y[n] = x[n + 1] - coef * x[n]: one sample shorter than x (the original's ``x[1:] - 0.97 * x[:-1]``)."""
    return (x[1:] - coef * x[:-1]).astype(np.float32)


def npy_path(folder, key):
    return os.path.join(folder, os.path.splitext(key)[0] + ".npy")


def load_index(folder):
    """(lengths: key -> samples, skipped keys) of a pre-processed folder."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise DataError(f"{folder}: no {INDEX}; run RawNet1/pre_process_waveforms.py on its wav folder first "
                        "(an interrupted run resumes)")
    with open(path) as f:
        index = json.load(f)
    if not index["lengths"]:
        raise DataError(f"{folder}: every utterance was skipped as empty or silent")
    return index["lengths"], index["skipped"]


def split_speakers(keys, nb_val_spk, seed):
    """Hold out ``nb_val_spk`` speakers (drawn with ``seed``) for validation: (train keys, val keys)."""
    speakers = sorted({utils.speaker_of(k) for k in keys})
    if nb_val_spk <= 0:
        return list(keys), []
    if nb_val_spk > len(speakers) - 2:
        raise DataError(f"-nb_val_spk {nb_val_spk}: the dev set has only {len(speakers)} speakers")
    held_out = set(np.random.default_rng(seed).choice(speakers, nb_val_spk, replace=False))
    return ([k for k in keys if utils.speaker_of(k) not in held_out],
            [k for k in keys if utils.speaker_of(k) in held_out])


class CropSet(Dataset):
    """Random ``nb_samp`` crops of pre-processed utterances; yields (waveform, label).

    The crop of item ``i`` comes from a generator seeded by (seed, phase, epoch, i); set ``epoch``
    before each epoch's DataLoader iterator. Shorter utterances are tiled (``utils.crop_or_tile``)."""

    def __init__(self, keys, folder, labels, nb_samp, seed=0, phase=0):
        self.keys, self.folder, self.labels, self.nb_samp = keys, folder, labels, nb_samp
        self.seed, self.phase, self.epoch = seed, phase, 0

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        x = np.load(npy_path(self.folder, key), mmap_mode="r")
        rng = np.random.default_rng([self.seed, self.phase, self.epoch, i])
        crop = np.array(utils.crop_or_tile(x, self.nb_samp, rng), dtype=np.float32)
        return torch.from_numpy(crop), self.labels[utils.speaker_of(key)]


class UtteranceSet(Dataset):
    """Whole pre-processed utterances, tiled to at least ``min_samples``; yields (waveform, key)."""

    def __init__(self, keys, folder, min_samples):
        self.keys, self.folder, self.min_samples = keys, folder, min_samples

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        x = np.load(npy_path(self.folder, self.keys[i]))
        if len(x) < self.min_samples:
            x = utils.crop_or_tile(x, self.min_samples)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.keys[i]


@torch.no_grad()
def embed_utterances(model, keys, folder, device="cpu", nb_worker=0, progress=True, desc="embeddings"):
    """Embedding of each whole utterance (one forward each, eval mode): dict id (no .wav) -> float32."""
    was_training = model.training
    model.eval()
    loader = DataLoader(UtteranceSet(keys, folder, model.min_samples), batch_size=None, num_workers=nb_worker)
    embeddings = {}
    for x, key in tqdm(loader, desc=desc, disable=not progress, leave=False):
        embeddings[utils.utt_id(key)] = model.embed(x[None].to(device))[0].float().cpu().numpy()
    model.train(was_training)
    return embeddings


def trial_arrays(lines):
    """(labels, keysA, keysB) of trial lines '<1|0> <keyA> <keyB>' (``utils.make_validation_trials``)."""
    parts = [line.split() for line in lines]
    return (np.array([int(p[0]) for p in parts]), [utils.utt_id(p[1]) for p in parts],
            [utils.utt_id(p[2]) for p in parts])


def usable_trials(trials, available, skipped, what):
    """Drop (with a warning) trials touching a skipped silent file; any other missing key is an error."""
    labels, keys_a, keys_b = trials
    bad = {utils.utt_id(k) for k in skipped}
    keep = np.array([a not in bad and b not in bad for a, b in zip(keys_a, keys_b)])
    if not keep.all():
        warnings.warn(f"{what}: {int((~keep).sum())} trials dropped, they use files skipped as silent "
                      f"({', '.join(sorted(bad)[:5])})")
        labels = labels[keep]
        keys_a = [k for k, m in zip(keys_a, keep) if m]
        keys_b = [k for k, m in zip(keys_b, keep) if m]
    scoring.check_keys(keys_a + keys_b, available, f"trial keys of {what}")
    return labels, keys_a, keys_b
