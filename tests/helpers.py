"""Helpers more than one test module needs."""
import json
from dataclasses import asdict
from pathlib import Path

import torch

import cli
import vae

# a Slot Attention small enough to train in seconds on the CPU (sa.py's flags)
SA_SMALL = ["--resolution", "16", "--slots", "3", "--slot-dim", "8", "--slot-mlp-hidden", "8",
            "--enc-channels", "8", "--dec-channels", "8", "--batch-size", "4", "--num-train", "16", "--num-val", "8",
            "--eval-images", "8", "--compile", "0", "--amp", "0", "--device", "cpu", "--no-eval"]

# a SlotDiffusion small enough to train in seconds, on a 16 px synthetic-clevr split (slotdiff.py's flags)
SD_TINY = ["--resolution", "16", "--num-train", "8", "--num-val", "4", "--slots", "2", "--slot-dim", "8",
           "--enc-channels", "8", "--base-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1",
           "--head-dim", "8", "--batch-size", "2", "--device", "cpu"]


def save_tiny_vae(path) -> None:
    """A VQ-VAE checkpoint with random weights, as vae.py writes it, small enough for SD_TINY (4x down)."""
    cfg = cli.make_config(vae.TrainConfig, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16))
    torch.save(dict(kind="vae", model=vae.VQVAE(cfg.model).state_dict(), config=asdict(cfg)), path)


def randomise_zero_inits(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Fresh UNets output exactly zero (zero-initialised last layers); random weights make the checks non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
