"""Datasets for object-centric learning: an embedded CLEVR-like scene generator and CLEVRTex/folder loaders.

Everything ends up as `Scenes`: uint8 images (N,H,W,3) and uint8 instance masks (N,H,W) with 0 = background and
ids 1..n contiguous per image. Training code only needs `load_split` and `get_batch`.

    python data.py --preview out/preview.png [--data synthetic|PATH] [--split train] [--resolution 64] [--n 16]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from errors import InputError
from scenegen import GENERATOR_VERSION, hsv_to_rgb, render


@dataclass
class Scenes:
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8; 0 = background, 1..n objects (ids contiguous per image)
    name: str

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "Scenes":
        """The first n scenes (all of them when there are fewer)."""
        return Scenes(self.images[:n], self.masks[:n], self.name)

    @functools.cached_property
    def content_hash(self) -> str:
        """A short hash of the pixels: what caches derived from them (a VAE, its latents) are keyed by, so that a
        dataset folder edited in place never gets a stale one. Computed once per split (seconds for a few GB)."""
        return hashlib.sha1(np.ascontiguousarray(self.images).data).hexdigest()[:16]



def _run_chunks(make_pair, jobs: list, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Apply make_pair(*job) -> (image, mask) to every job, in order, with a progress bar; two processes for big
    jobs (results do not depend on the process: every scene has its own seed or file)."""
    chunks = [(make_pair, jobs[i:i + 64]) for i in range(0, len(jobs), 64)]
    parallel = len(jobs) >= 256 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods()
    images, masks = [], []
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=len(jobs) < 64) as bar:
        with multiprocessing.get_context("fork").Pool(2) if parallel else contextlib.nullcontext() as pool:
            for image_chunk, mask_chunk in (pool.imap if parallel else map)(_run_chunk, chunks):
                images.append(image_chunk), masks.append(mask_chunk), bar.update(len(image_chunk))
    return np.concatenate(images), np.concatenate(masks)


def _run_chunk(chunk: tuple) -> tuple[np.ndarray, np.ndarray]:
    make_pair, jobs = chunk
    pairs = [make_pair(*job) for job in jobs]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _atomic_save(folder: Path, **arrays: np.ndarray) -> None:
    """Write arrays into a temp folder next to `folder`, then rename: readers never see half a cache."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as e:
        raise InputError(f"cannot write the data cache in {folder.parent} ({e.strerror}); make it writable") from None
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
    except OSError as e:  # a full disk: leave no half-written cache behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"could not write the data cache {folder} ({e.strerror}); free disk space and run "
                         f"again") from None
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: Path, name: str) -> Scenes | None:
    if not (folder / "masks.npy").exists():
        return None
    return Scenes(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"), name)


def synthetic_scenes(n: int, resolution: int, seed: int, cache_dir: str = ".cache", min_objects: int = 3,
                     max_objects: int = 10, style: str = "clevrtex") -> Scenes:
    """n scenes, scene i rendered from seed `seed + i`; cached on disk under a hash of all generator settings."""
    if n < 1 or resolution < 16:
        raise InputError(f"need n >= 1 and resolution >= 16, got n={n}, resolution={resolution}")
    settings = dict(version=GENERATOR_VERSION, n=n, resolution=resolution, seed=seed, min_objects=min_objects,
                    max_objects=max_objects, style=style)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "synthetic" / key
    name = f"synthetic-{style}-{resolution}-seed{seed}-n{n}"
    if (cached := _load_cached(folder, name)) is not None:
        return cached
    jobs = [(seed + i, resolution, min_objects, max_objects, style) for i in range(n)]
    images, masks = _run_chunks(render, jobs, f"rendering {name}")
    _atomic_save(folder, images=images, masks=masks)
    return _load_cached(folder, name)


# ----------------------------------------------------------------------------------------------------------------
# Real datasets on disk. Three layouts are auto-detected; all are centre-cropped and resized to a square resolution.

LAYOUTS_HELP = """accepted dataset layouts:
  course CLEVRTex subset:   ROOT/images/{train,val}/CLEVRTEX_full_000123.png   (RGBA or RGB)
                            ROOT/masks/{train,val}/<same name or number>.png    (colour per object, black = background)
  official CLEVRTex:        ROOT/<k>/CLEVRTEX_<variant>_000123.png  + ROOT/<k>/CLEVRTEX_<variant>_000123_flat.png
                            (split by index: test 0-10%, val 10-20%, train 20-100%)
  generic folder:           ROOT/{train,val,test}/images/<name>.png|.jpg|.bmp|.webp|.tif
                            ROOT/{train,val,test}/masks/<same name or number>.png|.bmp|.tif  (ids, 0 = background;
                                                                 or colours; train may have none: give --slots)
or pass --data synthetic-clevr or --data synthetic-clevrtex for the built-in generator"""
LOADER_VERSION = 3  # bump whenever the decoded arrays or the image-mask pairing change
CLEVRTEX_CROP = 192  # SlotDiffusion's CLEVRTex preprocessing: centre crop 192x192 of the 320x240 render, then resize
SPLITS = ("train", "val", "test")
SYNTHETIC_SPLITS = {"train": (0, 5000), "val": (10_000_000, 500), "test": (20_000_000, 500)}  # seed base, default n
# --data names of the embedded generator: its style and object counts
SYNTHETIC = {"synthetic-clevr": dict(style="clevr", min_objects=3, max_objects=6),
             "synthetic-clevrtex": dict(style="clevrtex", min_objects=3, max_objects=10),
             "synthetic-dsprites": dict(style="dsprites", min_objects=2, max_objects=5),
             "synthetic-textured-shapes": dict(style="textured-shapes", min_objects=2, max_objects=5),
             "synthetic-occluded": dict(style="occluded", min_objects=2, max_objects=4)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")   # lossless only: JPEG would blur the ids at every edge
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")


def _number(stem: str) -> str | None:
    digits = re.findall(r"\d+", stem)
    return str(int(digits[-1])) if digits else None


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The folder's files with these suffixes, by name; hidden ones (macOS's ._name.png copies) are not data."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))


def _pair_by_name(images: list[Path], masks: list[Path]) -> tuple[list[tuple[Path, Path]], Path | None]:
    """Each image with the mask of the same file name (any extension), else with the one mask whose name has the
    same number (img_0012.jpg / mask_12.png): the pairs, and the first image left without a mask of its own (None
    when every image has one)."""
    by_stem = {p.stem: p for p in masks}
    numbers = Counter(_number(p.stem) for p in masks)
    by_number = {n: p for p in masks if (n := _number(p.stem)) is not None and numbers[n] == 1}
    pairs, used = [], set()
    for image in images:
        mask = by_stem.get(image.stem) or by_number.get(_number(image.stem))
        if mask is None or mask in used:
            return pairs, image
        used.add(mask)
        pairs.append((image, mask))
    return pairs, None


def _pair_course(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    images, masks = _files(image_dir, IMAGE_SUFFIXES), _files(mask_dir, MASK_SUFFIXES)
    pairs, unmatched = _pair_by_name(images, masks)
    if unmatched is None:
        return pairs
    if len(images) != len(masks):
        raise InputError(f"{image_dir} has {len(images)} images but {mask_dir} has {len(masks)} masks and their "
                         f"names do not match; give every image a mask with the same file name")
    warnings.warn(f"mask names in {mask_dir} do not match image names in {image_dir}; pairing them in sorted order "
                  f"(rename the masks to the image names to be safe)", stacklevel=3)
    return list(zip(images, masks))


def _pairs_official(root: Path, split: str) -> list[tuple[Path, Path]]:
    images = [p for p in root.glob("*/CLEVRTEX_*.png") if re.fullmatch(r"CLEVRTEX_.+_\d+", p.stem)]
    images.sort(key=lambda p: int(_number(p.stem)))
    n = len(images)
    lo, hi = {"test": (0, n // 10), "val": (n // 10, n // 5), "train": (n // 5, n)}[split]
    pairs = []
    for image in images[lo:hi]:
        mask = image.with_name(image.stem + "_flat.png")
        if not mask.exists():
            raise InputError(f"image {image} has no mask {mask.name}; restore the official *_flat.png masks")
        pairs.append((image, mask))
    return pairs


def _pairs_generic(split_dir: Path) -> list[tuple[Path, Path | None]]:
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    images = _files(image_dir, IMAGE_SUFFIXES)
    if not mask_dir.is_dir():
        if split_dir.name != "train":
            raise InputError(f"{split_dir} has images/ but no masks/ folder; the {split_dir.name} split is scored "
                             f"against masks: add {mask_dir} with one mask per image")
        # training needs no masks (it is unsupervised): each image gets an empty one
        _note_once(f"note: {split_dir} has no masks/ folder; training on its images alone")
        return [(image, None) for image in images]
    masks = _files(mask_dir, MASK_SUFFIXES)
    pairs, unmatched = _pair_by_name(images, masks)
    if unmatched is not None:
        if jpegs := _files(mask_dir, (".jpg", ".jpeg")):
            raise InputError(f"mask {jpegs[0]} is a JPEG, whose compression blurs the object ids at every edge; "
                             f"save the masks losslessly, as .png (or .bmp, .tif)")
        raise InputError(f"image {unmatched} has no mask {mask_dir / (unmatched.stem + '.png')}; add it (same file "
                         f"name, .png)")
    return pairs


def _find_pairs(root: Path, split: str) -> tuple[str, list[tuple[Path, Path]]]:
    if not root.exists():
        raise InputError(f"dataset path {root} does not exist; pass --data synthetic or an existing folder\n"
                         + LAYOUTS_HELP)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use train, val or test")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise InputError(f"split folder {folder} does not exist (course CLEVRTex layout); "
                                 f"use one of: {sorted(p.name for p in (root / 'images').iterdir() if p.is_dir())}")
        return "course", _pair_course(image_dir, mask_dir)
    if next(root.glob("*/CLEVRTEX_*_flat.png"), None) is not None:
        return "official", _pairs_official(root, split)
    if any((root / s / "images").is_dir() for s in SPLITS):
        if not (root / split / "images").is_dir():
            raise InputError(f"split folder {root / split / 'images'} does not exist (generic layout); "
                             f"create it or choose another split")
        return "generic", _pairs_generic(root / split)
    raise InputError(f"{root} matches no known dataset layout\n" + LAYOUTS_HELP)


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise InputError(f"cannot read image file {path} ({type(e).__name__}: {e}); replace or delete it") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale (microscopy, depth-like renders) scaled to 8 bits, which convert("RGB") would
    clip to white above 255."""
    if image.mode in SIXTEEN_BIT_GREY:
        image = Image.fromarray((np.asarray(image, np.float64) / 257).round().clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _crop_box(width: int, height: int, crop: int | None) -> tuple[int, int, int, int]:
    side = min(width, height) if crop is None else min(crop, width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _mask_to_ids(mask: Image.Image, path: Path) -> np.ndarray:
    """Any mask image -> contiguous ids 0..n (0 = background: value 0 or black)."""
    if mask.mode in ("RGB", "RGBA"):
        rgb = np.asarray(mask.convert("RGB"), np.int64)
        values = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    elif mask.mode in ("L", "P", *SIXTEEN_BIT_GREY):  # integer ids (for P: the palette index is the id)
        values = np.asarray(mask).astype(np.int64)
    else:  # e.g. LA or 1-bit
        values = np.asarray(mask.convert("L")).astype(np.int64)
    uniques, ids = np.unique(values, return_inverse=True)
    ids = ids.reshape(values.shape) + (0 if uniques[0] == 0 else 1)  # black/0 sorts first and becomes background
    if ids.max() > 255:
        raise InputError(f"mask {path} has {ids.max()} distinct objects (> 255 is not supported); "
                         f"check it is an instance mask, not a photo or a JPEG-compressed mask")
    return ids.astype(np.uint8)


def _load_pair(image_path: Path, mask_path: Path | None, resolution: int, crop: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    image = _open(image_path)
    mask = Image.new("L", image.size) if mask_path is None else _open(mask_path)   # None: all background
    if image.size != mask.size:
        raise InputError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but image {image_path} is "
                         f"{image.size[0]}x{image.size[1]}; masks must have the size of their image")
    box = _crop_box(*image.size, crop)
    image = _to_rgb(image).crop(box).resize((resolution, resolution), Image.BILINEAR)
    # nearest keeps ids (and palette indices of mode-P masks) exact; ids are numbered after the crop so that objects
    # cut away by it leave no gaps
    mask = mask.crop(box).resize((resolution, resolution), Image.NEAREST)
    return np.asarray(image), _mask_to_ids(mask, mask_path)


def _load_folder(root: Path, split: str, resolution: int, limit: int | None, cache_dir: str) -> Scenes:
    layout, pairs = _find_pairs(root, split)
    if not pairs:
        raise InputError(f"split {split!r} of {root} ({layout} layout) contains no images; add images or pick "
                         f"another split")
    pairs = pairs[:limit] if limit else pairs
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for pair in pairs for p in pair if p is not None]
    key_data = dict(version=LOADER_VERSION, root=str(root.resolve()), split=split, resolution=resolution,
                    limit=limit, files=len(stats), bytes=sum(s for s, _ in stats), mtime=max(m for _, m in stats))
    key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    folder, name = Path(cache_dir) / "real" / key, f"{root}:{split}"
    if (cached := _load_cached(folder, name)) is not None:
        return cached
    crop = None if layout == "generic" else CLEVRTEX_CROP
    images, masks = _run_chunks(_load_pair, [(*pair, resolution, crop) for pair in pairs], f"decoding {name}")
    _atomic_save(folder, images=images, masks=masks)
    return _load_cached(folder, name)


def check_source(data: str) -> None:
    """Fail fast, before any output is written, on a --data that is neither a generator name nor a dataset folder
    of a known layout with a train split."""
    if data not in SYNTHETIC:
        _check_not_a_misspelt_generator(data)
        _find_pairs(Path(data), "train")


def _check_not_a_misspelt_generator(data: str) -> None:
    if data.startswith("synthetic") and not Path(data).exists():
        raise InputError(f"--data {data}: the embedded generator's scenes are {', '.join(SYNTHETIC)}")


def load_split(data: str, split: str, resolution: int, limit: int | None = None, cache_dir: str = ".cache") -> Scenes:
    """data = a name in SYNTHETIC (the embedded generator) or a dataset folder (layout auto-detected);
    split in train/val/test."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (or None for everything), got {limit}")
    if data in SYNTHETIC:
        if split not in SYNTHETIC_SPLITS:
            raise InputError(f"unknown split {split!r}; use train, val or test")
        seed, default_n = SYNTHETIC_SPLITS[split]
        n = limit or default_n
        if n > 10_000_000:
            raise InputError(f"limit {n} is too large: split seeds are 10,000,000 apart; use a smaller --limit")
        scenes = synthetic_scenes(n, resolution, seed, cache_dir, **SYNTHETIC[data])
        scenes.name = f"{data}-{resolution}-{split}"
        return scenes
    _check_not_a_misspelt_generator(data)
    root = Path(data)
    if split == "val" and not _has_split_folder(root, "val") and _has_split_folder(root, "test"):
        _note_once(f"note: {root} has no val split; validating on its test split")   # many ship train/test only
        split = "test"
    return _load_folder(root, split, resolution, limit, cache_dir)


@functools.cache
def _note_once(text: str) -> None:
    """Print a note the first time only: training, its evaluations and the final evaluation each load the split."""
    print(text)


def _has_split_folder(root: Path, split: str) -> bool:
    """Whether the split exists at all (generic or course layout; the official layout splits by index)."""
    return (root / split / "images").is_dir() or (root / "images" / split).is_dir()


# ----------------------------------------------------------------------------------------------------------------
# Batches: uint8 stays in (mapped) host memory; conversion to float happens on the target device.

def _to_device(scenes: Scenes, index: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.asarray(scenes.images[index])).to(device, non_blocking=True)  # fancy index = copy
    masks = torch.from_numpy(np.asarray(scenes.masks[index])).to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).contiguous().float().div_(255), masks.long()


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Scene indices of batch `step` of an endless stream of shuffled epochs; a pure function of (seed, step),
    so resuming needs no sampler state, and other per-scene arrays (e.g. cached latents) can be indexed alike.

    Sample k of the global stream is permutation(seed, epoch=k // n)[k % n]; rank r takes the r-th slice of the
    global batch, so ranks never overlap and each epoch visits every scene exactly once."""
    first = (step * world_size + rank) * batch_size
    positions = np.arange(first, first + batch_size)
    epochs = positions // n
    index = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        index[epochs == epoch] = perm[positions[epochs == epoch] % n]
    return index


def get_batch(scenes: Scenes, step: int, batch_size: int, seed: int, device: torch.device | str, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` (see batch_indices): images float (B,3,H,W) in [0,1] and masks int64 (B,H,W) on device."""
    return _to_device(scenes, batch_indices(len(scenes), step, batch_size, seed, rank, world_size), device)


def iterate_batches(scenes: Scenes, batch_size: int, device: torch.device | str
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All scenes in order (last batch may be smaller), for evaluation."""
    for start in range(0, len(scenes), batch_size):
        yield _to_device(scenes, np.arange(start, min(start + batch_size, len(scenes))), device)


# ----------------------------------------------------------------------------------------------------------------
# Visualisation

def _make_palette() -> np.ndarray:
    fixed = [(40, 40, 40), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
             (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
             (255, 215, 180), (0, 0, 128), (128, 128, 128), (255, 255, 255)]
    rest = hsv_to_rgb((np.arange(256 - len(fixed)) * 0.618034) % 1, np.full(256 - len(fixed), 0.75),
                       0.6 + 0.4 * (np.arange(256 - len(fixed)) % 3) / 2)
    return np.concatenate([np.array(fixed, np.uint8), (rest * 255).astype(np.uint8)])


PALETTE = _make_palette()  # id 0 (background) is dark grey, then 21 hand-picked distinct colours


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) model output in [-1, 1] -> (B, H, W, 3) uint8 pictures (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(pictures: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 pictures -> float tensor in [-1, 1], channels last: to_uint8's pictures compared in the
    model's range (reconstruction MSE)."""
    return torch.from_numpy(np.asarray(pictures, dtype=np.float32)) / 127.5 - 1   # a copy: cached splits are read-only


def colorize_masks(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """(..., H, W) integer ids -> (..., H, W, 3) uint8 colours from a fixed palette."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    return PALETTE[np.asarray(masks).astype(np.int64) % len(PALETTE)]


def save_grid(images: np.ndarray, path: str, nrow: int, labels: list[str] | None = None) -> None:
    """(N,H,W,3) uint8 -> PNG grid with nrow images per row. Small images are upscaled (nearest) to >= 96 px.
    labels: one per column (len == nrow, drawn on top) or one per row (drawn on the left)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    ncol, rows = nrow, -(-n // nrow)
    scale = max(1, 96 // h)
    h, w = h * scale, w * scale
    column_labels = labels if labels is not None and len(labels) == ncol else None
    row_labels = labels if labels is not None and column_labels is None and len(labels) == rows else None
    if labels is not None and column_labels is None and row_labels is None:
        raise InputError(f"save_grid got {len(labels)} labels for {ncol} columns and {rows} rows; give one per "
                         f"column or one per row")
    font = ImageFont.load_default(size=12)
    gap, top = 2, (16 if column_labels else 0)
    left = 8 + 7 * max(map(len, row_labels)) if row_labels else 0
    canvas = Image.new("RGB", (left + ncol * (w + gap) + gap, top + rows * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        tile = Image.fromarray(image).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (left + gap + (i % ncol) * (w + gap), top + gap + (i // ncol) * (h + gap)))
    for c, text in enumerate(column_labels or []):
        draw.text((left + gap + c * (w + gap) + 2, 2), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + gap + r * (h + gap) + h // 2 - 6), text, fill=(0, 0, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load or generate a dataset split, print stats, save a preview.")
    parser.add_argument("--preview", default="out/preview.png", help="where to write the preview grid")
    parser.add_argument("--data", default="synthetic-clevr", help=f"{' or '.join(SYNTHETIC)} or a dataset folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--n", type=int, default=16, help="scenes to preview (synthetic: scenes to generate)")
    parser.add_argument("--limit", type=int, default=None, help="real data: load at most this many scenes")
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args(argv)
    try:
        if args.n < 1:
            raise InputError(f"--n must be >= 1, got {args.n}")
        if args.data in SYNTHETIC:
            seed = SYNTHETIC_SPLITS.get(args.split, (0, 0))[0]
            start = time.perf_counter()
            for i in range(min(args.n, 32)):  # uncached timing on this process's single core
                render(seed + i, args.resolution, **SYNTHETIC[args.data])
            speed = min(args.n, 32) / (time.perf_counter() - start)
            print(f"generator speed: {speed:.0f} images/s at {args.resolution}x{args.resolution} "
                  f"(one process, wall clock)")
        scenes = load_split(args.data, args.split, args.resolution, args.n if args.data in SYNTHETIC else
                            args.limit, args.cache_dir)
        counts = np.array([int(m.max()) for m in scenes.masks])
        print(f"{scenes.name}: {len(scenes)} scenes at {args.resolution}x{args.resolution}; objects per scene "
              f"mean {counts.mean():.2f} min {counts.min()} max {counts.max()}; cache under {args.cache_dir}/")
        shown = min(args.n, len(scenes))
        per_row = min(8, shown)
        rows = []
        for start in range(0, shown, per_row):  # row pairs: images, then their masks
            chunk = np.arange(start, min(start + per_row, shown))
            pad = np.zeros((per_row - len(chunk), args.resolution, args.resolution, 3), np.uint8)
            rows += [np.concatenate([scenes.images[chunk], pad]), np.concatenate([colorize_masks(scenes.masks[chunk]),
                                                                                  pad])]
        save_grid(np.concatenate(rows), args.preview, per_row, ["image", "mask"] * (len(rows) // 2))
        print(f"wrote {args.preview}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
