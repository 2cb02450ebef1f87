"""Benchmark: TTA segment embeddings on CPU, onnxruntime (export_RawNet2.py's ONNX) vs PyTorch.

    python bench/onnx_extract.py                       # paper-size RawNet2, random weights
    python bench/onnx_extract.py -segments 8 -rounds 3

Exports the paper-size network (random weights, or -model_dir) once, then embeds the same
``-segments`` random TTA segments (59,049 samples each) with, in the same run:
  * PyTorch, the reference path (``fast=False``) and the fast path (``fast=True``: the stages the
    rule picks, as -extract runs them), one segment per forward;
  * onnxruntime on the exported ONNX file, one segment and ``-bs`` segments per run.
Configurations are interleaved over ``-rounds`` rounds and the best time of each is kept. Prints
segments/s, the ratio to the PyTorch fast path, and the largest difference to the reference
path's embeddings relative to their scale.
"""

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import export_RawNet2  # noqa: E402
import fast_RawNet2  # noqa: E402
import runs  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-model_dir", "--model_dir", default="", help="checkpoint (default: random weights)")
    parser.add_argument("-segments", "--segments", type=int, default=8,
                        help="TTA segments embedded per round")
    parser.add_argument("-bs", "--bs", type=int, default=4, help="segments per onnxruntime run (batched row)")
    parser.add_argument("-rounds", "--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    return parser.parse_args(argv)


def torch_runner(model, fast):
    model = fast_RawNet2.accelerate(copy.deepcopy(model), fast)

    def run(batch):
        with torch.no_grad():
            return model.embed(torch.from_numpy(batch)).numpy()
    return run


def embed_all(run, segments, bs):
    return np.concatenate([run(segments[i:i + bs]) for i in range(0, len(segments), bs)])


def main(args):
    import onnxruntime

    if args.model_dir:
        model = runs.load_network(args.model_dir, "checkpoint (-model_dir)")
    else:
        torch.manual_seed(0)
        model = RawNet2(default_d_args()).eval()
        model.apply(utils.init_weights)
    net = export_RawNet2.EmbeddingNetwork(model)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rawnet2.onnx")
        start = time.perf_counter()
        export_RawNet2.save_onnx(export_RawNet2.export_program(net), path, {}, 18)
        print(f"exported in {time.perf_counter() - start:.0f} s; torch threads {torch.get_num_threads()}")
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    segments = np.random.default_rng(0).uniform(-1, 1, (args.segments, model.nb_samp)).astype(np.float32)
    onnx_run = lambda batch: session.run(None, {"waveform": batch})[0]  # noqa: E731
    configs = {"torch reference, bs 1": (torch_runner(model, False), 1),
               "torch fast, bs 1": (torch_runner(model, True), 1),
               "onnxruntime, bs 1": (onnx_run, 1),
               f"onnxruntime, bs {args.bs}": (onnx_run, args.bs)}
    best, outputs = dict.fromkeys(configs, np.inf), {}
    for _ in range(args.rounds):
        for name, (run, bs) in configs.items():
            start = time.perf_counter()
            outputs[name] = embed_all(run, segments, bs)
            best[name] = min(best[name], time.perf_counter() - start)
    ref = outputs["torch reference, bs 1"]
    base = best["torch fast, bs 1"]
    print(f"{'configuration':<24} {'segments/s':>10} {'vs torch fast':>14} {'max diff / scale':>17}")
    for name in configs:
        error = np.max(np.abs(outputs[name] - ref)) / np.max(np.abs(ref))
        print(f"{name:<24} {args.segments / best[name]:>10.2f} {base / best[name]:>13.2f}x {error:>17.1e}")


if __name__ == "__main__":
    common.run_cli(lambda: main(parse_args()))
