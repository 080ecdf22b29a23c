"""Is the compiled training step right on this machine? Per-parameter gradient agreement of compiled and eager,
the check every compiled training run makes on its first batch (trainlib.check_compiled), printed in full.

    .venv/bin/python bench/bench_compile.py [--model sa|slotdiff] [--preset cpu|paper] [--resolution R]

One random batch of the preset's model (random weights), from the same weights and seed: eager fp32 (the
reference), eager under --amp, the compiled step as the scripts call it (autocast entered inside the compiled
module) and, for contrast, compiled with autocast around the call (how the scripts called it before: torch.compile
then traced the backward of Slot Attention's fp32 iterations in bf16, and on a Xeon with AMX its GRU gradients came
out non-finite). Columns are distances from the fp32 reference relative to its norm; "allowed" is the check's bound.
A cold compile cache costs a minute or two per compiled variant on 2 CPU cores.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402


LossOf = Callable[[torch.nn.Module], torch.Tensor]   # the loss of one fixed batch through a view of the model


def model_and_loss(name: str, preset: str, resolution: int | None, device: torch.device
                   ) -> tuple[sa.SAConfig | slotdiff.SDConfig, torch.nn.Module, LossOf]:
    """The preset's model with random weights (7 slots, synthetic-clevr's K) and loss_of(view) on one random batch."""
    module, config = (sa, sa.SAConfig) if name == "sa" else (slotdiff, slotdiff.SDConfig)
    cfg = cli.make_config(config, module.PRESETS[preset])
    cfg = replace(cfg, encoder=replace(cfg.encoder, slots=7, resolution=resolution or cfg.encoder.resolution))
    res = cfg.encoder.resolution
    images = torch.rand(cfg.batch_size, 3, res, res, device=device)
    if name == "sa":
        return cfg, sa.SlotAutoencoder(cfg).to(device), lambda view: view(images)["loss"]
    latents = torch.randn(cfg.batch_size, 3, res // 4, res // 4, device=device)   # a VQ-VAE that downsamples 4x
    model = slotdiff.SlotDiffusion(cfg, latents.shape[1]).to(device)
    for p in model.unet.parameters():   # fresh UNets output exactly zero (zero-initialised last layers)
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return cfg, model, lambda view: view(images, latents)["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("sa", "slotdiff"), default="sa")
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--resolution", type=int, help="override the preset's (the paper presets' 128 is slow on a CPU)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = trainlib.pick_device(args.device)
    torch.manual_seed(0)
    cfg, model, loss_of = model_and_loss(args.model, args.preset, args.resolution, device)
    precision = trainlib.precision(device, cfg.amp)
    print(f"{args.model} --preset {args.preset}, {cfg.encoder.resolution}px, batch {cfg.batch_size}, --amp: "
          f"{precision}, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")

    def gradients(view):
        return trainlib.loss_and_gradients(view, loss_of, model, device)

    class Around(torch.nn.Module):   # the old call: autocast entered around the compiled module
        def __init__(self, compiled: torch.nn.Module):
            super().__init__()
            self.compiled = compiled

        def forward(self, *args):
            with trainlib.autocast(device, cfg.amp):
                return self.compiled(*args)

    reference = gradients(trainlib.Autocast(model, device, False))
    eager = gradients(trainlib.Autocast(model, device, cfg.amp))
    inside = trainlib.compare_steps(reference, eager, gradients(trainlib.training_view(model, device, cfg.amp, True)))
    outside = trainlib.compare_steps(reference, eager, gradients(Around(trainlib.compile_model(model))))
    print(f"{'':48s} {'|reference|':>11s} {'eager ' + precision:>11s} {'compiled':>9s} {'(around)':>9s} "
          f"{'allowed':>8s}")
    for (name, norm, eager_error, error, allowed), (*_, around_error, _) in zip(inside.rows, outside.rows):
        scale = max(norm, 1e-30)
        flag = "" if error <= allowed and error == error else "  <- disagrees"
        print(f"{name.removeprefix('gradient of '):48s} {norm:11.2e} {eager_error / scale:11.3f} {error / scale:9.3f} "
              f"{around_error / scale:9.3f} {allowed / scale:8.3f}{flag}")
    for label, check in (("compiled (autocast inside, as the scripts train)", inside),
                         ("compiled with autocast around the call", outside)):
        print(f"{label}: {'agrees with eager' if check.ok else 'DISAGREES: ' + check.reason}")


if __name__ == "__main__":
    main()
