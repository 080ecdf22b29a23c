"""Small training helpers shared by sa.py, slotdiff.py and vae.py.

Only what would otherwise be copied between the three training scripts lives here: configs from dataclasses,
presets and flags; device/DDP set-up, mixed precision, learning-rate schedules, atomic checkpoints, RNG capture
for exact resume; and TrainLoop, the bookkeeping around each script's own loop body (time budget, progress bar,
metrics log, periodic evaluation and plots, checkpoints, Ctrl-C). Each script still owns its model and the
body of its training loop.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import signal
import tempfile
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from errors import InputError


# ----------------------------------------------------------------------------------------------------------
# configs: a dataclass whose fields may be the config dataclasses of its modules (an encoder's, a UNet's), presets
# (dicts of overrides) and command-line flags. Every leaf field is a flag named after it: --slot-dim sets
# cfg.encoder.slot_dim; leaf names are unique within a script's config.

def config_paths(cls) -> dict[str, tuple[str, ...]]:
    """Flag name (a leaf field) -> its path of attribute names in cls, nested configs included."""
    paths = {}
    for name, hint in typing.get_type_hints(cls).items():
        nested = config_paths(hint) if dataclasses.is_dataclass(hint) else {name: ()}
        for leaf, path in nested.items():
            assert leaf not in paths, f"{cls.__name__}: two settings are called {leaf!r}"
            paths[leaf] = (name, *path) if dataclasses.is_dataclass(hint) else (name,)
    return paths


def field_comments(cls) -> dict[str, str]:
    """The comment after each field in the source of cls and its nested configs (a comment may go on over the
    following lines, indented under it): what --help shows for the flag."""
    comments, current, indent = {}, None, 0
    for line in inspect.getsource(cls).splitlines()[1:]:
        code, _, comment = line.partition("#")
        if code.strip():
            match = re.match(r"(\s*)(\w+)\s*:", code)
            current, indent = (match.group(2), len(match.group(1))) if match else (None, 0)
            if current:
                comments[current] = comment.strip()
        elif comment and current and len(line) - len(line.lstrip()) > indent:
            comments[current] += " " + comment.strip()
        else:
            current = None
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            comments.update(field_comments(hint))
    return comments


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def flag_parser(hint) -> Callable[[str], Any]:
    """How a flag's text becomes the field's type: bool, int, float, str, a tuple of ints as "1,2,3", or
    "none" for an optional field."""
    if hint is bool:
        return parse_bool
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in options:
        inner = flag_parser(next(a for a in options if a is not type(None)))
        return lambda text: None if text.lower() == "none" else inner(text)
    if typing.get_origin(hint) is tuple:
        return lambda text: tuple(int(v) for v in text.split(","))
    return hint


def leaf_types(cls) -> dict[str, Any]:
    """Flag name -> the type of that leaf field."""
    return {leaf: typing.get_type_hints(functools.reduce(lambda c, name: typing.get_type_hints(c)[name], path[:-1],
                                                         cls))[leaf] for leaf, path in config_paths(cls).items()}


def setting_name(item: str) -> str:
    """The config field a "key=value" override names: "--slot-grad=x" and "slot_grad=x" -> "slot_grad"."""
    return item.partition("=")[0].strip().lstrip("-").replace("-", "_")


def parse_overrides(cls, items: list[str]) -> dict:
    """["slot_grad=bo-qsa", "lr=1e-3", ...] -> typed overrides for cls (flag names, - or _)."""
    types_by_name, overrides = leaf_types(cls), {}
    for item in items:
        key, value = setting_name(item), item.partition("=")[2]
        if key not in types_by_name:
            raise InputError(f"{key!r} is not a setting of {cls.__name__}; use the names of the script's flags")
        try:
            overrides[key] = flag_parser(types_by_name[key])(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise InputError(f"{key}={value!r} is not a valid {types_by_name[key]}") from None
    return overrides


def set_config_value(cfg, key: str, value) -> None:
    """cfg.<key> = value, where key is a field of cfg or a leaf of one of its nested configs. A nested config's
    own name takes a config object (replacing it) or a dict of its fields (as a checkpoint stores it)."""
    hints = typing.get_type_hints(type(cfg))
    if key in hints and dataclasses.is_dataclass(hints[key]):
        if dataclasses.is_dataclass(value):
            setattr(cfg, key, copy.deepcopy(value))
        else:
            for name, item in value.items():
                set_config_value(getattr(cfg, key), name, item)
    elif key in hints:
        setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
    else:
        nested = [name for name, hint in hints.items() if dataclasses.is_dataclass(hint) and key in config_paths(hint)]
        if not nested:
            raise KeyError(key)
        set_config_value(getattr(cfg, nested[0]), key, value)


def make_config(cls, *layers: dict):
    """cls() with each layer of overrides applied in turn (defaults <- preset or checkpoint <- flags)."""
    cfg = cls()
    for layer in layers:
        for key, value in layer.items():
            set_config_value(cfg, key, value)
    return cfg


def config_from_checkpoint(cls, stored: dict, path: str | Path):
    """The config a checkpoint was trained with; a field this version does not know is a clear error."""
    try:
        return make_config(cls, stored)
    except KeyError as e:
        raise InputError(f"{path} was written by another version of this script (unknown setting {e}); retrain "
                         f"it, or use the version that wrote it") from None


def parse_command_line(cls, presets: dict, argv: list[str], description: str, kind: str,
                       commands: tuple[str, ...] = ("train", "eval")) -> tuple[str, Any, argparse.Namespace]:
    """(command, config, args) for a training script: every config field is a flag (its comment is the help);
    --preset applies a named dict of overrides; --resume / --ckpt start from that checkpoint's config instead
    (a --preset beside them is ignored, and says so); explicit flags always win."""
    command = argv.pop(0) if argv and argv[0] in commands else commands[0]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), help="a named set of overrides (explicit flags still win)")
    p.add_argument("--resume", help="train: continue exactly from this checkpoint (its settings, model, optimiser, "
                                    "step and random state)")
    p.add_argument("--ckpt", help="eval: the checkpoint to evaluate")
    p.add_argument("--no-eval", action="store_true", help="train: skip the final evaluation")
    p.add_argument("--overwrite", action="store_true", help="train: replace the run already in --out")
    hints, comments, defaults = leaf_types(cls), field_comments(cls), cls()
    for leaf, path in config_paths(cls).items():
        default = functools.reduce(getattr, path, defaults)
        p.add_argument(flag(leaf), type=flag_parser(hints[leaf]), default=None,
                       metavar=leaf.upper(), help=f"{comments.get(leaf, '')} (default {default})".strip())
    args = p.parse_args(attach_negative_numbers(argv))
    base = {}
    source = args.resume or args.ckpt
    if source:
        base = load_checkpoint(source, kind=kind)["config"]
        if args.preset:
            print(f"note: --preset {args.preset} is ignored: {source} continues with its own settings "
                  f"(explicit flags still apply)")
    elif args.preset:
        base = presets[args.preset]
    explicit = {leaf: getattr(args, leaf) for leaf in hints if getattr(args, leaf) is not None}
    cfg = config_from_checkpoint(cls, base, source) if source else make_config(cls, base)
    return command, with_overrides(cfg, explicit), args


def run_command_line(argv: list[str] | None, cls, presets: dict, description: str, kind: str, validate: Callable,
                     train: Callable, evaluate: Callable, eval_needs: Callable[[], None] | None = None) -> None:
    """The command line of a training script: `train` (the default; then the checkpoint is evaluated with its own
    config, where training resolved settings such as --slots 0) or `eval --ckpt PATH [--out DIR]`. eval_needs
    checks, before any work, what the evaluation needs from the environment (not asked with --no-eval). Any
    InputError ends the program as one line, exit code 1."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command, cfg, args = parse_command_line(cls, presets, argv, description, kind)
        validate(cfg)
        if eval_needs and (command == "eval" or not args.no_eval):
            eval_needs()
        if command == "eval":
            if not args.ckpt:
                raise InputError(f"eval needs --ckpt PATH (e.g. {cls().out}/ckpt.pt, written by training)")
            evaluate(args.ckpt, cfg, out=args.out)
            return
        ckpt = train(cfg, resume=args.resume, overwrite=args.overwrite)
        if ckpt is not None and not args.no_eval:   # None: a DDP rank other than the first
            evaluate(ckpt)
    except InputError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():   # under torchrun: NCCL warns of leaked resources otherwise (seen on an H200)
            dist.destroy_process_group()


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """argparse reads "--lr -1e-3" as two flags (it only knows plain negatives like -0.001); "--lr=-1e-3" is what
    the user meant, so a flag's value that parses as a number is attached to it."""
    joined = []
    for arg in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                joined[-1] += "=" + arg
                continue
        joined.append(arg)
    return joined


def with_overrides(cfg, overrides: dict):
    """A copy of cfg with overrides (flag name -> value) applied."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        set_config_value(cfg, key, value)
    return cfg


def flag(name: str) -> str:
    """The command-line spelling of a config field: slot_dim -> --slot-dim."""
    return "--" + name.replace("_", "-")


def check_ranges(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 choices: dict[str, tuple] | None = None, shares: tuple[str, ...] = ()) -> None:
    """One line per impossible number or unknown choice, naming the flag: sizes, counts, intervals and learning
    rates must be finite and > 0 (optional ones may be None), budgets, seeds and clip norms >= 0, shares of a
    whole in [0, 1]."""
    values = {leaf: functools.reduce(getattr, path, cfg) for leaf, path in config_paths(type(cfg)).items()}

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for name in positive:
        value = values[name]
        if value is not None and not (is_number(value) and value > 0):
            raise InputError(f"{flag(name)} {value}: must be a number > 0")
    for name in non_negative:
        value = values[name]
        if value is not None and not (is_number(value) and value >= 0):
            raise InputError(f"{flag(name)} {value}: must be a number >= 0")
    for name in shares:
        value = values[name]
        if not (is_number(value) and 0 <= value <= 1):
            raise InputError(f"{flag(name)} {value}: it is a share of the whole, so a number in [0, 1]")
    for name, allowed in (choices or {}).items():
        if values[name] not in allowed:
            raise InputError(f"{flag(name)} {values[name]!r}: choose one of {', '.join(map(str, allowed))}")


def check_unchanged(cfg, stored: dict, what: str, path: str | Path) -> None:
    """Refuse flags that would change a trained model's structure (cfg's fields against the checkpoint's dict),
    naming the flag and the value the model was trained with."""
    current = dataclasses.asdict(cfg)
    for key, value in stored.items():
        if isinstance(value, list):
            value = tuple(value)
        if key in current and current[key] != value:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise InputError(f"{flag(key)} {current[key]}: {path} was trained with "
                             f"{flag(key)} {shown}, and {what} cannot change after training; drop "
                             f"the flag")


# ----------------------------------------------------------------------------------------------------------
# devices, DDP, mixed precision

@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), a single process otherwise."""
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, pick_device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world, local, dev)


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on device (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX). Without it (an AVX2-only CPU)
    PyTorch emulates bf16: a sa.py cpu-preset training step ran 12.8x slower than in fp32 (bench/bench_sa.py)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """What --amp autocasts to: bf16 where the hardware has it (Ampere+ GPUs, CPUs with cpu_has_bf16), fp16 on
    older GPUs (needs a GradScaler), None = stay in fp32 on a CPU without bf16 arithmetic, where autocast would
    make every step an order of magnitude slower."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def precision(device: torch.device, amp: bool) -> str:
    """What --amp trains and samples in on this device, for the logs: "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype(device) if amp else None]


def autocast(device: torch.device, enabled: bool = True):
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling is only needed for fp16; with bf16 (or AMP off) the scaler is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules: pure functions of the step, so resuming needs no scheduler state

def lr_warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1,
                     spent: float = 0.0) -> float:
    """Linear warm-up, then a cosine to min_ratio * base_lr at step `total`, or sooner when `spent` (the share of a
    --max-minutes budget used, TrainLoop.spent) is further along: a run the clock stops still ends annealed."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), spent))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_warmup_step_decay(step: int, base_lr: float, warmup: int, decay_every: int, decay_rate: float) -> float:
    """Locatello et al. 2020: linear warm-up, then multiply by decay_rate every decay_every steps (smoothly)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return base_lr * warm * decay_rate ** (step / decay_every)


def budget_progress(step: int, steps: int, spent: float) -> float:
    """The share of a run's budget spent before `step`: of its steps, or of its time (`spent`, 0 to 1) when that is
    further along; the learning-rate cool-down follows whichever ends the run."""
    return max(step / steps, spent)


def cooldown_factor(progress: float, fraction: float) -> float:
    """Warm-up-stable-decay's final phase (Hu et al. 2024, MiniCPM; Hagele et al. 2024): over the last `fraction`
    of the training budget the learning rate falls linearly to 0, so a run ends annealed wherever its budget
    ends, in steps or in minutes. progress: the share of the budget spent, 0 to 1. fraction 0 = no cool-down."""
    if fraction <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


# ----------------------------------------------------------------------------------------------------------
# checkpoints and RNG state

def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomic: write a temp file in the same folder, fsync, then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch reports a full disk as a RuntimeError ("file write failed"), or as one from its zip writer
        # raised while the OSError it met is being handled
        os_error = next((c for c in (e, e.__context__) if isinstance(c, OSError)), None)
        torch_write_error = isinstance(e, RuntimeError) and "write" in str(e)
        if os_error is not None or torch_write_error:
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise InputError(f"could not write {path} ({os_error or e}); {kept}. Free disk space (or fix the "
                             f"folder), then resume") from None
        raise


SCRIPTS = {"sa": "sa.py", "slotdiff": "slotdiff.py", "vae": "vae.py"}  # checkpoint kind -> the script that writes it


def file_hash(path: str | Path) -> str:
    """A short content hash: names what a cache or an exported graph was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_checkpoint(path: str | Path, map_location="cpu", kind: str | None = None) -> dict:
    """torch.load with weights_only=True: a checkpoint is tensors and plain data only, so a file from elsewhere
    (the course's vae_checkpoint.pth, a colleague's run) can never execute code while it is read. With `kind`
    ("sa", "slotdiff", "vae"), anything but a checkpoint that script wrote is refused, naming what it is."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; train first or pass the right --ckpt/--resume path")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol warning would only precede the refusal below
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise InputError(f"refusing to load {path}: it contains a pickled Python object ({found.group(1)}), "
                             f"which could run code on this machine; only checkpoints of tensors, numbers, "
                             f"strings, lists and dicts are loaded") from None
        raise InputError(f"checkpoint {path} is unreadable: not a PyTorch file of tensors and plain data "
                         f"(truncated, corrupt, or a bare pickle, which is never loaded because it could run "
                         f"code); delete it and retrain") from None
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it and retrain") from None
    if kind is not None:
        check_kind(state, kind, path)
    return state


def load_weights(model: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """model.load_state_dict, with a mismatch (an edited file, another version of the code) as one clear line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = (str(e).splitlines()[1:2] or [str(e)])[0].strip()
        raise InputError(f"{path}: the weights do not match the config stored with them ({first}); the file was "
                         f"edited or written by another version: retrain it") from None


def check_kind(state, kind: str, path: str | Path) -> None:
    script = SCRIPTS[kind]
    if not isinstance(state, dict) or not {"model", "config", "kind"} <= set(state):
        what = f"a dict with keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise InputError(f"{path} is not a checkpoint written by {script} (it holds {what}); pass the ckpt.pt that "
                         f"`python {script}` wrote")
    if state["kind"] != kind:
        other = SCRIPTS.get(state["kind"], state["kind"])
        raise InputError(f"{path} is a {other} checkpoint, not a {script} one; use it with `python {other}`")


def prepare_out(out: str | Path, resume: str | None, overwrite: bool) -> Path:
    """Checks the output folder before any work: it must be a writable folder, and a new run must not replace an
    earlier one by accident (it would truncate its metrics and overwrite its checkpoint). Leftover temp files of a
    checkpoint save that was killed are removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the checkpoint, metrics and pictures")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"--out {out} is not a writable folder ({e.strerror}); choose another --out") from None
    earlier = [name for name in ("ckpt.pt", "metrics.jsonl") if (out / name).exists()]
    if earlier and not resume and not overwrite:
        raise InputError(f"--out {out} already holds a run ({', '.join(earlier)}); continue it with --resume "
                         f"{out / 'ckpt.pt'}, choose another --out, or pass --overwrite to replace it")
    for leftover in out.glob("ckpt.pt.*.tmp"):
        leftover.unlink(missing_ok=True)
    return out


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (loadable with weights_only=True)."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# logging, plots, interruption

class MetricsLog:
    """Append-only JSON-lines log. On resume, records after the checkpoint's step are dropped so the curve
    has no duplicated segment."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curves(records: list[dict], png_path: str | Path, keys=("train_loss", "val_loss"),
                     x: str = "step", title: str = "", scores=("fg_ari", "ari", "mbo")) -> None:
    """Losses (log scale) on the left; on the right, the segmentation scores of the periodic evaluations, when
    there are any, so a reader sees whether falling loss means objects are being found."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, names):
        for key in names:
            pts = [(r[x], r[key]) for r in records if key in r and x in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=SCORE_NAMES.get(key, key))
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend()

    has_scores = any(key in r for r in records for key in scores)
    fig, axes = plt.subplots(1, 2 if has_scores else 1, figsize=(12 if has_scores else 7, 4), squeeze=False)
    draw(axes[0, 0], keys)
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_title(title)
    if has_scores:
        draw(axes[0, 1], scores)
        axes[0, 1].set_ylim(min(0.0, *(r[k] for r in records for k in scores if k in r)), 1.0)
        axes[0, 1].set_title("val segmentation (periodic eval subset)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


SCORE_NAMES = {"fg_ari": "FG-ARI", "ari": "ARI", "mbo": "mBO", "train_loss": "train loss", "val_loss": "val loss",
               "psnr": "PSNR", "codebook_usage": "codebook usage"}


class StopOnInterrupt:
    """The first Ctrl-C only sets .requested, so the loop can finish its step, checkpoint and exit;
    a second Ctrl-C interrupts immediately."""

    def __init__(self, then: str = "writing a checkpoint"):
        self.requested, self.then = False, then

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ninterrupt: finishing this step and {self.then} (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


class TimeBudget:
    """Ends training after `minutes` of wall time (0 = never), so a demo fits a fixed budget on any machine.
    The step-decay/cosine schedules are functions of the step, so stopping early leaves them consistent; --cooldown
    and vae.py's cosine follow the clock too (spent)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.deadline = time.monotonic() + self.seconds if minutes > 0 else None

    def spent(self, world_size: int = 1, device: torch.device | None = None) -> float:
        """The share of the budget used so far (0 without a budget); under DDP the first rank's clock for every
        rank, so all of them stop at the same step and a schedule that follows it gives them the same rate."""
        if self.deadline is None:
            return 0.0
        share = 1.0 - (self.deadline - time.monotonic()) / self.seconds
        if world_size > 1:
            value = torch.tensor(share, device=device)
            dist.broadcast(value, src=0)
            share = value.item()
        return share

    def expired(self, world_size: int = 1, device: torch.device | None = None) -> bool:
        return self.spent(world_size, device) > 1


class TrainProgress:
    """The training progress bar, with a true total and ETA: under a time budget it fills with the budget's
    seconds (or the steps, whichever runs out first), so its ETA is the budget's end, not `--steps` at the
    current speed; without one it counts steps."""

    def __init__(self, start: int, steps: int, minutes: float, disable: bool = False):
        self.start, self.steps, self.seconds = start, steps, minutes * 60
        self.began = time.monotonic()
        if self.seconds > 0:
            self.bar = tqdm(total=1000, desc="train", disable=disable, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} of the "
                                       f"{minutes:g}-minute budget" + "{postfix}")
        else:
            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self.seconds > 0:
            fraction = max((time.monotonic() - self.began) / self.seconds,
                           (done - self.start) / max(1, self.steps - self.start))
            self.bar.update(min(1000, int(fraction * 1000)) - self.bar.n)
        else:
            self.bar.update(done - self.bar.n)

    def show(self, done: int, **values: str) -> None:
        self.bar.set_postfix(step=f"{done}/{self.steps}", **values)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class EMA:
    """An exponential moving average of a model's weights, the copy that evaluation and sampling use. The decay
    ramps up as (1 + n) / (10 + n) over the first updates (as LDM's LitEma), so the average does not sit on the
    initial weights for its first ~1/(1 - decay) steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def adam(params, **kwargs) -> torch.optim.Adam:
    """Adam as every training script builds it: fused, one kernel over all parameters. torch's default on a CPU is
    a Python loop of ~10 small ops per tensor: 32 ms of SlotDiffusion's ~250 ms step on 2 AVX2 cores, 7 ms fused
    (docs/results.md, Benchmarks); the update is the same."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler, parameters, grad_clip: float = 0.0) -> None:
    """Backward through the AMP loss scaler, optional gradient-norm clipping (on unscaled gradients), then the
    optimiser step: the same for every training script."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(opt)
    scaler.update()


def restore(state: dict, path: str | Path, master: bool = True, **parts) -> int:
    """Continues a training checkpoint exactly: loads each part's state (model=..., optimizer=..., scaler=..., the
    keys the checkpoint stores them under) and every random generator's state; returns the checkpoint's step."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
    set_rng_state(state["rng"])
    if master:
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


COMPILE_CACHE = Path(".cache") / "inductor"
# read at import, not in compile_model: building an optimiser imports torch._dynamo, which sets the variable to torch's
# default (/tmp/torchinductor_<user>) before any model is compiled; None unless the user chose a folder
CHOSEN_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """torch.compile, with the inductor's caches in the project's .cache/inductor (or the TORCHINDUCTOR_CACHE_DIR
    the user set) instead of /tmp (which machines clear), so only the first run in a folder pays the whole
    compilation; the compiled view shares the parameters."""
    if not enabled:
        return model
    # set, not setdefault (see CHOSEN_COMPILE_CACHE); inductor reads the variable at every cache lookup
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = CHOSEN_COMPILE_CACHE or str(COMPILE_CACHE.resolve())
    return torch.compile(model)


def compile_times() -> dict[str, float]:
    """Seconds the first training step (or sampling call) took last time, per title, compilation included; {} if
    unknown."""
    try:
        return json.loads((COMPILE_CACHE / "first_step_seconds.json").read_text())
    except (OSError, ValueError):
        return {}


def compile_notice(title: str, what: str = "the training step") -> str:
    """What to expect while `what` compiles: the time it took last time here, or the first-run cost."""
    last = compile_times().get(title)
    kernels = CHOSEN_COMPILE_CACHE or COMPILE_CACHE   # where compile_model puts them
    if last is None:
        return (f"compiling {what} (first run in this folder only: 0.5 to 5 minutes, measured on 2-core CPUs and "
                f"for paper-size models on an H200; later runs reuse {kernels})")
    return f"compiling {what} (cached in {kernels}: ~{last:.0f} s last time)"


def record_compile_time(title: str, seconds: float) -> None:
    with contextlib.suppress(OSError):
        COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
        (COMPILE_CACHE / "first_step_seconds.json").write_text(json.dumps({**compile_times(),
                                                                           title: round(seconds, 1)}))


class TrainLoop:
    """The bookkeeping every training script does around its own loop body, written once: the time budget, a
    progress bar with a true ETA, the metrics log, periodic evaluation with the loss-curve picture, atomic
    checkpoints (every ckpt_every steps, at the last step, on Ctrl-C) and what to print when it stops.

        loop = TrainLoop(cfg, start, out, script="sa.py", title="...", resumed=bool(resume))
        for step in loop.steps():
            loss = ...one optimiser step...
            loop.end_step(step + 1, loss, lr, evaluate=lambda: {...scores...}, state=lambda: {...checkpoint...})

    cfg needs steps, max_minutes, log_every, eval_every and ckpt_every. Under DDP only the master logs,
    evaluates and saves, but every rank stops at the same step."""

    def __init__(self, cfg, start: int, out: Path, script: str, title: str, resumed: bool = False,
                 master: bool = True, world_size: int = 1, device: torch.device | None = None,
                 images_per_step: int = 1, epoch_size: int = 1, compiled: bool = False):
        self.compiled = compiled
        self.cfg, self.start, self.out, self.script, self.title = cfg, start, Path(out), script, title
        self.master, self.world_size, self.device = master, world_size, device or torch.device("cpu")
        self.images_per_step, self.epoch_size = images_per_step, epoch_size
        self.ckpt = self.out / "ckpt.pt"
        self.log = MetricsLog(self.out / "metrics.jsonl", resume_step=start if resumed else None) if master else None
        if master:   # the settings in effect, for the reader of the run folder (checkpoints carry their own copy)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.finished = start >= cfg.steps
        self.interrupt = StopOnInterrupt()

    def steps(self):
        """The step numbers to run, from the start until the last step, the budget or a Ctrl-C."""
        self.budget, self.spent = TimeBudget(self.cfg.max_minutes), 0.0
        self.bar = TrainProgress(self.start, self.cfg.steps, self.cfg.max_minutes, disable=not self.master)
        step = self.start
        if self.compiled and self.master:
            self.bar.write(compile_notice(self.title))
        if getattr(self.cfg, "amp", False) and self.master and precision(self.device, True) == "fp32":
            self.bar.write("--amp: this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast runs "
                           "~13x slower than fp32; training in fp32")
        with self.interrupt:
            try:
                while not self.finished:
                    yield step
                    step += 1
            finally:
                self.bar.close()

    def progress(self, step: int) -> float:
        """budget_progress of --steps and --max-minutes (its time as measured at the end of the step before)."""
        return budget_progress(step, self.cfg.steps, self.spent)

    def end_step(self, done: int, loss: torch.Tensor, lr: float, evaluate: Callable[[], dict],
                 state: Callable[[], dict]) -> None:
        cfg = self.cfg
        self.spent = self.budget.spent(self.world_size, self.device)   # one clock reading (and collective) a step
        out_of_time = self.spent > 1
        last = done >= cfg.steps or out_of_time
        self.bar.update(done)
        if self.compiled and self.master and done == self.start + 1:
            record_compile_time(self.title, time.monotonic() - self.bar.began)
        epoch = done * self.images_per_step / self.epoch_size
        if done % cfg.log_every == 0 or last:
            if self.world_size > 1:  # log the loss of the global batch: the mean over the ranks' local losses
                loss = loss.detach().clone()
                dist.all_reduce(loss)   # a sum (gloo has no AVG)
                loss /= self.world_size
        if self.master and (done % cfg.log_every == 0 or last):
            value = loss.item()
            self.bar.show(done, loss=f"{value:.4f}", lr=f"{lr:.1e}")
            self.log.log(step=done, epoch=epoch, train_loss=value, lr=lr)
        if self.master and (done % cfg.eval_every == 0 or last):
            scores = evaluate()
            self.log.log(step=done, epoch=epoch, **scores)
            self.bar.write(f"step {done}: " + "  ".join(f"{SCORE_NAMES.get(k, k)} {v:.4f}" for k, v in scores.items()))
            plot_loss_curves(self.log.records(), self.out / "loss_curves.png", title=self.title)
        if self.master and (done % cfg.ckpt_every == 0 or last or self.interrupt.requested):
            save_checkpoint({**state(), "finished": last}, self.ckpt)   # finished: by --steps or --max-minutes
        if out_of_time and self.master:
            self.bar.write(f"--max-minutes {cfg.max_minutes:g} reached at step {done}; checkpoint {self.ckpt} "
                           f"(train further with: python {self.script} --resume {self.ckpt} --max-minutes N)")
        if self.interrupt.requested:
            self.bar.close()
            print(f"stopped at step {done}; checkpoint {self.ckpt}. Resume: python {self.script} --resume {self.ckpt}")
            sys.exit(130)
        self.finished = last
