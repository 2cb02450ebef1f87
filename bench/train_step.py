"""Training-step throughput of RawNet2: crops/s and peak memory on synthetic batches.

    python bench/train_step.py                          # paper model, batch 100 on GPU / 4 on CPU
    torchrun --nproc_per_node=N bench/train_step.py     # the same step under DistributedDataParallel
                                                        # (batch = global batch, split over processes)

Prints one JSON line (rank 0) with the device, the configuration and the measured figures, so that
driver scripts (bench/gpu_scaling.sh) can compute ratios between runs made on the same machine.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from model_RawNet2 import RawNet2, default_d_args  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bs", type=int, default=None, help="global batch (default 100 on GPU, 4 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--nb_classes", type=int, default=5994, help="output classes")
    p.add_argument("--benchmark", action="store_true", help="cudnn.benchmark (the original runs deterministic)")
    p.add_argument("--label", default="", help="name of this run in the JSON line")
    return p.parse_args(argv)


def main(args):
    rank, world = utils.rank_and_world()
    cuda = torch.cuda.is_available()
    if world > 1 or "LOCAL_RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cudnn.deterministic = not args.benchmark
    torch.backends.cudnn.benchmark = args.benchmark
    bs = args.bs or (100 if cuda else 4)
    if bs % world:
        sys.exit(f"error: --bs {bs} is not divisible by the world size {world}")
    torch.manual_seed(0)
    model = RawNet2(default_d_args(args.nb_classes)).to(device)
    model.apply(utils.init_weights)
    if dist.is_initialized():
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(utils.param_groups(model, 1e-4), lr=1e-3, weight_decay=1e-4, amsgrad=True)
    x = torch.randn(bs // world, 59049, device=device)
    y = torch.randint(0, args.nb_classes, (bs // world,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {"label": args.label, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "world_size": world, "ddp": dist.is_initialized(), "global_batch": bs,
              "s_per_step": round(seconds, 4), "crops_per_s": round(bs / seconds, 1),
              "peak_mem_GiB_per_process": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    if rank == 0:
        print(json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
