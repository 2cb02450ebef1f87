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
import common  # noqa: E402
import evaluate_pretrained_RawNet2 as evaluate  # noqa: E402
import prepare_dataset  # noqa: E402
import scoring  # noqa: E402
import train_RawNet2  # noqa: E402
import utils  # noqa: E402
from common import DataError  # noqa: E402


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
    (out / "wav" / "a" / "default" / ".tmp-00002.wavx1y2").write_bytes(b"half")  # an interrupted ffmpeg
    before = os.stat(out / rows[1][1]).st_mtime_ns
    assert prepare([src, "-layout", "speaker/file", "-ffmpeg", ffmpeg], out) == 0
    assert "resuming" in capsys.readouterr().out and os.stat(out / rows[1][1]).st_mtime_ns == before
    assert os.path.isfile(out / rows[0][1])
    assert not [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp-")]
    with pytest.raises(DataError, match="prepared earlier from other sources or flags"):
        prepare([src, "-layout", "speaker/file", "-test_speakers", "1"], out)
    (out / ".prepare_plan.json").write_text('[["a.wav", "wav/a/')  # cut short
    with pytest.raises(DataError, match=r"\.prepare_plan\.json: not the plan this script writes"):
        prepare([src, "-layout", "speaker/file", "-ffmpeg", ffmpeg], out)


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
    with pytest.raises(DataError, match="-wav_base DIR names the folder of the -wav_list paths"):
        evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", str(tmp_path), "-wav_base", "."]))
    os.makedirs(tmp_path / "d")
    sf.write(tmp_path / "d" / "a\nb.wav", np.ones(100) * 0.1, 16000)
    with pytest.raises(DataError, match="a file name holding a line break cannot be a key"):
        evaluate.audio_files(evaluate.parse_args(["-extract", "-wav_dir", str(tmp_path / "d")]))


@pytest.mark.slow
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
    flags = ["-model_dir", checkpoint, "-window_size", "1000", "-nb_worker", "0", "-fast", "False",
             "-bs", "32", "-eer_file", str(tmp_path / "eers.txt")]
    prepared_embd = str(tmp_path / "two.npy")
    results = evaluate.main(evaluate.parse_args(
        ["-extract", "-wav_dir", prepared["two"] + "/test/eval_wav", "-embd", prepared_embd,
         "-trials", prepared["two"] + "/test/veri_test.txt"] + flags))
    assert 0 <= results["veri_test"]["eer"] <= 1
    # The raw 44.1 kHz wavs of the list, converted on the fly, match their prepared (PCM-16) copies.
    rows = mapping(prepared["csv"])
    with open(tmp_path / "list.txt", "w") as f:
        f.writelines(r[0] + "\n" for r in rows)
    evaluate.main(evaluate.parse_args(["-extract", "-wav_list", str(tmp_path / "list.txt"),
                                       "-embd", str(tmp_path / "raw.pk")] + flags))
    assert "12 files are converted to 16 kHz mono" in capsys.readouterr().out
    raw = scoring.load_embeddings(str(tmp_path / "raw.pk"))
    evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", prepared["csv"], "-embd",
                                       str(tmp_path / "prep.pk")] + flags))
    prep = scoring.load_embeddings(str(tmp_path / "prep.pk"))
    for source, output, *_ in rows:
        a, b = raw[common.utt_id(source)], prep[common.utt_id(output)]
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
        ref = extracted[common.utt_id(key)]
        for run in (lambda b: session.run(None, {"waveform": b})[0], program):
            code = export_RawNet2.tta_embedding(run, x, 4000, 1000, segments_per_batch=3)
            assert np.max(np.abs(code - ref)) <= 1e-4 * np.max(np.abs(ref))
    # -extract -onnx: the same extraction with onnxruntime running the network.
    evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", wav_dir, "-embd", str(tmp_path / "onnx.pk"),
                                       "-onnx", paths["onnx"]] + flags))
    by_onnx = scoring.load_embeddings(str(tmp_path / "onnx.pk"))
    assert by_onnx.keys() == extracted.keys()
    for key, ref in extracted.items():
        assert np.max(np.abs(by_onnx[key] - ref)) <= 1e-4 * np.max(np.abs(ref))


# ---------------------------------------------------------------------------------------------
# Own files that cannot be read, keys with spaces, lists relative to another folder, settings that
# the checkpoint records

SMALL = {"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]], "nb_fc_node": 16,
         "gru_node": 16, "nb_gru_layer": 1, "nb_samp": 4000, "nb_classes": 5}


def small_checkpoint(path, window_size=None, d_args=None, plain=False, seed=0):
    """A random tiny RawNet2 saved as a last.pt of train_RawNet2.py (recording ``window_size`` among
    its flags when given), or as a plain state_dict; returns the model."""
    from model_RawNet2 import RawNet2
    torch.manual_seed(seed)
    model = RawNet2(d_args or SMALL).eval()
    model.apply(utils.init_weights)
    args = {} if window_size is None else {"window_size": window_size}
    torch.save(model.state_dict() if plain else {"model": model.state_dict(), "d_args": d_args or SMALL,
                                                  "args": args}, path)
    return model


def extract(tmp_path, *flags):
    """-extract into tmp_path/e.pk with the tiny checkpoint's flags; returns the embeddings."""
    embd = str(tmp_path / "e.pk")
    evaluate.main(evaluate.parse_args(["-extract", "-embd", embd, "-nb_worker", "0", "-fast", "False",
                                       "-device", "cpu", *flags]))
    return scoring.load_embeddings(embd)


def hand_embedding(model, path, window_size):
    """The TTA recipe by hand (docs/FIDELITY.md): peak-normalised samples, (len - window_size) // step
    + 1 segments of 4,000 samples, segment i starting at i * step (step = 4000 - window_size) except
    the last, right-aligned; the mean of the segments' embeddings."""
    x, _ = sf.read(path, dtype="float64")
    x = (x / np.abs(x).max()).astype(np.float32)
    step = 4000 - window_size
    starts = [i * step for i in range((len(x) - window_size) // step)] + [len(x) - 4000]
    with torch.no_grad():
        return model.embed(torch.from_numpy(np.stack([x[s:s + 4000] for s in starts]))).mean(0).numpy()


def test_unreadable_own_files_are_skipped_counted_and_listed(tmp_path, capsys):
    folder = tmp_path / "own"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in ("a.wav", "with space.wav"):
        sf.write(folder / name, voice(rng, 120, 0.5, 16000, 1), 16000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("not audio but named .wav\n")
    (folder / "noise.flac").write_bytes(rng.bytes(3000))
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    embeddings = extract(tmp_path, "-wav_dir", str(folder), "-model_dir", str(tmp_path / "last.pt"))
    assert sorted(embeddings) == ["a", "with space"]
    out = capsys.readouterr().out.splitlines()
    start = out.index(f"warning: 3 files of {folder} cannot be read and have no embedding "
                      f"(-strict stops at the first):")
    listed = out[start + 1:start + 4]
    assert [line.split(":")[0] for line in listed] == [f"  {folder}/{n}" for n in ("empty.wav", "noise.flac",
                                                                                    "notes.wav")]
    assert all("cannot read audio" in line for line in listed)


def test_strict_stops_at_the_first_file_that_cannot_be_read(tmp_path):
    os.makedirs(tmp_path / "own")
    sf.write(tmp_path / "own" / "a.wav", voice(np.random.default_rng(0), 120, 0.5, 16000, 1), 16000)
    (tmp_path / "own" / "b.wav").write_bytes(b"")
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    with pytest.raises(DataError, match=f"^{tmp_path}/own/b.wav: cannot read audio"):
        extract(tmp_path, "-wav_dir", str(tmp_path / "own"), "-model_dir", str(tmp_path / "last.pt"),
                "-strict")
    assert not (tmp_path / "e.pk").exists()


def test_a_key_with_spaces_round_trips_through_an_npy_key_list(tmp_path):
    os.makedirs(tmp_path / "own" / "my speaker")
    wav = tmp_path / "own" / "my speaker" / "take one.wav"
    sf.write(wav, voice(np.random.default_rng(0), 120, 0.5, 16000, 1), 16000)
    model = small_checkpoint(tmp_path / "last.pt", window_size=1000)
    embd = str(tmp_path / "e.npy")
    evaluate.main(evaluate.parse_args(["-extract", "-embd", embd, "-wav_dir", str(tmp_path / "own"),
                                       "-model_dir", str(tmp_path / "last.pt"), "-nb_worker", "0",
                                       "-fast", "False", "-device", "cpu"]))
    embeddings = scoring.load_embeddings(embd)
    assert list(embeddings) == ["my speaker/take one"]
    expected = hand_embedding(model, wav, 1000)
    np.testing.assert_allclose(embeddings["my speaker/take one"], expected, rtol=1e-4, atol=1e-6)


def test_a_trial_line_with_a_spaced_key_says_keys_cannot_hold_whitespace(tmp_path):
    (tmp_path / "t.txt").write_text("1 my speaker/a.wav b.wav\n")
    with pytest.raises(DataError, match=r"t.txt:1: expected .* \(a key cannot hold whitespace"):
        scoring.read_trial_list(str(tmp_path / "t.txt"))


def test_a_list_relative_to_its_own_folder_names_wav_base(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    os.makedirs(lists / "clips")
    sf.write(lists / "clips" / "a.wav", voice(np.random.default_rng(0), 120, 0.5, 16000, 1), 16000)
    (lists / "files.txt").write_bytes(b"\xef\xbb\xbfclips/a.wav\r\n")  # a byte-order mark, CRLF
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    monkeypatch.chdir(tmp_path)
    flags = ["-wav_list", str(lists / "files.txt"), "-model_dir", str(tmp_path / "last.pt")]
    with pytest.raises(DataError, match=f"1 listed files not found, e.g. clips/a.wav .* -wav_base {lists}"):
        extract(tmp_path, *flags)
    assert list(extract(tmp_path, *flags, "-wav_base", str(lists))) == ["clips/a"]


def test_a_list_relative_to_elsewhere_says_how_to_give_the_folder(tmp_path, monkeypatch):
    (tmp_path / "files.txt").write_text("nowhere/a.wav\n")
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="relative to the current folder: give the folder they are relative "
                                        "to with -wav_base DIR"):
        extract(tmp_path, "-wav_list", "files.txt", "-model_dir", str(tmp_path / "last.pt"))


def test_a_list_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "files.txt").write_bytes(b"a.wav\n\xe9t\xe9.wav\n")  # Latin-1
    with pytest.raises(DataError, match=r"files.txt: not UTF-8 text .*-wav_list"):
        extract(tmp_path, "-wav_list", str(tmp_path / "files.txt"), "-model_dir", str(tmp_path / "none.pt"))


def test_window_size_comes_from_the_checkpoint_unless_given(tmp_path, capsys):
    os.makedirs(tmp_path / "own")
    wav = tmp_path / "own" / "a.wav"
    sf.write(wav, voice(np.random.default_rng(0), 120, 1.0, 16000, 1), 16000)
    model = small_checkpoint(tmp_path / "last.pt", window_size=3000)
    flags = ["-wav_dir", str(tmp_path / "own"), "-model_dir", str(tmp_path / "last.pt")]
    np.testing.assert_allclose(extract(tmp_path, *flags)["a"], hand_embedding(model, wav, 3000), rtol=1e-4,
                               atol=1e-6)
    assert "note: -window_size" not in capsys.readouterr().out
    os.remove(tmp_path / "e.pk")
    np.testing.assert_allclose(extract(tmp_path, *flags, "-window_size", "1000")["a"],
                               hand_embedding(model, wav, 1000), rtol=1e-4, atol=1e-6)
    assert f"note: -window_size 1000 given; {tmp_path / 'last.pt'} records -window_size 3000" in \
        capsys.readouterr().out


def test_verify_takes_the_checkpoints_window_size(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, voice(rng, 120, 1.0, 16000, 1), 16000)
    model = small_checkpoint(tmp_path / "last.pt", window_size=3000)
    a, b = (hand_embedding(model, tmp_path / n, 3000).astype(np.float64) for n in ("a.wav", "b.wav"))
    score = evaluate.main(evaluate.parse_args(["-verify", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"),
                                               "-model_dir", str(tmp_path / "last.pt"), "-fast", "False",
                                               "-device", "cpu"]))
    assert score == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)


def test_sinc_length_of_a_plain_state_dict_is_given_by_flag_and_checked_against_a_last_pt(tmp_path):
    wide = {**SMALL, "first_conv": 101}
    os.makedirs(tmp_path / "own")
    wav = tmp_path / "own" / "a.wav"
    sf.write(wav, voice(np.random.default_rng(0), 120, 1.0, 16000, 1), 16000)
    model = small_checkpoint(tmp_path / "TA_1.pt", d_args=wide, plain=True)
    flags = ["-wav_dir", str(tmp_path / "own"), "-window_size", "1000", "-m_first_conv", "101"]
    embedded = extract(tmp_path, *flags, "-model_dir", str(tmp_path / "TA_1.pt"))["a"]
    np.testing.assert_allclose(embedded, hand_embedding(model, wav, 1000), rtol=1e-4, atol=1e-6)
    small_checkpoint(tmp_path / "last.pt", d_args=SMALL)
    with pytest.raises(DataError, match=r"last.pt: first_conv 101 given, but this checkpoint was trained "
                                         r"with first_conv 251 \(its d_args\)"):
        extract(tmp_path, *flags, "-model_dir", str(tmp_path / "last.pt"))


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path):
    model = small_checkpoint(tmp_path / "TA_1.pt", plain=True)
    state = model.state_dict()
    state["fc1_gru.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "TA_1.pt")
    os.makedirs(tmp_path / "own")
    sf.write(tmp_path / "own" / "a.wav", voice(np.random.default_rng(0), 120, 0.5, 16000, 1), 16000)
    with pytest.raises(DataError, match=r"TA_1.pt: checkpoint \(-model_dir\) holds NaN or infinite values "
                                        r"in 1 tensors \(fc1_gru.weight\)"):
        extract(tmp_path, "-wav_dir", str(tmp_path / "own"), "-window_size", "1000", "-model_dir",
                str(tmp_path / "TA_1.pt"))
    assert not (tmp_path / "e.pk").exists()


def test_embeddings_with_nan_are_refused_when_loaded_and_never_written(tmp_path):
    codes = {"s/a": np.ones(4, np.float32), "s/b": np.array([1, np.inf, 0, 0], np.float32)}
    common.write_pickle_atomic(codes, str(tmp_path / "e.pk"))
    with pytest.raises(DataError, match=r"e.pk: 1 embeddings hold NaN or infinite values, e.g. s/b$"):
        scoring.load_embeddings(str(tmp_path / "e.pk"))
    with pytest.raises(DataError, match=r"e.pk: 1 embeddings hold NaN or infinite values, e.g. s/b$"):
        scoring.EmbeddingTable.read([str(tmp_path / "e.pk")])  # (s/b is named by no trial)
    with pytest.raises(DataError, match=r"f.npy: 1 embeddings hold NaN .* e.g. s/b; not written$"):
        scoring.save_embeddings(codes, str(tmp_path / "f.npy"))
    assert os.listdir(tmp_path) == ["e.pk"]


def cut_short(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep])


@pytest.mark.parametrize("fmt", ["WAV", "AIFF"])
def test_audio_cut_short_is_refused_not_read_shorter(tmp_path, fmt):
    path = str(tmp_path / f"a.{fmt.lower()}")
    sf.write(path, voice(np.random.default_rng(0), 120, 1.0, 16000, 1), 16000, format=fmt, subtype="PCM_16")
    cut_short(path, os.path.getsize(path) - 4000)  # 2,000 of 16,000 frames gone
    with pytest.raises(DataError, match=f"^{path}: cut short: its header claims 16000 frames of audio, "
                                        f"the file holds 14000"):
        utils.read_audio(path)


def test_cut_short_own_files_are_skipped_and_listed(tmp_path, capsys):
    os.makedirs(tmp_path / "own")
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / "own" / name, voice(rng, 120, 1.0, 16000, 1), 16000, subtype="PCM_16")
    cut_short(tmp_path / "own" / "b.wav", 20000)
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    flags = ["-wav_dir", str(tmp_path / "own"), "-model_dir", str(tmp_path / "last.pt")]
    assert list(extract(tmp_path, *flags)) == ["a"]
    assert f"  {tmp_path}/own/b.wav: cut short: its header claims 16000 frames" in capsys.readouterr().out


def test_a_header_claiming_absurd_length_is_not_allocated(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, voice(np.random.default_rng(0), 120, 1.0, 16000, 1), 16000)
    data = bytearray(path.read_bytes())
    field = int.from_bytes(data[18:26], "big")  # STREAMINFO: the low 36 bits are the total samples
    data[18:26] = (field | (1 << 36) - 1).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).frames == (1 << 36) - 1  # 512 GiB as float64
    with pytest.raises(DataError, match=f"^{path}: "):
        utils.read_audio(str(path))


def test_own_files_none_of_which_embeds_write_nothing(tmp_path):
    os.makedirs(tmp_path / "own")
    sf.write(tmp_path / "own" / "silent.wav", np.zeros(8000), 16000)
    (tmp_path / "own" / "empty.wav").write_bytes(b"")
    small_checkpoint(tmp_path / "last.pt", window_size=1000)
    message = f"^{tmp_path}/own: no embedding computed .*; {tmp_path}/e.pk not written$"
    with pytest.raises(DataError, match=message):
        extract(tmp_path, "-wav_dir", str(tmp_path / "own"), "-model_dir", str(tmp_path / "last.pt"))
    assert not (tmp_path / "e.pk").exists()
