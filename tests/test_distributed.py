"""Training at scale: DDP and FSDP2 over 2 CPU processes (gloo), and timm's grad checkpointing."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vit_fast
from tiny_models import tiny_vit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_ddp_and_fsdp2_match_single_process():
    # The worker asserts; a failure on any rank re-raises here with that rank's traceback.
    import dist_worker
    mp.spawn(dist_worker.run, args=(2, _free_port()), nprocs=2, join=True)


def _model(**kw):
    return tiny_vit(depth=3, **kw)


def _grads(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)  # same drop-path draws in both runs
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_on_converted_model():
    model = vit_fast.convert(_model(drop_path_rate=0.2, init_values=0.1))
    assert all(isinstance(b, vit_fast.Block) for b in model.blocks)
    model.train()
    x = torch.randn(4, 3, 16, 16)
    want = _grads(model, x, seed=3)

    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]
    model.set_grad_checkpointing(True)
    got = _grads(model, x, seed=3)
    for h in hooks:
        h.remove()
    # Checkpointing re-runs each block in the backward (non-reentrant checkpointing stops the re-run
    # once it has rebuilt what backward needs, so count the forwards that start).
    assert len(calls) == 2 * len(model.blocks), f"{len(calls)} block forwards: not checkpointed"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
