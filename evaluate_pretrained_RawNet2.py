"""Score RawNet2 speaker embeddings on the VoxCeleb1 trial lists; make them from any checkpoint.

    python evaluate_pretrained_RawNet2.py                    # released pickles in spk_embd/, lists in trials/
    python evaluate_pretrained_RawNet2.py -extract           # first embed DB/VoxCeleb1/{dev,eval}_wav
    python evaluate_pretrained_RawNet2.py -verify a.wav b.wav -threshold T   # one pair of recordings

Reproduces evaluate_pretrained_RawNet2.py of github.com/Jungjee/RawNet (python/RawNet2): the pickled
TTA embeddings ``-embd_dir/TTA_vox1_{dev,eval}.pk`` are scored with cosine similarity on Vox1-O
(``vox_original.txt``, eval embeddings) and on Vox1-E and Vox1-H (``list_test_all_cleaned.txt``,
``list_test_hard_cleaned.txt``, dev + eval embeddings); each EER is printed as the original prints it
(``Vox original evaluation EER: <fraction>``) and appended to ``eers.txt``. docs/FIDELITY.md lists
what it keeps from the original and where it differs.

Added: minDCF and the EER threshold under each EER line; ``-extract`` (the pickles from any
checkpoint, resumable), ``-wav_dir``/``-wav_list`` (any audio), ``-onnx``, ``-verify``, ``-asnorm``,
``-score_dir``, ``-plot``, ``-bf16``. Scoring imports no PyTorch: only extraction and verification do.
"""

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shutil

import numpy as np

import common
import scoring
from common import DataError

# (name printed, file in -trial_dir, embedding sets scored with it), as in the original script.
LISTS = [("Vox original", "vox_original.txt", ("eval",)),
         ("Vox1_E_cleaned", "list_test_all_cleaned.txt", ("dev", "eval")),
         ("Vox1_H_cleaned", "list_test_hard_cleaned.txt", ("dev", "eval"))]
P_TARGETS = (0.01, 0.05)
# An extraction's log of finished embeddings is synced to disk every this many records (a killed
# process loses nothing written before; the sync bounds what a machine crash can lose).
PARTIAL_SYNC_RECORDS = 64


def build_parser():
    parser = argparse.ArgumentParser(
        description="Score RawNet2 TTA embeddings on VoxCeleb1 trial lists (EER, minDCF); "
                    "extract them from a checkpoint; verify a pair of recordings.")

    add = common.arg_group(parser, "scoring")
    add("embd_dir", type=str, default="spk_embd/", help="folder of TTA_vox1_dev.pk and TTA_vox1_eval.pk")
    add("trial_dir", type=str, default="trials/",
        help="folder of vox_original.txt, list_test_all_cleaned.txt, list_test_hard_cleaned.txt")
    add("trials", type=str, nargs="+", default=None, metavar="FILE",
        help="score these trial lists (with every embedding set present) instead of the three above")
    add("format", type=str, default="pk", choices=["pk", "npy"],
        help="embedding files: pickles (dict key -> vector) or a .npy matrix plus <name>_keys.txt")
    add("skip_missing", action="store_true",
        help="drop trials whose keys have no embedding (and say how many) instead of stopping")
    add("score_dir", type=str, default="", help="write per-trial scores 'score target keyA keyB' here")
    add("eer_file", type=str, default="eers.txt", help="file the EER lines are appended to")
    add("plot", type=str, nargs="?", const="det_curves/", default=None, metavar="DIR",
        help="write a DET curve PNG per list into DIR (needs matplotlib)")

    add = common.arg_group(parser, "score normalisation")
    add("asnorm", action="store_true",
        help="also report adaptive symmetric score normalisation (AS-norm) with -cohort")
    add("cohort", type=str, default="", help="AS-norm cohort: an embedding file (.pk or .npy)")
    add("cohort_by", type=str, default="speaker", choices=["speaker", "utterance"],
        help="cohort entries: per-speaker mean embeddings (speaker = first part of the key), or utterances")
    add("asnorm_top_n", type=int, default=300, help="AS-norm: closest cohort entries per side")

    add = common.arg_group(parser, "extraction")
    add("extract", action="store_true",
        help="compute TTA embeddings of -DB's -dev_wav and -eval_wav with -model_dir into -embd_dir, "
             "then score")
    add("model_dir", **common.MODEL_DIR_FLAG)
    add("DB", type=str, default="DB/VoxCeleb1/", help="VoxCeleb1 folder holding -dev_wav and -eval_wav")
    add("dev_wav", type=str, default="dev_wav/", help="dev utterances (Vox1-E/H), inside -DB")
    add("eval_wav", **common.EVAL_WAV_FLAG)
    add("wav_dir", type=str, default=None, metavar="DIR",
        help="-extract: embed every audio file under DIR instead (wav, flac, ogg, mp3, ...: any rate and "
             "channel count, converted to 16 kHz mono on the fly); keys are paths relative to DIR")
    add("wav_list", type=str, default=None, metavar="FILE",
        help="-extract: embed the audio files listed in FILE (one path per line) instead; keys are the "
             "paths as written")
    add("wav_base", type=str, default=None, metavar="DIR",
        help="-wav_list: the folder its paths are relative to (default: the current folder)")
    add("strict", **common.STRICT_FLAG)
    add("embd", type=str, default=None, metavar="FILE",
        help="one embedding file (.pk or .npy): written by -extract with -wav_dir/-wav_list (default "
             "<embd_dir>/embeddings.<format>), and the file every trial list is scored against")
    add("onnx", type=str, default=None, metavar="FILE",
        help="run the network with onnxruntime from this export of export_RawNet2.py instead of "
             "-model_dir (CPU; bench/onnx_extract.py; needs requirements-optional.txt)")
    add("window_size", **common.CHECKPOINT_WINDOW_FLAG)
    add("m_first_conv", **common.CHECKPOINT_SINC_FLAG)
    add("bs", type=int, default=None,
        help="TTA segments per forward, packed across utterances (default: a fixed rule of the model's "
             "size and the device, fast_RawNet2.segments_per_forward: 16 for the paper model on CPU; -bs 1 "
             "runs the original's one segment at a time)")
    # (threads, not train_RawNet2.py's DataLoader processes: its own default)
    add("nb_worker", type=int, default=4, help="threads reading audio ahead of the model "
                                               "(at most one per usable core; 0: read in turn)")
    add("fast", **common.FAST_FLAG)
    add("bf16", action="store_true",
        help="bfloat16 autocast in the network (faster on CPUs with bf16 support; changes scores slightly)")
    add("device", type=str, default=None, help="device of the network (default: cuda if available, else cpu)")

    add = common.arg_group(parser, "verification")
    add("verify", type=str, nargs=2, default=None, metavar=("A.wav", "B.wav"),
        help="embed two recordings with -model_dir and print their cosine score and decision")
    add("threshold", type=float, default=None,
        help="-verify: same speaker when score >= threshold (e.g. the EER threshold of Vox1-O)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Embedding files, model. PyTorch is imported only here and in extraction and verification, so that
# a scoring run starts without it.

def embedding_path(args, subset):
    if args.embd:  # -embd: one file holds every embedding
        return args.embd
    return os.path.join(args.embd_dir, f"TTA_vox1_{subset}.{args.format}")


def with_device(args):
    """``args`` with -device set: CUDA when available unless given (a device that cannot run the
    network is one line naming the flag)."""
    import torch

    import utils
    common.keep_freed_memory()  # the network's large activations are allocated once per forward
    device = utils.check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available()
                                                                   else "cpu")
    return argparse.Namespace(**{**vars(args), "device": device})


def load_model(args):
    """The network of -onnx or -model_dir, and ``args`` with -window_size resolved for it
    (``utils.resolve_window_size``: the flag, else what the file records, else 11810)."""
    import utils

    model = load_network(args)
    window_size = utils.resolve_window_size(args.window_size, model, args.onnx or args.model_dir)
    return model, argparse.Namespace(**{**vars(args), "window_size": window_size})


def load_network(args):
    if args.onnx:
        from export_RawNet2 import OnnxNetwork
        return OnnxNetwork(args.onnx)
    import fast_RawNet2
    import runs

    d_args = {"first_conv": args.m_first_conv} if args.m_first_conv is not None else None
    model = runs.load_network(args.model_dir, "checkpoint (-model_dir)", d_args)
    return fast_RawNet2.accelerate(model, args.fast).to(args.device)


def segments_per_forward(model, args):
    """-bs, else the fixed rule of fast_RawNet2.segments_per_forward (an ONNX network too)."""
    import fast_RawNet2

    return args.bs or fast_RawNet2.segments_per_forward(model, args.device)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Extraction with resume: each finished embedding is appended to -embd_dir/.partial/<subset>_<n>.log

def open_partial(folder, fingerprint):
    """Make ``folder`` hold partial results of this model and these settings, or start it over."""
    stamp = os.path.join(folder, "fingerprint.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            try:
                recorded = json.load(f)
            except ValueError:
                raise DataError(f"{stamp}: not the JSON fingerprint an extraction writes; delete {folder} "
                                f"to start the extraction over") from None
        if recorded == fingerprint:
            return
        print(f"note: {folder} holds a partial extraction made with another model or settings: starting over")
        shutil.rmtree(folder)
    common.write_json_atomic(fingerprint, stamp)


def load_partial(folder, subset):
    """Embeddings and silent keys saved by earlier, interrupted runs for ``subset``: the records
    ``(key, embedding or None)`` of its logs (a record torn by a killed process is left out)."""
    embeddings, skipped = {}, set()
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"{subset}_") and name.endswith(".log"):
            path = os.path.join(folder, name)
            try:
                import runs

                records = runs.read_records(path)
            except DataError as e:
                raise DataError(f"{e}; delete {folder} to start the extraction over") from None
            for record in records:
                if not (isinstance(record, tuple) and len(record) == 2 and isinstance(record[0], str)):
                    raise DataError(f"{path}: not a partial-extraction log; delete {folder} to start over")
                key, code = record
                if code is None:
                    skipped.add(key)
                else:
                    embeddings.update(scoring.check_embeddings({key: code}, path))
    return embeddings, skipped


def extract_subset(model, args, folder, wav_dir, subset, keys=None, convert=False):
    """TTA embeddings of every utterance under ``wav_dir`` (or of ``keys``, paths inside it; with
    ``convert``, of any format, rate and channel count, and a file that cannot be read is skipped
    and listed unless -strict), resuming from ``folder``. A skipped file is not logged: a resumed
    run reads it again."""
    from tqdm import tqdm

    import runs
    import tta
    import utils

    keys = utils.list_utterances(wav_dir) if keys is None else keys
    embeddings, skipped = load_partial(folder, subset)
    todo = [k for k in keys if common.utt_id(k) not in embeddings and k not in skipped]
    if len(todo) < len(keys):
        print(f"resuming {wav_dir}: {len(keys) - len(todo)} of {len(keys)} utterances already done")
    stream = tta.iter_embeddings(model, todo, wav_dir, model.nb_samp, args.window_size, args.device,
                                   args.nb_worker, segments_per_forward(model, args), args.bf16, convert,
                                   skip_unreadable=convert and not args.strict)
    unreadable = []
    # A log of this run's own: every finished embedding is appended (and flushed) as it comes, so a
    # run killed at any moment loses at most the utterance in flight.
    number = len(os.listdir(folder))  # (a resumed, half-deleted log folder may have gaps)
    while os.path.exists(os.path.join(folder, f"{subset}_{number:05d}.log")):
        number += 1
    log_path = os.path.join(folder, f"{subset}_{number:05d}.log")
    with open(log_path, "ab") as log:  # (an OSError here names the path: see cli)
        for count, (key, code) in enumerate(tqdm(stream, total=len(todo), desc=f"TTA {subset}",
                                                 dynamic_ncols=True), 1):
            if isinstance(code, str):  # the reason it cannot be read
                unreadable.append(code)
                continue
            common.trace(f"embedded {key}")
            runs.append_record(log, (key, code), log_path)
            if code is None:
                skipped.add(key)
            else:
                embeddings[common.utt_id(key)] = code
            if count % PARTIAL_SYNC_RECORDS == 0:
                os.fsync(log.fileno())
    if skipped:
        print(f"warning: {len(skipped)} silent/empty files of {wav_dir} have no embedding "
              f"({', '.join(sorted(skipped)[:5])})")
    if unreadable:
        print(f"warning: {len(unreadable)} files of {args.wav_dir or args.wav_list} cannot be read and have "
              f"no embedding (-strict stops at the first):")
        print("".join(f"  {reason}\n" for reason in unreadable), end="")
    return embeddings


def audio_files(args):
    """(keys, folder they are relative to) of -wav_dir or -wav_list. A key may hold spaces (a trial
    list cannot name it, but it is embedded), not a line break (the .npy key list is one per line)."""
    import utils

    if args.wav_dir:
        if not os.path.isdir(args.wav_dir):
            raise DataError(f"{args.wav_dir}: folder not found (-wav_dir)")
        keys = sorted(os.path.relpath(os.path.join(path, name), args.wav_dir).replace(os.sep, "/")
                      for path, _, files in os.walk(args.wav_dir, followlinks=True) for name in files
                      if name.lower().endswith(utils.AUDIO_EXTENSIONS))
        source, base = args.wav_dir, args.wav_dir
    else:
        keys, base = listed_files(args), args.wav_base or ""
        source = args.wav_list
    if not keys:
        raise DataError(f"{source}: no audio files (extensions {', '.join(utils.AUDIO_EXTENSIONS)})")
    broken = [k for k in keys if "\n" in k or "\r" in k]
    if broken:
        raise DataError(f"{os.path.join(base, broken[0])!r}: a file name holding a line break cannot be "
                        f"a key: rename it")
    return keys, base


def listed_files(args):
    """The paths of -wav_list (each once, in order; a UTF-8 byte-order mark and CRLF line ends are no
    part of them), every one present under -wav_base; a miss is one line that says where the paths
    were looked for and how to give the folder they are relative to."""
    if not os.path.isfile(args.wav_list):
        raise DataError(f"{args.wav_list}: list not found (-wav_list)")
    if args.wav_base is not None and not os.path.isdir(args.wav_base):
        raise DataError(f"{args.wav_base}: folder not found (-wav_base)")
    try:
        with open(args.wav_list, encoding="utf-8-sig") as f:
            keys = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    except UnicodeDecodeError as e:
        raise DataError(f"{args.wav_list}: not UTF-8 text ({e.reason} at byte {e.start}; "
                        f"-wav_list)") from None
    base = args.wav_base or ""
    absent = [k for k in keys if not os.path.isfile(os.path.join(base, k))]
    if absent:
        beside = os.path.dirname(os.path.abspath(args.wav_list))
        if all(os.path.isfile(os.path.join(beside, k)) for k in absent):
            hint = f"they are there relative to the list's folder: add -wav_base {beside}"
        else:
            hint = (f"paths are taken relative to {base or 'the current folder'}: give the folder they are "
                    f"relative to with -wav_base DIR")
        raise DataError(f"{args.wav_list}: {len(absent)} listed files not found, e.g. "
                        f"{', '.join(absent[:3])} ({hint})")
    return keys


def conversion_note(keys, base):
    """One line saying how many files are converted on the fly (other rates, several channels)."""
    import soundfile as sf

    import utils

    rates, channels = set(), set()
    converted = 0
    for key in keys:
        try:
            info = sf.info(os.path.join(base, key))
        except (RuntimeError, sf.LibsndfileError):
            continue  # reported by name when it is read
        if info.samplerate != utils.SAMPLE_RATE or info.channels != 1:
            converted += 1
            rates.add(info.samplerate), channels.add(info.channels)
    if converted:
        print(f"note: {converted} of {len(keys)} files are converted to 16 kHz mono as they are read "
              f"(rates {', '.join(map(str, sorted(rates)))} Hz; "
              f"channels {', '.join(map(str, sorted(channels)))})")


def extraction_jobs(args):
    """(folder of the outputs, jobs): each job (subset, folder its keys are relative to, keys or None
    for every wav under it, convert, output path)."""
    if args.wav_dir or args.wav_list:  # any audio files, into one file (-embd)
        keys, base = audio_files(args)
        conversion_note(keys, base)
        return os.path.dirname(os.path.abspath(args.embd)), [("files", base, keys, True, args.embd)]
    folders = [(subset, os.path.join(args.DB, wav))
               for subset, wav in (("dev", args.dev_wav), ("eval", args.eval_wav))]
    present = [(subset, wav_dir) for subset, wav_dir in folders if os.path.isdir(wav_dir)]
    if not present:
        raise DataError(f"-extract: neither {folders[0][1]} nor {folders[1][1]} exists")
    for subset, wav_dir in folders:
        if (subset, wav_dir) not in present:
            print(f"note: {wav_dir} not found: no {subset} embeddings")
    return args.embd_dir, [(subset, wav_dir, None, False, embedding_path(args, subset))
                           for subset, wav_dir in present]


def extract(args):
    """TTA embeddings of -DB's dev_wav/ and eval_wav/ (or of -wav_dir / -wav_list), resumable: the
    output folder is locked while it runs, and finished embeddings are logged in a .partial folder."""
    import runs

    folder, jobs = extraction_jobs(args)
    model, args = load_model(args)
    source = args.wav_dir or args.wav_list
    # (what changes the numbers: a resumed extraction with other settings starts over)
    fingerprint = {"model_sha256": file_sha256(args.onnx or args.model_dir), "nb_samp": model.nb_samp,
                   "window_size": args.window_size, "bf16": args.bf16, "fast": args.fast,
                   "segments_per_forward": segments_per_forward(model, args),
                   "audio": {subset: os.path.abspath(base) for subset, base, *_ in jobs},
                   **({"source": os.path.abspath(source)} if source else {})}
    partial = os.path.join(folder, ".partial-" + os.path.basename(args.embd) if source else ".partial")
    with runs.folder_lock(folder, "wait for it to end, or write the embeddings elsewhere"):
        if not source:  # -embd_dir holds only our outputs: temporaries of a killed run are removed
            common.remove_temporaries(folder)
        done = partial + ".done"
        if os.path.isdir(done):  # a finished extraction killed while deleting its logs: resumed
            # from what is left of them (checked by open_partial), unless its stamp is gone already
            if os.path.isfile(os.path.join(done, "fingerprint.json")) and not os.path.exists(partial):
                os.replace(done, partial)
            else:
                shutil.rmtree(done)
        open_partial(partial, fingerprint)
        for subset, base, keys, convert, path in jobs:
            embeddings = extract_subset(model, args, partial, base, subset, keys, convert)
            if not embeddings:
                raise DataError(f"{source or base}: no embedding computed (every file is silent or cannot be "
                                f"read); {path} not written")
            scoring.save_embeddings(embeddings, path)
            print(f"{len(embeddings)} embeddings of {source or base} written to {path}")
        os.replace(partial, done)  # one step: a half-deleted log folder is never taken for a live one
        shutil.rmtree(done)


# ---------------------------------------------------------------------------------------------
# Scoring

def distinct_names(paths):
    """A name per path that no other path shares: its file name without extension, or, where several
    paths share that, with as many of its parent folders as tell them apart (``a/trials``,
    ``b/trials``). The same file given twice is one line."""
    parts = [os.path.splitext(os.path.abspath(p))[0].split(os.sep) for p in paths]
    for i, path in enumerate(paths):
        if parts[i] in parts[:i]:
            raise DataError(f"-trials: {path} is given twice")
    names = []
    for own in parts:
        same = [other for other in parts if other[-1] == own[-1]]
        depth = 1
        while len({tuple(other[-depth:]) for other in same}) < len(same):
            depth += 1
        names.append("/".join(own[-depth:]))
    return names


def trial_lists(args):
    """(name, path, embedding sets, output stem) of each list to score: the stem names its
    -score_dir and -plot files, one per list (a clash of two lists' files is one line)."""
    if args.trials:
        lists = [(name, path, ("dev", "eval"))
                 for name, path in zip(distinct_names(args.trials), args.trials)]
    else:
        lists = [(name, os.path.join(args.trial_dir, file), subsets) for name, file, subsets in LISTS]
    lists = [(name, path, ("embd",) if args.embd else subsets,
              name.replace("/", "_") if args.trials else os.path.splitext(os.path.basename(path))[0])
             for name, path, subsets in lists]
    suffixes = ("", "_asnorm") if args.asnorm else ("",)
    outputs = [stem + suffix for *_, stem in lists for suffix in suffixes]
    clash = next((o for o in outputs if outputs.count(o) > 1), None)
    if clash and (args.score_dir or args.plot is not None):
        raise DataError(f"-trials: two lists would write the same output file {clash}.txt/.png: rename one")
    return lists


def load_cohort(args):
    """AS-norm cohort matrix: per-speaker means of the -cohort embeddings, or the embeddings."""
    embeddings = scoring.load_embeddings(args.cohort)
    if args.cohort_by == "utterance":
        return np.stack(list(embeddings.values()))
    by_speaker = {}
    for key, code in embeddings.items():
        by_speaker.setdefault(common.speaker_of(key), []).append(code)
    return np.stack([np.mean(codes, axis=0) for codes in by_speaker.values()])


def trial_rows(name, trials, table, skip_missing):
    """Table rows of each trial's keys (``trials`` from ``scoring.read_trial_list``). A key without
    embedding is an error, or with -skip_missing its trials are dropped with a note. Returns
    (labels, rowsA, rowsB, kept): ``kept`` the trials scored, a slice or a mask."""
    labels, keys, index_a, index_b = trials
    key_rows = table.lookup(keys)
    rows_a, rows_b = key_rows[index_a], key_rows[index_b]
    kept = slice(None)
    if np.any(key_rows < 0):
        missing = sorted(k for k, r in zip(keys, key_rows.tolist()) if r < 0)
        if not skip_missing:
            scoring.check_keys(missing, (), f"trial keys of {name}")
        kept = (rows_a >= 0) & (rows_b >= 0)
        if not kept.any():
            raise DataError(f"{name}: no trial has embeddings for both of its keys")
        print(f"note: {name}: {int((~kept).sum())} of {len(kept)} trials skipped, "
              f"{len(missing)} keys have no embedding (e.g. {', '.join(missing[:3])})")
        labels, rows_a, rows_b = labels[kept], rows_a[kept], rows_b[kept]
    table.check_finite(np.concatenate([rows_a, rows_b]))
    return labels, rows_a, rows_b, kept


def metrics(labels, scores):
    """EER (original method), its threshold, and minDCF at each of P_TARGETS."""
    (eer, threshold), min_dcfs = scoring.eer_and_min_dcf(labels, scores, P_TARGETS)
    return {"eer": eer, "eer_threshold": threshold,
            **{f"min_dcf_{p}": dcf for p, (dcf, _) in zip(P_TARGETS, min_dcfs)}}


def report(line, result, eer_file):
    print(line)
    common.append_line(eer_file, line, "the EER above was printed only")
    print("  " + ", ".join(f"minDCF(p_target={p}) {result[f'min_dcf_{p}']:.4f}" for p in P_TARGETS)
          + f", EER threshold {result['eer_threshold']:.4f}")


def write_scores(path, scores, labels, trials, kept):
    """'score target keyA keyB' per scored trial."""
    _, keys, index_a, index_b = trials
    keys = np.array(keys, dtype=object)
    lines = zip(scores.tolist(), labels.tolist(), keys[index_a[kept]], keys[index_b[kept]])
    common.write_text_atomic("".join(f"{s} {t} {a} {b}\n" for s, t, a, b in lines), path)


def plot_det(path, title, curves):
    """DET curve (miss vs false-alarm probability on normal-deviate axes) of each (label, labels, scores)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import det_curve

    ticks = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6])
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, labels, scores in curves:
        fpr, fnr, _ = det_curve(labels, scores)
        eer = scoring.compute_eer(labels, scores)[0]
        ax.plot(norm.ppf(np.clip(fpr, 1e-6, 1 - 1e-6)), norm.ppf(np.clip(fnr, 1e-6, 1 - 1e-6)),
                label=f"{label}, EER {100 * eer:.2f} %")
    ax.plot(norm.ppf(ticks), norm.ppf(ticks), ":", color="grey", linewidth=0.8)  # EER diagonal
    for set_ticks, set_labels in ((ax.set_xticks, ax.set_xticklabels), (ax.set_yticks, ax.set_yticklabels)):
        set_ticks(norm.ppf(ticks))
        set_labels([f"{100 * t:g}" for t in ticks])
    ax.set_xlim(norm.ppf(ticks[[0, -1]])), ax.set_ylim(norm.ppf(ticks[[0, -1]]))
    ax.set_xlabel("false alarm probability (%)"), ax.set_ylabel("miss probability (%)")
    ax.set_title(title), ax.grid(True, linewidth=0.3), ax.legend(loc="lower left")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def scorable_lists(args):
    """(name, path, embedding sets) of each list to score whose file and embeddings are present; a
    note for each other. A missing -embd_dir, or no trial list at all, is one line (after -extract
    only a note: the embeddings are its result)."""
    if not args.embd and not os.path.isdir(args.embd_dir):
        raise DataError(f"{args.embd_dir}: folder not found (-embd_dir: the folder of "
                        f"{os.path.basename(embedding_path(args, 'dev'))} and "
                        f"{os.path.basename(embedding_path(args, 'eval'))})")
    candidates = trial_lists(args)
    if not any(os.path.isfile(path) for _, path, *_ in candidates):
        where = (" ".join(args.trials) if args.trials
                 else f"{args.trial_dir} ({', '.join(file for _, file, _ in LISTS)})")
        if args.extract:
            print(f"note: no trial list found in {where}: embeddings written, nothing scored")
            return []
        raise DataError(f"nothing was scored: no trial list found in {where} (-trial_dir or -trials)")
    lists = []
    for name, path, subsets, stem in candidates:
        if not os.path.isfile(path):
            print(f"note: {path} not found: {name} skipped")
            continue
        present = tuple(s for s in subsets if os.path.isfile(embedding_path(args, s)))
        if not present or (args.trials is None and present != subsets):
            absent = [embedding_path(args, s) for s in subsets if s not in present]
            print(f"note: {' and '.join(absent)} not found: {name} skipped")
            continue
        lists.append((name, path, present, stem))
    return lists


def score_list(args, name, path, stem, trials, table, cohort):
    """Metrics of one trial list (and its AS-norm metrics with a cohort), reported and written to
    files named by ``stem``."""
    labels, rows_a, rows_b, kept = trial_rows(path, trials, table, args.skip_missing)
    scores = table.cosine(rows_a, rows_b)
    result = metrics(labels, scores)
    report(f"{name} evaluation EER: {result['eer']}", result, args.eer_file)
    curves = [("cosine", labels, scores)]
    if args.score_dir:
        write_scores(os.path.join(args.score_dir, stem + ".txt"), scores, labels, trials, kept)
    if cohort is not None:
        if cohort.shape[1] != table.matrix.shape[1]:
            raise DataError(f"{args.cohort}: {cohort.shape[1]}-dimensional embeddings (-cohort), the "
                            f"embeddings of {name} are {table.matrix.shape[1]}-dimensional")
        normed = scoring.asnorm_scores(scores, table, rows_a, rows_b, cohort, args.asnorm_top_n)
        result["asnorm"] = metrics(labels, normed)
        report(f"{name} evaluation EER (AS-norm, top {args.asnorm_top_n}): {result['asnorm']['eer']}",
               result["asnorm"], args.eer_file)
        curves.append((f"AS-norm (top {args.asnorm_top_n})", labels, normed))
        if args.score_dir:
            write_scores(os.path.join(args.score_dir, stem + "_asnorm.txt"), normed, labels, trials, kept)
    if args.plot is not None:
        plot_det(os.path.join(args.plot, stem + ".png"), name, curves)
    return result


def score(args):
    """Score every list present; returns {name: metrics (and 'asnorm': metrics)}."""
    tables = {}  # embedding sets -> EmbeddingTable, built on first use

    def table_of(subsets):
        if subsets not in tables:
            tables[subsets] = scoring.EmbeddingTable.read([embedding_path(args, s) for s in subsets])
        return tables[subsets]

    lists = scorable_lists(args)
    cohort = load_cohort(args) if args.asnorm and lists else None
    results = {}
    # The lists are parsed in a second thread while the embeddings load (NumPy's parsing steps run
    # without the GIL, unpickling holds it).
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        parsed = [reader.submit(scoring.read_trial_list, path) for _, path, *_ in lists]
        for (name, path, subsets, stem), trials in zip(lists, parsed):
            table = table_of(subsets)
            results[name] = score_list(args, name, path, stem, trials.result(), table, cohort)
    if not results and not args.extract:
        raise DataError("nothing was scored: no trial list together with its embeddings was found")
    return results


def verify(args):
    """Cosine score of two recordings' TTA embeddings, and the decision at -threshold."""
    import tta

    model, args = load_model(args)
    code_a, code_b = (tta.embed_utterance(model, path, args.window_size, args.device, bf16=args.bf16)
                      for path in args.verify)
    scores = scoring.cosine_scores({"a": code_a, "b": code_b}, ["a"], ["b"])
    value = float(scores[0])
    if args.threshold is None:
        print(f"cosine score {value:.6f} (pass -threshold for a same/different decision)")
    else:
        verdict = "same speaker" if value >= args.threshold else "different speakers"
        print(f"cosine score {value:.6f}: {verdict} (threshold {args.threshold})")
    return value


def check_flags(args):
    """One line naming the flag for a value no run can use; called before anything is read or written."""
    checks = (("window_size", args.window_size is None or args.window_size >= 0, "must not be negative"),
              ("m_first_conv", args.m_first_conv is None or args.m_first_conv >= 1, "must be at least 1"),
              ("bs", args.bs is None or args.bs >= 1, "must be at least 1"),
              ("nb_worker", args.nb_worker >= 0, "must not be negative"),
              ("asnorm_top_n", args.asnorm_top_n >= 1, "must be at least 1"),
              ("threshold", args.threshold is None or math.isfinite(args.threshold),
               "must be a finite number"))
    for flag, ok, why in checks:
        if not ok:
            raise DataError(f"-{flag} {getattr(args, flag)}: {why}")


def main(args):
    check_flags(args)
    if args.asnorm and not args.cohort:
        raise DataError("-asnorm needs -cohort FILE (embeddings of speakers outside the trials)")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (optional dependency, checked before any long work)
        except ImportError:
            raise DataError("-plot needs matplotlib, which is not installed: "
                            "pip install matplotlib") from None
    if (args.wav_dir or args.wav_list) and not args.extract:
        raise DataError("-wav_dir and -wav_list name what -extract embeds: add -extract")
    if args.wav_dir and args.wav_list:
        raise DataError("-extract: give -wav_dir or -wav_list, not both")
    if args.wav_base is not None and not args.wav_list:
        raise DataError("-wav_base DIR names the folder of the -wav_list paths: add -wav_list FILE")
    if args.extract and args.embd and not (args.wav_dir or args.wav_list):
        raise DataError("-extract -embd FILE needs -wav_dir or -wav_list (the VoxCeleb extraction writes "
                        "<embd_dir>/TTA_vox1_{dev,eval})")
    if (args.wav_dir or args.wav_list) and not args.embd:
        args = argparse.Namespace(**{**vars(args),
                                     "embd": os.path.join(args.embd_dir, f"embeddings.{args.format}")})
    if args.verify:
        return verify(with_device(args))
    trial_lists(args)  # (two lists that would write one output file: refused before any work)
    if args.extract:
        extract(with_device(args))
        if (args.wav_dir or args.wav_list) and not args.trials:
            return None  # own files: nothing to score unless trial lists are given
    return score(args)


def cli(argv=None):
    """Command-line entry: bad input or a refused write ends in one line on stderr, exit 1; a run that
    extracted embeddings but found no trial list to score them with exits 0."""
    common.run_cli(lambda: main(parse_args(argv)),
                   interrupted="interrupted (an -extract run keeps finished embeddings in a .partial "
                               "folder beside its output: the same command resumes it)")


if __name__ == "__main__":
    cli()
