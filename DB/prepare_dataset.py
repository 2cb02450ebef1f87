"""Prepare any speaker-labelled audio collection for RawNet2: 16 kHz mono 16-bit wav in our layout.

    python DB/prepare_dataset.py /data/mine -layout speaker/session/file -out DB/mine
    python DB/prepare_dataset.py -list files.csv -out DB/mine                 # rows: path,speaker[,session]
    python DB/prepare_dataset.py -list cv/validated.tsv -root cv/clips -out DB/cv   # a header names columns
    python DB/prepare_dataset.py /data/mine -layout speaker/file -out DB/mine -test_speakers 10 \
        -make_trials 2000                                                     # + a test split and trials

Sources: a folder whose path components name the speaker (and optionally the session), described by
``-layout`` (``speaker/file``, ``speaker/session/file``, ``*/speaker/file``: ``*`` is a folder level
that is ignored), or a list (CSV; TSV by its .tsv extension or a tab in its first line; UTF-8 with or
without a byte-order mark, or UTF-16 with one, as Excel saves "Unicode text"). A list's rows are
``path, speaker[, session]``, or follow a header row whose path and speaker (and session) columns are
found by name (path/file/filename/audio/wav, speaker/client_id/speaker_id/spk, session/session_id) or
named with ``-columns path=COLUMN,speaker=COLUMN[,session=COLUMN]``; relative paths start from
``-root`` (default: the list's folder). Every file libsndfile reads (wav, flac, ogg, mp3, aiff, ...)
at any sample rate and channel count is mixed down (channels averaged) and resampled to 16 kHz by
polyphase filtering (``utils.to_mono_16k``); m4a/aac/mp4 go through ffmpeg as in
``DB/convert_vox2_to_wav.py``. Each file becomes ``<speaker>/<session>/<NNNNN>.wav`` (files of one
speaker and session numbered in sorted source order; a speaker without sessions gets the session
``-default_session``), under:

    OUT/wav/                      no -test_speakers: train_RawNet2.py -DB_vox2 OUT/
    OUT/train/wav/                with -test_speakers N: the other speakers, -DB_vox2 OUT/train/
    OUT/test/eval_wav/            the N test speakers, -DB OUT/test/
    OUT/test/veri_test.txt        trials '<1|0> keyA keyB' over the test speakers (-make_trials)

Files that cannot be used are skipped, each with its reason: not found, empty (0 bytes), a text
file, not decodable, all zero, or shorter than ``-min_seconds`` (with its duration); ``-strict`` stops
at the first one instead. ``OUT/mapping.tsv`` maps each source file to its output (``source output
speaker session``, output relative to OUT); ``OUT/skipped.tsv`` lists the skipped files and why.
Files are converted in ``-jobs`` processes, each written to a temporary name and renamed when
complete, so an interrupted run is resumed by running the same command again (finished files are
kept). The closing "train with:" line suggests the demo's scaled-down model below an hour of
training audio.
"""

import argparse
import codecs
import csv
import io
import json
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import unicodedata
from collections import Counter

import numpy as np
import soundfile as sf
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import convert_vox2_to_wav  # noqa: E402  (the ffmpeg path, for formats libsndfile does not read)
import train_RawNet2  # noqa: E402  (the demo's model, suggested for small corpora)
import utils  # noqa: E402
from common import DataError  # noqa: E402
from utils import SAMPLE_RATE  # noqa: E402

FFMPEG_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".webm")
PLAN = ".prepare_plan.json"
STRICT = "(-strict stops at the first file it cannot use)"
SHOWN = 5  # skipped files of each kind printed (all are in OUT/skipped.tsv)
SMALL_CORPUS_SECONDS = 3600  # less training audio than this: the demo's model is suggested
SMALL_MODEL_FLAGS = ("nb_samp", "m_nb_samp", "window_size", "m_filts", "m_gru_node", "m_nb_fc_node", "bs",
                     "epoch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = common.arg_group(parser, "sources")
    parser.add_argument("source", nargs="?", default=None,
                        help="folder of audio files laid out as -layout says (or use -list)")
    add("layout", type=str, default="speaker/session/file",
        help="path of each file below the source folder: 'speaker', 'session' and '*' (ignored) folder "
             "levels, ending in 'file'; e.g. speaker/file, speaker/session/file, */speaker/file")
    add("list", type=str, default=None, metavar="FILE",
        help="CSV or TSV (.tsv, or a tab in the first line) of 'path,speaker[,session]' rows instead of a "
             "folder, or with a header row naming its columns (see -columns); UTF-8 or UTF-16")
    add("root", type=str, default=None,
        help="-list: folder that relative paths in the list start from (default: the list's folder)")
    add("columns", type=str, default=None, metavar="MAP",
        help="-list with a header row: the columns holding path, speaker and session, as "
             "path=COLUMN,speaker=COLUMN[,session=COLUMN] (default: found by name: path/file/filename/"
             "audio/wav, speaker/client_id/speaker_id/spk, session/session_id)")
    add("min_seconds", type=float, default=1.0,
        help="skip clips shorter than this many seconds (listed in OUT/skipped.tsv with their duration)")
    add("strict", **common.STRICT_FLAG)
    add = common.arg_group(parser, "output")
    add("out", type=str, required=True, help="dataset folder to write (see the layout above)")
    add("default_session", type=str, default="default", help="session folder of files without a session")
    add("test_speakers", type=int, default=0,
        help="put this many speakers (drawn with -seed) into OUT/test/eval_wav/, the rest into "
             "OUT/train/wav/")
    add("make_trials", type=int, default=None, metavar="N",
        help="with -test_speakers: N trials over the test speakers in OUT/test/veri_test.txt, half targets "
             "(cross-session where a speaker has several sessions), half non-targets (default: every "
             "target pair and as many non-targets)")
    add("seed", type=int, default=0, help="seed of the test-speaker draw and of the trials")
    add("jobs", type=int, default=os.cpu_count(), help="parallel conversion processes")
    add("ffmpeg", **convert_vox2_to_wav.FFMPEG_FLAG)  # for m4a/aac/mp4/wma/webm sources
    add("progress", **common.PROGRESS_FLAG)
    args = parser.parse_args(argv)
    if (args.source is None) == (args.list is None):
        parser.error("give either a source folder or -list FILE")
    if args.columns is not None and args.list is None:
        parser.error("-columns names the columns of a -list FILE")
    if not args.min_seconds >= 0:
        parser.error(f"-min_seconds {args.min_seconds}: must be 0 or more")
    if args.make_trials is not None and not args.test_speakers:
        parser.error("-make_trials needs -test_speakers N (the trials are made over the test speakers)")
    for flag, low in (("test_speakers", 0), ("seed", 0), ("jobs", 1)):
        if getattr(args, flag) < low:
            parser.error(f"-{flag} {getattr(args, flag)}: must be {low} or more")
    if not re.fullmatch(r"[\w+-][\w.+-]*", args.default_session):  # (what folder_name keeps)
        parser.error(f"-default_session {args.default_session!r}: must be one folder name of letters, "
                     f"digits and _ . + - (not starting with a dot)")
    return args


# ---------------------------------------------------------------------------------------------
# Sources: (path, speaker, session or None)

def is_audio(name):
    return name.lower().endswith(utils.AUDIO_EXTENSIONS + FFMPEG_EXTENSIONS)


def parse_layout(layout):
    parts = layout.strip("/").split("/")
    if parts[-1] != "file" or parts.count("speaker") != 1 or parts.count("session") > 1 or \
            any(p not in ("speaker", "session", "*") for p in parts[:-1]):
        raise DataError(f"-layout {layout}: expected folder levels 'speaker' (once), 'session' (at most "
                        f"once) and '*', ending in 'file', e.g. speaker/session/file")
    return parts


def scan_folder(source, layout):
    """Sources of every audio file under ``source``, and (path, reason) of files that do not fit."""
    if not os.path.isdir(source):
        raise DataError(f"{source}: source folder not found")
    parts = parse_layout(layout)
    found, skipped, ignored = [], [], Counter()
    for folder, dirs, files in os.walk(source, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.abspath(os.path.join(folder, name))
            if not is_audio(name):
                ignored[os.path.splitext(name)[1] or name] += 1
                continue
            rel = os.path.relpath(path, source).split(os.sep)
            if len(rel) != len(parts):
                reason = (f"{len(rel) - 1} folder levels below the source, -layout {layout} "
                          f"has {len(parts) - 1}")
                skipped.append((path, reason))
                continue
            levels = dict(zip(parts, rel))
            found.append((path, levels["speaker"], levels.get("session")))
    if ignored:
        print(f"note: {sum(ignored.values())} files that are not audio ignored "
              f"({', '.join(f'{ext}: {n}' for ext, n in sorted(ignored.items()))})")
    return found, skipped


# Column names recognised in a list's header (compared in lower case), in order of preference.
KNOWN_COLUMNS = {"path": ("path", "file", "filename", "file_name", "audio", "wav"),
                 "speaker": ("speaker", "client_id", "speaker_id", "spk"),
                 "session": ("session", "session_id")}
POSITIONAL = ("path", "speaker", "session")  # the columns of a list without a header
COLUMNS_SYNTAX = "-columns path=COLUMN,speaker=COLUMN[,session=COLUMN]"


def read_text(path):
    """The text of a list: UTF-8 with or without a byte-order mark, or UTF-16 with one (what Excel
    saves as "Unicode text")."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].decode(encoding, "replace").count("\n") + 1
        raise DataError(f"{path}:{line}: not {encoding.split('-sig')[0].upper()} text; save the list as "
                        f"UTF-8 (Excel: CSV UTF-8) or UTF-16 (Excel: Unicode text)") from None


def header_columns(header, columns, where):
    """Index of the path, speaker and (if any) session column of a ``header`` row: as ``columns``
    ('path=COLUMN,speaker=COLUMN[,session=COLUMN]', the -columns flag) says, else by known names."""
    names = [name.lower() for name in header]
    if columns is None:
        found = {what: next(names.index(n) for n in known if n in names)
                 for what, known in KNOWN_COLUMNS.items() if any(n in names for n in known)}
        if "path" not in found or "speaker" not in found:
            raise DataError(f"{where}: no {'path' if 'path' not in found else 'speaker'} column among the "
                            f"header's {header}; say which columns hold what with {COLUMNS_SYNTAX}")
        return found
    found = {}
    for item in columns.split(","):
        what, _, name = (part.strip() for part in item.partition("="))
        if what not in KNOWN_COLUMNS or not name or what in found:
            raise DataError(f"-columns {columns}: expected {COLUMNS_SYNTAX.split(' ', 1)[1]}")
        if name.lower() not in names:
            raise DataError(f"{where}: -columns {what}={name}: no such column in the header {header}")
        found[what] = names.index(name.lower())
    if "path" not in found or "speaker" not in found:
        raise DataError(f"-columns {columns}: needs path= and speaker=, as in {COLUMNS_SYNTAX}")
    return found


def list_root(path, root):
    """The folder that relative paths in the list ``path`` start from: -root, else the list's folder."""
    if root is not None and not os.path.isdir(root):
        raise DataError(f"-root {root}: folder not found")
    return os.path.dirname(os.path.abspath(path)) if root is None else os.path.abspath(root)


def read_list(path, root=None, columns=None):
    """Sources of a CSV/TSV list: ``path, speaker[, session]`` rows, or rows under a header that names
    its columns (recognised by name, or mapped by ``columns``, the -columns flag)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: list not found (-list)")
    root = list_root(path, root)
    text = read_text(path)
    tab = path.lower().endswith((".tsv", ".tab")) or \
        (not path.lower().endswith(".csv") and "\t" in text.split("\n", 1)[0])
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE) if tab else \
        csv.reader(io.StringIO(text))
    try:
        rows = [(lineno, [field.strip() for field in row]) for lineno, row in enumerate(reader, 1)]
    except csv.Error as e:  # (a field beyond csv's size limit: a quote never closed, a binary file)
        raise DataError(f"{path}:{reader.line_num}: not a CSV/TSV row ({e})") from None
    rows = [(lineno, row) for lineno, row in rows if any(row)]
    if not rows:
        raise DataError(f"{path}: no rows")
    header, index = None, None
    lineno, first = rows[0]
    if columns is not None or not (is_audio(first[0]) or os.path.isfile(os.path.join(root, first[0]))):
        header, index = first, header_columns(first, columns, f"{path}:{lineno}")
        rows = rows[1:]
        if index == dict(zip(POSITIONAL, range(len(header)))):  # 'path,speaker[,session]': by position
            index = None
    found = []
    for lineno, row in rows:
        fields = list_fields(row, header, index, f"{path}:{lineno}", "\t" if tab else ",")
        found.append((os.path.join(root, fields["path"]), fields["speaker"], fields.get("session") or None))
    if not found:
        raise DataError(f"{path}: no rows")
    return found


def list_fields(row, header, index, where, sep):
    """Path, speaker and (if any) session of one list row: by position, or by the ``header``'s columns
    at ``index``."""
    if index is None:
        if len(row) not in (2, 3) or not row[0] or not row[1]:
            raise DataError(f"{where}: expected 'path{sep}speaker[{sep}session]', got {row}")
        return dict(zip(POSITIONAL, row))
    fields = {what: row[i] if i < len(row) else "" for what, i in index.items()}
    for what in ("path", "speaker"):
        if not fields[what]:
            raise DataError(f"{where}: no {what} (column {header[index[what]]!r} is empty)")
    return fields


def folder_name(name, what, source):
    """A speaker or session name as a folder name of a key: no separators, spaces or leading dot."""
    clean = re.sub(r"[^\w.+-]", "_", name).lstrip(".")
    if not clean:
        raise DataError(f"{source}: {what} name {name!r} is empty as a folder name")
    return clean


# ---------------------------------------------------------------------------------------------
# The plan: source -> output path relative to OUT

def split_speakers(speakers, count, seed):
    """The test speakers: ``count`` of the sorted ``speakers``, drawn with ``seed``."""
    if count >= len(speakers):
        raise DataError(f"-test_speakers {count}: there are only {len(speakers)} speakers; "
                        f"at least one must be left for training")
    rng = np.random.default_rng(seed)
    return {speakers[i] for i in rng.choice(len(speakers), count, replace=False)}


def make_plan(sources, args):
    """Rows (source, output relative to OUT, speaker, session), in sorted source order."""
    names = {}  # folder name -> original speaker name, to catch two names that clean to one
    rows = []
    for path, speaker, session in sorted(sources):
        spk = folder_name(speaker, "speaker", path)
        if names.setdefault(spk, speaker) != speaker:
            raise DataError(f"{path}: speakers {names[spk]!r} and {speaker!r} both become the folder {spk!r}")
        sess = folder_name(session, "session", path) if session is not None else args.default_session
        rows.append([path, spk, sess, speaker, session or ""])
    test = split_speakers(sorted(names), args.test_speakers, args.seed) if args.test_speakers else set()
    counts, plan = Counter(), []
    for path, spk, sess, speaker, session in rows:
        counts[spk, sess] += 1
        base = "wav" if not args.test_speakers else ("test/eval_wav" if spk in test else "train/wav")
        plan.append((path, f"{base}/{spk}/{sess}/{counts[spk, sess]:05d}.wav", speaker, session))
    if len({os.path.abspath(p) for p, *_ in plan}) != len(plan):
        raise DataError("a source file is listed more than once")
    return plan


def check_plan(out, plan):
    """Record the plan in ``out``; a folder prepared with another plan is refused, not overwritten."""
    path = os.path.join(out, PLAN)
    entries = [[src, dst] for src, dst, *_ in plan]
    if os.path.isfile(path):
        with open(path) as f:
            try:
                recorded = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
                raise DataError(f"{path}: not the plan this script writes ({e}); choose another -out "
                                f"or delete the folder") from None
            if recorded != entries:
                raise DataError(f"{out}: prepared earlier from other sources or flags ({PLAN} differs); "
                                f"choose another -out or delete it")
        return
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out}: exists and is not a folder made by DB/prepare_dataset.py; "
                        f"choose another -out")
    common.write_json_atomic(entries, path)


# ---------------------------------------------------------------------------------------------
# Conversion of one file

def write_wav_atomic(path, x):
    """16-bit PCM wav, written atomically (``common.atomic_path``)."""
    with common.atomic_path(path) as tmp:
        sf.write(tmp, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def unusable(x, min_seconds):
    """Why converted audio ``x`` is not kept (all zero, or shorter than ``min_seconds``), or None."""
    if not np.any(x):
        return "empty or all-zero audio"
    if len(x) < min_seconds * SAMPLE_RATE:
        return f"too short: {len(x) / SAMPLE_RATE:.3f} s, under -min_seconds {min_seconds:g}"
    return None


def convert_file(task):
    """``(source, frames written or None, reason skipped or None)`` for one (source, wav, ffmpeg,
    min_seconds) task."""
    src, dst, ffmpeg, min_seconds = task
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if src.lower().endswith(FFMPEG_EXTENSIONS):
        if ffmpeg is None:
            return src, None, "needs ffmpeg (not found; install it or pass -ffmpeg)"
        error = convert_vox2_to_wav.convert(src, dst, ffmpeg)
        if error:
            return src, None, utils.decode_failure(src, f"ffmpeg: {error.split(': ', 1)[-1]}")
        x = sf.read(dst, dtype="float64")[0]
        reason = unusable(x, min_seconds)
        if reason:
            os.remove(dst)
        return src, None if reason else len(x), reason
    try:
        x, _ = utils.read_audio(src)
    except DataError as e:  # (the exact reason: utils.decode_failure)
        return src, None, str(e).removeprefix(f"{src}: ")
    reason = unusable(x, min_seconds)
    if reason:
        return src, None, reason
    peak = np.max(np.abs(x))
    if peak > 1:  # the resampling filter can overshoot a full-scale source: scale, never clip
        x = x / peak
    write_wav_atomic(dst, x)
    return src, len(x), None


def convert_all(tasks, jobs, progress, strict=False):
    """Run ``convert_file`` on every task in ``jobs`` processes; returns frames per source and skips.
    ``strict``: the first file that cannot be used stops the run (DataError)."""
    frames, skipped = {}, []
    if not tasks:
        return frames, skipped
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(max(1, min(jobs, len(tasks)))) as pool:
        for src, n, reason in tqdm(pool.imap(convert_file, tasks, chunksize=4), total=len(tasks),
                                   desc="converting to 16 kHz mono wav", unit="file", disable=not progress):
            if reason is None:
                frames[src] = n
            elif strict:
                raise DataError(f"{src}: {reason} {STRICT}")
            else:
                skipped.append((src, reason))
    return frames, skipped


# ---------------------------------------------------------------------------------------------
# Trials

def make_trials(keys, sessions, count, rng):
    """``count`` trial lines over ``keys`` (``<spk>/<session>/<NNNNN>.wav``): half targets, two files of
    one speaker, from different sessions when that speaker has several; half non-targets, two speakers.
    Pairs are drawn without repetition; fewer come back when fewer exist. ``count`` None: every
    target pair and as many non-targets."""
    by_spk = {}
    for key in sorted(keys):
        by_spk.setdefault(key.split("/")[0], []).append(key)
    targets = []
    for spk, files in by_spk.items():
        i, j = np.triu_indices(len(files), 1)
        if len(sessions[spk]) > 1:
            session = np.array([f.split("/")[1] for f in files])
            cross = session[i] != session[j]
            i, j = i[cross], j[cross]
        targets.extend((files[a], files[b]) for a, b in zip(i, j))
    count = 2 * len(targets) if count is None else count
    chosen = [targets[t] for t in rng.permutation(len(targets))[:count // 2]]
    lines = [f"1 {a} {b}" for a, b in chosen]
    speakers, flat = sorted(by_spk), sorted(keys)
    spk_of = [k.split("/")[0] for k in flat]
    n_non = sum(len(by_spk[a]) * len(by_spk[b]) for x, a in enumerate(speakers) for b in speakers[x + 1:])
    wanted, seen = min(count - count // 2, n_non), set()
    while len(seen) < wanted:
        a, b = sorted(rng.choice(len(flat), 2, replace=False))
        if spk_of[a] != spk_of[b] and (a, b) not in seen:
            seen.add((a, b))
            lines.append(f"0 {flat[a]} {flat[b]}")
    return [lines[k] for k in rng.permutation(len(lines))]


# ---------------------------------------------------------------------------------------------

def main(args):
    if args.list:
        sources, misfits = read_list(args.list, args.root, args.columns), []
    else:
        sources, misfits = scan_folder(args.source, args.layout)
    listed = len(sources)
    sources, missing = locate(sources)
    if missing and args.list:
        hint_root(args.list, args.root, missing, listed)
    if args.strict and (misfits or missing):
        raise DataError("{}: {} ".format(*min(misfits + missing)) + STRICT)
    if not sources:
        raise DataError(f"{args.list or args.source}: no audio files found")
    plan = make_plan(sources, args)
    check_plan(args.out, plan)
    common.remove_temporaries(args.out)  # what an interrupted run left half-written
    ffmpeg = shutil.which(args.ffmpeg)
    done = finished(args.out, plan, args.min_seconds)
    if done:
        print(f"resuming {args.out}: {len(done)} of {len(plan)} files already converted")
    tasks = [(src, os.path.join(args.out, dst), ffmpeg, args.min_seconds) for src, dst, *_ in plan
             if src not in done]
    frames, failed = convert_all(tasks, args.jobs, args.progress, args.strict)
    frames.update(done)
    skipped = sorted(misfits + missing + failed)
    rows = [row for row in plan if row[0] in frames]
    common.write_lines(os.path.join(args.out, "mapping.tsv"),
                       ["source\toutput\tspeaker\tsession"] + ["\t".join(r) for r in rows])
    common.write_lines(os.path.join(args.out, "skipped.tsv"),
                       ["source\treason"] + [f"{p}\t{r}" for p, r in skipped])
    if not rows:
        report_skipped(args, skipped)
        raise DataError(f"{args.list or args.source}: none of its {len(plan)} audio files can be used "
                        f"(reasons above and in {os.path.join(args.out, 'skipped.tsv')})")
    if args.test_speakers:
        write_trials(args, rows)
    summarise(args, rows, frames, skipped)
    return 0


def locate(sources):
    """The sources whose file exists, each under the name found on disk (a name typed in one Unicode
    normal form, NFC or NFD, is found in the other), and (path, "file not found") for the rest."""
    found, missing = [], []
    for path, speaker, session in sources:
        forms = dict.fromkeys([path] + [unicodedata.normalize(form, path) for form in ("NFC", "NFD")])
        on_disk = next((form for form in forms if os.path.isfile(form)), None)
        if on_disk is None:
            missing.append((path, "file not found"))
        else:
            found.append((on_disk, speaker, session))
    return found, missing


def hint_root(list_path, root, missing, listed):
    """DataError pointing at -root when listed files are missing: naming the folder they lie under where
    one the user likely meant holds them all (the list's folder, -root or the working directory, a
    folder above one of these, or a folder in one of those); when all ``listed`` are missing, in any case."""
    root = list_root(list_path, root)
    rel = [r for r in (os.path.relpath(p, root) for p, _ in missing[:20]) if not r.startswith("..")]
    near = []
    for base in (os.path.dirname(os.path.abspath(list_path)), root, os.getcwd()):
        for folder in (base, os.path.dirname(base)):
            near += [folder] + subfolders(folder)
        near.append(os.path.dirname(os.path.dirname(base)))
    where = f"{len(missing)} of the {listed} listed files are not under {root}"
    where += f" (e.g. {rel[0]})" if rel else ""
    for folder in dict.fromkeys(near):
        if rel and folder != root and all(os.path.isfile(os.path.join(folder, r)) for r in rel):
            raise DataError(f"{list_path}: {where} but are under {folder}: add -root {folder}")
    if len(missing) == listed:
        raise DataError(f"{list_path}: {where}; -root names the folder that the listed paths start from")


def subfolders(folder):
    """The sorted folders in ``folder`` (none where it cannot be listed)."""
    try:
        return sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())
    except OSError:
        return []


def finished(out, plan, min_seconds):
    """Frames of each source whose output an earlier run wrote. An output shorter than ``min_seconds``
    (left by a run with a lower -min_seconds) is deleted: converted again, it is skipped with its reason."""
    done = {}
    for src, dst, *_ in plan:
        path = os.path.join(out, dst)
        if os.path.exists(path):
            frames = sf.info(path).frames
            if frames < min_seconds * SAMPLE_RATE:
                os.remove(path)
            else:
                done[src] = frames
    return done


def write_trials(args, rows):
    keys = [dst.split("/", 2)[2] for _, dst, *_ in rows if dst.startswith("test/")]
    sessions = {}
    for key in keys:
        sessions.setdefault(key.split("/")[0], set()).add(key.split("/")[1])
    lines = make_trials(keys, sessions, args.make_trials, np.random.default_rng([args.seed, 1]))
    if args.make_trials is not None and len(lines) < args.make_trials:
        print(f"note: only {len(lines)} distinct trials exist over the test speakers "
              f"({args.make_trials} asked for)")
    if not lines or all(line[0] == "1" for line in lines) or all(line[0] == "0" for line in lines):
        raise DataError("-make_trials: the test speakers' files give no target or no non-target pair "
                        "(need two speakers, one with two files)")
    common.write_lines(os.path.join(args.out, "test", "veri_test.txt"), lines)


def summarise(args, rows, frames, skipped):
    """The closing report: per part, speakers, files and hours; the skipped files; the training command,
    sized to the corpus."""
    seconds, counts = {}, {}
    for part in sorted({dst.rsplit("/", 3)[0] for _, dst, *_ in rows}):
        files = [(src, dst) for src, dst, *_ in rows if dst.startswith(part + "/")]
        counts[part] = len(files)
        speakers = {dst.rsplit("/", 3)[1] for _, dst in files}
        seconds[part] = total = sum(frames[src] for src, _ in files) / SAMPLE_RATE
        duration = f"{total / 3600:.2f} h" if total >= 3600 else f"{total / 60:.1f} min"
        print(f"{os.path.join(args.out, part)}: {len(speakers)} speakers, {len(files)} files, {duration}")
    if os.path.isfile(os.path.join(args.out, "test", "veri_test.txt")):
        with open(os.path.join(args.out, "test", "veri_test.txt")) as f:
            labels = [line.split()[0] for line in f]
        print(f"{os.path.join(args.out, 'test', 'veri_test.txt')}: {len(labels)} trials, "
              f"{labels.count('1')} targets")
    report_skipped(args, skipped)
    if args.test_speakers:
        train_seconds, train_files = seconds.get("train/wav", 0), counts.get("train/wav", 0)
        if train_seconds < SMALL_CORPUS_SECONDS:
            print("note: under an hour of training audio: the demo's scaled-down model, not the paper's "
                  "(80 epochs of batch 100)")
        print("train with: " + train_command(args.out, train_seconds, train_files))


def report_skipped(args, skipped):
    """How many files were skipped, too short and otherwise unusable, and a few of each with their
    reasons (OUT/skipped.tsv has them all)."""
    short = [s for s in skipped if s[1].startswith("too short")]
    other = [s for s in skipped if not s[1].startswith("too short")]
    counts = [f"{len(short)} too short (under -min_seconds {args.min_seconds:g})"] * bool(short) + \
        [f"{len(other)} unusable"] * bool(other)
    print(f"{len(skipped)} files skipped" + (f": {', '.join(counts)}" if skipped else ""))
    for group, kind in ((other, "unusable"), (short, "too short")):
        for path, reason in group[:SHOWN]:
            print(f"  {path}: {reason}")
        if len(group) > SHOWN:
            print(f"  ... and {len(group) - SHOWN} more {kind}")
    if skipped:
        print(f"  every skipped file with its reason: {os.path.join(args.out, 'skipped.tsv')}")


def train_command(out, train_seconds, train_files=None):
    """The command that trains on a prepared ``out``: the paper's model, or, with under an hour of
    training audio, the demo's scaled-down model (train_RawNet2.DEMO_DEFAULTS); with fewer
    ``train_files`` than the batch (which drops incomplete batches), a batch of them all."""
    out = os.path.normpath(out)
    line = (f"python train_RawNet2.py -name NAME -DB {shlex.quote(out + '/test/')} "
            f"-DB_vox2 {shlex.quote(out + '/train/')}")
    small = train_seconds < SMALL_CORPUS_SECONDS
    values = ({flag: json.dumps(train_RawNet2.DEMO_DEFAULTS[flag], separators=(",", ":"))
               for flag in SMALL_MODEL_FLAGS} if small else {})
    batch = train_RawNet2.DEMO_DEFAULTS["bs"] if small else train_RawNet2.build_parser().get_default("bs")
    if train_files is not None and 0 < train_files < batch:
        values["bs"] = str(train_files)
    return " ".join([line] + [f"-{flag} {shlex.quote(value)}" for flag, value in values.items()])


if __name__ == "__main__":
    sys.exit(common.run_cli(lambda: main(parse_args()),
                            interrupted="interrupted: finished files are kept; the same command resumes"))
