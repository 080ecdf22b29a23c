"""How much of a Slot Attention model's segmentation is its own: a sa.py checkpoint's val scenes scored with four
readouts of the same images, so the product's score (the decoder's masks) sits between two references.

    .venv/bin/python bench/bench_readouts.py --ckpt runs/sa/ckpt.pt [--val-images 256]

- decoder masks: argmax over slots of the decoder's alpha masks (what sa.py reports, as the paper does).
- posterior: argmax of each pixel's responsibility under the decoder's spatial mixture, log m_k - |x - rgb_k|^2 /
  (2 s^2), with s^2 the model's own mean squared error on these scenes (no tuning on the ground truth). It uses
  the image, as the E-step of Neural EM does (Greff et al. 2017): a pixel goes to the slot whose colour explains
  it, among the slots whose masks reach it.
- slot colours only: the same with a uniform prior over slots (m_k = 1/K): what the slots' colours alone give.
- colour k-means: no model at all, each image's pixel colours in K clusters (metrics.kmeans, K = the slots). A
  family where this scores high can be segmented by colour; a model below it has learned less than colour.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402
import sa  # noqa: E402
import trainlib  # noqa: E402
from data import iterate_batches, load_split  # noqa: E402
from errors import InputError  # noqa: E402

READOUTS = ("decoder masks", "posterior", "slot colours only", "colour k-means")


def mixture_log_likelihood(images: torch.Tensor, rgb: torch.Tensor, noise_var: float) -> torch.Tensor:
    """(B, K, H, W) log N(x; rgb_k, noise_var) up to a constant, images (B, 3, H, W) and rgb (B, K, 3, H, W) in
    the decoder's [-1, 1] space."""
    return -((images.unsqueeze(1) - rgb) ** 2).sum(dim=2) / (2 * noise_var)


def posterior_segmentation(images: torch.Tensor, masks: torch.Tensor, rgb: torch.Tensor, noise_var: float
                           ) -> torch.Tensor:
    """(B, H, W) argmax over slots of log m_k + log N(x; rgb_k, noise_var), masks (B, K, H, W): each pixel to the
    slot whose mask and colour explain it best."""
    return (masks.clamp(min=1e-20).log() + mixture_log_likelihood(images, rgb, noise_var)).argmax(dim=1)


def colour_kmeans(images: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, W) segmentation of each image by k-means on its pixels' colours."""
    segments = []
    for image in images:
        _, assignments, _ = metrics.kmeans(image.flatten(1).T.contiguous(), k)
        segments.append(assignments.view(image.shape[1:]))
    return torch.stack(segments)


def score_readouts(ckpt: str, val_images: int) -> dict[str, dict[str, float]]:
    """FG-ARI, ARI and mBO of each readout (READOUTS) on the checkpoint's first val_images val scenes."""
    cfg, model, _ = sa.load(ckpt)
    device = torch.device("cpu")
    val = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
    val = val.head(val_images)
    torch.manual_seed(0)   # the Gaussian slot draws of sa.evaluate_masks
    outputs, squared_error = [], 0.0
    with torch.no_grad():
        for images, true_masks in iterate_batches(val, cfg.batch_size, device):
            with trainlib.autocast(device, cfg.amp):
                out = model(images)
            squared_error += out["loss"].item() * len(images)   # the model's loss is the mean squared error
            outputs.append((images * 2 - 1, true_masks, out["masks"].float(), out["rgb"].float()))
    noise_var = squared_error / len(val)
    scores = {name: metrics.SegmentationScores() for name in READOUTS}
    for x, true_masks, alpha, rgb in outputs:
        scores["decoder masks"].update(true_masks, sa.decoder_masks(alpha))
        masks = alpha.squeeze(2)
        scores["posterior"].update(true_masks, posterior_segmentation(x, masks, rgb, noise_var))
        uniform = torch.ones_like(masks)   # log 1 = 0: the slots' colours decide alone
        scores["slot colours only"].update(true_masks, posterior_segmentation(x, uniform, rgb, noise_var))
        scores["colour k-means"].update(true_masks, colour_kmeans(x, masks.shape[1]))
    return {name: s.summary() for name, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a sa.py checkpoint")
    parser.add_argument("--val-images", type=int, default=256, help="the first N val scenes")
    args = parser.parse_args()
    try:
        scores = score_readouts(args.ckpt, args.val_images)
    except InputError as e:
        sys.exit(f"error: {e}")
    print("| readout | FG-ARI | ARI | mBO |\n|---|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['fg_ari']:.3f} | {s['ari']:.3f} | {s['mbo']:.3f} |")


if __name__ == "__main__":
    main()
