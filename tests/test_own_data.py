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
import scoring  # noqa: E402
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


def write_layouts(root, speakers=4, seed=0):
    """Three foreign layouts: ``two/<speaker>/<file>.flac`` (48 kHz stereo), ``three/<speaker>/<chapter>/
    <file>.flac`` (16 kHz mono) and ``csv/list.csv`` of 44.1 kHz wavs (``path,speaker,session``)."""
    rng = np.random.default_rng(seed)
    for s in range(speakers):
        f0 = 90 * 1.15 ** s
        for u in range(3):
            path = os.path.join(root, "two", f"reader{s}", f"take_{u}.flac")
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
        for s in range(speakers):
            for u in range(3):
                name = f"clips/s{s}_{u}.wav"
                sf.write(os.path.join(root, "csv", name), voice(rng, 100 * 1.15 ** s, 0.4, 44100, 1), 44100,
                         subtype="PCM_16")
                writer.writerow([name, f"spk {s}", f"day{u % 2}"])
    return root


def prepare(argv, out):
    flags = ["-out", str(out), "-jobs", "2", "-progress", "False", "-min_seconds", "0"]  # (0.3-0.5 s clips)
    args = prepare_dataset.parse_args([str(a) for a in argv] + flags)
    return prepare_dataset.main(args)


def mapping(out):
    with open(os.path.join(out, "mapping.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


# ---------------------------------------------------------------------------------------------
# Conversion against closed-form references

@pytest.mark.parametrize("rate", [48000, 44100, 8000])
def test_resampled_tone_keeps_its_frequency_and_amplitude(rate):
    t = np.arange(3 * rate) / rate
    y, note = utils.to_mono_16k(0.5 * np.sin(2 * np.pi * 1000 * t), rate)
    assert note == f"resampled from {rate} Hz to 16000 Hz"
    assert abs(len(y) - 3 * 16000) <= 1
    middle = y[16000:32000]  # one second away from the filter's edge transients: 1 Hz bins
    spectrum = np.abs(np.fft.rfft(middle)) * 2 / len(middle)
    assert np.argmax(spectrum) == 1000
    assert abs(spectrum[1000] - 0.5) <= 0.005  # amplitude within 1 %
    assert np.sqrt(np.sum(spectrum ** 2) - spectrum[1000] ** 2) < 1e-3 * 0.5  # nothing else


def test_resampling_removes_what_lies_above_8_khz_and_keeps_what_lies_below():
    """A 48 kHz chirp sweeping 0 -> 24 kHz in 4 s, instantaneous frequency 6000 t Hz: after
    conversion, the stretch from 9.5 kHz up (past the filter's transition band, centred on 8 kHz) is
    gone, at least 55 dB down (nothing aliased into the band), and the stretch below 7 kHz keeps its
    RMS amplitude (0.5 / sqrt 2) within 1 %."""
    rate, seconds = 48000, 4.0
    t = np.arange(int(rate * seconds)) / rate
    chirp = 0.5 * np.sin(2 * np.pi * 3000 * t ** 2)  # phase' / 2 pi = 6000 t
    power = np.abs(np.fft.rfft(chirp)) ** 2
    assert np.sum(power[int(8000 * seconds):]) > 0.6 * np.sum(power)  # 2/3 of the source lies above 8 kHz
    y, _ = utils.to_mono_16k(chirp, rate)
    f = 6000 * np.arange(len(y)) / 16000
    below, above = y[(f > 500) & (f < 7000)], y[(f > 9500) & (f < 23500)]
    assert abs(np.sqrt(np.mean(below ** 2)) - 0.5 / np.sqrt(2)) <= 0.01 * 0.5 / np.sqrt(2)
    assert np.sqrt(np.mean(above ** 2)) < 10 ** (-55 / 20) * 0.5 / np.sqrt(2)


def test_channels_are_averaged_and_16k_mono_is_left_as_it_is(tmp_path):
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (1000, 2))
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    x, note = utils.read_audio(str(tmp_path / "s.wav"))
    np.testing.assert_allclose(x, stereo.astype(np.float32).astype(np.float64).mean(1), atol=1e-7)
    assert note == "2 channels mixed down to mono"
    sf.write(tmp_path / "m.wav", stereo[:, 0], 16000, subtype="PCM_16")
    x, note = utils.read_audio(str(tmp_path / "m.wav"))
    assert note == ""
    assert np.array_equal(utils.peak_normalise(x, "m"), utils.read_wav(str(tmp_path / "m.wav")))


# ---------------------------------------------------------------------------------------------
# DB/prepare_dataset.py

FAKE_FFMPEG = f"""#!{sys.executable}
import sys
import numpy as np, soundfile as sf
args = sys.argv[1:]
src, dst = args[args.index("-i") + 1], args[-1]
if "broken" in src:
    sys.exit("Invalid data found when processing input")
rate = int(args[args.index("-ar") + 1])
sf.write(dst, 0.1 * np.sin(np.arange(8000) / 5), rate, subtype="PCM_16", format="WAV")
"""


def test_prepare_reports_skips_resumes_and_refuses_other_plans(tmp_path, capsys):
    src = tmp_path / "src"
    for spk in ("a", "b"):
        for u in range(2):
            os.makedirs(src / spk, exist_ok=True)
            sf.write(src / spk / f"{u} take.ogg", voice(np.random.default_rng(u), 120, 0.3, 22050, 3), 22050)
    sf.write(src / "a" / "silent.wav", np.zeros(800), 16000)
    (src / "a" / "broken.flac").write_bytes(b"not audio")
    (src / "a" / "talk.m4a").write_bytes(b"m4a")
    (src / "a" / "notes.txt").write_text("not audio")
    os.makedirs(src / "b" / "extra")
    sf.write(src / "b" / "extra" / "deep.wav", np.ones(800) * 0.1, 16000)
    ffmpeg = tmp_path / "ffmpeg"
    ffmpeg.write_text(FAKE_FFMPEG)
    ffmpeg.chmod(0o755)
    out = tmp_path / "out"
    assert prepare([src, "-layout", "speaker/file", "-ffmpeg", ffmpeg], out) == 0
    report = capsys.readouterr().out
    assert f"{out}/wav: 2 speakers, 5 files" in report and "3 files skipped:" in report
    assert "1 files that are not audio ignored (.txt: 1)" in report
    assert "silent.wav: empty or all-zero audio" in report and "broken.flac: cannot read audio" in report
    assert "deep.wav: 2 folder levels below the source, -layout speaker/file has 1" in report
    rows = mapping(out)
    assert [r[1] for r in rows] == [f"wav/{name}.wav" for name in ("a/default/00001", "a/default/00002",
                                                                  "a/default/00005", "b/default/00001",
                                                                  "b/default/00002")]
    assert rows[2][0].endswith("talk.m4a")  # through ffmpeg
    for _, output, *_ in rows:
        info = sf.info(os.path.join(out, output))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert utils.list_utterances(str(out / "wav")) == sorted(r[1][len("wav/"):] for r in rows)
    os.remove(out / rows[0][1])
    (out / "wav" / "a" / "default" / "00002.wav.part.wav").write_bytes(b"half")  # an interrupted ffmpeg
    before = os.stat(out / rows[1][1]).st_mtime_ns
    assert prepare([src, "-layout", "speaker/file", "-ffmpeg", ffmpeg], out) == 0
    assert "resuming" in capsys.readouterr().out and os.stat(out / rows[1][1]).st_mtime_ns == before
    assert os.path.isfile(out / rows[0][1])
    assert not [f for _, _, files in os.walk(out) for f in files if ".part" in f]
    with pytest.raises(DataError, match="prepared earlier from other sources or flags"):
        prepare([src, "-layout", "speaker/file", "-test_speakers", "1"], out)


def test_prepare_bad_input_is_one_line(tmp_path):
    run = [sys.executable, os.path.join(ROOT, "DB", "prepare_dataset.py")]
    proc = subprocess.run(run + [str(tmp_path / "nowhere"), "-out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'nowhere'}: source folder not found"
    (tmp_path / "l.csv").write_text("path,speaker\na.wav\n")
    with pytest.raises(DataError, match=r"l.csv:2: expected 'path,speaker\[,session\]'"):
        prepare_dataset.read_list(str(tmp_path / "l.csv"))
    with pytest.raises(DataError, match="-layout speaker/take: expected"):
        prepare_dataset.parse_layout("speaker/take")


def test_trials_are_half_targets_cross_session_where_sessions_exist():
    keys = [f"s{s}/v{v}/{u:05d}.wav" for s in range(3) for v in range(2) for u in range(3)] + \
           ["t/default/00001.wav", "t/default/00002.wav"]
    sessions = {k.split("/")[0]: set() for k in keys}
    for k in keys:
        sessions[k.split("/")[0]].add(k.split("/")[1])
    lines = prepare_dataset.make_trials(keys, sessions, 40, np.random.default_rng(0))
    trials = [line.split() for line in lines]
    assert len(trials) == 40 and len({(a, b) for _, a, b in trials}) == 40
    targets = [(a, b) for label, a, b in trials if label == "1"]
    assert len(targets) == 20
    for a, b in targets:
        assert a.split("/")[0] == b.split("/")[0] and a != b
        assert a.split("/")[0] == "t" or a.split("/")[1] != b.split("/")[1]  # cross-session
    assert all(a.split("/")[0] != b.split("/")[0] for label, a, b in trials if label == "0")
    every = [line.split()
             for line in prepare_dataset.make_trials(keys, sessions, None, np.random.default_rng(0))]
    assert sum(t[0] == "1" for t in every) == 3 * 9 + 1 and sum(t[0] == "0" for t in every) == 28


# ---------------------------------------------------------------------------------------------
# Extraction of any files

def test_extract_flags_refuse_misuse_in_one_line(tmp_path):
    with pytest.raises(DataError, match="add -extract"):
        evaluate.main(evaluate.parse_args(["-wav_dir", str(tmp_path)]))
    with pytest.raises(DataError, match="-extract -embd FILE needs -wav_dir or -wav_list"):
        evaluate.main(evaluate.parse_args(["-extract", "-embd", str(tmp_path / "e.pk")]))
    os.makedirs(tmp_path / "d")
    sf.write(tmp_path / "d" / "a b.wav", np.ones(100) * 0.1, 16000)
    with pytest.raises(DataError, match="a b.wav: a key cannot hold whitespace"):
        evaluate.audio_files(evaluate.parse_args(["-extract", "-wav_dir", str(tmp_path / "d")]))


def test_foreign_layouts_end_to_end(tmp_path, capsys):
    """Three foreign layouts -> prepared folders -> two epochs of a tiny RawNet2 -> extraction of
    prepared and raw files -> scoring -> ONNX and .pt2 export matching PyTorch."""
    src = write_layouts(str(tmp_path / "src"))
    sources = {"two": [os.path.join(src, "two"), "-layout", "speaker/file"],
               "three": [os.path.join(src, "three"), "-layout", "speaker/session/file"],
               "csv": ["-list", os.path.join(src, "csv", "list.csv")]}
    prepared = {}
    for name, argv in sources.items():
        prepared[name] = str(tmp_path / f"prep_{name}")
        assert prepare(argv + ["-test_speakers", "2", "-make_trials", "10"], prepared[name]) == 0
        report = capsys.readouterr().out
        assert "0 files skipped" in report
        assert f"-DB {prepared[name]}/test/ -DB_vox2 {prepared[name]}/train/" in report
    assert len(mapping(prepared["two"])) == 12 and len(mapping(prepared["three"])) == 16
    assert {r[2] for r in mapping(prepared["csv"])} == {"spk 0", "spk 1", "spk 2", "spk 3"}
    assert all(r[1].split("/")[2].startswith("spk_") for r in mapping(prepared["csv"]))
    with open(os.path.join(prepared["three"], "test", "veri_test.txt")) as f:
        targets = [line.split()[1:] for line in f if line[0] == "1"]
    assert targets and all(a.split("/")[1] != b.split("/")[1] for a, b in targets)

    # Train two epochs on the three-level set, as a user would: -DB test part, -DB_vox2 training part.
    run = ["-name", "own", "-save_dir", str(tmp_path / "runs"), "-epoch", "2",
           "-DB", prepared["three"] + "/test/", "-DB_vox2", prepared["three"] + "/train/"] + TINY_FLAGS
    assert np.isfinite(train_RawNet2.main(train_RawNet2.parse_args(run)))
    checkpoint = str(tmp_path / "runs" / "own" / "last.pt")

    # Extract the prepared test set of the 48 kHz stereo source, score its trials against that file.
    common = ["-model_dir", checkpoint, "-window_size", "1000", "-nb_worker", "0", "-fast", "False",
              "-bs", "32", "-eer_file", str(tmp_path / "eers.txt")]
    prepared_embd = str(tmp_path / "two.npy")
    results = evaluate.main(evaluate.parse_args(
        ["-extract", "-wav_dir", prepared["two"] + "/test/eval_wav", "-embd", prepared_embd,
         "-trials", prepared["two"] + "/test/veri_test.txt"] + common))
    assert 0 <= results["veri_test"]["eer"] <= 1
    # The raw 44.1 kHz wavs of the list, converted on the fly, match their prepared (PCM-16) copies.
    rows = mapping(prepared["csv"])
    with open(tmp_path / "list.txt", "w") as f:
        f.writelines(r[0] + "\n" for r in rows)
    evaluate.main(evaluate.parse_args(["-extract", "-wav_list", str(tmp_path / "list.txt"),
                                       "-embd", str(tmp_path / "raw.pk")] + common))
    assert "12 files are converted to 16 kHz mono" in capsys.readouterr().out
    raw = scoring.load_embeddings(str(tmp_path / "raw.pk"))
    evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", prepared["csv"], "-embd",
                                       str(tmp_path / "prep.pk")] + common))
    prep = scoring.load_embeddings(str(tmp_path / "prep.pk"))
    for source, output, *_ in rows:
        a, b = raw[utils.utt_id(source)], prep[utils.utt_id(output)]
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999

    # Export the trainer checkpoint; the exported TTA embeddings equal the extracted ones.
    onnxruntime = pytest.importorskip("onnxruntime")
    import export_RawNet2
    paths = export_RawNet2.main(export_RawNet2.build_parser().parse_args(
        ["-model_dir", checkpoint, "-out", str(tmp_path / "export" / "rawnet2"), "-check", "False"]))
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    program = torch.export.load(paths["pt2"]).module()
    extracted = scoring.load_embeddings(prepared_embd)
    wav_dir = prepared["two"] + "/test/eval_wav"
    for key in utils.list_utterances(wav_dir):
        x = utils.read_wav(os.path.join(wav_dir, key))
        ref = extracted[utils.utt_id(key)]
        for run in (lambda b: session.run(None, {"waveform": b})[0], program):
            code = export_RawNet2.tta_embedding(run, x, 4000, 1000, segments_per_batch=3)
            assert np.max(np.abs(code - ref)) <= 1e-4 * np.max(np.abs(ref))
    # -extract -onnx: the same extraction with onnxruntime running the network.
    evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", wav_dir, "-embd", str(tmp_path / "onnx.pk"),
                                       "-onnx", paths["onnx"]] + common))
    by_onnx = scoring.load_embeddings(str(tmp_path / "onnx.pk"))
    assert by_onnx.keys() == extracted.keys()
    for key, ref in extracted.items():
        assert np.max(np.abs(by_onnx[key] - ref)) <= 1e-4 * np.max(np.abs(ref))
