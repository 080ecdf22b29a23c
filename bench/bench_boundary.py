"""How much of a checkpoint's FG-ARI is lost at object edges, for each way of reading masks off it.

    .venv/bin/python bench/bench_boundary.py --ckpt runs/sa/ckpt.pt         # decoder masks and attention maps
    .venv/bin/python bench/bench_boundary.py --ckpt runs/slotdiff/ckpt.pt   # attention maps

Prints FG-ARI over all foreground pixels (the metric the scripts report) beside FG-ARI over interior pixels only
(pixels whose four neighbours belong to the same true object), and the share of foreground pixels that lie on an
edge. At 32x32 a CLEVR-like object is ~7 pixels wide, so a large share of its pixels are edge pixels, where
smooth masks and the pixel-exact truth disagree most: the gap between the two numbers is what a higher
resolution can buy. For a Slot Attention checkpoint it also scores the attention maps (the readout SlotDiffusion,
which has no mask decoder, is scored by), so the two models can be compared on one readout.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
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
    p.add_argument("--ckpt", default="runs/sa/ckpt.pt", help="a checkpoint written by sa.py or slotdiff.py")
    args = p.parse_args()
    try:
        kind, cfg, model, _ = export.load_any(args.ckpt)
        scenes = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    except InputError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(0)
    readouts = dict(attention=lambda images: sa.attention_masks(model.encoder(images)[1], *images.shape[-2:]))
    if kind != "slotdiff":
        readouts = dict(decoder=lambda images: sa.decoder_masks(model(images)["masks"]), **readouts)
    scores = {name: ([], []) for name in readouts}
    edge_share = []
    for images, true_masks in iterate_batches(scenes, cfg.batch_size, torch.device("cpu")):
        inner = interior_only(true_masks)
        edge_share.append(1 - (inner > 0).sum((1, 2)) / (true_masks > 0).sum((1, 2)).clamp(min=1))
        for name, readout in readouts.items():
            with trainlib.autocast(torch.device("cpu"), cfg.amp):
                pred = readout(images)
            scores[name][0].append(metrics.ari(true_masks, pred, foreground_only=True))
            scores[name][1].append(metrics.ari(inner, pred, foreground_only=True))
    print(f"{args.ckpt} on {len(scenes)} val scenes of {cfg.data} at {cfg.encoder.resolution}x"
          f"{cfg.encoder.resolution}; {torch.cat(edge_share).mean():.1%} of foreground pixels are edge pixels")
    for name, (all_pixels, interior) in scores.items():
        print(f"  {name + ' masks:':17s} FG-ARI {torch.cat(all_pixels).mean():.3f} over all foreground pixels, "
              f"{torch.cat(interior).mean():.3f} over interior pixels")


if __name__ == "__main__":
    main()
