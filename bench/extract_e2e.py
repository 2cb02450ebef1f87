"""Benchmark: `evaluate_pretrained_RawNet2.py -extract` end to end (start to exit) vs the original loop.

    python bench/extract_e2e.py                     # 30 utterances of 2-11 s, paper-size model, CPU
    python bench/extract_e2e.py -nb_utt 100 -rounds 1

Both are timed as whole processes, start-up included (imports, model build and load, worker
start), on the same synthetic utterances and a random paper-size checkpoint, and both score the
same trial list at the end:
  * reference, the original evaluation's method (``-loop`` below, in this file): read each file
    when its turn comes, one TTA segment per forward through the reference network (``-fast
    False``), mean per utterance, then cosine scores and the EER;
  * ours: ``-extract`` with its defaults (the fast path's fixed rule: nothing is measured or cached,
    so the first run on a machine is as fast as any other).
Rounds interleave the two; the best of each is kept. The embeddings of ours are compared with the
loop's (max |diff|, also relative to the largest |value|). The per-utterance rate of each gives the
extrapolation to larger sets (``-extrapolate``) once start-up is paid.
"""

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 11810


def make_corpus(folder, nb_utt, rng):
    import soundfile as sf
    keys = []
    for i in range(nb_utt):
        key = f"id{10270 + i // 2}/vid{i:08d}/00001.wav"
        os.makedirs(os.path.join(folder, "eval_wav", os.path.dirname(key)), exist_ok=True)
        n = int(rng.uniform(2, 11) * 16000)
        x = np.sin(2 * np.pi * rng.uniform(90, 250) * np.arange(n) / 16000) + 0.3 * rng.standard_normal(n)
        sf.write(os.path.join(folder, "eval_wav", key), 0.3 * x, 16000, subtype="PCM_16")
        keys.append(key)
    with open(os.path.join(folder, "trials.txt"), "w") as f:
        for i, a in enumerate(keys):
            for b in keys[i + 1:i + 4]:
                f.write(f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n")
    return keys


def make_checkpoint(path):
    import torch
    sys.path.insert(0, ROOT)
    import utils
    from model_RawNet2 import RawNet2, default_d_args
    torch.manual_seed(0)
    model = RawNet2(default_d_args())
    model.apply(utils.init_weights)
    torch.save(model.state_dict(), path)


def loop(folder, checkpoint, out):
    """The original method in one process: read, segment, one forward per segment, mean; score."""
    import torch
    sys.path.insert(0, ROOT)
    import common
    import scoring
    import utils
    from model_RawNet2 import load_pretrained
    model = load_pretrained(checkpoint)  # eval mode, reference network
    wav_dir = os.path.join(folder, "eval_wav")
    embeddings = {}
    with torch.no_grad():
        for key in utils.list_utterances(wav_dir):
            segments = utils.tta_segments(utils.read_wav(os.path.join(wav_dir, key)), model.nb_samp, WINDOW)
            codes = [model.embed(torch.from_numpy(s[None].copy())) for s in segments]
            embeddings[common.utt_id(key)] = torch.cat(codes).mean(0).numpy()
    labels, keys_a, keys_b = scoring.read_trials(os.path.join(folder, "trials.txt"))
    scores = [float(np.dot(embeddings[a], embeddings[b])
                    / (np.linalg.norm(embeddings[a]) * np.linalg.norm(embeddings[b])))
              for a, b in zip(keys_a, keys_b)]
    print(f"Vox original evaluation EER: {scoring.compute_eer(labels, scores)[0]}")
    with open(out, "wb") as f:
        pickle.dump(embeddings, f)


def timed(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stderr


def run_set(tmp, nb_utt, rounds, checkpoint):
    """Best start-to-exit seconds of each configuration on ``nb_utt`` utterances, the fast path's
    plan lines, the largest embedding difference to the loop, and the number of segments."""
    import soundfile as sf
    sys.path.insert(0, ROOT)
    import utils
    folder = os.path.join(tmp, f"set{nb_utt}")
    keys = make_corpus(folder, nb_utt, np.random.default_rng(0))
    ref_out = os.path.join(folder, "loop.pk")
    reference = [sys.executable, os.path.abspath(__file__), "-loop", folder, checkpoint, ref_out]

    ours = [sys.executable, "evaluate_pretrained_RawNet2.py", "-extract", "-DB", folder, "-model_dir",
            checkpoint, "-embd_dir", os.path.join(folder, "embd"), "-trials",
            os.path.join(folder, "trials.txt"), "-eer_file", os.path.join(folder, "eers.txt"),
            "-device", "cpu"]

    best, notes = {}, []
    for _ in range(rounds):
        for label, cmd in ((REF, reference), (OURS, ours)):
            seconds, err = timed(cmd, dict(os.environ))
            best[label] = min(best.get(label, np.inf), seconds)
            if label == OURS:
                notes = [line for line in err.splitlines() if "fast path" in line]
    with open(ref_out, "rb") as f:
        expected = pickle.load(f)
    with open(os.path.join(folder, "embd", "TTA_vox1_eval.pk"), "rb") as f:
        got = pickle.load(f)
    diff = max(float(np.abs(got[k] - v).max()) for k, v in expected.items())
    scale = max(float(np.abs(v).max()) for v in expected.values())
    nb_seg = sum(len(utils.tta_segments(np.zeros(sf.info(os.path.join(folder, "eval_wav", k)).frames),
                                        59049, WINDOW)) for k in keys)
    return best, notes, (diff, scale), nb_seg


REF, OURS = "original loop (reference)", "-extract"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-nb_utt", type=int, default=30, help="utterances (2-11 s each)")
    p.add_argument("-small", type=int, default=6, help="a second, smaller set: start-up = the intercept")
    p.add_argument("-rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    p.add_argument("-extrapolate", type=int, default=500, help="utterances to extrapolate the ratio to")
    p.add_argument("-loop", nargs=3, metavar=("FOLDER", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loop:
        return loop(*args.loop)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "model.pt")
        make_checkpoint(checkpoint)
        small = run_set(tmp, args.small, args.rounds, checkpoint)[0]
        best, notes, (diff, scale), nb_seg = run_set(tmp, args.nb_utt, args.rounds, checkpoint)
    sys.path.insert(0, ROOT)
    import fast_RawNet2  # (here: the children time their own imports, this process none)
    kernels = fast_RawNet2.kernel_settings()
    print(f"{args.nb_utt} utterances of 2-11 s ({nb_seg} TTA segments), paper-size RawNet2, CPU, "
          f"{os.cpu_count()} cores, kernels: {kernels}; best of {args.rounds} interleaved rounds")
    extra = args.extrapolate
    print(f"{'configuration':30s} {'start to exit':>14} {'vs loop':>8} {'start-up':>9} {'s/utt':>7} "
          f"{'vs loop at ' + str(extra):>16}")
    slope = {k: (best[k] - small[k]) / (args.nb_utt - args.small) for k in best}
    intercept = {k: best[k] - slope[k] * args.nb_utt for k in best}
    at = {k: intercept[k] + slope[k] * extra for k in best}
    for label, seconds in best.items():
        print(f"{label:30s} {seconds:12.1f} s {best[REF] / seconds:7.2f}x {intercept[label]:7.1f} s "
              f"{slope[label]:7.3f} {at[REF] / at[label]:15.2f}x")
    print(f"(start-up and s/utt: the line through the {args.small}- and {args.nb_utt}-utterance runs; "
          f"the last column extrapolates it to {extra} utterances)")
    for line in notes:
        print(f"  {line}")
    print(f"max |embedding - loop's| {diff:.1e}, {diff / scale:.1e} of the largest |value| ({scale:.2g})")


if __name__ == "__main__":
    main()
