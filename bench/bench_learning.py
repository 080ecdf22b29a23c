"""Learning curves: val FG-ARI / ARI / mBO against wall-clock minutes of training, one line per variant, for Slot
Attention (sa.py, masks from the decoder) and SlotDiffusion (slotdiff.py, masks from the slot-attention maps).

    .venv/bin/python bench/bench_learning.py --data synthetic-clevr --minutes 20 --variants cpu gaussian-init implicit
    .venv/bin/python bench/bench_learning.py --variants cpu slotdiff slotdiff-warm5 --minutes 15
    .venv/bin/python bench/bench_learning.py --variants cpu "lr2e-3: lr=2e-3 warmup=200" --seeds 0 1
    .venv/bin/python bench/bench_learning.py --data suite --variants cpu torch-init --minutes 20   # every family

A variant is a named set of config overrides on top of `--preset` (VARIANTS below, or "name: key=value ..." with
the script's flag names). `--data` takes several datasets, or `suite` for every embedded family
(data.SYNTHETIC): each variant trains on each, and a summary table gives each family's final and peak FG-ARI and
the worst family's, the score a preset is chosen on. `model=slotdiff` makes it a SlotDiffusion run;
`warm_minutes=M` trains sa.py for its first M minutes and then continues as SlotDiffusion whose slot encoder
starts from that one (slotdiff.py --encoder-from, at equal total minutes). Variants train in turn, `--slice` seconds each (round robin), so a
machine that slows down slows every variant alike; a variant's minutes count only its own training steps
(compilation included; evaluation and SlotDiffusion's one-off VQ-VAE training excluded). Every `--eval-minutes`
of a variant's training it is scored on the same first `--val-images` val scenes, and the JSON and the PNG are
rewritten, so an interrupted run keeps everything measured so far. Each variant's final model is saved beside
them as a checkpoint of its script (`python sa.py eval --ckpt ...` draws its masks). `--score-averages 0.99 0.999`
also scores exponential moving averages of each Slot Attention run's weights (what `sa.py --ema-decay` keeps) at
every evaluation: an average does not change training, so one run measures the trained weights and every decay
(keys `fg_ari_ema<decay>` ...; dashed in the PNG; their own rows in the summary).
"""
import argparse
import itertools
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sa  # noqa: E402
import slotdiff  # noqa: E402
import trainlib  # noqa: E402
from data import SYNTHETIC, Scenes, get_batch, load_split  # noqa: E402
from errors import InputError  # noqa: E402

# Ablations of the cpu preset (BO-QSA learned queries, 32x32, batch 8): each changes one choice; then SlotDiffusion
# with the same encoder recipe, from scratch and warm-started from 5 minutes of Slot Attention.
VARIANTS = {
    "cpu": {},
    "gaussian-init": dict(slot_init="gaussian", slot_grad="full"),   # the paper's slot initialisation
    "implicit": dict(slot_init="gaussian", slot_grad="implicit"),   # Chang et al. 2022 instead of BO-QSA
    "torch-init": dict(weight_init="torch"),                        # PyTorch's layer init (the preset's before 12-05)
    "batch32": dict(batch_size=32),
    "slotdiff": dict(model="slotdiff", encoder_delay=0, encoder_steps=0),   # from scratch: the encoder trains throughout
    "slotdiff-warm5": dict(model="slotdiff", warm_minutes=5.0),
}
BENCH_KEYS = dict(model=str, warm_minutes=float)   # variant keys that are not config settings
MARKS = (5, 10, 20)  # minutes reported in the table


@dataclass
class Run:
    name: str                   # the variant, and its dataset when the run covers several
    variant: str
    cfg: sa.SAConfig | slotdiff.SDConfig   # the model being trained now
    model: torch.nn.Module
    step_model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    latents: tuple = ()         # SlotDiffusion: VAE latents of (train, val) and the VAE's hash
    ema: trainlib.EMA | None = None   # with --set ema_decay=...: the weights it is scored with
    averages: list[trainlib.EMA] = field(default_factory=list)   # --score-averages: scored beside the weights
    then: slotdiff.SDConfig | None = None   # warm start: the SlotDiffusion this run becomes at warm_seconds
    warm_seconds: float = 0.0
    step: int = 0               # steps of the current model
    earlier_steps: int = 0      # steps of the Slot Attention phase of a warm start
    seconds: float = 0.0
    next_eval: float = 0.0
    curve: list = field(default_factory=list)

    def done(self, budget: float) -> bool:
        """Spent the budget or ran out of steps."""
        return self.seconds >= budget or self.step >= self.cfg.steps


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def parse_variant(text: str) -> tuple[str, dict, dict | list]:
    """'name' from VARIANTS, or 'name: key=value ...' -> (name, bench options, config overrides: a dict, or for a
    'name: ...' text the key=value strings, which are checked once the model is known)."""
    if ":" not in text:
        if text not in VARIANTS:
            raise InputError(f"unknown variant {text!r}; use one of {', '.join(VARIANTS)} or 'name: key=value ...'")
        items = VARIANTS[text]
        return text, {k: v for k, v in items.items() if k in BENCH_KEYS}, {k: v for k, v in items.items()
                                                                          if k not in BENCH_KEYS}
    name, _, spec = text.partition(":")
    options, overrides = {}, []
    for item in spec.split():
        key, _, value = item.partition("=")
        if key in BENCH_KEYS:
            try:
                options[key] = BENCH_KEYS[key](value)
            except ValueError:
                raise InputError(f"variant {name.strip()!r}: {item!r} is not a valid {key}") from None
        else:
            overrides.append(item)
    return name.strip(), options, overrides


def settings_for(cls: type, items: list[str]) -> list[str]:
    """The --set items that apply to cls: all but those naming a setting of the other script only (so one --set
    can shrink both models; a name neither script knows is still an error)."""
    ours = cli.leaf_types(cls)
    known = set(cli.leaf_types(sa.SAConfig)) | set(cli.leaf_types(slotdiff.SDConfig))
    return [item for item in items if cli.setting_name(item) in ours or cli.setting_name(item) not in known]


def variant_configs(name: str, options: dict, overrides: dict | list, args: argparse.Namespace, data: str,
                    seed: int) -> tuple[sa.SAConfig | slotdiff.SDConfig, slotdiff.SDConfig | None, float]:
    """(the config trained first, the SlotDiffusion config a warm start continues with or None, and the seconds
    after which it does)."""
    model = options.get("model", "sa")
    if model not in ("sa", "slotdiff"):
        raise InputError(f"variant {name!r}: model={model!r}; use model=sa or model=slotdiff")
    if options.get("warm_minutes", 0) and model != "slotdiff":
        raise InputError(f"variant {name!r}: warm_minutes needs model=slotdiff")

    def config(module, variant_overrides):
        cls = module.SAConfig if module is sa else module.SDConfig
        try:
            parsed = (variant_overrides if isinstance(variant_overrides, dict)
                      else cli.parse_overrides(cls, variant_overrides))
            common = cli.parse_overrides(cls, settings_for(cls, args.set))
        except InputError as e:
            raise InputError(f"variant {name!r}: {e}") from None
        return cli.make_config(cls, module.PRESETS[args.preset], common, parsed,
                               dict(data=data, seed=seed, max_minutes=0.0))

    if model == "sa":
        return config(sa, overrides), None, 0.0
    sd_cfg = config(slotdiff, overrides)
    if not options.get("warm_minutes"):
        return sd_cfg, None, 0.0
    # the Slot Attention phase: sa.py's preset with the SlotDiffusion's encoder (the variant's settings are its)
    sa_cfg = replace(config(sa, {}), encoder=sd_cfg.encoder, num_train=sd_cfg.num_train, num_val=sd_cfg.num_val)
    return sa_cfg, sd_cfg, options["warm_minutes"] * 60


def split_key(cfg: sa.SAConfig | slotdiff.SDConfig) -> tuple[str, int, int | None, int | None]:
    return cfg.data, cfg.encoder.resolution, cfg.num_train, cfg.num_val


def datasets(names: list[str]) -> list[str]:
    """--data's names with `suite` expanded to every embedded family, each once."""
    expanded = [n for name in names for n in (SYNTHETIC if name == "suite" else [name])]
    return list(dict.fromkeys(expanded))


def run_label(variant: str, data: str, seed: int, several_datasets: bool) -> str:
    label = f"{variant} on {Path(data).name}" if several_datasets else variant
    return label if seed == 0 else f"{label} (seed {seed})"


def make_run(name: str, variant: str, cfg: sa.SAConfig | slotdiff.SDConfig, device: torch.device, splits: dict,
             latents: dict, encoder_weights: dict | None = None, average_decays: tuple[float, ...] = ()) -> Run:
    """A fresh model for cfg (sa.py's or slotdiff.py's); a SlotDiffusion's encoder may start from given weights; a
    Slot Attention run keeps an average of its weights for each of average_decays."""
    torch.manual_seed(cfg.seed)
    train_set, val_set = splits[split_key(cfg)]
    cfg = replace(cfg, encoder=sa.with_slots_for(train_set, cfg.encoder))
    if isinstance(cfg, sa.SAConfig):
        model = sa.SlotAutoencoder(cfg).to(device)
        opt, run_latents = trainlib.adam(model.parameters(), lr=cfg.lr), ()
    else:
        cfg = replace(cfg, vae=slotdiff.ensure_vae(cfg, train_set))   # trained once per dataset (cached), not timed
        key = cfg.vae, cfg.diffusion.latent_scale
        if key not in latents:   # (scaled train latents, scaled val latents, VAE hash, the resolved scale)
            vqvae, vae_hash = slotdiff.load_frozen_vae(cfg, device)
            resolved, train, val = slotdiff.diffusion_latents(cfg, vqvae, vae_hash, train_set, val_set, device)
            latents[key] = train, val, vae_hash, resolved.diffusion.latent_scale
        *run_latents, scale = latents[key]
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, latent_scale=scale))
        model = slotdiff.SlotDiffusion(cfg, run_latents[0].shape[1]).to(device)
        if cfg.encoder_from and encoder_weights is None:   # a trained sa.py checkpoint, as slotdiff.py does
            encoder_weights = slotdiff.trained_encoder(cfg.encoder_from, cfg.encoder)
        if encoder_weights is not None:
            model.encoder.load_state_dict(encoder_weights)
        opt = slotdiff.make_optimizer(model, cfg)
    step_model = trainlib.training_view(model, device, cfg.amp, cfg.compile)
    averages = [trainlib.EMA(model, decay) for decay in average_decays] if isinstance(cfg, sa.SAConfig) else []
    return Run(name, variant, cfg, model, step_model, opt, trainlib.make_grad_scaler(device, cfg.amp), run_latents,
               trainlib.make_ema(model, cfg.ema_decay), averages)


def train_for(run: Run, seconds: float, budget: float, scenes: Scenes, device: torch.device,
              interrupt: trainlib.StopOnInterrupt) -> None:
    """Train until `seconds` more have passed, the budget is spent, it is time to evaluate, a warm start's Slot
    Attention phase is over or Ctrl-C was pressed."""
    end = min(run.seconds + seconds, budget, run.next_eval, run.warm_seconds if run.then else budget)
    while not run.done(end) and not interrupt.requested:
        start = time.perf_counter()
        # the cool-down follows this variant's own clock (a warm start's Slot Attention phase ends early)
        progress = trainlib.budget_progress(run.step, run.cfg.steps,
                                            run.seconds / (run.warm_seconds if run.then else budget))
        if isinstance(run.cfg, sa.SAConfig):
            images, _ = get_batch(scenes, run.step, run.cfg.batch_size, run.cfg.seed, device)
            _, problem = sa.train_step(run.step_model, run.model, run.opt, run.scaler, images, run.step, run.cfg,
                                       progress, ema=run.ema)
            if problem is None:   # as train_step updates --ema-decay's average: after an applied step, timed
                for average in run.averages:
                    average.update(run.model)
        else:
            images, latents = slotdiff.batch_with_latents(scenes, run.latents[0], run.step, run.cfg, device)
            slotdiff.train_step(run.step_model, run.model, run.opt, run.scaler, images, latents, run.step, run.cfg,
                                run.ema, progress)
        run.seconds += time.perf_counter() - start
        run.step += 1


def continue_as_slotdiff(run: Run, device: torch.device, splits: dict, latents: dict) -> Run:
    """The end of a warm start's Slot Attention phase: a SlotDiffusion whose encoder is the trained one (its average
    when it keeps one, as slotdiff.py --encoder-from takes it)."""
    new = make_run(run.name, run.variant, run.then, device, splits, latents,
                   encoder_weights=trainlib.scored_model(run.model, run.ema).encoder.state_dict())
    return replace(new, earlier_steps=run.step, seconds=run.seconds, next_eval=run.next_eval, curve=run.curve)


def evaluate(run: Run, val_set: Scenes, device: torch.device, limit: int) -> dict:
    if isinstance(run.cfg, sa.SAConfig):
        return sa.evaluate_masks(trainlib.scored_model(run.model, run.ema), val_set, run.cfg, device, limit=limit)
    return slotdiff.evaluate_loss_and_masks(trainlib.scored_model(run.model, run.ema), val_set, run.latents[1],
                                            run.cfg, device, limit=limit)


def record_scores(run: Run, val_set: Scenes, device: torch.device, args: argparse.Namespace) -> None:
    scores = evaluate(run, val_set, device, args.val_images)
    for average in run.averages:
        averaged = sa.evaluate_masks(average.model, val_set, run.cfg, device, limit=args.val_images)
        scores.update({f"{key}{average_suffix(average.decay)}": value for key, value in averaged.items()})
    run.curve.append(dict(minutes=run.seconds / 60, step=run.earlier_steps + run.step,
                          model="sa" if isinstance(run.cfg, sa.SAConfig) else "slotdiff", **scores))
    of_averages = "".join(f"  EMA {a.decay:g}: {scores['fg_ari' + average_suffix(a.decay)]:.3f}" for a in run.averages)
    print(f"{run.name:28s} {run.seconds / 60:5.1f} min  step {run.earlier_steps + run.step:6d}  FG-ARI "
          f"{scores['fg_ari']:.3f}  ARI {scores['ari']:.3f}  mBO {scores['mbo']:.3f}  loss {scores['val_loss']:.4f}"
          f"{of_averages}", flush=True)


def average_suffix(decay: float) -> str:
    """The ending of an average's keys in a curve point: fg_ari_ema0.99 is the FG-ARI of the 0.99 average."""
    return f"_ema{decay:g}"


def save_final(run: Run, out: Path) -> None:
    ckpt = out.parent / f"{out.stem}-{safe_name(run.name)}" / "ckpt.pt"
    if isinstance(run.cfg, sa.SAConfig):
        state = sa.checkpoint_state(run.model, run.opt, run.scaler, run.step, run.cfg, run.ema)
    else:
        state = slotdiff.checkpoint_state(run.model, run.opt, run.scaler, run.step, run.cfg, run.latents[2], run.ema)
    trainlib.save_checkpoint(state, ckpt)


def point_at(curve: list[dict], minutes: float) -> dict | None:
    """The first evaluation at or after `minutes` (evaluations fall a step after each mark; None if the run was
    shorter)."""
    later = [p for p in curve if p["minutes"] >= minutes - 1e-6]
    return later[0] if later else None


def table_cell(curve: list[dict], minutes: float) -> str:
    """FG-ARI at a table mark; when --eval-minutes does not divide the mark, the minute it was measured at too."""
    point = point_at(curve, minutes)
    if point is None:
        return "-"
    late = point["minutes"] - minutes > 0.1   # more than the step past the mark every evaluation lands on
    return f"{point['fg_ari']:.3f}" + (f" (at {point['minutes']:.1f} min)" if late else "")


def write_results(runs: list[Run], args: argparse.Namespace, path: Path) -> None:
    result = dict(command="python bench/bench_learning.py " + shlex.join(sys.argv[1:]), data=datasets(args.data),
                  preset=args.preset, minutes=args.minutes, val_images=args.val_images, threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().machine,
                  variants={r.name: dict(variant=r.variant, data=r.cfg.data, config=sa.asdict(r.cfg),
                                        steps=r.earlier_steps + r.step, seconds=r.seconds, curve=r.curve)
                            for r in runs},
                  score_averages=args.score_averages, summary=suite_summary(runs))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    plot(result, path.with_suffix(".png"))


def suite_summary(runs: list[Run]) -> dict:
    """Per variant (and seed; and each --score-averages average as one more): each dataset's final and peak FG-ARI
    so far, the worst dataset's final, and the largest fall from a peak, the numbers a preset is chosen on."""
    summary = {}
    for r in runs:
        if not r.curve:
            continue
        label = run_label(r.variant, r.cfg.data, r.cfg.seed, False)
        scored = [(label, "fg_ari")] + [(f"{label} + EMA {a.decay:g}", "fg_ari" + average_suffix(a.decay))
                                        for a in r.averages]
        for name, key in scored:
            peak = max(r.curve, key=lambda p: p[key])
            entry = summary.setdefault(name, dict(datasets={}))
            entry["datasets"][Path(r.cfg.data).name] = dict(final=r.curve[-1][key], minutes=r.curve[-1]["minutes"],
                                                           peak=peak[key], peak_minutes=peak["minutes"])
    for entry in summary.values():
        scores = entry["datasets"]
        worst = min(scores, key=lambda d: scores[d]["final"])
        entry.update(worst=worst, worst_final=scores[worst]["final"],
                     largest_drop=max(d["peak"] - d["final"] for d in scores.values()))
    return summary


def plot(result: dict, png: Path) -> None:
    """FG-ARI against minutes from a results dict (as written to the JSON): one panel per dataset, one colour per
    variant, circles for Slot Attention's decoder masks, triangles for SlotDiffusion's attention maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}   # dataset -> [(name, variant)]
    for name, variant in result["variants"].items():
        panels.setdefault(variant.get("data", result["data"]), []).append((name, variant))
    variant_names = dict.fromkeys(v.get("variant", n) for n, v in result["variants"].items())
    colors = {name: f"C{i}" for i, name in enumerate(variant_names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 + 3.3 * len(panels), 4.5), squeeze=False, sharey=True)
    low = min([0.0] + [p["fg_ari"] for v in result["variants"].values() for p in v["curve"]])
    for ax, (data, members) in zip(axes[0], panels.items()):
        for name, variant in members:
            curve, color = variant["curve"], colors[variant.get("variant", name)]
            if not curve:
                continue
            label = variant.get("variant", name) if len(panels) > 1 else name
            ax.plot([p["minutes"] for p in curve], [p["fg_ari"] for p in curve], lw=1.2, color=color,
                    label=f"{label} ({variant['steps']} steps)")
            for decay, style in zip(result.get("score_averages", []), itertools.cycle(("--", ":", "-."))):
                key = "fg_ari" + average_suffix(decay)
                ax.plot([p["minutes"] for p in curve if key in p], [p[key] for p in curve if key in p], ls=style,
                        lw=1, color=color, label=f"{label}, EMA {decay:g}")
            for model, marker in (("sa", "o"), ("slotdiff", "^")):
                points = [p for p in curve if p.get("model", "sa") == model]
                ax.plot([p["minutes"] for p in points], [p["fg_ari"] for p in points], ls="", marker=marker, ms=4,
                        color=color)
        ax.set_title(Path(data).name, fontsize=10)
        ax.set_xlabel("minutes of training (2 threads)" if result["threads"] == 2 else "minutes of training")
        ax.set_ylim(low, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"val FG-ARI (first {result['val_images']} images)")
    fig.suptitle(f"Learning curves, preset {result['preset']}   (o: Slot Attention, decoder masks;  "
                 f"^: SlotDiffusion, attention maps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_summary(summary: dict) -> None:
    """The worst-family table: one row per variant, each dataset's final FG-ARI with its peak in brackets."""
    names = list(dict.fromkeys(d for entry in summary.values() for d in entry["datasets"]))
    print("\n| variant | " + " | ".join(names) + " | worst (final) | largest fall from peak |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for variant, entry in summary.items():
        cells = [f"{s['final']:.3f} (peak {s['peak']:.3f})" if (s := entry["datasets"].get(d)) else "-" for d in names]
        print(f"| {variant} | " + " | ".join(cells) + f" | {entry['worst_final']:.3f} {entry['worst']} | "
              f"{entry['largest_drop']:.3f} |")


def print_table(runs: list[Run]) -> None:
    marks = " | ".join(f"FG-ARI at {m} min" for m in MARKS)
    print(f"\n| variant | steps | s/step | {marks} | final ARI | final mBO |")
    print("|---|---|---|" + "---|" * len(MARKS) + "---|---|")
    for r in runs:
        last = r.curve[-1] if r.curve else {}
        steps = r.earlier_steps + r.step
        print(f"| {r.name} | {steps} | {r.seconds / max(1, steps):.3f} | "
              + " | ".join(table_cell(r.curve, m) for m in MARKS)
              + f" | {last.get('ari', float('nan')):.3f} | {last.get('mbo', float('nan')):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["synthetic-clevr"],
                   help="embedded generator names (data.SYNTHETIC), folders, or `suite` for every embedded family")
    p.add_argument("--preset", default="cpu", choices=sorted(sa.PRESETS))
    p.add_argument("--variants", nargs="+", default=["cpu"], help="names from VARIANTS or 'name: key=value ...'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="each variant is trained once per seed")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per variant")
    p.add_argument("--eval-minutes", type=float, default=1.0, help="evaluate every this many training minutes")
    p.add_argument("--slice", type=float, default=20.0, help="seconds each variant trains before the next one")
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--set", nargs="*", action="extend", default=[],
                   help="key=value overrides applied to every variant (a second --set adds to the first)")
    p.add_argument("--score-averages", type=float, nargs="*", default=[], metavar="DECAY",
                   help="Slot Attention: also score an EMA of each run's weights with each decay (e.g. 0.99 0.999)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/learning-<data>.json)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    try:
        if args.minutes <= 0 or args.eval_minutes <= 0 or args.slice <= 0 or args.val_images < 1:
            raise InputError("--minutes, --eval-minutes, --slice and --val-images must be positive")
        for decay in args.score_averages:
            if not 0 < decay < 1:
                raise InputError(f"--score-averages {decay:g}: a decay is in (0, 1), e.g. 0.999")
        device = trainlib.pick_device(args.device)
        torch._dynamo.config.cache_size_limit = 64  # one compiled graph per variant in this process
        names = datasets(args.data)
        configs = [(run_label(name, data, seed, len(names) > 1), name,
                    *variant_configs(name, options, overrides, args, data, seed))
                   for data in names for text in args.variants for name, options, overrides in [parse_variant(text)]
                   for seed in args.seeds]
        splits, latents = {}, {}
        for _, _, cfg, then, _ in configs:  # each dataset's splits once per resolution (the same for every variant)
            for checked in (cfg, then) if then else (cfg,):
                (sa if isinstance(checked, sa.SAConfig) else slotdiff).validate(checked)
            key = split_key(cfg)
            if key not in splits:
                splits[key] = (load_split(cfg.data, "train", cfg.encoder.resolution, cfg.num_train),
                               load_split(cfg.data, "val", cfg.encoder.resolution, cfg.num_val))
        runs = []
        for label, name, cfg, then, warm_seconds in configs:
            run = make_run(label, name, cfg, device, splits, latents, average_decays=tuple(args.score_averages))
            runs.append(replace(run, then=then, warm_seconds=warm_seconds, next_eval=args.eval_minutes * 60))
        stem = "suite" if len(names) > 1 else Path(names[0]).name
        out = Path(args.out or Path(__file__).parent / "results" / f"learning-{stem}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        budget = args.minutes * 60
        for r in runs:   # the starting point: ~0 from scratch, the trained encoder's score for a warm start
            record_scores(r, splits[split_key(r.cfg)][1], device, args)
        print(f"{len(runs)} runs x {args.minutes:g} training minutes on {', '.join(names)}, round robin in "
              f"{args.slice:g}-second slices; results -> {out}")
        # Ctrl-C only sets a flag that the loop checks between steps, so it is never lost in a library that
        # catches KeyboardInterrupt, and the results are written once more before stopping
        with trainlib.StopOnInterrupt(then="writing the results") as interrupt:
            train_round_robin(runs, budget, splits, latents, device, args, out, interrupt)
        if interrupt.requested:
            write_results(runs, args, out)
            raise KeyboardInterrupt
        print_table(runs)
        if len(names) > 1:
            print_summary(suite_summary(runs))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the results of every evaluation so far are in the JSON and PNG named above")


def train_round_robin(runs: list[Run], budget: float, splits: dict, latents: dict, device: torch.device,
                      args: argparse.Namespace, out: Path, interrupt: trainlib.StopOnInterrupt) -> None:
    """Every variant in turn, --slice seconds at a time, until each has spent the budget (or Ctrl-C)."""
    while not all(r.done(budget) for r in runs) and not interrupt.requested:
        for i, r in enumerate(runs):
            if r.done(budget) or interrupt.requested:
                continue
            train_set, val_set = splits[split_key(r.cfg)]
            train_for(r, args.slice, budget, train_set, device, interrupt)
            finished = r.done(budget)
            if finished:
                save_final(r, out)
            if r.seconds >= r.next_eval or finished:
                record_scores(r, val_set, device, args)
                r.next_eval += args.eval_minutes * 60
                write_results(runs, args, out)
            if r.then and r.seconds >= r.warm_seconds and not finished:
                print(f"{r.name}: {r.seconds / 60:.1f} minutes of Slot Attention done; its encoder now starts "
                      f"SlotDiffusion", flush=True)
                runs[i] = continue_as_slotdiff(r, device, splits, latents)
                record_scores(runs[i], val_set, device, args)   # the handed-over encoder's attention maps


if __name__ == "__main__":
    main()
