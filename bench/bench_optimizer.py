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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
from benchlib import sync  # noqa: E402


def model_and_inputs(name: str, device: torch.device) -> tuple[torch.nn.Module, tuple, float]:
    """The preset's model with 7 slots (synthetic-clevr's K), a random batch, and the preset's gradient clipping."""
    module, config = (sa, sa.SAConfig) if name == "sa" else (slotdiff, slotdiff.SDConfig)
    cfg = trainlib.make_config(config, module.PRESETS["cpu"])
    cfg = replace(cfg, encoder=replace(cfg.encoder, slots=7))
    res = cfg.encoder.resolution
    images = torch.rand(cfg.batch_size, 3, res, res, device=device)
    if name == "sa":
        return sa.SlotAutoencoder(cfg).to(device), (images,), cfg.grad_clip
    latents = torch.randn(cfg.batch_size, 3, res // 4, res // 4, device=device)   # the cpu VQ-VAE: 4x down
    return slotdiff.SlotDiffusion(cfg, latents.shape[1]).to(device), (images, latents), cfg.grad_clip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and optimiser")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = trainlib.pick_device(args.device)
    scaler = trainlib.make_grad_scaler(device, False)
    print(f"device {device}, threads {torch.get_num_threads()}, {'compiled' if args.compile else 'eager'}, "
          f"{trainlib.precision(device, True)}")
    for name in ("sa", "slotdiff"):
        torch.manual_seed(0)
        model, inputs, grad_clip = model_and_inputs(name, device)
        run = trainlib.compile_model(model, args.compile)
        optimisers = {"torch default Adam": torch.optim.Adam(model.parameters(), lr=1e-5),
                      "trainlib.adam (fused)": trainlib.adam(model.parameters(), lr=1e-5)}

        def step(opt: torch.optim.Optimizer) -> None:
            with trainlib.autocast(device):
                loss = run(*inputs)["loss"]
            trainlib.optimizer_step(loss, opt, scaler, model.parameters(), grad_clip)

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
        loop, fused = (statistics.median(t) for t in times.values())
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:9s} ({params / 1e6:.2f}M params in {len(list(model.parameters()))} tensors): "
              f"{loop * 1e3:.1f} ms/step with torch's default Adam, {fused * 1e3:.1f} fused: {loop / fused:.2f}x")


if __name__ == "__main__":
    main()
