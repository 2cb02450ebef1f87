"""Benchmark: scoring Vox1-O + Vox1-E + Vox1-H sized lists, evaluate_pretrained_RawNet2.py vs the
original script's method, each timed from process start to exit.

    python bench/score.py                 # full sizes, 1 round (~2 GB RAM, 0.7 GB in $TMPDIR)
    python bench/score.py -rounds 3       # 3 interleaved rounds, medians
    python bench/score.py -scale 0.1      # a tenth of the embeddings and trials

Builds synthetic data in a temporary folder (deleted afterwards; nothing is committed): 148,642 dev +
4,874 eval random 1,024-d float32 embeddings with speaker structure (1,211 + 40 speakers, as
VoxCeleb1), pickled as TTA_vox1_{dev,eval}.pk, and trial lists of the sizes of vox_original.txt
(37,720), list_test_all_cleaned.txt (579,818) and list_test_hard_cleaned.txt (550,894).

Then, in each round, two fresh processes:
  * original: the authors' evaluate_pretrained_RawNet2.py, step for step: it imports PyTorch,
    scikit-learn and SciPy, loads both pickles with ``pickle.load``, and per list feeds the trials
    through a PyTorch DataLoader (batches of 100, 4 workers, as its defaults) into a Python loop of
    ``np.dot(a, b) / (norm(a) * norm(b))`` per trial, then ``roc_curve`` + ``brentq``;
  * ours: ``python evaluate_pretrained_RawNet2.py`` on the same files.
It prints the medians, the ratio, the peak memory of each, and whether the printed EER lines are
identical.
"""

import argparse
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
        pool = np.array([k for s in subsets for k in keys[s]])
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


def original(folder):
    """The original script's method (see the module docstring); prints its EER lines."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve
    from torch.utils import data
    from tqdm import tqdm

    def cos_sim(a, b):
        return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))

    class Trials(data.Dataset):
        def __init__(self, embeddings, lines):
            self.embeddings, self.trials = embeddings, []
            for line in lines:
                label, key_a, key_b = line.strip().split(" ")
                self.trials.append([key_a.split(".")[0], key_b.split(",")[0], int(label)])

        def __len__(self):
            return len(self.trials)

        def __getitem__(self, index):
            key_a, key_b, label = self.trials[index]
            return self.embeddings[key_a.split(".")[0]], self.embeddings[key_b.split(".")[0]], label

    with open(os.path.join(folder, "TTA_vox1_dev.pk"), "rb") as f:
        dev = pickle.load(f)
    with open(os.path.join(folder, "TTA_vox1_eval.pk"), "rb") as f:
        evl = pickle.load(f)
    both = {**dev, **evl}
    for name, file, subsets, _ in LISTS:
        with open(os.path.join(folder, file)) as f:
            trials = Trials(evl if subsets == ("eval",) else both, f.readlines())
        y, y_score = [], []
        for batch_a, batch_b, labels in tqdm(data.DataLoader(trials, batch_size=100, shuffle=False,
                                                             drop_last=False, num_workers=4), ncols=70):
            for label, a, b in zip(labels, batch_a, batch_b):
                y.append(label)
                y_score.append(cos_sim(a, b))
        fpr, tpr, _ = roc_curve(y, y_score, pos_label=1)
        eer = brentq(lambda x, fpr=fpr, tpr=tpr: 1. - x - interp1d(fpr, tpr)(x), 0., 1.)
        print(f"{name} evaluation EER: {eer}")


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


def eer_lines(out):
    return [line for line in out.splitlines() if " evaluation EER: " in line]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-scale", type=float, default=1.0, help="fraction of the VoxCeleb1 sizes")
    parser.add_argument("-rounds", type=int, default=1, help="interleaved rounds (original, ours); medians")
    parser.add_argument("-original", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-make", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original:
        return original(args.original)
    if args.make:
        return make_data(args.make, args.scale, np.random.default_rng(0))

    print(f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}, numpy {np.__version__}")
    timings = {"original": [], "ours": []}
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        # in a child process: a forked child inherits the parent's peak RSS, so the parent stays small
        make = [sys.executable, os.path.abspath(__file__), "-make", folder, "-scale", str(args.scale)]
        subprocess.run(make, check=True)
        sizes = {}
        for _, file, _, _ in LISTS:
            with open(os.path.join(folder, file)) as f:
                sizes[file] = sum(1 for _ in f)
        print(f"synthetic data ({time.perf_counter() - t:.1f} s to make): trials {sizes}")
        commands = {"original": [sys.executable, os.path.abspath(__file__), "-original", folder],
                    "ours": [sys.executable, "evaluate_pretrained_RawNet2.py", "-embd_dir", folder,
                             "-trial_dir", folder, "-eer_file", os.path.join(folder, "eers.txt")]}
        for r in range(args.rounds):
            for name, cmd in commands.items():
                timings[name].append(timed(cmd))
                wall, cpu, mb, _ = timings[name][-1]
                print(f"round {r + 1}: {name:8s} {wall:6.1f} s start to exit, {cpu:6.1f} s CPU, "
                      f"peak RSS {mb:,.0f} MB", flush=True)
    median = {name: [float(np.median(column)) for column in zip(*[run[:3] for run in rs])]
              for name, rs in timings.items()}
    lines = {name: eer_lines(rs[-1][3]) for name, rs in timings.items()}
    print("\n| path | start to exit | CPU | peak RSS |\n| --- | --- | --- | --- |")
    for name, label in (("original", "original script (DataLoader, per-trial loop)"),
                        ("ours", "`evaluate_pretrained_RawNet2.py`")):
        wall, cpu, mb = median[name]
        print(f"| {label} | {wall:.1f} s | {cpu:.1f} s | {mb / 1024:.2f} GB |")
    ratios = [o[0] / u[0] for o, u in zip(timings["original"], timings["ours"])]
    print(f"\nspeed-up, start to exit: {median['original'][0] / median['ours'][0]:.1f}x "
          f"(per round: {', '.join(f'{x:.1f}x' for x in ratios)}); CPU time: "
          f"{median['original'][1] / median['ours'][1]:.1f}x; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    for ours, orig in zip(lines["ours"], lines["original"]):
        print(f"ours:     {ours}\noriginal: {orig}")
    same = lines["ours"] == lines["original"] and len(lines["ours"]) == len(LISTS)
    print(f"EERs identical (printed lines equal): {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
