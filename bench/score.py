"""Benchmark: scoring Vox1-O + Vox1-E + Vox1-H sized lists, vectorised vs the original per-trial loop.

    python bench/score.py                 # full sizes (needs ~4 GB of RAM and ~1.3 GB in $TMPDIR)
    python bench/score.py -scale 0.1      # a tenth of the embeddings and trials

Builds synthetic data in a temporary folder (deleted afterwards; nothing is committed): 148,642 dev +
4,874 eval random 1,024-d float32 embeddings with speaker structure (1,211 + 40 speakers, as
VoxCeleb1), pickled as TTA_vox1_{dev,eval}.pk, and trial lists of the sizes of vox_original.txt
(37,720), list_test_all_cleaned.txt (579,818) and list_test_hard_cleaned.txt (550,894).

Then, each timed from process start to exit, in the same run:
  * ours: ``python evaluate_pretrained_RawNet2.py`` on those files (restricted unpickler, vectorised
    chunked cosine scoring, EER + minDCF);
  * reference: the original script's method, i.e. ``pickle.load`` and a Python loop of
    ``np.dot(a, b) / (norm(a) * norm(b))`` per trial, then roc_curve + brentq.
It prints both times, their ratio, peak memory of each, and the EERs: ours must equal the per-trial
loop's to 1e-9 (the loop run in float64; the original's float32 loop is shown too).
"""

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"dev": (1211, 148_642), "eval": (40, 4_874)}  # speakers, utterances of VoxCeleb1
LISTS = [("Vox original", "vox_original.txt", ("eval",), 37_720),
         ("Vox1_E_cleaned", "list_test_all_cleaned.txt", ("dev", "eval"), 579_818),
         ("Vox1_H_cleaned", "list_test_hard_cleaned.txt", ("dev", "eval"), 550_894)]


def make_data(folder, scale, rng, dim=1024):
    """Synthetic embeddings (speaker mean + utterance noise) and trial lists, written to ``folder``."""
    keys = {}
    for subset, (nb_spk, nb_utt) in SIZES.items():
        nb_spk, nb_utt = max(2, int(nb_spk * scale)), max(4, int(nb_utt * scale))
        first = 10000 if subset == "dev" else 10270
        speaker = rng.integers(0, nb_spk, nb_utt)
        means = rng.standard_normal((nb_spk, dim), dtype=np.float32)
        codes = means[speaker] + 2.5 * rng.standard_normal((nb_utt, dim), dtype=np.float32)
        keys[subset] = [f"id{first + s:05d}/vid{i // 10:08d}/{i % 10 + 1:05d}" for i, s in enumerate(speaker)]
        with open(os.path.join(folder, f"TTA_vox1_{subset}.pk"), "wb") as f:
            pickle.dump(dict(zip(keys[subset], codes)), f, protocol=4)
    for _, file, subsets, size in LISTS:
        pool = np.array(sum((keys[s] for s in subsets), []))
        spk = np.array([k.split("/")[0] for k in pool])
        order = np.argsort(spk, kind="stable")
        starts = np.searchsorted(spk[order], spk)  # same-speaker block of each utterance
        ends = np.searchsorted(spk[order], spk, side="right")
        n = max(10, int(size * scale))
        a = rng.integers(0, len(pool), n)
        target = rng.random(n) < 0.5
        b = np.where(target, order[starts[a] + (rng.random(n) * (ends[a] - starts[a])).astype(int)],
                     rng.integers(0, len(pool), n))
        label = (spk[a] == spk[b]).astype(int)
        with open(os.path.join(folder, file), "w") as f:
            f.writelines(f"{t} {x}.wav {y}.wav\n" for t, x, y in zip(label, pool[a], pool[b]))


def reference(folder, dtype):
    """The original script's method: plain pickle.load, then one cos_sim per trial in a loop."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    def cos_sim(a, b):
        return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))

    with open(os.path.join(folder, "TTA_vox1_dev.pk"), "rb") as f:
        dev = pickle.load(f)
    with open(os.path.join(folder, "TTA_vox1_eval.pk"), "rb") as f:
        evl = pickle.load(f)
    if dtype != "float32":
        dev = {k: v.astype(dtype) for k, v in dev.items()}
        evl = {k: v.astype(dtype) for k, v in evl.items()}
    both = {**dev, **evl}
    eers = {}
    for name, file, subsets, _ in LISTS:
        embd = evl if subsets == ("eval",) else both
        y, y_score = [], []
        with open(os.path.join(folder, file)) as f:
            for line in f:
                trg, utt_a, utt_b = line.strip().split(" ")
                y.append(int(trg))
                y_score.append(cos_sim(embd[utt_a.replace(".wav", "")], embd[utt_b.replace(".wav", "")]))
        fpr, tpr, _ = roc_curve(y, y_score, pos_label=1)
        eers[name] = brentq(lambda x: 1. - x - interp1d(fpr, tpr)(x), 0., 1.)
    print(json.dumps(eers))


def timed(cmd):
    """Run ``cmd``; return (wall seconds from start to exit, CPU seconds (user + sys), peak RSS in
    MB, stdout), all of that one process. CPU time is reported too because on a shared machine
    wall time also measures the neighbours."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-scale", type=float, default=1.0, help="fraction of the VoxCeleb1 sizes")
    parser.add_argument("-reference", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-dtype", type=str, default="float32", help=argparse.SUPPRESS)
    parser.add_argument("-make", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        return reference(args.reference, args.dtype)
    if args.make:
        return make_data(args.make, args.scale, np.random.default_rng(0))

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        # in a child process: a forked child inherits the parent's peak RSS, so the parent stays small
        subprocess.run([sys.executable, os.path.abspath(__file__), "-make", folder, "-scale", str(args.scale)], check=True)
        sizes = {file: sum(1 for _ in open(os.path.join(folder, file))) for _, file, _, _ in LISTS}
        print(f"synthetic data ({time.perf_counter() - t:.1f} s to make): trials {sizes}")
        ours_cmd = [sys.executable, "evaluate_pretrained_RawNet2.py", "-embd_dir", folder,
                    "-trial_dir", folder, "-eer_file", os.path.join(folder, "eers.txt")]
        ref_cmd = [sys.executable, os.path.abspath(__file__), "-reference", folder]
        ref_t, ref_cpu, ref_mb, out = timed(ref_cmd)
        ref32 = json.loads(out)
        ours_t, ours_cpu, ours_mb, out = timed(ours_cmd)
        ours = {line.split(" evaluation EER: ")[0]: float(line.split(": ")[1])
                for line in out.splitlines() if " evaluation EER: " in line}
        _, _, _, out = timed(ref_cmd + ["-dtype", "float64"])
        ref64 = json.loads(out)
    print(f"reference (per-trial loop): {ref_t:6.1f} s start to exit ({ref_cpu:6.1f} s CPU), peak RSS {ref_mb:,.0f} MB")
    print(f"ours (vectorised):          {ours_t:6.1f} s start to exit ({ours_cpu:6.1f} s CPU), "
          f"peak RSS {ours_mb:,.0f} MB")
    print(f"speed-up: {ref_t / ours_t:.1f}x wall, {ref_cpu / ours_cpu:.1f}x CPU; "
          f"load average during the run {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in ref32:
        print(f"{name}: EER ours {ours[name]:.9f}, loop float64 {ref64[name]:.9f} "
              f"(|diff| {abs(ours[name] - ref64[name]):.1e}), original float32 loop {ref32[name]:.9f} "
              f"(|diff| {abs(ours[name] - ref32[name]):.1e})")
    worst = max(abs(ours[n] - ref64[n]) for n in ref64)
    print("EERs equal to the float64 per-trial loop within 1e-9" if worst <= 1e-9 else
          f"MISMATCH: largest EER difference {worst:.2e}")


if __name__ == "__main__":
    main()
