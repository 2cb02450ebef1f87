"""Training data path: crops/s of the original read-normalise-crop vs the indexed partial read.

    python bench/data.py                 # 200 synthetic 8-second files, 59,049-sample crops

Reference (the original's Dataset_VoxCeleb2): read the whole file as float64, divide by its peak,
cast to float32, crop. Fast path (utils.read_crop, train_RawNet2.py -wav_index): read only the crop's
frames, divide by the peak stored in the index (utils.wav_index, built once). Both draw the same start
from the same generator; the script checks the arrays are identical and prints the ratio.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200, help="number of synthetic files")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each file")
    p.add_argument("--nb_samp", type=int, default=59049, help="crop length")
    p.add_argument("--rounds", type=int, default=3, help="timed passes of each path (best kept)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        keys = [f"id{i // 10:05d}/video/{i % 10:05d}.wav" for i in range(args.files)]
        for key in keys:
            os.makedirs(os.path.join(tmp, os.path.dirname(key)), exist_ok=True)
            sf.write(os.path.join(tmp, key), rng.uniform(-0.5, 0.5, int(args.seconds * 16000)), 16000,
                     subtype="PCM_16")
        start = time.perf_counter()
        index = utils.wav_index(keys, tmp, nb_worker=2, progress=False)
        index_s = time.perf_counter() - start

        def reference(seed):
            return [utils.crop_or_tile(utils.read_wav(os.path.join(tmp, k)), args.nb_samp,
                                       np.random.default_rng([seed, i])) for i, k in enumerate(keys)]

        def fast(seed):
            return [utils.read_crop(os.path.join(tmp, k), *index[k], args.nb_samp,
                                    np.random.default_rng([seed, i])) for i, k in enumerate(keys)]

        times = {"reference": [], "fast": []}
        for r in range(args.rounds):
            for name, fn in (("reference", reference), ("fast", fast)):
                start = time.perf_counter()
                crops = fn(r)
                times[name].append(time.perf_counter() - start)
                if name == "reference":
                    expected = crops
                else:
                    assert all(np.array_equal(a, b) for a, b in zip(crops, expected)), "crops differ"
        ref, fst = (args.files / min(times[n]) for n in ("reference", "fast"))
        print(f"device: cpu ({os.cpu_count()} cores), {args.files} files of {args.seconds:g} s, "
              f"crops of {args.nb_samp}")
        print(f"index build (once): {index_s:.2f} s")
        print(f"original read-normalise-crop: {ref:.0f} crops/s")
        print(f"indexed partial read:         {fst:.0f} crops/s  ({fst / ref:.2f}x, identical arrays)")


if __name__ == "__main__":
    main()
