"""Convert VoxCeleb2 from m4a (AAC) to 16 kHz mono 16-bit WAV, as the RawNet2 experiments used it.

    python DB/convert_vox2_to_wav.py SRC [SRC ...] -out DB/VoxCeleb2/wav/ -jobs 16

Each SRC is a folder laid out ``<spk>/<video>/<NNNNN>.m4a`` (VoxCeleb2's ``dev/aac/`` and
``test/aac/``); every file becomes ``<out>/<spk>/<video>/<NNNNN>.wav``. Runs ``ffmpeg`` in parallel with
a progress bar. Resumable: each file is written to a temporary name and renamed when ffmpeg succeeds,
so an existing ``.wav`` is always complete and is skipped on the next run.
"""

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import DataError  # noqa: E402

# add("ffmpeg", **FFMPEG_FLAG): here and in DB/prepare_dataset.py
FFMPEG_FLAG = {"type": str, "default": "ffmpeg", "help": "ffmpeg executable"}


class FfmpegError(Exception):
    """ffmpeg could not convert a file; the message is its last line of error output."""


def find_jobs(sources, out_dir):
    """(m4a path, wav path) for every m4a under ``sources`` whose wav does not exist yet."""
    jobs = []
    for src in sources:
        if not os.path.isdir(src):
            raise DataError(f"{src}: folder not found (expected <spk>/<video>/<NNNNN>.m4a)")
        found = False
        for path, _, files in os.walk(src):
            for name in sorted(files):
                if not name.endswith(".m4a"):
                    continue
                found = True
                rel = os.path.relpath(os.path.join(path, name), src)
                wav = os.path.join(out_dir, rel[:-len(".m4a")] + ".wav")
                if not os.path.exists(wav):
                    jobs.append((os.path.join(path, name), wav))
        if not found:
            raise DataError(f"{src}: no .m4a files found (expected <spk>/<video>/<NNNNN>.m4a)")
    return jobs


def convert(m4a, wav, ffmpeg="ffmpeg"):
    """One file: decode, downmix to mono, resample to 16 kHz, 16-bit PCM, written atomically
    (``common.atomic_path``). Returns an error or None."""
    try:
        with common.atomic_path(wav) as tmp:
            cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", m4a,
                   "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", "-f", "wav", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise FfmpegError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                                  else "ffmpeg failed")
    except FfmpegError as e:
        return f"{m4a}: {e}"
    return None


def main(args):
    ffmpeg = shutil.which(args.ffmpeg)
    if ffmpeg is None:
        raise DataError(f"{args.ffmpeg}: not found (install ffmpeg, e.g. apt-get install ffmpeg)")
    if args.jobs < 1:
        raise DataError(f"-jobs {args.jobs}: must be at least 1")
    jobs = find_jobs(args.sources, args.out)
    errors = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for err in tqdm(pool.map(lambda job: convert(*job, ffmpeg=ffmpeg), jobs),
                        total=len(jobs), desc="m4a -> wav", unit="file"):
            if err:
                errors.append(err)
    print(f"converted {len(jobs) - len(errors)} files into {args.out}; {len(errors)} failed")
    for err in errors[:20]:
        print(f"  {err}", file=sys.stderr)
    return 1 if errors else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="folders of <spk>/<video>/<NNNNN>.m4a (dev/aac, test/aac)")
    add = common.arg_group(parser, "conversion")
    add("out", default="DB/VoxCeleb2/wav/", help="output folder of 16 kHz mono wavs")
    add("jobs", type=int, default=os.cpu_count(), help="parallel ffmpeg processes")
    add("ffmpeg", **FFMPEG_FLAG)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(common.run_cli(lambda: main(parse_args()),
                            interrupted="interrupted: converted files are kept; the same command resumes"))
