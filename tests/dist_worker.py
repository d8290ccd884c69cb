"""Worker for tests/test_distributed.py: one rank of a 2-process gloo (CPU) training run.

Each rank trains the same small vit_fast ViT on its half of a fixed global batch, under DDP and
then FSDP2 (fully_shard), and checks the gradients and updated weights against one process
training on the whole batch (which every rank computes locally: same seed, same init).
Run by torch.multiprocessing.spawn; an assertion here fails the spawning test with its traceback.
"""
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import vit_fast
from tiny_models import tiny_vit

STEPS = 3
GLOBAL_BATCH = 4
TOL = dict(rtol=1e-4, atol=1e-5)


def make_model():
    return vit_fast.convert(tiny_vit(init_values=0.1))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def train(model, data, shard, lr=0.1):
    """STEPS of SGD; returns the gradients of the last step (full tensors) and the final state."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads = None
    for x, y in data:
        x, y = x[shard], y[shard]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
    return grads, {n: _full(p.detach()).clone() for n, p in model.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(name, got, want):
    assert got.keys() == want.keys(), f"{name}: parameter names differ"
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{name} {k}: {m}")


def run(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        data = batches()
        mine = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        base = make_model()
        ref_grads, ref_state = train(copy.deepcopy(base), data, slice(None))

        ddp = DDP(copy.deepcopy(base))
        grads, state = train(ddp, data, mine)
        strip = len("module.")
        check("DDP grads", {k[strip:]: v for k, v in grads.items()}, ref_grads)
        check("DDP weights", {k[strip:]: v for k, v in state.items()}, ref_state)

        fsdp = copy.deepcopy(base)
        for block in fsdp.blocks:
            fully_shard(block)
        fully_shard(fsdp)
        assert type(fsdp.blocks[0]).__name__.startswith("FSDP"), "fully_shard did not wrap"
        grads, state = train(fsdp, data, mine)
        check("FSDP2 grads", grads, ref_grads)
        check("FSDP2 weights", state, ref_state)
    finally:
        dist.destroy_process_group()
