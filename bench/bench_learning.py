"""Learning curves: val FG-ARI / ARI / mBO against wall-clock minutes of training, one line per variant.

    .venv/bin/python bench/bench_learning.py --data synthetic-clevr --minutes 20 --variants cpu gaussian-init implicit
    .venv/bin/python bench/bench_learning.py --variants cpu "lr2e-3: lr=2e-3 warmup=200" --seeds 0 1

A variant is a named set of sa.py config overrides on top of `--preset` (VARIANTS below, or "name: key=value ...").
Variants train in turn, `--slice` seconds each (round robin), so a machine that slows down slows every variant
alike; a variant's minutes count only its own training steps (compilation included, evaluation excluded).
Every `--eval-minutes` of a variant's training it is scored on the same first `--val-images` val scenes, and the
JSON and the PNG are rewritten, so an interrupted run keeps everything measured so far. Each variant's final
model is saved beside them as an sa.py checkpoint (`python sa.py eval --ckpt ...` draws its masks).
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sa  # noqa: E402
import trainlib  # noqa: E402
from data import get_batch, load_split  # noqa: E402
from errors import InputError  # noqa: E402

# Ablations of the cpu preset (BO-QSA learned queries, 32x32, batch 16): each changes one choice.
VARIANTS = {
    "cpu": {},
    "gaussian-init": dict(slot_init="gaussian", slot_grad="full"),   # the paper's slot initialisation
    "implicit": dict(slot_init="gaussian", slot_grad="implicit"),   # Chang et al. 2022 instead of BO-QSA
    "xavier": dict(weight_init="xavier"),                           # the official code's layer init
    "batch32": dict(batch_size=32),
    "res64-stride2": dict(resolution=64, enc_stride=2),
}
MARKS = (5, 10, 20)  # minutes reported in the table


@dataclass
class Run:
    name: str
    cfg: sa.SAConfig
    model: sa.SlotAutoencoder
    step_model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    seconds: float = 0.0
    next_eval: float = 0.0
    curve: list = field(default_factory=list)


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def parse_variant(text: str) -> tuple[str, dict]:
    """'name' from VARIANTS, or 'name: key=value key=value' with sa.py flag names -> (name, overrides)."""
    if ":" not in text:
        if text not in VARIANTS:
            raise InputError(f"unknown variant {text!r}; use one of {', '.join(VARIANTS)} or 'name: key=value ...'")
        return text, VARIANTS[text]
    name, _, spec = text.partition(":")
    try:
        return name.strip(), trainlib.parse_overrides(sa.SAConfig, spec.split())
    except InputError as e:
        raise InputError(f"variant {name.strip()!r}: {e}") from None


def split_key(cfg: sa.SAConfig) -> tuple:
    return cfg.encoder.resolution, cfg.num_train, cfg.num_val


def make_run(name: str, cfg: sa.SAConfig, device: torch.device) -> Run:
    torch.manual_seed(cfg.seed)
    model = sa.SlotAutoencoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step_model = torch.compile(model) if cfg.compile else model
    label = name if cfg.seed == 0 else f"{name} (seed {cfg.seed})"
    return Run(label, cfg, model, step_model, opt, trainlib.make_grad_scaler(device, cfg.amp))


def train_for(run: Run, seconds: float, budget: float, scenes, device: torch.device) -> None:
    """Train until `seconds` more have passed, the budget is spent or it is time to evaluate."""
    end = run.seconds + seconds
    while run.seconds < min(end, budget, run.next_eval) and run.step < run.cfg.steps:
        start = time.perf_counter()
        images, _ = get_batch(scenes, run.step, run.cfg.batch_size, run.cfg.seed, device)
        sa.train_step(run.step_model, run.model, run.opt, run.scaler, images, run.step, run.cfg, device).item()
        run.seconds += time.perf_counter() - start
        run.step += 1


def value_at(curve: list[dict], minutes: float, key: str = "fg_ari") -> float | None:
    """The score of the first evaluation at or after `minutes` (evaluations fall a step after each mark; None if
    the run was shorter)."""
    later = [p for p in curve if p["minutes"] >= minutes - 1e-6]
    return later[0][key] if later else None


def write_results(runs: list[Run], args, path: Path) -> None:
    result = dict(command="python bench/bench_learning.py " + " ".join(sys.argv[1:]), data=args.data,
                  preset=args.preset, minutes=args.minutes, val_images=args.val_images, threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().machine,
                  variants={r.name: dict(config=sa.asdict(r.cfg), steps=r.step, seconds=r.seconds, curve=r.curve)
                            for r in runs})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    plot(runs, args, path.with_suffix(".png"))


def plot(runs: list[Run], args, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.curve:
            ax.plot([p["minutes"] for p in run.curve], [p["fg_ari"] for p in run.curve], marker="o", ms=3,
                    label=f"{run.name} ({run.step} steps)")
    ax.set_xlabel("minutes of training (2 threads)" if torch.get_num_threads() == 2 else "minutes of training")
    ax.set_ylabel(f"val FG-ARI (first {args.val_images} images)")
    ax.set_title(f"Slot Attention learning curves on {Path(args.data).name}, preset {args.preset}")
    ax.set_ylim(min(0.0, *(p["fg_ari"] for r in runs for p in r.curve)), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def print_table(runs: list[Run]) -> None:
    marks = " | ".join(f"FG-ARI at {m} min" for m in MARKS)
    print(f"\n| variant | steps | s/step | {marks} | final ARI | final mBO |")
    print("|---|---|---|" + "---|" * len(MARKS) + "---|---|")
    for r in runs:
        cells = [value_at(r.curve, m) for m in MARKS]
        last = r.curve[-1] if r.curve else {}
        print(f"| {r.name} | {r.step} | {r.seconds / max(1, r.step):.3f} | "
              + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
              + f" | {last.get('ari', float('nan')):.3f} | {last.get('mbo', float('nan')):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic-clevr", help="synthetic-clevr, synthetic-clevrtex or a folder")
    p.add_argument("--preset", default="cpu", choices=sorted(sa.PRESETS))
    p.add_argument("--variants", nargs="+", default=["cpu"], help="names from VARIANTS or 'name: key=value ...'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="each variant is trained once per seed")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per variant")
    p.add_argument("--eval-minutes", type=float, default=1.0, help="evaluate every this many training minutes")
    p.add_argument("--slice", type=float, default=20.0, help="seconds each variant trains before the next one")
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides applied to every variant")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/learning-<data>.json)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    try:
        if args.minutes <= 0 or args.eval_minutes <= 0 or args.slice <= 0 or args.val_images < 1:
            raise InputError("--minutes, --eval-minutes, --slice and --val-images must be positive")
        common = trainlib.parse_overrides(sa.SAConfig, args.set)
        device = trainlib.pick_device(args.device)
        torch._dynamo.config.cache_size_limit = 64  # one compiled graph per variant in this process
        configs = [(name, trainlib.make_config(sa.SAConfig, sa.PRESETS[args.preset], common, overrides,
                                               dict(data=args.data, seed=seed, max_minutes=0.0)))
                   for text in args.variants for name, overrides in [parse_variant(text)] for seed in args.seeds]
        splits = {}
        for _, cfg in configs:  # each resolution's splits once (same data for every variant)
            sa.validate(cfg)
            key = split_key(cfg)
            if key not in splits:
                splits[key] = (load_split(args.data, "train", cfg.encoder.resolution, cfg.num_train),
                               load_split(args.data, "val", cfg.encoder.resolution, cfg.num_val))
        runs = [make_run(name, replace(cfg, encoder=sa.with_slots_for(splits[split_key(cfg)][0], cfg.encoder)), device)
                for name, cfg in configs]
        out = Path(args.out or Path(__file__).parent / "results" / f"learning-{Path(args.data).name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        budget = args.minutes * 60
        for r in runs:
            r.next_eval = args.eval_minutes * 60
        print(f"{len(runs)} runs x {args.minutes:g} training minutes on {args.data}, round robin in "
              f"{args.slice:g}-second slices; results -> {out}")
        while any(r.seconds < budget and r.step < r.cfg.steps for r in runs):
            for r in runs:
                if r.seconds >= budget or r.step >= r.cfg.steps:
                    continue
                train_set, val_set = splits[split_key(r.cfg)]
                train_for(r, args.slice, budget, train_set, device)
                finished = r.seconds >= budget or r.step >= r.cfg.steps
                if finished:
                    ckpt = out.parent / f"{out.stem}-{safe_name(r.name)}" / "ckpt.pt"
                    trainlib.save_checkpoint(sa.checkpoint_state(r.model, r.opt, r.scaler, r.step, r.cfg), ckpt)
                if r.seconds >= r.next_eval or finished:
                    scores = sa.evaluate_masks(r.model, val_set, r.cfg, device, limit=args.val_images)
                    r.curve.append(dict(minutes=r.seconds / 60, step=r.step, **scores))
                    r.next_eval += args.eval_minutes * 60
                    print(f"{r.name:28s} {r.seconds / 60:5.1f} min  step {r.step:6d}  FG-ARI {scores['fg_ari']:.3f}  "
                          f"ARI {scores['ari']:.3f}  mBO {scores['mbo']:.3f}  loss {scores['val_loss']:.4f}",
                          flush=True)
                    write_results(runs, args, out)
        print_table(runs)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the results of every evaluation so far are in the JSON and PNG named above")


if __name__ == "__main__":
    main()
