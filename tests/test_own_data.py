"""Own data: DB/prepare_dataset.py, conversion of any rate and channel count, extraction of any folder
or list, scoring against one embedding file, and the whole path from foreign layouts to an export."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, TINY_FLAGS

sys.path.insert(0, os.path.join(ROOT, "DB"))
import evaluate_pretrained_RawNet2 as evaluate  # noqa: E402
import prepare_dataset  # noqa: E402
import train_RawNet2  # noqa: E402
import utils  # noqa: E402
from utils import DataError  # noqa: E402


def voice(rng, f0, seconds, rate, channels):
    """A speaker-dependent signal: harmonics of the speaker's pitch ``f0`` with a slow vibrato, plus
    noise; ``channels`` copies with per-channel gains."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * f0 * (t + 0.002 * np.sin(2 * np.pi * 3 * t))
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.2 * rng.standard_normal(t.size)
    x = 0.25 * x / np.max(np.abs(x))
    return np.stack([x * g for g in np.linspace(1.0, 0.6, channels)], axis=1) if channels > 1 else x


def write_layouts(root, seed=0):
    """Three foreign layouts: ``two/<speaker>/<file>.flac`` (48 kHz stereo), ``three/<speaker>/<chapter>/
    <file>.flac`` (16 kHz mono) and ``csv/list.csv`` of 44.1 kHz wavs (``path,speaker,session``)."""
    rng = np.random.default_rng(seed)
    for s in range(4):
        f0 = 90 + 45 * s
        for u in range(3):
            path = os.path.join(root, "two", f"reader{s}", f"take {u}.flac")  # a space in the file name
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sf.write(path, voice(rng, f0, rng.uniform(0.3, 0.5), 48000, 2), 48000)
        for c in range(2):
            for u in range(2):
                path = os.path.join(root, "three", f"{100 + s}", f"ch{c}", f"{100 + s}-{c}-{u:04d}.flac")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                sf.write(path, voice(rng, f0 + 7, rng.uniform(0.3, 0.5), 16000, 1), 16000)
    os.makedirs(os.path.join(root, "csv", "clips"))
    with open(os.path.join(root, "csv", "list.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "speaker", "session"])
        for s in range(4):
            for u in range(3):
                name = f"clips/s{s}_{u}.wav"
                sf.write(os.path.join(root, "csv", name), voice(rng, 100 + 40 * s, 0.4, 44100, 1), 44100,
                         subtype="PCM_16")
                writer.writerow([name, f"spk {s}", f"day{u % 2}"])
    return root
