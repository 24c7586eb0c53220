"""Where a network runs and in what precision."""

from __future__ import annotations

import torch

from classifier.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """channels_last when asked, or by default (None) on CUDA, where convolutions run faster in it."""
    wanted = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if wanted else torch.contiguous_format


def use_fast_kernels(device: torch.device) -> None:
    """On CUDA let cuDNN time its convolution algorithms once per input shape and keep the fastest (a training
    run's shapes repeat every batch)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where supported (auto), else fp16; full precision on CPU."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16
