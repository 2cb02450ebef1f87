"""RawNet1's hot paths, the plain PyTorch form against the one the scripts run, in one process.

    python bench/rawnet1_step.py                   # the demo's networks (channels 32/32/64, GRU 128)
    python bench/rawnet1_step.py --config paper    # the paper's (128/128/256, GRU 1024), batch 4

Rows (each the median over --rounds of --steps, the two forms interleaved):
  training step, phase 1 and phase 2  a block's end as max_pool1d(leaky_relu(a + b), 3) and
                                      torch.optim.Adam, against model_RawNet.add_lrelu_max_pool3
                                      and utils.adam (fused)
  front end, eval, one utterance      FrontEnd.forward against FrontEnd.forward_channels_last, on
                                      utterances of 2, 3.5 and 5 s (embeddings on CPU run the
                                      channels-last form: FrontEnd.channels_last)
  b-vector step (batch 120)           nn.Dropout and torch.optim.Adam against
                                      train_bvec.UniformDropout and utils.adam
Prints seconds and the ratio plain / ours (above 1: ours is faster).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "RawNet1"), ROOT]

import model_RawNet  # noqa: E402
import train_bvec  # noqa: E402
import utils  # noqa: E402

CONFIGS = {"demo": ({"filts": [32, 32, 64], "gru_node": 128}, 32, 19683),
           "paper": ({"filts": [128, 128, 256], "gru_node": 1024}, 4, 59049)}
FUSED_POOL = model_RawNet.add_lrelu_max_pool3


def plain_pool(a, b):
    return F.max_pool1d(model_RawNet.lrelu(a + b), 3)


def timed(fn, steps):
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def compare(name, make, rounds, steps):
    """make(form) -> a callable for form 'plain' or 'ours'; prints the medians and the ratio."""
    seconds = {"plain": [], "ours": []}
    for _ in range(rounds):
        for form in seconds:
            seconds[form].append(timed(make(form), steps))
    plain, ours = (statistics.median(v) for v in seconds.values())
    print(f"{name:<44} {plain:9.4f} {ours:9.4f} {plain / ours:7.2f}x")


def training_step(cls, d_args, batch, nb_samp):
    def make(form):
        torch.manual_seed(0)
        model = cls(d_args)
        model.apply(model_RawNet.keras_init)
        groups = model_RawNet.keras_l2_groups(model, 1e-4)
        opt = (torch.optim.Adam if form == "plain" else utils.adam)(groups, lr=1e-3, amsgrad=True)
        x = torch.randn(batch, nb_samp) * 1000
        y = torch.randint(0, d_args["nb_classes"], (batch,))

        def step():
            model_RawNet.add_lrelu_max_pool3 = plain_pool if form == "plain" else FUSED_POOL
            code, logits = model(x)
            loss = F.cross_entropy(logits, y) + model_RawNet.between_speaker_loss(model.speaker_weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    return make


def front_end(d_args, samples):
    model = model_RawNet.RawNet(d_args).eval()
    model.frontend.channels_last = False  # forward: the plain form
    x = torch.randn(1, 1, samples) * 1000

    def make(form):
        run = model.frontend.forward if form == "plain" else model.frontend.forward_channels_last
        return lambda: run(x)
    return make


def bvector_step():
    def make(form):
        torch.manual_seed(0)
        model = train_bvec.BVectorDNN(128)
        if form == "plain":  # the same network with nn.Dropout
            model.in_dropout = nn.Dropout(0.2)
            for i, layer in enumerate(model.hidden):
                if isinstance(layer, train_bvec.UniformDropout):
                    model.hidden[i] = nn.Dropout(layer.rate)
        groups = model_RawNet.keras_l2_groups(model, 5e-5)
        opt = (torch.optim.Adam if form == "plain" else utils.adam)(groups, lr=1e-3, amsgrad=True)
        a, b, y = torch.randn(120, 128), torch.randn(120, 128), torch.randint(0, 2, (120,))

        def step():
            loss = F.cross_entropy(model(a, b), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    return make


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo", help="network size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per round and form")
    args = parser.parse_args()
    changes, batch, nb_samp = CONFIGS[args.config]
    d_args = {"nb_blocks": [2, 4], "nb_code": 128, "dropout": 0.5, "gru_dropout": 0.3,
              "nb_classes": 100, **changes}
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    print(f"{args.config} networks, {torch.get_num_threads()} threads, kernels: {capability}; "
          f"median of {args.rounds} rounds x {args.steps} calls")
    print(f"{'':<44} {'plain s':>9} {'ours s':>9} {'ratio':>8}")
    with torch.no_grad():
        for seconds in (2, 3.5, 5):
            compare(f"front end, eval, {seconds} s utterance",
                    front_end(d_args, int(seconds * 16000)), args.rounds, args.steps * 4)
    compare(f"training step, phase 1, batch {batch}",
            training_step(model_RawNet.RawNetPretrain, d_args, batch, nb_samp), args.rounds, args.steps)
    compare(f"training step, phase 2, batch {batch}",
            training_step(model_RawNet.RawNet, d_args, batch, nb_samp), args.rounds, args.steps)
    compare("b-vector step, batch 120", bvector_step(), args.rounds, args.steps * 10)
    model_RawNet.add_lrelu_max_pool3 = FUSED_POOL


if __name__ == "__main__":
    main()
