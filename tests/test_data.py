"""data.py: generator properties, loaders on tiny hand-made folders, batching, and bad-input errors."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import scenegen  # noqa: E402
from errors import InputError  # noqa: E402


# ---------------------------------------------------------------------------------------------- synthetic generator

def test_generator_is_deterministic_and_seeds_differ():
    image, mask = scenegen.render_scene(7, 64)
    again_image, again_mask = scenegen.render_scene(7, 64)
    other_image, _ = scenegen.render_scene(8, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and mask.shape == (64, 64) and mask.dtype == np.uint8
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    assert np.abs(image.astype(int) - other_image).mean() > 10


@pytest.mark.parametrize("style", scenegen.STYLES)
@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_mask_is_exactly_what_was_painted(resolution, style):
    for seed in range(8):
        image, mask, info = scenegen.render_scene(seed, resolution, style=style, return_albedo=True)
        n = len(info["colors"])
        assert set(np.unique(mask)) == set(range(n + 1))  # contiguous ids, nothing hidden left behind
        silhouettes = info["silhouettes"]
        assert np.array_equal(silhouettes.any(0), mask > 0)  # foreground = union of the objects' own silhouettes
        for k in range(1, n + 1):
            own = mask == k
            assert not (own & ~silhouettes[k - 1]).any()  # id k only where object k covers the pixel
            hidden = silhouettes[k - 1] & ~own
            assert (mask[hidden] > k).all()  # where k lost the pixel, a nearer object (painted later) won
            # every pixel labelled k got its base colour from object k's own two texture colours
            albedo = info["albedo"][own]
            matches = (albedo[:, None, :] == info["colors"][k - 1][None]).all(-1).any(-1)
            assert matches.all()
        background = info["albedo"][mask == 0]
        for colors in info["colors"]:
            assert not (background[:, None, :] == colors[None]).all(-1).any()


def test_object_counts_and_min_area():
    # The generator drops objects whose visible area is below a floor and tops the scene up again, so the number of
    # visible objects equals the sampled target; in 1000 checked seeds it never fell short. We assert the full range.
    counts = []
    for seed in range(120):
        mask = scenegen.render_scene(seed, 64)[1]
        counts.append(int(mask.max()))
        areas = np.bincount(mask.ravel())[1:]
        assert areas.min() >= max(6, int(0.0035 * 64 * 64))
    assert min(counts) >= 3 and max(counts) <= 10
    assert len(set(counts)) >= 6  # the count really varies over 3..10
    few = [int(scenegen.render_scene(s, 64, min_objects=1, max_objects=2)[1].max()) for s in range(20)]
    assert set(few) <= {1, 2}


def test_objects_stand_out_from_background():
    # objects are saturated, the floor/wall desaturated: mean saturation separates them in almost every scene
    def saturation(pixels):
        pixels = pixels.astype(float)
        return (pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1)
    wins = 0
    for seed in range(30):
        image, mask = scenegen.render_scene(seed, 64)
        wins += saturation(image[mask > 0]).mean() > saturation(image[mask == 0]).mean() + 0.1
    assert wins >= 27


def test_synthetic_cache_is_reused(tmp_path, monkeypatch):
    scenes = data.synthetic_scenes(5, 32, seed=3, cache_dir=str(tmp_path))
    assert len(scenes) == 5 and scenes.images.shape == (5, 32, 32, 3)
    image, mask = scenegen.render_scene(3 + 4, 32)  # scene i comes from seed + i
    assert np.array_equal(scenes.images[4], image) and np.array_equal(scenes.masks[4], mask)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of using the cache")
    monkeypatch.setattr(scenegen, "render_scene", fail)
    again = data.synthetic_scenes(5, 32, seed=3, cache_dir=str(tmp_path))
    assert isinstance(again.images, np.memmap) and np.array_equal(again.images, scenes.images)
    with pytest.raises(AssertionError):  # other settings -> other cache key -> renders
        data.synthetic_scenes(5, 32, seed=4, cache_dir=str(tmp_path))


def test_plain_style_is_flat_colours_on_a_plain_background_with_3_to_6_objects(tmp_path):
    scenes = data.load_split("synthetic-clevr", "train", 64, limit=60, cache_dir=str(tmp_path))
    counts = [int(m.max()) for m in scenes.masks]
    assert min(counts) == 3 and max(counts) == 6
    for seed in range(10):
        _, mask, info = scenegen.render_scene(seed, 64, min_objects=3, max_objects=6, style="clevr", return_albedo=True)
        for k in range(1, int(mask.max()) + 1):           # one base colour per object: no texture
            assert len(np.unique(info["albedo"][mask == k], axis=0)) == 1
        floor = info["albedo"][-8:][mask[-8:] == 0]       # the bottom rows are floor only
        assert len(np.unique(floor, axis=0)) == 1         # plain floor: one colour (shading and noise come later)
    textured = scenegen.render_scene(0, 64, return_albedo=True)[2]["albedo"][-8:]
    assert len(np.unique(textured.reshape(-1, 3), axis=0)) > 1


def test_synthetic_splits_do_not_overlap_and_styles_differ(tmp_path):
    train = data.load_split("synthetic-clevr", "train", 32, limit=3, cache_dir=str(tmp_path))
    val = data.load_split("synthetic-clevr", "val", 32, limit=3, cache_dir=str(tmp_path))
    textured = data.load_split("synthetic-clevrtex", "train", 32, limit=3, cache_dir=str(tmp_path))
    assert train.name == "synthetic-clevr-32-train" and textured.name == "synthetic-clevrtex-32-train"
    assert not any(np.array_equal(a, b) for a in train.images for b in val.images)
    assert not np.array_equal(np.asarray(train.images), np.asarray(textured.images))


def test_unknown_synthetic_name_lists_the_variants(tmp_path):
    with pytest.raises(InputError, match="synthetic-clevr, synthetic-clevrtex, synthetic-dsprites, "
                                         "synthetic-textured-shapes, synthetic-occluded"):
        data.load_split("synthetic", "train", 32, limit=3, cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ real-data loaders

OBJECT_COLORS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 255, 0)]  # ascending packed RGB = id order


def clevrtex_pair(index: int, n_objects: int = 3):
    """A 320x240 RGBA image whose pixels encode `index`, and an RGB colour mask with n_objects squares."""
    image = np.zeros((240, 320, 4), np.uint8)
    image[..., 0], image[..., 3] = index * 10, 255
    mask = np.zeros((240, 320, 3), np.uint8)
    for k in range(n_objects):
        mask[40 + 40 * k: 70 + 40 * k, 80 + 40 * k: 120 + 40 * k] = OBJECT_COLORS[k]
    mask[0:10, 0:10] = OBJECT_COLORS[3]  # outside the 192x192 centre crop: must disappear
    return Image.fromarray(image, "RGBA"), Image.fromarray(mask, "RGB")


def expected_crop_ids(n_objects: int = 3) -> np.ndarray:
    ids = np.zeros((240, 320), np.uint8)
    for k in range(n_objects):
        ids[40 + 40 * k: 70 + 40 * k, 80 + 40 * k: 120 + 40 * k] = k + 1
    return ids[24:216, 64:256]  # centre crop 192x192 of 320x240


def make_course(root, mask_name=lambda i: f"CLEVRTEX_full_{i:06d}.png", objects=lambda i: 3):
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(3):
            image, mask = clevrtex_pair(i, objects(i))
            image.save(root / "images" / split / f"CLEVRTEX_full_{i:06d}.png")
            mask.save(root / "masks" / split / mask_name(i))
    return root


def test_course_layout(tmp_path):
    root = make_course(tmp_path / "course")
    scenes = data.load_split(str(root), "train", 192, cache_dir=str(tmp_path / "cache"))
    assert scenes.images.shape == (3, 192, 192, 3) and scenes.masks.shape == (3, 192, 192)
    for i in range(3):
        assert np.array_equal(scenes.masks[i], expected_crop_ids())  # colours -> ids, black -> 0, crop exact
        assert (scenes.images[i][..., 0] == i * 10).all() and (scenes.images[i][..., 1:] == 0).all()
    small = data.load_split(str(root), "val", 32, limit=2, cache_dir=str(tmp_path / "cache"))
    assert small.images.shape == (2, 32, 32, 3) and set(np.unique(small.masks[0])) == {0, 1, 2, 3}
    with pytest.raises(InputError, match="test"):  # the course subset has no test split
        data.load_split(str(root), "test", 32, cache_dir=str(tmp_path / "cache"))


def test_course_masks_paired_by_number(tmp_path):
    root = make_course(tmp_path / "course", mask_name=lambda i: f"mask_{i:03d}.png")
    scenes = data.load_split(str(root), "train", 192, cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(scenes.masks[2], expected_crop_ids())


def test_course_sorted_order_fallback_warns(tmp_path):
    # masks named c, b, a for images 0, 1, 2: sorted order pairs image 0 with the mask made for image 2
    root = make_course(tmp_path / "course", mask_name=lambda i: "cba"[i] + ".png", objects=lambda i: i + 1)
    with pytest.warns(UserWarning, match="sorted order"):
        scenes = data.load_split(str(root), "train", 192, cache_dir=str(tmp_path / "cache"))
    assert [int(m.max()) for m in scenes.masks] == [3, 2, 1]


def test_official_layout_split_by_index(tmp_path):
    root = tmp_path / "clevrtex_full"
    for i in range(10):
        folder = root / str(i // 5)
        folder.mkdir(parents=True, exist_ok=True)
        image, mask = clevrtex_pair(i)
        image.convert("RGB").save(folder / f"CLEVRTEX_full_{i:06d}.png")
        palette_mask = Image.fromarray(np.asarray(mask).max(-1) // 255 * np.uint8(i % 3 + 1), "L").convert("P")
        palette_mask.save(folder / f"CLEVRTEX_full_{i:06d}_flat.png")
        Image.new("L", (320, 240)).save(folder / f"CLEVRTEX_full_{i:06d}_depth.png")  # other files are ignored
        (folder / f"CLEVRTEX_full_{i:06d}.json").write_text("{}")
    cache = str(tmp_path / "cache")
    indices = {split: [int(im[0, 0, 0]) // 10 for im in data.load_split(str(root), split, 32, cache_dir=cache).images]
               for split in ("train", "val", "test")}
    assert indices == {"test": [0], "val": [1], "train": list(range(2, 10))}
    test = data.load_split(str(root), "test", 192, cache_dir=cache)  # palette-index mask, object id 1 -> id 1
    assert np.array_equal(test.masks[0], (expected_crop_ids() > 0).astype(np.uint8))


def make_generic(root):
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
    # train: greyscale 40x30 images with integer-id masks using ids 0, 5, 9
    ids = np.zeros((30, 40), np.uint8)
    ids[5:15, 10:20], ids[20:28, 25:33] = 5, 9
    for name in ("a", "b"):
        ramp = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))
        Image.fromarray(ramp, "L").save(root / "train/images" / f"{name}.png")
        Image.fromarray(ids, "L").save(root / "train/masks" / f"{name}.png")
    # val: RGB jpg with a colour mask
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[5:15, 10:20], colour[20:28, 25:33] = (0, 0, 255), (255, 0, 0)
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(root / "val/images/c.jpg")
    Image.fromarray(colour).save(root / "val/masks/c.png")
    return root


def test_generic_layout_id_and_colour_masks(tmp_path):
    root = make_generic(tmp_path / "generic")
    cache = str(tmp_path / "cache")
    train = data.load_split(str(root), "train", 30, cache_dir=cache)
    expected = np.zeros((30, 40), np.uint8)
    expected[5:15, 10:20], expected[20:28, 25:33] = 1, 2  # ids 5, 9 relabelled to 1, 2
    assert np.array_equal(train.masks[0], expected[:, 5:35])  # centre crop to the largest square
    assert np.array_equal(train.images[0][..., 0], train.images[0][..., 2])  # greyscale -> RGB
    assert np.array_equal(train.images[0][0, :, 0], np.arange(5, 35) * 6)
    val = data.load_split(str(root), "val", 30, cache_dir=cache)
    colour_ids = np.zeros((30, 40), np.uint8)
    colour_ids[5:15, 10:20], colour_ids[20:28, 25:33] = 1, 2  # (0,0,255) < (255,0,0) in packed-RGB order
    assert np.array_equal(val.masks[0], colour_ids[:, 5:35])


def test_generic_masks_paired_by_number_when_names_differ(tmp_path):
    root = make_generic(tmp_path / "generic")
    for name, number in (("a", 7), ("b", 12)):   # images img_0007 / img_0012, masks mask_7 / mask_12
        (root / "train/images" / f"{name}.png").rename(root / "train/images" / f"img_{number:04d}.png")
    (root / "train/masks/a.png").rename(root / "train/masks/mask_7.png")
    Image.new("L", (40, 30)).save(root / "train/masks/b.png")   # an empty mask: must be paired with img_0012
    (root / "train/masks/b.png").rename(root / "train/masks/mask_12.png")
    train = data.load_split(str(root), "train", 30, cache_dir=str(tmp_path / "cache"))
    assert train.masks[0].max() == 2 and train.masks[1].max() == 0
    (root / "train/masks/mask_12.png").unlink()   # img_0012 now has no mask of either name
    with pytest.raises(InputError, match="img_0012"):
        data.load_split(str(root), "train", 30, cache_dir=str(tmp_path / "cache2"))


def test_a_train_split_without_masks_trains_on_images_alone(tmp_path, capsys):
    root = make_generic(tmp_path / "generic")
    for mask in (root / "train/masks").iterdir():
        mask.unlink()
    (root / "train/masks").rmdir()
    train = data.load_split(str(root), "train", 30, cache_dir=str(tmp_path / "cache"))
    assert len(train) == 2 and train.masks.shape == (2, 30, 30) and not train.masks.any()
    assert np.array_equal(train.images[0][0, :, 0], np.arange(5, 35) * 6)   # the images load as with masks
    assert "has no masks/ folder; training on its images alone" in capsys.readouterr().out
    (root / "val/masks/c.png").unlink()
    (root / "val/masks").rmdir()
    with pytest.raises(InputError, match="val split is scored against masks"):   # val/test are scored
        data.load_split(str(root), "val", 30, cache_dir=str(tmp_path / "cache"))


def test_generic_layout_reads_other_lossless_formats_and_16_bit_images_and_skips_hidden_files(tmp_path):
    root = make_generic(tmp_path / "generic")
    images, masks = root / "train/images", root / "train/masks"
    ramp = np.tile(np.arange(40, dtype=np.uint16) * 1000, (30, 1))           # 16-bit grey: 0 .. 39000
    Image.fromarray(ramp).save(images / "c.png")
    (masks / "a.png").rename(masks / "c.tif")                                  # a TIFF mask, not of "a" now
    Image.open(masks / "b.png").save(masks / "a.bmp")
    Image.open(images / "b.png").save(images / "d.webp", lossless=True)
    Image.open(masks / "b.png").save(masks / "d.png")
    (images / "._a.png").write_bytes(b"macOS resource fork, not an image")    # hidden: skipped, not "corrupt"
    train = data.load_split(str(root), "train", 30, cache_dir=str(tmp_path / "cache"))
    assert len(train) == 4 and all(m.max() == 2 for m in train.masks)
    assert np.array_equal(train.images[2][0, :, 0], (np.arange(5, 35) * 1000 / 257).round())   # scaled, not clipped
    assert np.array_equal(train.images[3], train.images[1])                   # webp (lossless) = the png
    (masks / "d.png").rename(masks / "d.jpg")
    with pytest.raises(InputError, match=r"d.jpg is a JPEG.*save the masks losslessly"):
        data.load_split(str(root), "train", 30, cache_dir=str(tmp_path / "cache2"))


def test_real_data_cache_skips_decoding(tmp_path, monkeypatch):
    root = make_generic(tmp_path / "generic")
    first = data.load_split(str(root), "train", 16, cache_dir=str(tmp_path / "cache"))

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")
    monkeypatch.setattr(data, "_load_pair", fail)
    again = data.load_split(str(root), "train", 16, cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(first.masks, again.masks)


# ------------------------------------------------------------------------------------------------------- bad input

def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        data.load_split(str(tmp_path / "nowhere"), "train", 32)
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="accepted dataset layouts") as info:
        data.load_split(str(tmp_path / "random"), "train", 32)
    assert str(tmp_path / "random") in str(info.value) and "CLEVRTEX_full" in str(info.value)


def test_corrupt_png_names_the_file(tmp_path):
    root = make_generic(tmp_path / "generic")
    (root / "train/images/b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InputError, match="b.png"):
        data.load_split(str(root), "train", 16, cache_dir=str(tmp_path / "cache"))


def test_mask_size_mismatch_names_the_file(tmp_path):
    root = make_generic(tmp_path / "generic")
    Image.new("L", (20, 20)).save(root / "train/masks/a.png")
    with pytest.raises(InputError, match=r"masks/a\.png"):
        data.load_split(str(root), "train", 16, cache_dir=str(tmp_path / "cache"))


def test_image_without_mask_empty_and_missing_split(tmp_path):
    root = make_generic(tmp_path / "generic")
    Image.new("RGB", (8, 8)).save(root / "train/images/z.png")
    with pytest.raises(InputError, match="z.png"):
        data.load_split(str(root), "train", 16, cache_dir=str(tmp_path / "cache"))
    for f in (root / "val/images").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="no images"):
        data.load_split(str(root), "val", 16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match="test"):
        data.load_split(str(root), "test", 16, cache_dir=str(tmp_path / "cache"))


def test_a_dataset_without_val_is_validated_on_its_test_split(tmp_path, capsys):
    root = make_generic(tmp_path / "generic")
    (root / "val").rename(root / "test")
    scenes = data.load_split(str(root), "val", 16, cache_dir=str(tmp_path / "cache"))
    assert len(scenes) == 1 and scenes.name.endswith(":test")
    assert "no val split; validating on its test split" in capsys.readouterr().out
    data.load_split(str(root), "val", 16, cache_dir=str(tmp_path / "cache"))
    assert "no val split" not in capsys.readouterr().out   # said once, not at every evaluation


def test_too_many_objects_is_an_error(tmp_path):
    root = make_generic(tmp_path / "generic")
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "val/masks/c.png")  # a photo, not an instance mask
    with pytest.raises(InputError, match="c.png"):
        data.load_split(str(root), "val", 30, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------- batches

def indexed_scenes(n: int) -> data.Scenes:
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], 4, 1).repeat(4, 2).repeat(3, 3)
    return data.Scenes(images, np.zeros((n, 4, 4), np.uint8), "indexed")


def batch_indices(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0] * 255).round().long().tolist()


def test_get_batch_determinism_types_and_epoch_coverage():
    scenes = indexed_scenes(10)
    images, masks = data.get_batch(scenes, step=3, batch_size=4, seed=1, device="cpu")
    assert images.dtype == torch.float32 and images.shape == (4, 3, 4, 4) and masks.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, data.get_batch(scenes, 3, 4, 1, "cpu")[0])
    stream = [i for step in range(15) for i in batch_indices(data.get_batch(scenes, step, 4, 1, "cpu")[0])]
    epochs = [stream[e * 10:(e + 1) * 10] for e in range(6)]  # 60 samples = 6 epochs, batches straddle epochs
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation per epoch
    other_seed = [i for step in range(3) for i in batch_indices(data.get_batch(scenes, step, 4, 2, "cpu")[0])]
    assert other_seed != stream[:12]


def test_get_batch_rank_slices_partition_the_global_batch():
    scenes = indexed_scenes(13)
    for step in range(5):
        ranks = [batch_indices(data.get_batch(scenes, step, 3, 0, "cpu", rank=r, world_size=2)[0]) for r in (0, 1)]
        whole = batch_indices(data.get_batch(scenes, step, 6, 0, "cpu")[0])
        assert ranks[0] + ranks[1] == whole


def test_iterate_batches_in_order():
    scenes = indexed_scenes(7)
    seen = [i for images, _ in data.iterate_batches(scenes, 3, "cpu") for i in batch_indices(images)]
    assert seen == list(range(7))


# -------------------------------------------------------------------------------------------------- visualisation

def test_colorize_and_save_grid(tmp_path):
    colors = data.colorize_masks(torch.arange(22).reshape(1, 2, 11))
    assert colors.shape == (1, 2, 11, 3) and colors.dtype == np.uint8
    assert tuple(colors[0, 0, 0]) == (40, 40, 40)  # background
    assert len({tuple(c) for c in colors.reshape(-1, 3)}) == 22  # all distinct
    images = np.zeros((6, 32, 32, 3), np.uint8)
    data.save_grid(images, str(tmp_path / "grid.png"), nrow=3, labels=["a", "b", "c"])
    width, height = Image.open(tmp_path / "grid.png").size
    assert width >= 3 * 96 and height >= 2 * 96  # small images are upscaled to >= 96 px
    with pytest.raises(InputError, match="labels"):
        data.save_grid(images, str(tmp_path / "bad.png"), nrow=3, labels=["only one", "x", "y", "z"])


def test_uint8_pictures_round_trip_in_the_model_range():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 1.7]).view(1, 3, 1, 2)   # NCHW, one value out of range
    pictures = data.to_uint8(images)
    assert pictures.shape == (1, 1, 2, 3) and pictures.dtype == np.uint8
    back = data.from_uint8(pictures)                                              # NHWC floats in [-1, 1]
    assert back.shape == (1, 1, 2, 3) and back.dtype == torch.float32
    expected = images.clamp(-1, 1).permute(0, 2, 3, 1)
    assert (back - expected).abs().max() <= 0.5 / 127.5 + 1e-6                    # within half a grey level
    assert back.min() == -1 and back.max() == 1                                   # the ends are exact


def test_cli_preview_and_error_exit(tmp_path, capsys):
    out = tmp_path / "preview.png"
    data.main(["--preview", str(out), "--resolution", "32", "--n", "4", "--cache-dir", str(tmp_path / "cache")])
    assert out.exists() and "objects per scene" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--data", str(tmp_path / "missing"), "--preview", str(out)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: dataset path")


def test_two_process_generation_matches_serial(tmp_path):
    scenes = data.synthetic_scenes(256, 32, seed=11, cache_dir=str(tmp_path))  # >= 256 scenes: two processes
    for i in (0, 77, 255):
        image, mask = scenegen.render_scene(11 + i, 32)
        assert np.array_equal(scenes.images[i], image) and np.array_equal(scenes.masks[i], mask)


@pytest.mark.parametrize("style", list(scenegen.SHAPE_STYLES))
def test_2d_shape_scenes_are_deterministic_and_keep_their_object_counts(style, tmp_path):
    image, mask = scenegen.render_shapes(3, 64, style=style)
    again_image, again_mask = scenegen.render_shapes(3, 64, style=style)
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    assert not np.array_equal(image, scenegen.render_shapes(4, 64, style=style)[0])
    limits = data.SYNTHETIC[f"synthetic-{style}"]
    scenes = data.load_split(f"synthetic-{style}", "val", 32, 24, cache_dir=str(tmp_path))
    for mask in scenes.masks:   # ids contiguous 1..n, each object at least a few pixels
        ids = np.unique(mask)
        assert list(ids) == list(range(len(ids))) and limits["min_objects"] <= len(ids) - 1 <= limits["max_objects"]
        assert np.bincount(mask.ravel())[1:].min() >= 6


@pytest.mark.parametrize("style", ["dsprites", "occluded"])
def test_flat_2d_shape_masks_are_exactly_the_regions_painted(style):
    """Flat colours plus pixel noise: every pixel is nearest to the mean colour of its own mask region, so the mask
    and the picture agree pixel for pixel (occluded parts included)."""
    for seed in range(12):
        image, mask = scenegen.render_shapes(seed, 64, style=style)
        ids = np.unique(mask)
        means = np.stack([image[mask == k].mean(0) for k in ids])
        nearest = ids[np.linalg.norm(image[:, :, None].astype(float) - means, axis=-1).argmin(-1)]
        assert np.array_equal(nearest, mask), seed


def test_head_keeps_the_first_scenes_with_their_masks():
    scenes = data.Scenes(np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3),
                         np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2), "five")
    first = scenes.head(3)
    assert len(first) == 3 and first.name == "five"
    assert np.array_equal(first.images, scenes.images[:3]) and np.array_equal(first.masks, scenes.masks[:3])
    assert len(scenes.head(9)) == 5   # fewer scenes than asked: all of them
