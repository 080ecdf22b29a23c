"""Configs from dataclasses, presets and command-line flags, shared by sa.py, slotdiff.py and vae.py.

A script's config is a dataclass whose fields may be the small configs of its modules (an encoder's, a UNet's);
a preset is a dict of overrides; every leaf field is a flag named after it (--slot-dim sets cfg.encoder.slot_dim),
and its comment in the dataclass is the flag's help. run_command_line is a training script's whole command line:
train (the default) or eval, --preset, --resume, one-line errors.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from errors import InputError
from trainlib import load_checkpoint, pick_device

Config = TypeVar("Config")   # a dataclass config (SAConfig, SDConfig, VAEConfig, ...)


def config_paths(cls: type) -> dict[str, tuple[str, ...]]:
    """Flag name (a leaf field) -> its path of attribute names in cls, nested configs included."""
    paths = {}
    for name, hint in typing.get_type_hints(cls).items():
        nested = config_paths(hint) if dataclasses.is_dataclass(hint) else {name: ()}
        for leaf, path in nested.items():
            assert leaf not in paths, f"{cls.__name__}: two settings are called {leaf!r}"
            paths[leaf] = (name, *path) if dataclasses.is_dataclass(hint) else (name,)
    return paths


def field_comments(cls: type) -> dict[str, str]:
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


def optional_of(hint: Any) -> Any:
    """T for an `T | None` field, else None."""
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in options:
        return next(a for a in options if a is not type(None))
    return None


def flag_parser(hint: Any) -> Callable[[str], Any]:
    """How a flag's text becomes the field's type: bool, int, float, str, a tuple of ints as "1,2,3", or
    "none" for an optional field."""
    if hint is bool:
        return parse_bool
    if (value_type := optional_of(hint)) is not None:
        inner = flag_parser(value_type)
        return lambda text: None if text.lower() == "none" else inner(text)
    if typing.get_origin(hint) is tuple:
        return lambda text: tuple(int(v) for v in text.split(","))
    return hint


def metavar(hint: Any) -> str:
    """What --help shows a flag to take: N, X, TEXT, 0|1, N,N,..."""
    hint = optional_of(hint) or hint
    if typing.get_origin(hint) is tuple:
        return "N,N,..."
    return {bool: "0|1", int: "N", float: "X"}.get(hint, "TEXT")


def leaf_types(cls: type) -> dict[str, Any]:
    """Flag name -> the type of that leaf field."""
    return {leaf: typing.get_type_hints(functools.reduce(lambda c, name: typing.get_type_hints(c)[name], path[:-1],
                                                         cls))[leaf] for leaf, path in config_paths(cls).items()}


def setting_name(item: str) -> str:
    """The config field a "key=value" override names: "--slot-grad=x" and "slot_grad=x" -> "slot_grad"."""
    return item.partition("=")[0].strip().lstrip("-").replace("-", "_")


def parse_overrides(cls: type, items: list[str]) -> dict:
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


def set_config_value(cfg: Any, key: str, value: Any) -> None:
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


def make_config(cls: type[Config], *layers: dict) -> Config:
    """cls() with each layer of overrides applied in turn (defaults <- preset or checkpoint <- flags)."""
    cfg = cls()
    for layer in layers:
        for key, value in layer.items():
            set_config_value(cfg, key, value)
    return cfg


# Settings no preset used and that measured no better, removed from the flags: a checkpoint that stored one loads
# when its value is the one the code now always uses (docs/results.md has the measurements). None: a setting of
# the evaluation only, ignored at any value (num_recon: slotdiff.py now reconstructs every val image, as sa.py).
RETIRED = {"enc_stride": 1, "broadcast_size": 8, "full_res_layers": 1, "attn_from_level": 1, "num_recon": None}


def without_retired(cls: type, stored: dict, path: str | Path) -> dict:
    """stored (a checkpoint's config dict, nested configs as dicts) less the retired settings it may hold."""
    hints, kept = typing.get_type_hints(cls), {}
    for key, value in stored.items():
        if isinstance(value, dict) and key in hints:
            kept[key] = without_retired(hints[key], value, path)
        elif key in RETIRED and key not in hints:
            if RETIRED[key] is not None and value != RETIRED[key]:
                raise InputError(f"{path} was trained with {flag(key)} {value}, a setting this version no longer "
                                 f"has (it always uses {RETIRED[key]}); use the version that wrote it")
        else:
            kept[key] = value
    return kept


def config_from_checkpoint(cls: type[Config], stored: dict, path: str | Path) -> Config:
    """The config a checkpoint was trained with; a field this version does not know is a clear error."""
    try:
        return make_config(cls, without_retired(cls, stored, path))
    except KeyError as e:
        raise InputError(f"{path} was written by another version of this script (unknown setting {e}); retrain "
                         f"it, or use the version that wrote it") from None


def parse_command_line(cls: type[Config], presets: dict, argv: list[str], description: str, kind: str,
                       commands: tuple[str, ...] = ("train", "eval")) -> tuple[str, Config, argparse.Namespace]:
    """(command, config, args) for a training script: every config field is a flag (its comment is the help);
    --preset applies a named dict of overrides; --resume / --ckpt start from that checkpoint's config instead
    (a --preset beside them is ignored, and says so); explicit flags always win."""
    command = argv.pop(0) if argv and argv[0] in commands else commands[0]
    # a flag and its help on one line where they fit, so --help stays short
    p = argparse.ArgumentParser(description=description, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
        prog, max_help_position=36, width=120))
    p.add_argument("--preset", choices=sorted(presets), help="a named set of overrides (explicit flags still win)")
    p.add_argument("--resume", help="train: continue exactly from this checkpoint (its settings, model, optimiser, "
                                    "step and random state); auto: from --out's checkpoint if there is one, else "
                                    "start a new run (a command a cluster can requeue unchanged)")
    p.add_argument("--ckpt", help="eval: the checkpoint to evaluate")
    p.add_argument("--no-eval", action="store_true", help="train: skip the final evaluation")
    p.add_argument("--overwrite", action="store_true", help="train: replace the run already in --out")
    hints, comments, defaults = leaf_types(cls), field_comments(cls), cls()
    for leaf, path in config_paths(cls).items():
        default = functools.reduce(getattr, path, defaults)
        p.add_argument(flag(leaf), type=flag_parser(hints[leaf]), default=None,
                       metavar=metavar(hints[leaf]), help=f"{comments.get(leaf, '')} (default {default})".strip())
    args = p.parse_args(attach_negative_numbers(argv))
    args.auto_resume = args.resume == "auto"
    if args.auto_resume:
        args.resume = auto_resume(Path(args.out or presets.get(args.preset, {}).get("out") or cls().out))
    base, args.finished = {}, False
    source = args.resume or args.ckpt
    if source:
        state = load_checkpoint(source, kind=kind)
        base, args.finished = state["config"], state.get("finished", False)
        if args.preset:
            print(f"note: --preset {args.preset} is ignored: {source} continues with its own settings "
                  f"(explicit flags still apply)")
    elif args.preset:
        base = presets[args.preset]
    explicit = {leaf: getattr(args, leaf) for leaf in hints if getattr(args, leaf) is not None}
    cfg = config_from_checkpoint(cls, base, source) if source else make_config(cls, base)
    return command, with_overrides(cfg, explicit), args


def auto_resume(out: Path) -> str | None:
    """--resume auto: out's checkpoint when there is one, else None (a new run), said in one line."""
    ckpt = out / "ckpt.pt"
    if not ckpt.exists():
        print(f"--resume auto: no checkpoint in {out} yet; starting a new run")
        return None
    print(f"--resume auto: continuing {ckpt}")
    return str(ckpt)


def note_cpu_without_preset(cfg: Config, args: argparse.Namespace, presets: dict) -> None:
    """The defaults are the paper's scale, sized for a GPU: a user who starts them on a CPU (no --preset, and neither
    --steps nor --max-minutes to bound the run) learns it from one line now instead of from an ETA of days."""
    paper_length = cfg.steps == type(cfg)().steps and not cfg.max_minutes
    if args.preset or args.resume or not paper_length or "cpu" not in presets or pick_device(cfg.device).type != "cpu":
        return
    print(f"note: no --preset, so this trains the defaults, the paper's scale ({cfg.steps} steps), which is sized "
          f"for a GPU; on a CPU, --preset cpu is the setting chosen to learn within minutes (flags still apply)")


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
        note_cpu_without_preset(cfg, args, presets)
        if args.auto_resume and args.finished:   # a requeued job whose training had ended: evaluate, if asked
            print(f"--resume auto: {args.resume} is a finished run; nothing left to train")
            ckpt = Path(args.resume) if int(os.environ.get("RANK", "0")) == 0 else None
        else:
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


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of cfg with overrides (flag name -> value) applied."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        set_config_value(cfg, key, value)
    return cfg


def flag(name: str) -> str:
    """The command-line spelling of a config field: slot_dim -> --slot-dim."""
    return "--" + name.replace("_", "-")


def check_ranges(cfg: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
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


def check_unchanged(cfg: Any, stored: dict, what: str, path: str | Path) -> None:
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
