"""Timing helpers the benchmark scripts share."""
import time

import torch

import trainlib


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def reduced_precision(device: torch.device, enabled: bool) -> torch.autocast:
    """Autocast to the GPU's AMP dtype, or to bf16 on a CPU even where it has no bf16 arithmetic and
    trainlib.autocast (what the scripts use) stays in fp32 there: a benchmark shows the raw cost of a "bf16" row."""
    dtype = trainlib.amp_dtype(device) if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """The machine's measured matmul FLOP/s for dtype: the ceiling MFU figures are relative to. On a GPU the fp32
    ceiling is TF32's, since cuDNN runs fp32 convolutions on TF32 tensor cores by default (against the plain fp32
    matmul, sa.py's fp32 steps printed MFU 180-200% on an H200)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        for _ in range(2):  # warm-up: thread pools, kernel selection
            a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 * reps / (time.perf_counter() - start)
