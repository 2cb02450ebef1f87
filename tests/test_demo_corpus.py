"""Tests of the synthetic demo corpus: layout, audio format, trials, determinism, caching, safety."""
import os
import re

import numpy as np
import pytest
import soundfile as sf

import demo_corpus

TINY = dict(n_train_speakers=3, n_test_speakers=3, n_videos=2, n_utterances=2,
            min_seconds=0.5, max_seconds=1.0, progress=False)
KEY = r"{}/[A-Za-z0-9_-]{{11}}/\d{{5}}\.wav"


def build(root, **overrides):
    return demo_corpus.make_demo_corpus(str(root), **{**TINY, "workers": 1, **overrides})


def wav_keys(folder):
    """Utterance keys `<spk>/<video>/<NNNNN>.wav` found under `folder`."""
    return sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                  for d, _, files in os.walk(folder) for f in files if f.endswith(".wav"))


def tree_bytes(root):
    """{relative path: file content} of every file under `root`."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny") / "demo")


def test_layout_and_key_format(tiny):
    train = wav_keys(os.path.join(tiny, "VoxCeleb2", "wav"))
    test = wav_keys(os.path.join(tiny, "VoxCeleb1", "eval_wav"))
    assert len(train) == len(test) == 3 * 2 * 2
    assert all(re.fullmatch(KEY.format(r"id0\d{4}"), k) for k in train)
    assert all(re.fullmatch(KEY.format(r"id1\d{4}"), k) for k in test)
    assert {k.rsplit("/", 1)[1] for k in train} == {"00001.wav", "00002.wav"}


def test_audio_is_16k_mono_pcm16_of_the_asked_length(tiny):
    for folder in ("VoxCeleb2/wav", "VoxCeleb1/eval_wav"):
        for key in wav_keys(os.path.join(tiny, folder)):
            info = sf.info(os.path.join(tiny, folder, key))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.5 <= info.duration <= 1.0


def test_train_and_test_speakers_are_disjoint(tiny):
    train = set(os.listdir(os.path.join(tiny, "VoxCeleb2", "wav")))
    test = set(os.listdir(os.path.join(tiny, "VoxCeleb1", "eval_wav")))
    assert len(train) == len(test) == 3 and not train & test


def test_trials_reference_existing_keys_with_correct_labels(tiny):
    with open(os.path.join(tiny, "VoxCeleb1", "veri_test.txt")) as f:
        lines = f.read().splitlines()
    keys = set(wav_keys(os.path.join(tiny, "VoxCeleb1", "eval_wav")))
    trials = [line.split(" ") for line in lines]
    assert all(len(t) == 3 and t[0] in ("0", "1") and {t[1], t[2]} <= keys for t in trials)
    assert {t[0] for t in trials} == {"0", "1"}
    for label, a, b in trials:
        (speaker_a, video_a, _), (speaker_b, video_b, _) = a.split("/"), b.split("/")
        assert (speaker_a == speaker_b) == (label == "1")
        assert label == "0" or video_a != video_b  # targets pair different videos
    assert sum(t[0] == "1" for t in trials) == 3 * 2 * 2  # per speaker: 2 x 2 pairs across its 2 videos


def test_one_video_per_speaker_falls_back_to_same_video_targets():
    keys = ["id10001/aaaaaaaaaaa/00001.wav", "id10001/aaaaaaaaaaa/00002.wav",
            "id10002/bbbbbbbbbbb/00001.wav", "id10002/bbbbbbbbbbb/00002.wav"]
    labels = sorted(line.split()[0] for line in demo_corpus.make_trials(1234, keys))
    assert labels == ["0", "0", "1", "1"]


def test_same_seed_gives_identical_bytes_for_any_worker_count(tiny, tmp_path):
    again = build(tmp_path / "demo", workers=2)
    assert tree_bytes(again) == tree_bytes(tiny)


def test_another_seed_gives_other_audio(tiny, tmp_path):
    other = build(tmp_path / "demo", seed=99)
    wavs = [{data for path, data in tree_bytes(root).items() if path.endswith(".wav")}
            for root in (other, tiny)]
    assert wavs[0].isdisjoint(wavs[1])


def test_cache_hit_returns_without_rewriting(tmp_path):
    root = build(tmp_path / "demo")
    before = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in tree_bytes(root)}
    assert build(tmp_path / "demo") == root
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in tree_bytes(root)} == before


def test_other_parameters_rebuild_own_corpus(tmp_path):
    root = build(tmp_path / "demo")
    build(tmp_path / "demo", n_utterances=1)
    assert len(wav_keys(os.path.join(root, "VoxCeleb2", "wav"))) == 3 * 2 * 1
    assert os.listdir(tmp_path) == ["demo"]  # no temporary folder left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        build(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_interrupted_build_leaves_no_corpus(tmp_path, monkeypatch):
    def fail(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_corpus, "_write_session", fail)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "demo")
    assert os.listdir(tmp_path) == []


def test_mean_log_spectrum_peaks_at_a_tone():
    wav = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.argmax(demo_corpus.mean_log_spectrum(wav)) == 1000 * 512 // 16000


@pytest.mark.slow
def test_naive_baseline_fails_on_the_default_corpus(tmp_path):
    # The acceptance bar of the demo: a mean-spectrum baseline must not solve the task.
    root = demo_corpus.make_demo_corpus(str(tmp_path / "demo"), progress=False)
    assert demo_corpus.naive_baseline_eer(root) > 0.10


def test_a_short_utterance_without_a_vowel_takes_the_next_vowels_formants():
    # seed 57: the phones drawn for 0.5 s are a pause and onsets only, no vowel
    speaker, session = demo_corpus.draw_speaker(57, 1, 1), demo_corpus.draw_session(57, 1, 1, 0)
    rng = demo_corpus._rng(57, demo_corpus.UTTERANCE, 1, 0, 0, 57)
    formants, *_ = demo_corpus.draw_phones(rng, 8000 // demo_corpus.HOP + 2, speaker, session)
    assert np.isfinite(formants).all() and np.ptp(formants, axis=0).max() == 0


@pytest.mark.parametrize("flags, message", [
    (["-n_train_speakers", "-1"], "-n_train_speakers -1: must not be negative"),
    (["-n_test_speakers", "1"], "-n_test_speakers 1: must be at least 2"),
    (["-n_videos", "1", "-n_utterances", "1"], "-n_utterances 1: must be at least 1, and at least 2"),
    (["-min_seconds", "0"], "-min_seconds 0.0: must be from 1 to 600"),
    (["-min_seconds", "3", "-max_seconds", "2"], "-max_seconds 2.0: must be from -min_seconds to 600"),
    (["-max_seconds", "nan"], "-max_seconds nan: must be from -min_seconds"),
    (["-workers", "0"], "-workers 0: must be at least 1")])
def test_flags_no_corpus_can_be_built_with_are_one_line(tmp_path, flags, message):
    with pytest.raises(demo_corpus.common.DataError, match=re.escape(message)):
        demo_corpus.main(demo_corpus.parse_args(["-root", str(tmp_path / "demo"), *flags]))
    assert not os.listdir(tmp_path)
