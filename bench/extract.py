"""Benchmark: TTA extraction, batched (tta.iter_embeddings) vs the original one-segment loop.

    python bench/extract.py                          # paper-size RawNet2, on the GPU if there is one
    python bench/extract.py -device cpu -nb_utt 12   # a quick CPU run
    python bench/extract.py -model_dir Pre-trained_model/rawnet2_best_weights.pt

Writes ``-nb_utt`` synthetic 16 kHz utterances of VoxCeleb1-like lengths (4-12 s, i.e. 1-4 TTA
segments) to a temporary folder and embeds them with the paper-size network (random weights unless
``-model_dir`` is given; speed does not depend on the weights), in the same run:
  * reference: the original evaluation loop, one segment per forward pass, audio read in the loop;
  * ours: segments of many utterances packed into forwards of ``-bs`` segments, audio read once
    per file in ``-nb_worker`` reading threads, with the fast path (``-fast True``) for each of
    several batch sizes, and at the largest one also with the reference network and with ``-bf16``;
  * the rule: what ``-extract`` runs by default (the fast path's rule, and its segments per forward).
Configurations are interleaved over ``-rounds`` rounds and the best time of each is kept, so a
busy machine disturbs every configuration alike. Prints segments/s, the ratio to the reference
and the largest difference to the reference embeddings (float rounding of another order of the
arithmetic, which bench/accuracy.py puts in scale; on a GPU with PyTorch's default TF32 convolutions
the header says so, and differences are larger where a path computes in float32 what the reference
computes in TF32, e.g. the folded front end's product).
"""

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import fast_RawNet2  # noqa: E402
import runs  # noqa: E402
import tta  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402

WINDOW = 11810


def make_utterances(folder, nb_utt, rng):
    keys = []
    for i in range(nb_utt):
        key = f"id{10270 + i // 4}/vid{i:08d}/00001.wav"
        os.makedirs(os.path.join(folder, os.path.dirname(key)), exist_ok=True)
        n = int(rng.uniform(4, 12) * 16000)
        t = np.arange(n) / 16000
        x = np.sin(2 * np.pi * rng.uniform(90, 250) * t) + 0.3 * rng.standard_normal(n)
        sf.write(os.path.join(folder, key), 0.3 * x, 16000, subtype="PCM_16")
        keys.append(key)
    return keys


@torch.no_grad()
def one_segment_loop(model, keys, folder, device):
    """The original evaluation: read, cut into TTA segments, one segment per forward, mean."""
    out = {}
    for key in keys:
        segments = utils.tta_segments(utils.read_wav(os.path.join(folder, key)), model.nb_samp, WINDOW)
        codes = [model.embed(torch.from_numpy(s[None].copy()).to(device)).cpu() for s in segments]
        out[common.utt_id(key)] = torch.cat(codes).mean(0).numpy()
    return out


def batched(model, keys, folder, device, bs, workers, bf16):
    return dict((common.utt_id(k), c) for k, c in
                tta.iter_embeddings(model, keys, folder, model.nb_samp, WINDOW, device, workers, bs, bf16))


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    parser.add_argument("-nb_utt", type=int, default=None, help="utterances (default 200 on GPU, 16 on CPU)")
    parser.add_argument("-bs", type=int, nargs="+", default=None,
                        help="segments per forward to try (default 64 256 512 on GPU, 1 4 16 on CPU)")
    parser.add_argument("-nb_worker", type=int, default=2, help="threads reading ahead for the batched path")
    parser.add_argument("-rounds", type=int, default=2,
                        help="interleaved repetitions; the best is kept")
    parser.add_argument("-model_dir", default="",
                        help="checkpoint to use instead of random paper-size weights")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    nb_utt = args.nb_utt or (200 if gpu else 16)
    sizes = args.bs or ([64, 256, 512] if gpu else [1, 4, 16])

    torch.manual_seed(0)
    model = (runs.load_network(args.model_dir, "checkpoint (-model_dir)") if args.model_dir
             else RawNet2(default_d_args()).eval())
    model = model.to(args.device)  # the reference path (model.fast is False)
    fast_model = fast_RawNet2.accelerate(copy.deepcopy(model), True)  # the rule
    name = torch.cuda.get_device_name() if gpu else f"CPU {platform.processor() or platform.machine()}"
    tf32 = f", TF32 allowed: {fast_RawNet2.tf32_settings()}" if gpu else ""
    print(f"device: {name} ({args.device}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores{tf32}")

    with tempfile.TemporaryDirectory() as folder:
        keys = make_utterances(folder, nb_utt, np.random.default_rng(0))
        nb_seg = sum(len(utils.tta_segments(np.zeros(sf.info(os.path.join(folder, k)).frames),
                                            model.nb_samp, WINDOW))
                     for k in keys)
        which = args.model_dir or "paper-size RawNet2, random weights"
        print(f"{nb_utt} utterances, {nb_seg} TTA segments of {model.nb_samp} samples; model: {which}")
        configs = {"one-segment loop (reference)": lambda: one_segment_loop(model, keys, folder, args.device)}
        for bs in sizes:
            configs[f"batched -bs {bs}"] = \
                lambda bs=bs: batched(fast_model, keys, folder, args.device, bs, args.nb_worker, False)
        configs["the rule (-extract default)"] = \
            lambda: batched(fast_model, keys, folder, args.device, None, args.nb_worker, False)
        top = sizes[-1]
        configs[f"batched -bs {top} -fast False"] = \
            lambda: batched(model, keys, folder, args.device, top, args.nb_worker, False)
        configs[f"batched -bs {top} -bf16"] = \
            lambda: batched(fast_model, keys, folder, args.device, top, args.nb_worker, True)
        for net in (model, fast_model):  # warm-up (kernels, allocator)
            batched(net, keys[:2], folder, args.device, sizes[0], 0, False)
        # nothing is measured or cached by the fast path: every round runs the same code
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for label, fn in configs.items():
                seconds, outputs[label] = timed(fn, args.device)
                best[label] = min(best.get(label, np.inf), seconds)
    reference = outputs["one-segment loop (reference)"]
    ref_time = best["one-segment loop (reference)"]
    for label, seconds in best.items():
        diff = max(np.abs(outputs[label][k] - reference[k]).max() for k in reference)
        cos = min(float(np.dot(outputs[label][k], reference[k]) /
                        (np.linalg.norm(outputs[label][k]) * np.linalg.norm(reference[k])))
                  for k in reference)
        print(f"{label:32s} {nb_seg / seconds:7.2f} segments/s  {ref_time / seconds:5.2f}x  "
              f"max |diff| {diff:.1e}  min cosine to reference {cos:.6f}")


if __name__ == "__main__":
    common.run_cli(main)
