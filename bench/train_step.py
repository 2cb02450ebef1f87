"""Training-step throughput of RawNet2, reference path vs fast path (and mixed precision).

    python bench/train_step.py                          # paper model; batch 100 on GPU, 4 on CPU
    python bench/train_step.py --rounds 5 --steps 5     # more rounds on a noisy machine
    python bench/train_step.py --variant fast           # one configuration, one JSON line
    torchrun --nproc_per_node=N bench/train_step.py --variant fast   # the same under DDP
                                                        # (batch = global batch, split over processes)

Variants (the training script's flags in brackets):
  reference   the original script's step: the plain PyTorch network of
              model_RawNet2.py, torch.optim.Adam, glibc's malloc as is
  plain       the same network as the training script runs it: fused
              Adam, freed memory kept for reuse (common.keep_freed_memory) [-fast False]
  fast        every kernel of fast_RawNet2.py: the fused sinc front end,
              and on CPU the channels-last blocks and GRU: same math
                                           [-fast front_end=fast,blocks=fast,gru=fast]
  rule        each part as the fast path's fixed rule picks               [-fast True, the default]
  fast+bf16   the rule under bfloat16 autocast                           [-fast True -amp bf16]
  reference+bf16  the reference network under bfloat16 autocast          [-fast False -amp bf16]
  fast+fp16   float16 autocast with a gradient scaler (GPU only)         [-amp fp16]
The sinc front end stays float32 under autocast (see RawNet2.embed in model_RawNet2.py).

Each (round, variant) runs in a fresh process on the same synthetic batch (paper config: 59,049
samples, Adam with AMSGrad); rounds interleave the variants, so a busy machine disturbs all of them
alike, and the median over rounds is reported with its ratio to the reference. Peak memory is the
CUDA allocator's peak on GPU and the process's peak resident size on CPU (it includes torch itself).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import distributed  # noqa: E402
import fast_RawNet2  # noqa: E402
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402

ALL_FAST = {"front_end": "fast", "blocks": "fast", "gru": "fast"}
VARIANTS = {"reference": (False, "none"), "plain": (False, "none"), "fast": (ALL_FAST, "none"),
            "rule": (True, "none"), "fast+bf16": (True, "bf16"),
            "reference+bf16": (False, "bf16"), "fast+fp16": (True, "fp16")}


# (crop samples, d_args changes, default batch on CPU)
SMALL_FILTERS = [32, [32, 32], [32, 64], [64, 64]]
CONFIGS = {"paper": (59049, {}, 4),
           "small": (24000, {"filts": SMALL_FILTERS, "gru_node": 256, "nb_fc_node": 256}, 32),
           "demo": (16000, {"filts": SMALL_FILTERS, "gru_node": 128, "nb_fc_node": 128}, 32)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bs", type=int, default=None, help="global batch (default 100 on GPU, 4 on CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the variants; the median is kept")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="variants to compare (default: all that the device runs)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="run this one variant in this process and print one JSON line")
    p.add_argument("--nb_classes", type=int, default=5994, help="output classes")
    p.add_argument("--benchmark", action="store_true",
                   help="cudnn.benchmark (the original, like -reproducible here, runs cuDNN deterministic)")
    p.add_argument("--label", default="", help="name of this run in the JSON line")
    p.add_argument("--config", default="paper", choices=list(CONFIGS),
                   help="paper: the paper's model and 59,049-sample crops; small: 24,000-sample crops, "
                        "filters 32/64, GRU 256 (default batch 32); demo: train_RawNet2.py -demo's model")
    return p.parse_args(argv)


def run_variant(args, variant):
    """Time ``args.steps`` training steps of one variant; returns the JSON-able result."""
    rank, world = distributed.rank_and_world()
    cuda = torch.cuda.is_available()
    if world > 1 or "LOCAL_RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cudnn.deterministic = not args.benchmark
    torch.backends.cudnn.benchmark = args.benchmark
    nb_samp, changes, cpu_bs = CONFIGS[args.config]
    bs = args.bs or (100 if cuda else cpu_bs)
    if bs % world:
        sys.exit(f"error: --bs {bs} is not divisible by the world size {world}")
    fast, amp = VARIANTS[variant]
    if variant != "reference":
        common.keep_freed_memory()  # as train_RawNet2.py does
    torch.manual_seed(0)
    model = RawNet2({**default_d_args(args.nb_classes, nb_samp), **changes})
    model = fast_RawNet2.accelerate(model, fast).to(device)
    model.apply(utils.init_weights)
    if dist.is_initialized():
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    # the original script's optimiser for the reference, the training script's (fused Adam) otherwise
    adam = torch.optim.Adam if variant == "reference" else utils.adam
    opt = adam(utils.param_groups(model, 1e-4), lr=1e-3, weight_decay=1e-4, amsgrad=True)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    x = torch.randn(bs // world, nb_samp, device=device)
    y = torch.randint(0, args.nb_classes, (bs // world,), device=device)

    def step():  # train_RawNet2.train_epoch's step
        with utils.amp_autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        utils.backward_step(loss, opt, scaler)

    for _ in range(args.warmup):
        step()
    net = model.module if dist.is_initialized() else model
    with utils.amp_autocast(device, amp):
        plan = (fast_RawNet2.plan(fast_RawNet2.call_now(net, x), net.fast_overrides).stages
                if isinstance(net, fast_RawNet2.FastRawNet2) else fast_RawNet2.REFERENCE)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"label": args.label, "variant": variant, "device": device_name(), "world_size": world,
            "global_batch": bs, "s_per_step": round(seconds, 4), "crops_per_s": round(bs / seconds, 1),
            "peak_mem_GiB_per_process": round(peak / 2 ** 30, 2),
            "peak_mem_kind": "CUDA allocator" if cuda else "process RSS", "plan": plan, "config": args.config}


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads ({cpu_model()})"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def child_argv(args, variant):
    argv = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--nb_classes", str(args.nb_classes), "--config", args.config]
    if args.bs:
        argv += ["--bs", str(args.bs)]
    if args.benchmark:
        argv.append("--benchmark")
    return argv


def compare(args):
    """Run every variant ``args.rounds`` times, interleaved, each in its own process; print a table."""
    cuda = torch.cuda.is_available()
    variants = args.variants or [v for v in VARIANTS if v != "reference+bf16" and (cuda or v != "fast+fp16")]
    if "reference" not in variants:
        variants = ["reference"] + variants
    timings = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            out = subprocess.run(child_argv(args, v), check=True, capture_output=True, text=True).stdout
            timings[v].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {v}: {timings[v][-1]['s_per_step']:.3f} s/step",
                  file=sys.stderr)
    first = timings[variants[0]][0]
    kernels = fast_RawNet2.kernel_settings()
    print(f"device: {first['device']} ({kernels}); config {args.config}, batch {first['global_batch']} x "
          f"{CONFIGS[args.config][0]:,} samples; median of {args.rounds} rounds x {args.steps} steps; "
          f"cudnn.benchmark={args.benchmark}")
    print(f"{'variant':<15} {'s/step':>8} {'crops/s':>9} {'vs reference':>13} {'peak GiB':>9}  "
          f"plan (front end / blocks / GRU)")
    ref = statistics.median(r["s_per_step"] for r in timings["reference"])
    for v in variants:
        s = statistics.median(r["s_per_step"] for r in timings[v])
        peak = max(r["peak_mem_GiB_per_process"] for r in timings[v])
        plan = " / ".join(timings[v][-1]["plan"][stage] for stage in fast_RawNet2.STAGES)
        print(f"{v:<15} {s:8.3f} {first['global_batch'] / s:9.1f} {ref / s:12.2f}x {peak:9.2f}  {plan}")
    print(f"(peak memory: {first['peak_mem_kind']})")


def main(args):
    if args.variant or "LOCAL_RANK" in os.environ:
        result = run_variant(args, args.variant or "fast")
        if distributed.rank_and_world()[0] == 0:
            print(json.dumps(result), flush=True)
    else:
        compare(args)


if __name__ == "__main__":
    main(parse_args())
