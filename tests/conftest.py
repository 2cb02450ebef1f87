"""Shared fixtures: a tiny corpus in VoxCeleb layout (seconds to make, seconds to train on)."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A scaled-down model for end-to-end runs; every other part of the pipeline is the paper's.
TINY_FLAGS = ["-nb_samp", "4000", "-m_nb_samp", "4000", "-window_size", "1000",
              "-m_filts", "[8,[8,8],[8,16],[16,16]]", "-m_gru_node", "16", "-m_nb_fc_node", "16",
              "-bs", "4", "-nb_worker", "0"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole trainings, extractions or exports, runs in new "
                                       "processes, larger sizes of a quick test (pytest -m 'not slow' "
                                       "leaves them out)")


def write_speakers(root, speakers, videos, utts, rng):
    """Harmonic tones with a per-speaker pitch plus noise; returns the sorted keys."""
    keys = []
    for spk in speakers:
        f0 = rng.uniform(80, 250)
        for v in range(videos):
            for u in range(utts):
                key = f"{spk}/vid{v:08d}/{u + 1:05d}.wav"
                n = int(rng.uniform(0.2, 0.6) * 16000)
                t = np.arange(n) / 16000
                x = (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(4 * np.pi * f0 * t)
                     + 0.3 * rng.standard_normal(n))
                os.makedirs(os.path.join(root, os.path.dirname(key)), exist_ok=True)
                sf.write(os.path.join(root, key), 0.3 * x, 16000, subtype="PCM_16")
                keys.append(key)
    return sorted(keys)


def make_tiny_corpus(root, seed=0):
    rng = np.random.default_rng(seed)
    write_speakers(os.path.join(root, "VoxCeleb2", "wav"), [f"id0{i:04d}" for i in range(6)], 2, 2, rng)
    eval_keys = write_speakers(os.path.join(root, "VoxCeleb1", "eval_wav"), [f"id1{i:04d}" for i in range(3)],
                               2, 2, rng)
    with open(os.path.join(root, "VoxCeleb1", "veri_test.txt"), "w") as f:
        for i, a in enumerate(eval_keys):
            for b in eval_keys[i + 1:]:
                f.write(f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n")
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Read-only tiny corpus shared by the tests: <root>/VoxCeleb1, <root>/VoxCeleb2."""
    return make_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def tiny_run_flags(corpus, save_dir, name="run", epochs=1):
    return ["-name", name, "-save_dir", str(save_dir), "-DB", os.path.join(corpus, "VoxCeleb1") + "/",
            "-DB_vox2", os.path.join(corpus, "VoxCeleb2") + "/", "-epoch", str(epochs)] + TINY_FLAGS
