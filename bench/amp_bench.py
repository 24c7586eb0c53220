"""Training steps/s with the CUDA defaults (bf16 autocast, or fp16 with a GradScaler, and channels_last) against
full precision in the contiguous format, on the same network and random batch. Target on a GPU: >= 2x on resnet50
at 224 px.

    python bench/amp_bench.py [--model resnet50] [--size 224] [--batch-size 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from classifier.learn.device import amp_dtype, resolve_device, use_fast_kernels
from classifier.nets.models import create_model


def images_per_second(model_name: str, size: int, batch_size: int, steps: int, fast: bool) -> float:
    """Images/s of `steps` optimizer steps; `fast`: mixed precision and channels_last as `fit` sets them on CUDA."""
    device = resolve_device("auto")
    use_fast_kernels(device)
    dtype = amp_dtype("auto", device) if fast else None
    layout = torch.channels_last if fast else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model(model_name, 2, 3).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = torch.rand(batch_size, 3, size, size, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(5):  # cuDNN's autotuner and the allocator settle
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    full = images_per_second(args.model, args.size, args.batch_size, args.steps, fast=False)
    fast = images_per_second(args.model, args.size, args.batch_size, args.steps, fast=True)
    dtype = amp_dtype("auto", resolve_device("auto"))
    precision = "fp32 (no AMP off CUDA)" if dtype is None else str(dtype).removeprefix("torch.")
    print(f"model {args.model}, {args.size} px, batch {args.batch_size}, device {resolve_device('auto')}")
    print(f"fp32, contiguous:    {full:8.0f} images/s")
    print(f"{precision}, channels_last: {fast:8.0f} images/s, {fast / full:.2f}x (GPU target >= 2)")


if __name__ == "__main__":
    main()
