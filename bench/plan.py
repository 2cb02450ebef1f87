"""The plan of the fast path on this machine: each stage's implementations timed, and the choice.

    python bench/plan.py                                   # paper model: training at batch 4, extraction at 1
    ATEN_CPU_CAPABILITY=default python bench/plan.py       # another kernel setting
    python bench/plan.py --config demo --bs 32 --eval_bs 16

Runs what ``-fast auto`` runs on first use (fast_RawNet2.measure_stages, at the real shapes, on a
copy of the model), with more passes, and prints per stage the seconds of each implementation,
their ratio, and what the plan keeps. Nothing is cached.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_RawNet2  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402
from train_step import CONFIGS  # noqa: E402  (bench/: the configurations of the training-step benchmark)


def report(model, x, title, passes):
    timings = fast_RawNet2.measure_stages(model, x, fast_RawNet2.applicable(model, x), passes=passes)
    plan = fast_RawNet2.choose(timings)
    print(f"{title}:")
    for stage in fast_RawNet2.STAGES:
        t = timings.get(stage)
        if t is None:
            print(f"  {stage:<10} (no other candidate here)  -> reference")
            continue
        others = "  ".join(f"{name} {seconds:8.4f} s ({t['reference'] / seconds:4.2f}x)"
                           for name, seconds in t.items() if name != "reference")
        print(f"  {stage:<10} reference {t['reference']:8.4f} s  {others}  -> {plan[stage]}")
    return plan


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper", choices=list(CONFIGS), help="model configuration")
    p.add_argument("--bs", type=int, default=4, help="training batch")
    p.add_argument("--eval_bs", type=int, default=1, help="extraction batch (segments per forward)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per candidate (the minimum is kept)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nb_samp, changes, _ = CONFIGS[args.config]
    torch.manual_seed(0)
    model = RawNet2({**default_d_args(5994, nb_samp), **changes}).to(device)
    model.apply(utils.init_weights)
    ident = fast_RawNet2.device_identity(device)
    kernels = fast_RawNet2.kernel_settings()
    print(f"device: {ident.get('gpu', ident['cpu'])} ({device.type}), kernels {ident['capability']} "
          f"({kernels}), {ident['threads']} threads, torch {ident['torch']}; config {args.config}")
    report(model.train(), torch.randn(args.bs, nb_samp, device=device), f"training step, batch {args.bs}",
           args.passes)
    with torch.no_grad():
        report(model.eval(), torch.randn(args.eval_bs, nb_samp, device=device),
               f"extraction forward, {args.eval_bs} segment(s)", args.passes)


if __name__ == "__main__":
    main()
