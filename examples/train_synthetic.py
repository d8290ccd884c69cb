"""Train a vit_fast-converted timm ViT on synthetic data and print img/s per step.

    python examples/train_synthetic.py vit_tiny_patch16_224 --img-size 32 --patch-size 8 \
        --depth 2 --batch 8 --steps 5                       # a few seconds on a laptop CPU
    python examples/train_synthetic.py vit_base_patch16_224 --batch 128 --steps 50 \
        --device cuda --amp bf16 --compile --profile trace.json

The model is built by timm (random init, no download) and converted with vit_fast.convert; the
summary of what was swapped is printed. --profile writes a Chrome trace (chrome://tracing,
ui.perfetto.dev) of all steps.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import timm
import torch

import vit_fast

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="timm model name, e.g. vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", metavar="TRACE.json", help="write a Chrome trace of the steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="vit_fast backend policy (default auto: kernels on CUDA)")
    p.add_argument("--amp", choices=tuple(AMP), default="none", help="torch.autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    p.add_argument("--no-convert", action="store_true", help="train timm's model as it is")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-classes", type=int, default=1000)
    # Model-size overrides, passed to timm.create_model only when given.
    for name in ("img-size", "patch-size", "depth", "embed-dim", "num-heads"):
        p.add_argument(f"--{name}", type=int)
    return p.parse_args(argv)


def build(args):
    overrides = {k: getattr(args, k) for k in ("img_size", "patch_size", "depth", "embed_dim",
                                              "num_heads") if getattr(args, k) is not None}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes,
                              **overrides)
    if not args.no_convert:
        vit_fast.convert(model)
        print(model.vit_fast_summary)
    return model.to(args.device).train()


def main(argv=None):
    """Runs the training; returns the img/s of every step (the first includes warm-up/compile)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build(args)
    step_model = torch.compile(model, fullgraph=True) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    img_size = model.patch_embed.img_size if hasattr(model, "patch_embed") else (224, 224)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch, 3, *img_size, device=device, generator=g)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device, generator=g)
    amp = AMP[args.amp]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = (torch.profiler.profile(activities=activities, record_shapes=True)
                if args.profile else contextlib.nullcontext())
    rates = []
    with profiler as prof, vit_fast.use_backend(args.backend):
        for step in range(1, args.steps + 1):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(step_model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            rates.append(args.batch / (time.perf_counter() - start))
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {rates[-1]:.1f} img/s",
                  flush=True)
            if args.profile:
                prof.step()
    if args.profile:
        prof.export_chrome_trace(args.profile)
        print(f"trace written to {args.profile}")
    if len(rates) > 1:
        print(f"mean after the first step: {sum(rates[1:]) / len(rates[1:]):.1f} img/s "
              f"({args.model}, batch {args.batch}, {device.type}, backend {args.backend}, "
              f"amp {args.amp}{', compiled' if args.compile else ''})")
    return rates


if __name__ == "__main__":
    main()
