"""Distributed helpers for torchrun: rank, barrier, buffer broadcast, gathering embeddings. Each is
a no-op in a single process, so the scripts call them unconditionally.
"""

import os


def rank_and_world():
    """(rank, world size) of this process: from the process group, else torchrun's environment."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process():
    return rank_and_world()[0] == 0


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(model):
    """Copy rank 0's buffers (batch-norm running statistics) to every process, as DDP does at the
    start of each training forward; needed before evaluating in eval mode on every process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_gather_embeddings(embeddings, skipped):
    """Merge every process's share of (embeddings dict, skipped keys); identity in one process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, skipped
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (embeddings, skipped))
    merged, all_skipped = {}, []
    for emb, skip in shares:
        merged.update(emb)
        all_skipped.extend(skip)
    return merged, sorted(all_skipped)
