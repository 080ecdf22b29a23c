"""Where a SlotDiffusion checkpoint's reconstruction error comes from: the spread of its samples, or drawing the
wrong thing.

    .venv/bin/python bench/bench_recon_spread.py --ckpt runs/slotdiff/ckpt.pt            # 64 val scenes, 4 chains
    .venv/bin/python bench/bench_recon_spread.py --ckpt CKPT --seeds 2 --sample-steps 100 # faster, not the metric's

Samples each of the first --scenes val scenes from its own slots --seeds times (full DDPM chains, seeds 0, 1, ...;
slotdiff.generate, as `slotdiff.py eval`) and prints, as MSE in [-1, 1] over pixels:
  per sample       each sample against the input (what `eval` reports as reconstruction MSE, one chain)
  spread           half the MSE between two samples of the same slots: a sample's distance from the mean of what
                   these slots allow (the part no model can remove unless it draws the scene with certainty)
  mean vs input    the mean of the samples against the input: the wrong things drawn in every chain, the VAE's own
                   error included, plus spread / seeds (what is left of the spread after averaging)
For --seeds n these satisfy, exactly: per sample = mean vs input + (n - 1) / n * spread.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
from data import from_uint8, iterate_batches, load_split, to_uint8  # noqa: E402
from errors import InputError  # noqa: E402


def decompose(samples: list[torch.Tensor], inputs: torch.Tensor) -> dict[str, float]:
    """per-sample MSE, half the mean MSE between two samples, and the MSE of their mean, all against `inputs`."""
    pairs = [F.mse_loss(a, b).item() for i, a in enumerate(samples) for b in samples[i + 1:]]
    return dict(per_sample=sum(F.mse_loss(s, inputs).item() for s in samples) / len(samples),
                spread=sum(pairs) / len(pairs) / 2,
                mean_vs_input=F.mse_loss(torch.stack(samples).mean(0), inputs).item())


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/slotdiff/ckpt.pt", help="a checkpoint written by slotdiff.py")
    p.add_argument("--scenes", type=int, default=64, help="the first this many val scenes")
    p.add_argument("--seeds", type=int, default=4, help="DDPM chains per scene (at least 2)")
    p.add_argument("--sample-steps", type=int, default=None, help="a divisor of T: respaced chains (default: all T)")
    args = p.parse_args()
    try:
        if args.seeds < 2 or args.scenes < 1:
            raise InputError(f"--seeds {args.seeds} / --scenes {args.scenes}: need at least 2 seeds and 1 scene")
        device = torch.device("cpu")
        cfg, model, vqvae, state = slotdiff.load(args.ckpt, device=device)
        if args.sample_steps:
            slotdiff.check_sample_steps(args.sample_steps, "ddpm", cfg.diffusion.timesteps)
        scenes = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    except InputError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(cfg.seed)  # as slotdiff.evaluate: the Gaussian slot initialisation
    images, _ = next(iterate_batches(scenes, args.scenes, device))
    with trainlib.autocast(device, cfg.amp):
        slots, _ = model.encoder(images)
    samples = [from_uint8(slotdiff.generate(model, vqvae, slots.float(), dataclasses.replace(
        cfg, seed=seed, sample_steps=args.sample_steps or cfg.sample_steps), device)) for seed in range(args.seeds)]
    result = dict(ckpt=args.ckpt, step=state["step"], scenes=len(images), seeds=args.seeds,
                  sample_steps=args.sample_steps or cfg.sample_steps or cfg.diffusion.timesteps,
                  **decompose(samples, from_uint8(to_uint8(images * 2 - 1))))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
