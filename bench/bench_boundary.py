"""How much of a Slot Attention checkpoint's FG-ARI is lost at object edges.

    .venv/bin/python bench/bench_boundary.py --ckpt runs/sa/ckpt.pt

Prints FG-ARI over all foreground pixels (the metric sa.py reports) beside FG-ARI over interior pixels only
(pixels whose four neighbours belong to the same true object), and the share of foreground pixels that lie on an
edge. At 32x32 a CLEVR-like object is ~7 pixels wide, so a large share of its pixels are edge pixels, where the
decoder's smooth masks and the pixel-exact truth disagree most: the gap between the two numbers is what a
higher resolution can buy.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402
import sa  # noqa: E402
import trainlib  # noqa: E402
from data import iterate_batches, load_split  # noqa: E402
from errors import InputError  # noqa: E402


def interior_only(true_masks: torch.Tensor) -> torch.Tensor:
    """The true masks with every pixel that touches another id (4-neighbourhood) set to background (0)."""
    padded = F.pad(true_masks[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long()
    centre = padded[:, 1:-1, 1:-1]
    same = ((centre == padded[:, :-2, 1:-1]) & (centre == padded[:, 2:, 1:-1])
            & (centre == padded[:, 1:-1, :-2]) & (centre == padded[:, 1:-1, 2:]))
    return torch.where(same, true_masks, torch.zeros_like(true_masks))


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/sa/ckpt.pt", help="a checkpoint written by sa.py")
    args = p.parse_args()
    try:
        cfg, model, _ = sa.load(args.ckpt)
        scenes = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    except InputError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(0)
    all_pixels, interior, edge_share = [], [], []
    for images, true_masks in iterate_batches(scenes, cfg.batch_size, torch.device("cpu")):
        with trainlib.autocast(torch.device("cpu"), cfg.amp):
            pred = model(images)["masks"].squeeze(2).argmax(dim=1)
        inner = interior_only(true_masks)
        all_pixels.append(metrics.ari(true_masks, pred, foreground_only=True))
        interior.append(metrics.ari(inner, pred, foreground_only=True))
        edge_share.append(1 - (inner > 0).sum((1, 2)) / (true_masks > 0).sum((1, 2)).clamp(min=1))
    print(f"{args.ckpt} on {len(scenes)} val scenes of {cfg.data} at {cfg.encoder.resolution}x{cfg.encoder.resolution}: "
          f"FG-ARI {torch.cat(all_pixels).mean():.3f} over all foreground pixels, "
          f"{torch.cat(interior).mean():.3f} over interior pixels; "
          f"{torch.cat(edge_share).mean():.1%} of foreground pixels are edge pixels")


if __name__ == "__main__":
    main()
