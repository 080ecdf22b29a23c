"""SlotDiffusion's samplers side by side on one checkpoint: quality against sampling time.

    .venv/bin/python bench/bench_samplers.py --ckpt runs/slotdiff/ckpt.pt             # the table in the README
    .venv/bin/python bench/bench_samplers.py --ckpt CKPT --images 100 --samplers ddpm:100 dpm-solver++:20

Each SAMPLER:STEPS decodes the same slots from the same starting noise (slotdiff.generate, seeds as `eval`):
the first --images val scenes from their own slots (reconstruction MSE against the inputs, in [-1, 1], and
reconstruction FID against the val images) and as many composed scenes (k-means slot library, as `eval`;
compositional FID against the val images). Time per image is the wall clock of those 2 x --images samples
(VAE decode included) after one warm-up call, on the backend export.py's `fid` would pick (--backend auto) or
the one named. Writes the table to stdout and JSON to --out.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
import metrics  # noqa: E402
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
from data import from_uint8, iterate_batches, load_split, to_uint8  # noqa: E402
from errors import InputError  # noqa: E402

DEFAULT = ["ddpm:1000", "ddpm:100", "ddpm:50", "ddim:50", "dpm-solver++:20", "dpm-solver++:10"]


def parse_sampler(text: str, timesteps: int) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if sampler not in slotdiff.SAMPLERS or not steps.isdigit():
        raise InputError(f"--samplers {text!r}: write SAMPLER:STEPS with SAMPLER one of "
                         f"{', '.join(slotdiff.SAMPLERS)}, e.g. dpm-solver++:20")
    return sampler, slotdiff.check_sample_steps(int(steps), sampler, timesteps)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/slotdiff/ckpt.pt", help="a checkpoint written by slotdiff.py")
    p.add_argument("--images", type=int, default=500, help="val scenes reconstructed, and scenes composed")
    p.add_argument("--samplers", nargs="+", default=DEFAULT, help="SAMPLER:STEPS, e.g. ddpm:1000 dpm-solver++:20")
    p.add_argument("--backend", choices=export.BACKENDS, default="auto", help="as export.py fid --backend")
    p.add_argument("--out", default="bench/results/samplers.json")
    args = p.parse_args()
    device = torch.device("cpu")
    try:
        ckpt = Path(args.ckpt)
        export.require_checkpoint(ckpt, "`make demo-diffusion`")
        metrics.require_fid()
        cfg, model, vqvae, state = slotdiff.load(ckpt, device=device)
        chains = [parse_sampler(text, cfg.diffusion.timesteps) for text in args.samplers]
        val_set = load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val)
        train_set = load_split(cfg.data, "train", cfg.encoder.resolution, cfg.num_train)
        if not 2 <= args.images <= len(val_set):
            raise InputError(f"--images {args.images}: FID needs 2 to {len(val_set)} (the val split's size)")
    except InputError as e:
        sys.exit(f"error: {e}")

    torch.manual_seed(cfg.seed)   # as slotdiff.evaluate: the same slots for every sampler
    images, _ = next(iterate_batches(val_set, args.images, device))
    with trainlib.autocast(device, cfg.amp):
        own_slots, _ = model.encoder(images)
    slots = torch.cat([own_slots.float(), sa.composed_slots(model.encoder, train_set, args.images, cfg, device)])
    inputs = from_uint8(to_uint8(images * 2 - 1))
    val_stats = metrics.fid_stats(val_set.images, device=str(device), name="val", cache_dir=".cache")
    shape = (vqvae.cfg.embed_dim, *[cfg.encoder.resolution // vqvae.cfg.downsample] * 2)
    chunk = slots[:slotdiff.sampling_chunk(len(slots), cfg.sample_batch)]

    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for sampler, steps in chains:
        run_cfg = dataclasses.replace(cfg, sampler=sampler, sample_steps=steps)
        label, sample, decode = export.pick_sampler(args.backend, ckpt, run_cfg, model, vqvae, device, chunk)
        sample(chunk, shape, 0, steps=1, progress=False)   # warm-up: compilation, ORT's first allocations
        start = time.perf_counter()
        out = slotdiff.generate(model, vqvae, slots, run_cfg, device, sample=sample, decode=decode)
        seconds = time.perf_counter() - start
        recon, composed = out[:args.images], out[args.images:]
        rows.append(dict(sampler=sampler, steps=steps, backend=label, s_per_image=seconds / len(out),
                         comp_fid=metrics.fid(val_stats, metrics.fid_stats(composed, str(device), name="composed")),
                         recon_fid=metrics.fid(val_stats, metrics.fid_stats(recon, str(device), name="recon")),
                         recon_mse=F.mse_loss(from_uint8(recon), inputs).item()))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps(dict(ckpt=str(ckpt), step=state["step"], images=args.images,
                                                  rows=rows), indent=1))

    base = rows[0]
    print(f"\n{args.images} reconstructed + {args.images} composed scenes, {ckpt} (step {state['step']})\n"
          f"| sampler | steps | s/image | speed-up | compositional FID | reconstruction FID | reconstruction MSE |\n"
          f"|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = base["s_per_image"] / r["s_per_image"]
        print(f"| {r['sampler']} | {r['steps']} | {r['s_per_image']:.3f} | {speedup:.1f}x | {r['comp_fid']:.1f} "
              f"| {r['recon_fid']:.1f} | {r['recon_mse']:.4f} |")
    print(f"(speed-up and the rest against the first row; backend: {base['backend']}; JSON: {args.out})")


if __name__ == "__main__":
    main()
