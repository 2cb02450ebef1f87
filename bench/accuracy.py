"""How far float32 embeddings are from the exact (float64) ones, per stage plan and packing.

    python bench/accuracy.py                      # paper model, 40 TTA segments
    python bench/accuracy.py -segments 100 -bs 8

The original evaluation runs the reference network in float32, one segment per forward. Any other
order of the same arithmetic (a front end of fast_RawNet2.py, several segments per forward) moves
the embeddings by float rounding; this script shows by how much, next to the rounding the original
loop itself carries: every variant's embeddings against the same network in float64. The network is
the paper's, randomly initialised, with its batch-norm statistics measured on the synthetic audio
(a network that normalises as a trained one does, not the identity of fresh statistics).
"""

import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from extract_e2e import WINDOW, make_corpus  # noqa: E402  (bench/: its synthetic utterances)

import fast_RawNet2  # noqa: E402
import tta  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402


def embed(model, segments, plan, batch):
    model = fast_RawNet2.accelerate(copy.deepcopy(model), {**fast_RawNet2.REFERENCE, **plan})
    with torch.no_grad():
        return torch.cat([model.embed(segments[i:i + batch])
                          for i in range(0, len(segments), batch)]).double()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-segments", type=int, default=40, help="TTA segments to embed")
    p.add_argument("-bs", type=int, default=4, help="segments per forward of the packed variant")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(tmp, max(4, args.segments // 2), np.random.default_rng(1))
        folder = os.path.join(tmp, "eval_wav")
        segments = torch.cat([tta.read_tta_segments(key, folder, 59049, WINDOW)[1]
                              for key in utils.list_utterances(folder)])[:args.segments]
    torch.manual_seed(0)
    model = RawNet2(default_d_args())
    model.apply(utils.init_weights)
    for module in model.modules():  # batch-norm statistics: cumulative averages over the audio
        if isinstance(module, torch.nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()
        for i in range(0, len(segments), 4):
            model(segments[i:i + 4])
    model.eval()
    exact = embed(copy.deepcopy(model).double(), segments.double(), {}, 1)
    loop = embed(model, segments, {}, 1)
    print(f"{len(segments)} TTA segments, paper-size RawNet2 (random weights, measured batch-norm "
          f"statistics), CPU, kernels: {fast_RawNet2.kernel_settings()}; largest |embedding value| "
          f"{exact.abs().max():.2f}")
    print(f"{'float32 variant':44s} {'max |diff| to float64':>22} {'to the loop':>12}")
    variants = {"reference, 1 per forward (the original loop)": ({}, 1),
                f"reference, {args.bs} per forward": ({}, args.bs)}
    for name in fast_RawNet2.IMPLEMENTATIONS["front_end"]:
        variants[f"front end {name}, 1 per forward"] = ({"front_end": name}, 1)
    for label, (plan, batch) in variants.items():
        got = loop if label.endswith("(the original loop)") else embed(model, segments, plan, batch)
        print(f"{label:44s} {(got - exact).abs().max():22.2e} {(got - loop).abs().max():12.2e}")


if __name__ == "__main__":
    main()
