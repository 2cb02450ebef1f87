"""Each stage of RawNet2.embed timed per implementation at fixed shapes: the data behind fast_RawNet2.RULES.

    python bench/stages.py             # paper, mid and demo models, training and extraction
    python bench/stages.py --compile   # also torch.compile of the reference blocks and GRU
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python bench/stages.py         # an AVX-512 machine running the kernels of an AVX2 one

For each configuration the three stages (front end: sinc conv, |.|, max-pool 3; residual blocks;
GRU) run on the inputs a reference forward gives them: forward, plus backward in training. Every
implementation of a stage runs in turn within each pass (interleaved, so that a change of machine
load hits all of them alike), after one untimed warm-up pass; the minimum over the passes is kept.
Printed: seconds per call, each implementation's ratio to the reference, and what the rule in
fast_RawNet2.RULES picks there. A second table times whole eval forwards per segment at several
segments per forward (the TTA packing rule). Nothing is written.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import fast_RawNet2  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import LEAKY_SLOPE, RawNet2, default_d_args  # noqa: E402

SMALL_FILTERS = [32, [32, 32], [32, 64], [64, 64]]
MID_FILTERS = [64, [64, 64], [64, 128], [128, 128]]
# name: (crop samples, model changes, training batch, segments per extraction forward)
CONFIGS = {"paper": (59049, {}, 4, 1),
           "mid": (32000, {"filts": MID_FILTERS, "gru_node": 512, "nb_fc_node": 512}, 16, 4),
           "demo": (16000, {"filts": SMALL_FILTERS, "gru_node": 128, "nb_fc_node": 128}, 32, 16)}


def stage_inputs(model, x):
    """The input of each stage in a reference forward of ``x`` (detached)."""
    with torch.no_grad():
        x0 = model.ln(x).unsqueeze(1)
        front = model.sinc_front_end(x0)
        x1 = F.leaky_relu(model.first_bn(front), LEAKY_SLOPE)
        x2 = F.leaky_relu(model.bn_before_gru(model.residual_stack(x1)), LEAKY_SLOPE).transpose(1, 2)
    return {"front_end": x0, "blocks": x1.contiguous(), "gru": x2.contiguous()}


def seconds_of(fn, inp, backward):
    with torch.set_grad_enabled(backward):
        inp = inp.detach().requires_grad_(backward)
        start = time.perf_counter()
        out = fn(inp)
        if backward:
            out.backward(torch.ones_like(out))
        return time.perf_counter() - start


def implementations(model, stage, compile_):
    reference = getattr(model, fast_RawNet2.REFERENCE_METHODS[stage])  # (model: a plain RawNet2)
    impls = {"reference": reference}
    for name, fn in fast_RawNet2.IMPLEMENTATIONS[stage].items():
        impls[name] = fn.__get__(model)
    if compile_ and stage in ("blocks", "gru"):
        impls["compile"] = torch.compile(reference)
    return impls


def time_stages(model, x, backward, passes, compile_):
    inputs = stage_inputs(model, x)
    result = {}
    for stage, inp in inputs.items():
        impls = implementations(model, stage, compile_)
        if backward:
            impls.pop("fold", None)  # (no gradients)
        for fn in impls.values():  # untimed warm-up: kernels, caches, compilation
            seconds_of(fn, inp, backward)
        best = {}
        for _ in range(passes):
            for name, fn in impls.items():
                best[name] = min(best.get(name, float("inf")), seconds_of(fn, inp, backward))
        model.zero_grad(set_to_none=True)
        result[stage] = best
    return result


def print_stages(title, timings, picked):
    print(f"{title}")
    for stage, t in timings.items():
        ref = t["reference"]
        others = "  ".join(f"{n} {s:.4f} s ({ref / s:.2f}x)" for n, s in t.items() if n != "reference")
        print(f"  {stage:<9} reference {ref:.4f} s  {others}  -> rule: {picked[stage]}")


def time_packing(model, nb_samp, sizes, passes):
    """Seconds per segment of whole eval forwards (the rule's stages) at each segments-per-forward size."""
    per_segment = {}
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(size, nb_samp)
            model(x, is_test=True)
            best = float("inf")
            for _ in range(passes):
                start = time.perf_counter()
                model(x, is_test=True)
                best = min(best, time.perf_counter() - start)
            per_segment[size] = best / size
    return per_segment


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--passes", type=int, default=3, help="timed passes per implementation (minimum kept)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the reference blocks and GRU")
    p.add_argument("--packing", nargs="*", type=int, default=[1, 4, 16, 64],
                   help="segments per forward for the packing table (none: skip it)")
    p.add_argument("--packing_only", action="store_true", help="only the packing table")
    args = p.parse_args()
    common.keep_freed_memory()  # as the scripts run (large temporaries reuse their pages)
    torch.manual_seed(0)
    print(f"CPU kernels: {torch.backends.cpu.get_cpu_capability()} ({fast_RawNet2.kernel_settings()}), "
          f"rule class {fast_RawNet2.cpu_class()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for name in args.configs:
        nb_samp, changes, batch, segments = CONFIGS[name]
        model = RawNet2({**default_d_args(1000, nb_samp), **changes})
        model.apply(utils.init_weights)
        for training, n in () if args.packing_only else ((True, batch), (False, segments)):
            model.train(training)
            x = torch.randn(n, nb_samp)
            picked = fast_RawNet2.plan(fast_RawNet2.call_of(model, n, "cpu", training)).stages
            kind = f"training, batch {n}" if training else f"extraction, {n} segment(s) per forward"
            timings = time_stages(model, x, training, args.passes, args.compile)
            print_stages(f"{name}: {kind}", timings, picked)
        if args.packing:
            fast = fast_RawNet2.accelerate(model.eval(), True)
            ref = time_packing(fast, nb_samp, args.packing, args.passes)
            base = ref[args.packing[0]]
            rule = fast_RawNet2.segments_per_forward(fast, torch.device("cpu"))
            print(f"{name}: eval forward, seconds per segment by segments per forward (rule: {rule}): " +
                  "  ".join(f"{s}: {t:.4f} ({base / t:.2f}x)" for s, t in ref.items()))


if __name__ == "__main__":
    main()
