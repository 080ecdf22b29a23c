"""ONNX Runtime vs PyTorch for the two decoders that generate images, side by side in one run.

    .venv/bin/python bench/bench_export.py [--batch 16] [--steps 20] [--rounds 3] [--threads N] [--device auto]

1. DDPM sampling with slotdiff's cpu-preset UNet (random weights: speed does not depend on them; --ckpt for a
   trained one, whose samples the max |diff| column compares across backends for one seed): the PyTorch
   sampler (slotdiff.Diffusion.sample) eager in fp32 and in bf16 autocast (how slotdiff.py samples), compiled
   (torch.compile) in both, and export.ort_sample with the ddpm_step graph. Each variant runs a --steps chain;
   images/s are extrapolated to the full 1000-step chain (every step costs the same: one UNet call + update).
   With a GPU: PyTorch eager bf16, PyTorch with the whole step captured in a CUDA graph, ORT's CUDA provider with
   I/O binding in fp32 and fp16, and the fraction of the GPU's measured bf16 matmul peak each reaches.
2. Compositional-generation decode with sa.py's cpu-preset Spatial Broadcast Decoder: slots -> image.

Timings on shared machines drift: variants are interleaved in rounds and the median is reported.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import export  # noqa: E402
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
import vae  # noqa: E402
from benchlib import matmul_peak, reduced_precision, sync  # noqa: E402
from errors import InputError  # noqa: E402


def cuda_graph_sampler(unet: torch.nn.Module, diffusion: slotdiff.Diffusion, slots: torch.Tensor,
                       latent_shape: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """PyTorch's fastest GPU path: one whole DDPM step (export.DDPMStep: UNet + update, bf16 autocast) captured
    once in a CUDA graph and replayed per step on static buffers; the noise is drawn as Diffusion.sample does."""
    step = export.DDPMStep(unet)
    x = torch.randn((len(slots), *latent_shape), device=slots.device)
    t = torch.zeros(len(slots), dtype=torch.long, device=slots.device)
    noise, coefs = torch.zeros_like(x), torch.zeros(3, device=slots.device)
    # no autocast weight cache: cached casts made outside the graph would be freed while the graph still reads them
    amp = torch.autocast("cuda", dtype=trainlib.amp_dtype(slots.device), cache_enabled=False)
    with torch.no_grad(), amp:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
            for _ in range(2):
                step(x, t, slots, noise, coefs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_prev = step(x, t, slots, noise, coefs)

    def sample(steps: int, seed: int = 0) -> torch.Tensor:
        ts, all_coefs = diffusion.step_coefficients(steps)
        all_coefs = all_coefs.float().to(x.device)
        generator = torch.Generator(slots.device).manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=generator, device=x.device))
        for i in range(steps):
            t.fill_(int(ts[i]))
            coefs.copy_(all_coefs[i])
            if i < steps - 1:
                torch.randn(x.shape, generator=generator, device=x.device, out=noise)
            else:
                noise.zero_()
            graph.replay()
            x.copy_(x_prev)
        return x
    return sample


def run_rounds(variants: dict, rounds: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each variant, variants interleaved in every round; and the max abs difference
    of each variant's output (same inputs, same seed) from the first variant's."""
    outputs = {name: fn().float().clone() for name, fn in variants.items()}  # warm-up: compilation, ORT set-up
    sync(device)
    reference = next(iter(outputs.values()))
    diffs = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, diffs


def print_table(seconds: dict[str, float], diffs: dict[str, float], images: int, flops_per_call: float, unit: str,
                peak: float | None, scale: float = 1.0) -> None:
    base, first = next(iter(seconds.values())), next(iter(seconds))
    for name, s in seconds.items():
        rate = flops_per_call / s
        peak_part = f"  {rate / peak:6.1%} of bf16 peak" if peak else ""
        print(f"  {name:28s} {s * scale:9.2f} {unit}  {images / (s * scale):9.2f} img/s  {rate / 1e9:8.1f} GFLOP/s"
              f"  {base / s:5.2f}x vs {first}  max |diff| {diffs[name]:.1e}{peak_part}")


def bench_ddpm(args: argparse.Namespace, device: torch.device, scratch: Path) -> None:
    if args.ckpt:
        cfg, model, vqvae, _ = slotdiff.load(args.ckpt, device=device)
        latent_size, slots_per_scene = cfg.encoder.resolution // vqvae.cfg.downsample, cfg.encoder.slots
    else:
        cfg = cli.make_config(slotdiff.SDConfig, slotdiff.PRESETS["cpu"])
        torch.manual_seed(0)
        model = slotdiff.SlotDiffusion(cfg).to(device).eval()
        model.unet.out[-1].reset_parameters()   # zero-initialised: every backend would return the same noise
        latent_size = cfg.encoder.resolution // vae.PRESETS["cpu"]["model"].downsample
        slots_per_scene = cfg.encoder.slots or 7   # --slots 0 = from the data: 7 on synthetic-clevr
    unet, diffusion, latent_shape = model.unet, model.diffusion, (3, latent_size, latent_size)
    slots = sa.example_slots(cfg.encoder, args.batch, slots_per_scene).to(device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(torch.randn(args.batch, *latent_shape, device=device), torch.zeros(args.batch, dtype=torch.long,
                                                                                 device=device), slots)
    flops = counter.get_total_flops() * args.steps
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"DDPM sampling, slotdiff {args.ckpt or 'cpu-preset'} UNet ({params:.2f}M params, "
          f"latent {latent_shape}, K={slots_per_scene}), batch {args.batch}, {args.steps}-step chains extrapolated to "
          f"1000 steps; {counter.get_total_flops() / args.batch / 1e9:.3f} GFLOP per image per step")

    start = time.perf_counter()
    step_inputs = dict(x=torch.randn(2, *latent_shape), t=torch.zeros(2, dtype=torch.long),
                       slots=slots[:2].cpu(), noise=torch.randn(2, *latent_shape), coefs=torch.ones(3))
    graph = export.Graph("ddpm_step", export.DDPMStep(unet.cpu()), lambda batch: step_inputs, ["x_prev"], ("coefs",))
    export.export_graph(graph, scratch / "ddpm_step.onnx", "onnx")
    if device.type == "cuda":
        export.export_graph(replace(graph, module=export.to_float16(graph.module)),
                            scratch / "ddpm_step_fp16.onnx", "onnx")
    unet.to(device)
    print(f"  (ONNX export {time.perf_counter() - start:.0f} s)")

    def torch_sampler(denoiser, amp: bool):
        def run():
            with torch.no_grad(), reduced_precision(device, amp):
                return diffusion.sample(denoiser, slots, latent_shape, steps=args.steps, progress=False)
        return run

    def ort_sampler(path: Path):
        session = export.ort_session(path, device, args.threads)
        return lambda: export.ort_sample(session, diffusion, slots, latent_shape, steps=args.steps, progress=False)

    compiled = torch.compile(unet)
    if device.type == "cuda":
        graph_sample = cuda_graph_sampler(unet, diffusion, slots, latent_shape)
        variants = {"torch eager bf16": torch_sampler(unet, True),
                    "torch CUDA graph bf16": lambda: graph_sample(args.steps)}
        if export.ort_runs_on(device):
            variants.update({"ORT CUDA fp32 (I/O binding)": ort_sampler(scratch / "ddpm_step.onnx"),
                             "ORT CUDA fp16 (I/O binding)": ort_sampler(scratch / "ddpm_step_fp16.onnx")})
        else:
            print("  (no ORT rows: this ONNX Runtime has no CUDA provider; install onnxruntime-gpu)")
    else:
        variants = {"torch eager fp32": torch_sampler(unet, False), "torch eager bf16": torch_sampler(unet, True),
                    "torch compiled fp32": torch_sampler(compiled, False),
                    "torch compiled bf16": torch_sampler(compiled, True),
                    "ORT CPU fp32": ort_sampler(scratch / "ddpm_step.onnx")}
    start = time.perf_counter()
    seconds, diffs = run_rounds(variants, args.rounds, device)
    print(f"  (warm-up incl. compilation + {args.rounds} rounds: {time.perf_counter() - start:.0f} s; max |diff|: "
          f"final latents of the {args.steps}-step chain for one seed, against {next(iter(variants))})")
    peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    print_table(seconds, diffs, args.batch, flops, "s/1000 steps", peak, scale=1000 / args.steps)


def bench_decoder(args: argparse.Namespace, device: torch.device, scratch: Path) -> None:
    cfg = cli.make_config(sa.SAConfig, sa.PRESETS["cpu"])
    slots_per_scene = cfg.encoder.slots or 7   # --slots 0 = from the data: 7 on synthetic-clevr
    torch.manual_seed(0)
    decoder = sa.SpatialBroadcastDecoder(cfg.decoder, cfg.encoder.slot_dim, cfg.encoder.resolution,
                                         cfg.encoder.slot_frame, cfg.encoder.slot_moments).eval()
    batch = cfg.batch_size
    slots = sa.example_slots(cfg.encoder, batch, slots_per_scene)
    graph = export.Graph("decoder", export.conv_transpose_as_conv(decoder), lambda b: dict(slots=slots[:b]),
                         ["image", "masks", "rgb"])   # as export.export_checkpoint writes it
    export.export_graph(graph, scratch / "decoder.onnx", "onnx")
    decoder, slots = decoder.to(device), slots.to(device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        decoder(slots)
    flops = counter.get_total_flops() * args.decode_iters
    print(f"\nSpatial Broadcast Decoder, sa cpu preset ({cfg.encoder.resolution}px, K={slots_per_scene}, "
          f"{cfg.decoder.dec_channels} ch), "
          f"batch {batch} scenes, {counter.get_total_flops() / batch / 1e9:.3f} GFLOP per image")
    on_ort = export.ort_runs_on(device)
    session = export.ort_session(scratch / "decoder.onnx", device, args.threads) if on_ort else None
    shape = (batch, 3, cfg.encoder.resolution, cfg.encoder.resolution)

    def torch_decode(module, amp: bool):
        def run():
            with torch.no_grad(), reduced_precision(device, amp):
                for _ in range(args.decode_iters):
                    image = module(slots)[0]
            return image
        return run

    def ort_decode():
        for _ in range(args.decode_iters):
            image = export.ort_decode(session, dict(slots=slots), "image", shape)
        return image

    compiled = torch.compile(decoder)
    variants = {"torch eager fp32": torch_decode(decoder, False), "torch eager bf16": torch_decode(decoder, True),
                "torch compiled fp32": torch_decode(compiled, False),
                "torch compiled bf16": torch_decode(compiled, True)}
    if on_ort:
        variants[f"ORT {device.type.upper()} fp32"] = ort_decode
    seconds, diffs = run_rounds(variants, args.rounds, device)
    peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    print_table(seconds, diffs, batch, flops, "s/batch", peak, scale=1 / args.decode_iters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16, help="scenes sampled together")
    p.add_argument("--steps", type=int, default=20, help="DDPM steps timed per round (extrapolated to 1000)")
    p.add_argument("--decode-iters", type=int, default=3, help="decoder batches timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and ORT alike")
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt", help="ddpm: a slotdiff.py checkpoint's UNet (default: the cpu preset's, random weights)")
    p.add_argument("--only", choices=["ddpm", "decoder"], help="run one of the two benchmarks")
    args = p.parse_args()
    device = trainlib.pick_device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device {device}, {args.threads} threads for torch and ONNX Runtime, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if args.only in (None, "ddpm"):
                bench_ddpm(args, device, Path(scratch))
            if args.only in (None, "decoder"):
                bench_decoder(args, device, Path(scratch))
        except InputError as e:   # e.g. a --ckpt that does not exist
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
