"""Pre-process VoxCeleb wavs for RawNet1: int16 scale, pre-emphasis 0.97, one float32 .npy per utterance.

    python RawNet1/pre_process_waveforms.py -wav_dir DB/VoxCeleb1/dev_wav/  -out_dir DB/VoxCeleb1/dev_npy/
    python RawNet1/pre_process_waveforms.py -wav_dir DB/VoxCeleb1/eval_wav/ -out_dir DB/VoxCeleb1/eval_npy/

As the Keras RawNet code's pre-processing, each 16 kHz mono wav is read at int16 scale and
pre-emphasised, y[n] = x[n + 1] - 0.97 x[n]. Output: ``<out_dir>/<spk>/<video>/<NNNNN>.npy`` (float32)
and ``<out_dir>/index.json`` (utterance key -> samples, skipped files), written last.

One .npy per utterance lets training memory-map random crops. Files are converted in parallel with a
progress bar, each is written atomically, and an interrupted run resumes where it stopped (existing
.npy files are kept); empty or all-zero files are skipped and listed in the index; a wav that is not
16 kHz mono stops the run with one line naming it.
"""

import argparse
import json
import math
import multiprocessing
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]  # RawNet1/, repo root

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import utils  # noqa: E402
from common import DataError  # noqa: E402
from data_RawNet import INDEX, PRE_EMPHASIS, npy_path, pre_emphasis, read_int16  # noqa: E402
from utils import SilentAudioError  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = common.arg_group(parser, "pre-processing")

    add("wav_dir", type=str, required=True, help="folder of <spk>/<video>/<NNNNN>.wav files (16 kHz mono)")
    add("out_dir", type=str, required=True, help="output folder: .npy per utterance and index.json")
    add("coef", type=float, default=PRE_EMPHASIS, help="pre-emphasis coefficient")
    # (conversion processes, one per core: not the training scripts' DataLoader workers)
    add("nb_worker", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def convert(task):
    """Convert one wav (skipped if its .npy exists). Returns (key, samples or None, error or None)."""
    key, wav_dir, out_dir, coef = task
    out = npy_path(out_dir, key)
    if os.path.exists(out):
        return key, int(np.load(out, mmap_mode="r").shape[0]), None
    try:
        y = pre_emphasis(read_int16(os.path.join(wav_dir, key)), coef)
    except SilentAudioError:
        return key, None, None
    except DataError as e:
        return key, None, str(e)
    common.write_npy_atomic(y, out)  # a .npy that exists is complete
    return key, len(y), None


def check_earlier_run(args):
    """One line if -out_dir holds the finished conversion of another folder or -coef: its .npy files
    would be kept as they are."""
    path = os.path.join(args.out_dir, INDEX)
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        try:
            index = json.load(f)
        except ValueError:
            index = None
    if not isinstance(index, dict):
        raise DataError(f"{path}: not the index this script writes; delete {args.out_dir} or choose "
                        f"another -out_dir")
    if (index.get("source"), index.get("pre_emphasis")) != (os.path.abspath(args.wav_dir), args.coef):
        raise DataError(f"{args.out_dir}: holds the conversion of {index.get('source')} with -coef "
                        f"{index.get('pre_emphasis')}; delete it or choose another -out_dir")


def main(args, progress=True):
    """Convert every wav under ``args.wav_dir``; returns (lengths, skipped)."""
    if not (math.isfinite(args.coef) and 0 <= args.coef <= 1):
        raise DataError(f"-coef {args.coef}: a pre-emphasis coefficient must be from 0 to 1")
    check_earlier_run(args)
    keys = utils.list_utterances(args.wav_dir)
    tasks = [(key, args.wav_dir, args.out_dir, args.coef) for key in keys]
    lengths, skipped, errors = {}, [], []
    workers = max(1, min(args.nb_worker, len(tasks)))
    with multiprocessing.Pool(workers) if workers > 1 else _Serial() as pool:
        results = pool.imap_unordered(convert, tasks, chunksize=16)
        for key, length, error in tqdm(results, total=len(tasks), desc=f"pre-processing {args.wav_dir}",
                                       unit="file", disable=not progress):
            if error:
                errors.append(error)
            elif length is None:
                skipped.append(key)
            else:
                lengths[key] = length
    if errors:
        raise DataError(f"{len(errors)} files could not be used (nothing else lost; fix them and rerun to "
                        f"resume), e.g. {errors[0]}")
    skipped.sort()
    if skipped:
        print(f"skipped {len(skipped)} empty or all-zero files (listed in {INDEX}): {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""))
    index = {"source": os.path.abspath(args.wav_dir), "pre_emphasis": args.coef,
             "lengths": dict(sorted(lengths.items())), "skipped": skipped}
    common.write_json_atomic(index, os.path.join(args.out_dir, INDEX))
    return lengths, skipped


class _Serial:
    """Stand-in for a one-process pool."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, tasks, chunksize=1):
        return map(fn, tasks)


if __name__ == "__main__":
    common.run_cli(lambda: main(parse_args()),
                   interrupted="interrupted: converted files are kept; rerun the same command to resume")
