"""What the optimiser costs in a training step: torch's default Adam (on a CPU a Python loop over the parameter
tensors) against trainlib.adam (fused), for sa.py's and slotdiff.py's `cpu` presets, side by side in one run.

    .venv/bin/python bench/bench_optimizer.py [--compile] [--steps 10] [--rounds 6] [--device auto]

Each round times both optimisers in turn on the same model and batch (the median over rounds is reported, since
timings on shared machines drift). --compile compiles the model as the scripts do (the optimiser step stays eager
there too); a cold compile cache costs minutes before the first round.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
from benchlib import sync  # noqa: E402


def training_step(name: str, device: torch.device, compiled: bool) -> tuple[Callable, torch.optim.Optimizer,
                                                                       torch.optim.Optimizer, torch.nn.Module]:
    """step(opt): the script's own train_step on a random batch of its `cpu` preset (7 slots, synthetic-clevr's K),
    the optimiser the script builds, torch's default Adam over the same parameter groups, and the model."""
    module, config = (sa, sa.SAConfig) if name == "sa" else (slotdiff, slotdiff.SDConfig)
    cfg = cli.make_config(config, module.PRESETS["cpu"])
    cfg = replace(cfg, encoder=replace(cfg.encoder, slots=7))
    res, scaler = cfg.encoder.resolution, trainlib.make_grad_scaler(device, cfg.amp)
    images = torch.rand(cfg.batch_size, 3, res, res, device=device)
    if name == "sa":
        model = sa.SlotAutoencoder(cfg).to(device)
        fused = trainlib.adam(model.parameters(), lr=cfg.lr)
    else:
        latents = torch.randn(cfg.batch_size, 3, res // 4, res // 4, device=device)   # the cpu VQ-VAE: 4x down
        model = slotdiff.SlotDiffusion(cfg, latents.shape[1]).to(device)
        fused = slotdiff.make_optimizer(model, cfg)
    default = torch.optim.Adam([{key: value for key, value in group.items() if key in ("params", "lr", "base_lr")}
                                for group in fused.param_groups])
    run = trainlib.training_view(model, device, cfg.amp, compiled)
    step_index = 2_000   # past SlotDiffusion's --encoder-delay (1000): the encoder trains too, as in most steps

    def step(opt: torch.optim.Optimizer) -> None:
        if name == "sa":
            sa.train_step(run, model, opt, scaler, images, step_index, cfg)
        else:
            slotdiff.train_step(run, model, opt, scaler, images, latents, step_index, cfg)
    return step, default, fused, model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and optimiser")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = trainlib.pick_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {'compiled' if args.compile else 'eager'}, "
          f"{trainlib.precision(device, True)}")
    for name in ("sa", "slotdiff"):
        torch.manual_seed(0)
        step, default, fused, model = training_step(name, device, args.compile)
        optimisers = {"torch default Adam": default, "trainlib.adam (fused)": fused}
        times = {key: [] for key in optimisers}
        for opt in optimisers.values():
            step(opt)   # warm-up (and compilation)
        for _ in range(args.rounds):
            for key, opt in optimisers.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(opt)
                sync(device)
                times[key].append((time.perf_counter() - start) / args.steps)
        default_s, fused_s = (statistics.median(t) for t in times.values())
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:9s} ({params / 1e6:.2f}M params in {len(list(model.parameters()))} tensors): "
              f"{default_s * 1e3:.1f} ms/step with torch's default Adam, {fused_s * 1e3:.1f} fused: "
              f"{default_s / fused_s:.2f}x")


if __name__ == "__main__":
    main()
