"""DB/prepare_dataset.py on corpora as people bring them: manifests with their own header, lists in
UTF-8 or UTF-16, names with spaces and accents, empty, text and corrupt files, clips too short to use."""

import os
import shlex
import sys
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "DB"))
import prepare_dataset  # noqa: E402
import train_RawNet2  # noqa: E402
from common import DataError  # noqa: E402

EMPTY = "cannot read audio (empty file: 0 bytes)"
TEXT = "cannot read audio (a text file, not audio; it begins 'hello, this is a note')"


def clip(path, seconds, rate=16000, channels=1, **kwargs):
    """A 200 Hz tone of ``seconds`` at ``rate`` Hz with ``channels`` channels, written to ``path``."""
    x = 0.3 * np.sin(2 * np.pi * 200 * np.arange(round(seconds * rate)) / rate)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, **kwargs)


def bad_files(folder):
    """A 0-byte wav, a text file named .wav and a FLAC header followed by binary garbage."""
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "empty.wav"), "wb").close()
    with open(os.path.join(folder, "note.wav"), "w") as f:
        f.write("hello, this is a note\nnot a recording\n")
    with open(os.path.join(folder, "corrupt.flac"), "wb") as f:
        f.write(b"fLaC" + bytes(range(256)) * 4)


def prepare(argv, out):
    args = prepare_dataset.parse_args([str(a) for a in argv] + ["-out", str(out), "-jobs", "2",
                                                                "-progress", "False"])
    return prepare_dataset.main(args)


def table(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


def test_flat_folder_with_headered_tsv_end_to_end(tmp_path, capsys):
    """Mixed rates, channels and formats listed by a crowd-sourced style TSV: every good file prepared
    at its length, every bad one listed with its own reason."""
    clips = tmp_path / "corpus" / "clips"
    good = {"a 1.wav": ("alice", 1.5, 44100, 2, "WAV"), "a2.flac": ("alice", 1.25, 16000, 1, "FLAC"),
            "b1.ogg": ("bob", 2.0, 22050, 1, "OGG"), "Zoë élan 1.wav": ("Zoë", 1.5, 48000, 2, "WAV")}
    for name, (_, seconds, rate, channels, fmt) in good.items():
        clip(str(clips / name), seconds, rate, channels, format=fmt)
    clip(str(clips / "short.wav"), 0.2)
    bad_files(str(clips))
    speakers = {**{name: spk for name, (spk, *_) in good.items()}, "short.wav": "bob", "empty.wav": "bob",
                "note.wav": "alice", "corrupt.flac": "bob"}
    with open(tmp_path / "corpus" / "validated.tsv", "w", encoding="utf-8") as f:
        f.write("client_id\tpath\tsentence\tup_votes\n")
        f.writelines(f"{spk}\tclips/{name}\t\"Quoted\" words, commas\t2\n" for name, spk in speakers.items())
    assert prepare(["-list", tmp_path / "corpus" / "validated.tsv"], tmp_path / "out") == 0
    rows = {os.path.basename(src): (out, spk) for src, out, spk, _ in table(tmp_path / "out" / "mapping.tsv")}
    assert {name: spk for name, (_, spk) in rows.items()} == {name: spk for name, (spk, *_) in good.items()}
    for name, (_, seconds, *_) in good.items():
        info = sf.info(tmp_path / "out" / rows[name][0])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames - seconds * 16000) <= 1
    assert sorted((os.path.basename(p), r) for p, r in table(tmp_path / "out" / "skipped.tsv")) == [
        ("corrupt.flac", "cannot read audio (cannot be decoded: File contains data in an unimplemented "
                         "format.)"),
        ("empty.wav", EMPTY), ("note.wav", TEXT), ("short.wav", "too short: 0.200 s, under -min_seconds 1")]
    assert "4 files skipped: 1 too short (under -min_seconds 1), 3 unusable" in capsys.readouterr().out


def test_clips_under_min_seconds_are_skipped_listed_and_left_out_of_trials(tmp_path, capsys):
    for spk in ("a", "b", "c"):
        for u in range(2):
            clip(str(tmp_path / "src" / spk / f"long{u}.wav"), 1.25)
        for u in range(3):
            clip(str(tmp_path / "src" / spk / f"short{u}.wav"), 0.2 + 0.1 * u)
    argv = [tmp_path / "src", "-layout", "speaker/file", "-test_speakers", "2"]
    assert prepare(argv, tmp_path / "out") == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.wav"))
    assert len(written) == 6 and all(sf.info(tmp_path / "out" / p).frames == 20000 for p in written)
    with open(tmp_path / "out" / "test" / "veri_test.txt") as f:
        keys = {key for line in f for key in line.split()[1:]}
    assert keys == {p.split("/", 2)[2] for p in written if p.startswith("test/")}
    skipped = table(tmp_path / "out" / "skipped.tsv")
    assert sorted(r for _, r in skipped) == [f"too short: {s:.3f} s, under -min_seconds 1"
                                             for s in (0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4)]
    report = capsys.readouterr().out
    assert "9 files skipped: 9 too short (under -min_seconds 1)" in report
    assert "/src/a/short0.wav: too short: 0.200 s" in report and "  ... and 4 more too short" in report


def test_raising_min_seconds_on_a_rerun_removes_outputs_now_too_short(tmp_path):
    clip(str(tmp_path / "src" / "a" / "long.wav"), 1.0)
    clip(str(tmp_path / "src" / "a" / "short.wav"), 0.5)
    argv = [tmp_path / "src", "-layout", "speaker/file"]
    assert prepare(argv + ["-min_seconds", "0.5"], tmp_path / "out") == 0
    assert len(list((tmp_path / "out").rglob("*.wav"))) == 2
    assert prepare(argv, tmp_path / "out") == 0
    assert [p.name for p in (tmp_path / "out").rglob("*.wav")] == ["00001.wav"]
    assert table(tmp_path / "out" / "skipped.tsv") == [
        [str(tmp_path / "src" / "a" / "short.wav"), "too short: 0.500 s, under -min_seconds 1"]]


def test_a_corpus_of_only_unusable_clips_stops_with_one_line(tmp_path):
    clip(str(tmp_path / "src" / "a" / "short.wav"), 0.5)
    open(tmp_path / "src" / "a" / "empty.wav", "wb").close()
    with pytest.raises(DataError, match=r"src: none of its 2 audio files can be used \(reasons above"):
        prepare([tmp_path / "src", "-layout", "speaker/file"], tmp_path / "out")
    assert len(table(tmp_path / "out" / "skipped.tsv")) == 2


def test_every_bad_file_is_listed_with_its_own_reason(tmp_path):
    clip(str(tmp_path / "src" / "a" / "good.wav"), 1.0)
    bad_files(str(tmp_path / "src" / "a"))
    assert prepare([tmp_path / "src", "-layout", "speaker/file"], tmp_path / "out") == 0
    reasons = {os.path.basename(p): r for p, r in table(tmp_path / "out" / "skipped.tsv")}
    assert reasons["empty.wav"] == EMPTY and reasons["note.wav"] == TEXT
    assert reasons["corrupt.flac"].startswith("cannot read audio (cannot be decoded: ")
    assert len(reasons) == 3 and len(table(tmp_path / "out" / "mapping.tsv")) == 1


def test_strict_stops_at_the_first_bad_file(tmp_path):
    clip(str(tmp_path / "src" / "a" / "good.wav"), 1.0)
    bad_files(str(tmp_path / "src" / "a"))
    os.remove(tmp_path / "src" / "a" / "corrupt.flac")
    with pytest.raises(DataError, match=r"a/empty.wav: cannot read audio \(empty file: 0 bytes\) \(-strict"):
        prepare([tmp_path / "src", "-layout", "speaker/file", "-strict"], tmp_path / "out")


def test_header_columns_are_found_by_name_or_mapped_with_columns(tmp_path):
    assert prepare_dataset.header_columns(["client_id", "path", "sentence"], None, "l") == \
        {"path": 1, "speaker": 0}
    assert prepare_dataset.header_columns(["Session", "Speaker_ID", "FileName"], None, "l") == \
        {"path": 2, "speaker": 1, "session": 0}
    clip(str(tmp_path / "x.wav"), 1.0)
    (tmp_path / "l.tsv").write_text("who\taudio_file\ttext\nann\tx.wav\thi\n")
    with pytest.raises(DataError, match=r"l.tsv:1: no path column among the header's \['who', "
                                        r"'audio_file', 'text'\]; .* -columns path=COLUMN,speaker=COLUMN\["):
        prepare_dataset.read_list(str(tmp_path / "l.tsv"))
    assert prepare_dataset.read_list(str(tmp_path / "l.tsv"), columns="path=audio_file,speaker=who") == \
        [(str(tmp_path / "x.wav"), "ann", None)]
    with pytest.raises(DataError, match=r"-columns speaker=whom: no such column in the header"):
        prepare_dataset.read_list(str(tmp_path / "l.tsv"), columns="path=audio_file,speaker=whom")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_lists_in_utf8_with_or_without_bom_and_utf16_read_alike(tmp_path, encoding):
    clip(str(tmp_path / "Zoë élan" / "prise 1.wav"), 1.0)
    text = "path\tspeaker\r\nZoë élan/prise 1.wav\tZoë Élan\r\n"
    (tmp_path / "list.txt").write_bytes(text.encode(encoding))
    assert prepare_dataset.read_list(str(tmp_path / "list.txt")) == \
        [(str(tmp_path / "Zoë élan" / "prise 1.wav"), "Zoë Élan", None)]


def test_a_list_in_another_encoding_is_refused_with_its_line(tmp_path):
    (tmp_path / "l.csv").write_bytes("path,speaker\nx.wav,Zoë\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.csv:2: not UTF-8 text; save the list as UTF-8"):
        prepare_dataset.read_list(str(tmp_path / "l.csv"))


def test_a_field_beyond_the_csv_size_limit_is_one_line(tmp_path):
    (tmp_path / "list.csv").write_text("path,speaker\na.wav," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"list.csv:2: not a CSV/TSV row \(field larger than"):
        prepare_dataset.read_list(str(tmp_path / "list.csv"))


@pytest.mark.parametrize("flags, message", [
    (["-default_session", ".."], "-default_session '..': must be one folder name"),
    (["-default_session", "a/b"], "-default_session 'a/b': must be one folder name"),
    (["-test_speakers", "-1"], "-test_speakers -1: must be 0 or more"),
    (["-seed", "-1"], "-seed -1: must be 0 or more"),
    (["-jobs", "0"], "-jobs 0: must be 1 or more")])
def test_flags_no_preparation_can_use_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        prepare_dataset.parse_args([str(tmp_path), "-out", str(tmp_path / "out"), *flags])
    assert message in capsys.readouterr().err


def test_a_name_typed_in_another_unicode_form_is_found(tmp_path):
    on_disk = str(tmp_path / unicodedata.normalize("NFD", "Zoë.wav"))
    clip(on_disk, 1.0)
    sources = [(str(tmp_path / unicodedata.normalize("NFC", "Zoë.wav")), "z", None)]
    assert prepare_dataset.locate(sources) == ([(on_disk, "z", None)], [])


def test_missing_listed_files_hint_at_root(tmp_path):
    for name in ("a.wav", "b.wav"):
        clip(str(tmp_path / "corpus" / "clips" / name), 1.0)
    (tmp_path / "corpus" / "lists").mkdir()
    (tmp_path / "corpus" / "lists" / "l.csv").write_text("a.wav,x\nb.wav,y\n")
    with pytest.raises(DataError, match=f"2 of the 2 listed files are not under {tmp_path}/corpus/lists "
                                        rf"\(e.g. a.wav\) but are under {tmp_path}/corpus/clips: "
                                        f"add -root {tmp_path}/corpus/clips$"):
        prepare(["-list", tmp_path / "corpus" / "lists" / "l.csv"], tmp_path / "out")
    (tmp_path / "corpus" / "lists" / "l.csv").write_text("nowhere/a.wav,x\n")
    with pytest.raises(DataError, match="1 of the 1 listed files .*; -root names the folder that the listed"):
        prepare(["-list", tmp_path / "corpus" / "lists" / "l.csv"], tmp_path / "out")


def test_train_command_is_the_demos_model_below_an_hour_of_audio():
    paper = "python train_RawNet2.py -name NAME -DB 'my db/test/' -DB_vox2 'my db/train/'"
    assert prepare_dataset.train_command("my db/", 3600) == paper
    small = prepare_dataset.train_command("my db/", 3599)
    assert small == paper + (" -nb_samp 16000 -m_nb_samp 16000 -window_size 3200 -m_filts "
                             "'[32,[32,32],[32,64],[64,64]]' -m_gru_node 128 -m_nb_fc_node 128 -bs 32 "
                             "-epoch 10")
    args = train_RawNet2.parse_args(shlex.split(small)[2:])
    assert (args.DB, args.m_filts, args.epoch) == ("my db/test/", [32, [32, 32], [32, 64], [64, 64]], 10)


def test_the_closing_report_sizes_the_command_by_the_training_part(tmp_path, capsys):
    args = prepare_dataset.parse_args(["-list", "x.csv", "-out", str(tmp_path), "-test_speakers", "1"])
    rows = [(f"s{i}.wav", f"train/wav/a/s/{i:05d}.wav") for i in range(200)]
    rows.append(("t.wav", "test/eval_wav/b/s/00001.wav"))
    for hours, paper in ((0.5, False), (1.0, True)):
        frames = {src: hours * 3600 * 16000 / 200 for src, _ in rows}
        prepare_dataset.summarise(args, rows, frames, [])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train with: "))
        assert ("-m_filts" not in line) is paper, line


def test_train_command_batch_is_never_more_than_the_training_files():
    # (training drops incomplete batches: a batch larger than the corpus trains on nothing)
    assert prepare_dataset.train_command("d", 100, 15).endswith(" -bs 15 -epoch 10")
    assert prepare_dataset.train_command("d", 3600, 50).endswith("-DB_vox2 d/train/ -bs 50")
    assert prepare_dataset.train_command("d", 3600, 500).endswith("-DB_vox2 d/train/")


def voice(path, seconds, f0, rate, channels, rng, **kwargs):
    """A harmonic tone of pitch ``f0`` plus noise (a speaker per pitch), as ``clip`` writes it."""
    t = np.arange(round(seconds * rate)) / rate
    x = 0.3 * (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(4 * np.pi * f0 * t)
               + 0.3 * rng.standard_normal(len(t)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, **kwargs)


@pytest.mark.slow
def test_a_crowd_sourced_corpus_prepares_trains_extracts_and_scores_as_printed(tmp_path, capsys):
    """A flat folder of mixed-rate, mixed-channel, compressed clips listed by a headered TSV with
    hashed speaker ids, a name with spaces and accents and broken files: prepared, then trained with
    the printed command (one epoch), then the raw clips extracted and the prepared trials scored,
    with no flag beyond those printed and the run's own names."""
    import evaluate_pretrained_RawNet2 as evaluate

    rng = np.random.default_rng(0)
    clips, rows = tmp_path / "cv" / "clips", []
    formats = [("wav", 44100, 2, "WAV"), ("flac", 16000, 1, "FLAC"), ("ogg", 22050, 1, "OGG")]
    for s in range(8):
        speaker = f"{s:02d}" + "c0ffee" * 5  # hashed ids, as crowd-sourced corpora give them
        for u, (ext, rate, channels, fmt) in enumerate(formats):
            name = f"common_voice {s}_{u}{' é' if s == 0 else ''}.{ext}"
            voice(str(clips / name), rng.uniform(1.2, 1.8), 90 + 20 * s, rate, channels, rng, format=fmt)
            rows.append((speaker, name))
    bad_files(str(clips))
    clip(str(clips / "short.wav"), 0.3)
    rows += [(rows[0][0], name) for name in ("empty.wav", "note.wav", "corrupt.flac", "short.wav")]
    with open(tmp_path / "cv" / "validated.tsv", "w", encoding="utf-8") as f:
        f.write("client_id\tpath\tsentence\tup_votes\n")
        f.writelines(f"{spk}\t{name}\tsome words\t2\n" for spk, name in rows)
    out = tmp_path / "prepared"
    listed = tmp_path / "cv" / "validated.tsv"
    assert prepare(["-list", listed, "-root", clips, "-test_speakers", "3"], out) == 0
    report = capsys.readouterr().out
    assert "4 files skipped: 1 too short (under -min_seconds 1), 3 unusable" in report
    assert len(table(out / "mapping.tsv")) == 24
    command = next(line for line in report.splitlines() if line.startswith("train with: "))
    argv = shlex.split(command[len("train with: "):])[2:]
    argv[argv.index("NAME")] = "own"
    argv[argv.index("-epoch") + 1] = "1"  # (one epoch of the ten it suggests)
    argv += ["-save_dir", str(tmp_path / "runs"), "-nb_worker", "0"]
    assert np.isfinite(train_RawNet2.main(train_RawNet2.parse_args(argv)))
    checkpoint = str(tmp_path / "runs" / "own" / "last.pt")

    # The raw clips, converted as they are read (bad files skipped and listed), then the prepared
    # test trials scored against the prepared test files' embeddings.
    eers = ["-eer_file", str(tmp_path / "eers.txt")]
    evaluate.main(evaluate.parse_args(["-extract", "-wav_dir", str(clips), "-embd",
                                       str(tmp_path / "raw.pk"), "-model_dir", checkpoint] + eers))
    raw = evaluate.scoring.load_embeddings(str(tmp_path / "raw.pk"))
    assert len(raw) == 25 and "common_voice 0_0 é" in raw  # (and the 0.3 s clip: extraction embeds it)
    err = capsys.readouterr().out
    assert f"{clips / 'empty.wav'}: {EMPTY}" in err and f"{clips / 'note.wav'}: {TEXT}" in err
    results = evaluate.main(evaluate.parse_args(
        ["-extract", "-wav_dir", str(out / "test" / "eval_wav"), "-embd", str(tmp_path / "test.pk"),
         "-trials", str(out / "test" / "veri_test.txt"), "-model_dir", checkpoint] + eers))
    assert 0 <= results["veri_test"]["eer"] <= 1
