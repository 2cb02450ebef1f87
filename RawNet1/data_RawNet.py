"""RawNet1 data: int16-scale pre-emphasised waveforms stored one ``.npy`` per utterance, training crops,
whole-utterance (or random-crop) embeddings, validation trial lists.

Storage (written by ``pre_process_waveforms.py``): ``<folder>/<spk>/<video>/<NNNNN>.npy`` (float32,
memory-mapped for random access) and ``<folder>/index.json`` (utterance key -> samples, the skipped
files, the source folder), written last so an index means a complete folder.

Utterance lists are sorted (labels do not depend on the file system's order); crops are drawn from a
generator seeded by (seed, phase, epoch, item), so a run does not depend on the worker count and
resumes exactly; silent or empty files are skipped and listed.
"""

import json
import os
import warnings

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import common
import scoring
import tta
import utils
from common import DataError
from utils import SilentAudioError

PRE_EMPHASIS = 0.97
INDEX = "index.json"


# add("trials", **TRIALS_FLAG): the test trials of train_RawNet.py and train_bvec.py
TRIALS_FLAG = {"type": str, "default": "DB/VoxCeleb1/veri_test.txt", "help": "test trials (Vox1-O)"}

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
    with open(path, "rb") as f:
        try:
            index = json.load(f)
        except ValueError:
            index = None
    if not (isinstance(index, dict) and isinstance(index.get("lengths"), dict)
            and isinstance(index.get("skipped"), list)):
        raise DataError(f"{path}: not the index RawNet1/pre_process_waveforms.py writes; run it again "
                        f"into an empty folder")
    if not index["lengths"]:
        raise DataError(f"{folder}: every utterance was skipped as empty or silent")
    return index["lengths"], index["skipped"]


def validation_speakers(keys, nb_val_spk, seed):
    """The keys of ``nb_val_spk`` speakers drawn with ``seed`` (all of them for 0). They stay in the
    training set: the Keras code trains on every dev speaker and validates on 40 of them."""
    speakers = sorted({common.speaker_of(k) for k in keys})
    if nb_val_spk <= 0:
        return list(keys)
    if nb_val_spk > len(speakers) or nb_val_spk < 2:
        raise DataError(f"-nb_val_spk {nb_val_spk}: needs 2 to {len(speakers)} speakers (the dev set has "
                        f"{len(speakers)})")
    chosen = set(np.random.default_rng(seed).choice(speakers, nb_val_spk, replace=False))
    return [k for k in keys if common.speaker_of(k) in chosen]


def per_utterance_trials(keys, rng, nb_target=4, nb_nontarget=4):
    """Trial lines in the layout of the Keras code's ``voxceleb1_val.txt`` (and of Vox1-O): every
    utterance is paired in turn with ``nb_target`` utterances of its speaker and ``nb_nontarget``
    utterances of other speakers, alternating target and non-target lines (8 lines per utterance).
    As the counts in that list show, partners are drawn with replacement: target partners uniformly
    among the speaker's utterances (the utterance itself included: 154 of the list's 21,760 target
    trials), non-target partners as a uniformly drawn other speaker, then one of its utterances."""
    by_spk = {}
    for key in keys:
        by_spk.setdefault(common.speaker_of(key), []).append(key)
    if len(by_spk) < 2:
        raise DataError("validation trials need at least two speakers")
    speakers = sorted(by_spk)
    lines = []
    for key in keys:
        spk = common.speaker_of(key)
        others = [s for s in speakers if s != spk]
        targets = rng.choice(by_spk[spk], nb_target)
        impostors = [rng.choice(by_spk[s]) for s in rng.choice(others, nb_nontarget)]
        for i in range(max(nb_target, nb_nontarget)):
            lines += [f"1 {key} {targets[i]}"] if i < nb_target else []
            lines += [f"0 {key} {impostors[i]}"] if i < nb_nontarget else []
    return lines


def generate_validation_lines(keys, nb_val_spk, nb_val_trial, seed):
    """Validation trials over ``nb_val_spk`` speakers of ``keys`` (0: all) drawn with ``seed``: 8 per
    utterance (``per_utterance_trials``) when ``nb_val_trial`` is 0, else ``nb_val_trial`` random
    trials, half target (``utils.make_validation_trials``, the PyTorch code's way)."""
    keys = validation_speakers(keys, nb_val_spk, seed)
    rng = np.random.default_rng([seed, 1])
    if nb_val_trial:
        return utils.make_validation_trials(keys, nb_val_trial, rng)
    return per_utterance_trials(keys, rng)


def read_vox1_meta(path):
    """VoxCeleb1's ``vox1_meta.csv`` (tab-separated: VoxCeleb1 ID, VGGFace1 ID (the speaker's name),
    gender, nationality, set): name -> id."""
    names = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2 and parts[0].strip().startswith("id"):
                    names[parts[1].strip()] = parts[0].strip()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not names:
        raise DataError(f"{path}: no 'id<NNNNN>\\t<name>' lines (expected VoxCeleb1's vox1_meta.csv)")
    return names


def vox1_id_key(key, names):
    """A key of the first VoxCeleb1 release, ``<name>/<video>_<NNNNNNN>.wav`` (the Keras code's lists),
    as the current release's ``<id>/<video>/<NNNNN>.wav``; keys already in that form pass unchanged."""
    parts = key.split("/")
    if len(parts) != 2:
        return key
    name, file = parts
    stem, ext = os.path.splitext(file)
    video, _, number = stem.rpartition("_")
    if name not in names or not video or not number.isdigit():
        raise DataError(f"{key}: not '<name>/<video>_<number>.wav' with a name in the VoxCeleb1 meta file")
    return f"{names[name]}/{video}/{int(number):05d}{ext}"


def read_trial_lines(path, names=None):
    """Trial lines '<1|0> <keyA> <keyB>' of ``path``; with ``names`` (``read_vox1_meta``) keys of the
    first VoxCeleb1 release are translated to the current one."""
    labels, keys_a, keys_b = scoring.read_trials(path)
    if names is not None:
        keys_a = [vox1_id_key(k, names) for k in keys_a]
        keys_b = [vox1_id_key(k, names) for k in keys_b]
    return [f"{t} {a} {b}" for t, a, b in zip(labels, keys_a, keys_b)]


def load_npy(folder, key, mmap_mode=None):
    """The pre-processed samples of ``key``; a damaged file is one line naming it."""
    path = npy_path(folder, key)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy ({e}); delete it and rerun "
                        f"RawNet1/pre_process_waveforms.py (it converts what is missing)") from None


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
        x = load_npy(self.folder, key, mmap_mode="r")
        rng = np.random.default_rng([self.seed, self.phase, self.epoch, i])
        crop = np.array(utils.crop_or_tile(x, self.nb_samp, rng), dtype=np.float32)
        return torch.from_numpy(crop), self.labels[common.speaker_of(key)]


class UtteranceSet(Dataset):
    """Whole pre-processed utterances, tiled to at least ``min_samples``; yields (waveform, key).
    With ``crop = (nb_samp, seed)`` each utterance is instead one random ``nb_samp`` crop drawn from
    a generator seeded by (seed..., i), as the PyTorch baseline scores its validation trials."""

    def __init__(self, keys, folder, min_samples, crop=None):
        self.keys, self.folder, self.min_samples, self.crop = keys, folder, min_samples, crop

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self.crop is not None:
            nb_samp, seed = self.crop
            x = load_npy(self.folder, self.keys[i], mmap_mode="r")
            x = np.array(utils.crop_or_tile(x, nb_samp, np.random.default_rng(list(seed) + [i])))
        else:
            x = load_npy(self.folder, self.keys[i])
            if len(x) < self.min_samples:
                x = utils.crop_or_tile(x, self.min_samples)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.keys[i]


@torch.no_grad()
def embed_utterances(model, keys, folder, device="cpu", nb_worker=0, progress=True, desc="embeddings",
                     crop=None):
    """Embedding of each utterance (one forward each, eval mode): dict id (no .wav) -> float32.
    Whole utterances, or random crops with ``crop = (nb_samp, seed)`` (see ``UtteranceSet``): each
    one segment of ``tta.tta_embeddings``, the embedding path RawNet2's scripts run too."""
    dataset = UtteranceSet(keys, folder, model.min_samples, crop)
    # A generator of its own: the loader's seed draw leaves torch's global random state (training's
    # dropout) as it was, so that scoring an epoch or not never changes the training.
    loader = DataLoader(dataset, batch_size=None, num_workers=nb_worker, generator=torch.Generator())
    utterances = ((key, x[None]) for x, key in tqdm(loader, desc=desc, disable=not progress, leave=False))
    with tta.eval_mode(model):
        return {common.utt_id(key): code
                for key, code in tta.tta_embeddings(tta.model_forward(model, device), utterances, 1)}


def trial_arrays(lines):
    """(labels, keysA, keysB) of trial lines '<1|0> <keyA> <keyB>' (``utils.make_validation_trials``)."""
    parts = [line.split() for line in lines]
    return (np.array([int(p[0]) for p in parts]), [common.utt_id(p[1]) for p in parts],
            [common.utt_id(p[2]) for p in parts])


def usable_trials(trials, available, skipped, what):
    """Drop (with a warning) trials touching a skipped silent file; any other missing key is an error."""
    (labels, keys_a, keys_b), dropped = scoring.trials_without(trials, skipped)
    if dropped:
        bad = sorted(common.utt_id(k) for k in skipped)
        warnings.warn(f"{what}: {dropped} trials dropped, they use files skipped as silent "
                      f"({', '.join(bad[:5])})", stacklevel=2)
    scoring.check_keys(keys_a + keys_b, available, f"trial keys of {what}")
    return labels, keys_a, keys_b
