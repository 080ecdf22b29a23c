"""bench/bench_learning.py: a few seconds of two variants write curves, a picture and loadable checkpoints, which
bench_boundary.py and bench_recon_spread.py read;
Ctrl-C keeps what was measured; bad variants are one clear line."""
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import cli
import metrics
import trainlib
import vae

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "compile=0", "amp=0", "num_train=32", "num_val=8", "batch_size=4", "slot_dim=16",
        "slot_mlp_hidden=16", "enc_channels=8", "dec_channels=8", "--val-images", "8", "--slice", "0.2"]


def bench(tmp_path, *args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_learning.py"), *args, *TINY,
                           "--out", str(tmp_path / "curves.json")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_two_variants_write_curves_picture_and_checkpoints(tmp_path):
    run = bench(tmp_path, "--variants", "cpu", "implicit: slot_grad=implicit ema_decay=0.9", "--minutes", "0.03",
                "--eval-minutes", "0.01")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "curves.json").read_text())
    assert set(result["variants"]) == {"cpu", "implicit"}
    averaged = trainlib.load_checkpoint(tmp_path / "curves-implicit" / "ckpt.pt")   # scored with the average
    assert averaged["ema"]["updates"] == result["variants"]["implicit"]["steps"]
    for name, variant in result["variants"].items():
        minutes = [p["minutes"] for p in variant["curve"]]
        assert minutes and minutes == sorted(minutes) and minutes[-1] >= 0.03 - 1e-6   # ends at the budget
        assert all(-1 <= p["fg_ari"] <= 1 for p in variant["curve"])
        assert variant["curve"][0]["step"] == 0 and all(p["step"] > 0 for p in variant["curve"][1:])  # from 0
        state = trainlib.load_checkpoint(tmp_path / f"curves-{name}" / "ckpt.pt")
        assert state["step"] == variant["steps"] and state["config"] == variant["config"]
    assert result["variants"]["implicit"]["config"]["encoder"]["slot_grad"] == "implicit"
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "| cpu |" in run.stdout and "| implicit |" in run.stdout
    edges = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_boundary.py"), "--ckpt",
                            str(tmp_path / "curves-cpu" / "ckpt.pt")], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert edges.returncode == 0, edges.stderr
    assert "decoder masks:" in edges.stdout and "attention masks:" in edges.stdout   # Slot Attention: both readouts
    readouts = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_readouts.py"), "--ckpt",
                               str(tmp_path / "curves-cpu" / "ckpt.pt"), "--val-images", "8"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert readouts.returncode == 0, readouts.stderr
    assert all(f"| {name} |" in readouts.stdout for name in ("decoder masks", "posterior", "colour k-means"))


def test_a_suite_trains_each_variant_on_each_dataset_and_names_the_worst(tmp_path):
    run = bench(tmp_path, "--data", "synthetic-dsprites", "synthetic-occluded", "--variants", "cpu",
                "implicit: slot_grad=implicit", "--minutes", "0.02", "--eval-minutes", "0.01")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "curves.json").read_text())
    assert result["data"] == ["synthetic-dsprites", "synthetic-occluded"]
    assert set(result["variants"]) == {f"{v} on {d}" for v in ("cpu", "implicit")
                                       for d in ("synthetic-dsprites", "synthetic-occluded")}
    for name, variant in result["variants"].items():
        assert variant["config"]["data"] == variant["data"] and name.endswith(variant["data"])
    for variant, entry in result["summary"].items():
        finals = {d: result["variants"][f"{variant} on {d}"]["curve"][-1]["fg_ari"] for d in result["data"]}
        assert {d: s["final"] for d, s in entry["datasets"].items()} == finals
        assert entry["worst_final"] == min(finals.values()) and finals[entry["worst"]] == entry["worst_final"]
        assert entry["largest_drop"] >= 0
    assert "| worst (final) |" in run.stdout and "| implicit | " in run.stdout
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_scored_average_is_the_one_sa_ema_decay_keeps(tmp_path):
    # learned slot queries draw no random numbers, so both variants take the same steps: the 0.9 average scored
    # beside the trained weights of `plain` must score what the `ema` variant, which keeps it as sa.py does, scores
    run = bench(tmp_path, "--data", "synthetic-dsprites", "synthetic-occluded", "--variants", "plain: ema_decay=0",
                "ema: ema_decay=0.9", "--score-averages", "0.9", "--minutes", "5", "--eval-minutes", "5",
                "--set", "steps=6")   # added to TINY's --set
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "curves.json").read_text())
    for data in result["data"]:
        plain, kept = (result["variants"][f"{v} on {data}"]["curve"][-1] for v in ("plain", "ema"))
        assert plain["step"] == kept["step"] == 6
        assert plain["fg_ari_ema0.9"] == kept["fg_ari"] and plain["val_loss_ema0.9"] == kept["val_loss"]
        assert plain["val_loss_ema0.9"] != plain["val_loss"]   # an average, not the trained weights scored twice
    averaged = result["summary"]["plain + EMA 0.9"]["datasets"]
    assert {d: s["final"] for d, s in averaged.items()} == {d: s["final"] for d, s in
                                                            result["summary"]["ema"]["datasets"].items()}
    assert "| plain + EMA 0.9 |" in run.stdout


def test_suite_expands_to_every_embedded_family():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_learning import datasets
    from data import SYNTHETIC
    assert datasets(["suite"]) == list(SYNTHETIC)
    assert datasets(["synthetic-clevr", "suite"]) == list(SYNTHETIC)   # each once, in order


def test_slotdiff_from_scratch_and_warm_started_from_slot_attention(tmp_path):
    """A SlotDiffusion variant, and one that trains Slot Attention first and hands its encoder over: both write
    curves (the warm one's Slot Attention points first) and slotdiff.py checkpoints."""
    vae_cfg = cli.make_config(vae.TrainConfig, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16))
    torch.save(dict(kind="vae", model=vae.VQVAE(vae_cfg.model).state_dict(), config=asdict(vae_cfg)),
               tmp_path / "vae.pt")
    unet = f"model=slotdiff vae={tmp_path / 'vae.pt'} base_channels=16 channel_mult=1,2 num_res_blocks=1 head_dim=8"
    run = bench(tmp_path, "--variants", f"sd: {unet}", f"warm: {unet} warm_minutes=0.02", "--minutes", "0.05",
                "--eval-minutes", "0.01")
    assert run.returncode == 0, run.stderr
    variants = json.loads((tmp_path / "curves.json").read_text())["variants"]
    assert {p["model"] for p in variants["sd"]["curve"]} == {"slotdiff"}
    models = [p["model"] for p in variants["warm"]["curve"]]
    assert models[0] == "sa" and models[-1] == "slotdiff" and models == sorted(models)   # sa points, then slotdiff
    for name in ("sd", "warm"):
        state = trainlib.load_checkpoint(tmp_path / f"curves-{name}" / "ckpt.pt", kind="slotdiff")
        assert state["config"]["unet"]["base_channels"] == 16
    edges = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_boundary.py"), "--ckpt",
                            str(tmp_path / "curves-sd" / "ckpt.pt")], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert edges.returncode == 0, edges.stderr
    assert "attention masks:" in edges.stdout and "decoder" not in edges.stdout   # SlotDiffusion has no decoder masks
    spread = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_recon_spread.py"), "--ckpt",
                             str(tmp_path / "curves-sd" / "ckpt.pt"), "--scenes", "4", "--seeds", "3",
                             "--sample-steps", "10"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert spread.returncode == 0, spread.stderr
    parts = json.loads(spread.stdout)
    assert parts["scenes"] == 4 and parts["sample_steps"] == 10 and parts["spread"] > 0
    # the decomposition of the mean per-sample error is exact for n samples: mean + (n - 1) / n * spread
    assert abs(parts["per_sample"] - parts["mean_vs_input"] - 2 / 3 * parts["spread"]) < 1e-5
    samplers = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_samplers.py"), "--ckpt",
                               str(tmp_path / "curves-sd" / "ckpt.pt"), "--images", "4", "--samplers", "ddpm:10",
                               "dpm-solver++:3", "--backend", "torch", "--out", str(tmp_path / "samplers.json")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert samplers.returncode == 0, samplers.stderr
    rows = json.loads((tmp_path / "samplers.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddpm", 10), ("dpm-solver++", 3)]
    assert all(r["s_per_image"] > 0 and r["recon_mse"] > 0 and r["comp_fid"] > 0 for r in rows)
    assert "| dpm-solver++ | 3 |" in samplers.stdout


def test_interior_pixels_exclude_every_pixel_touching_another_object():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_boundary import interior_only
    masks = torch.zeros(1, 7, 7, dtype=torch.long)
    masks[0, 1:6, 1:6] = 1          # a 5x5 object on background
    masks[0, 1:6, 5] = 2            # its right column is another object
    inner = interior_only(masks)
    expected = torch.zeros_like(masks)
    expected[0, 2:5, 2:4] = 1       # object 1 loses its outer ring and the column next to object 2
    assert torch.equal(inner, expected)


def test_colour_readouts_recover_flat_colour_objects_that_blob_masks_miss():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_readouts import colour_kmeans, posterior_segmentation
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    true[0, 1:4, 1:7] = 1                                   # a wide red bar
    true[0, 5:8, 2:5] = 2                                   # a green square
    colours = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    images = colours[true].permute(0, 3, 1, 2) * 2 - 1      # (1, 3, 8, 8) in [-1, 1]
    assert metrics.ari(true, colour_kmeans(images, 3)).item() == 1.0
    rgb = (colours * 2 - 1)[None, :, :, None, None].expand(1, 3, 3, 8, 8)   # each slot draws its flat colour
    blobs = torch.full((1, 3, 8, 8), 0.1)
    blobs[:, 1, :4, :] = 0.8                                # the bar's slot reaches the whole top half
    blobs[:, 2, 4:, 2:6] = 0.8                              # the square's slot is a column too wide
    blobs = blobs / blobs.sum(1, keepdim=True)
    posterior = posterior_segmentation(images, blobs, rgb, 0.01)
    assert metrics.ari(true, blobs.argmax(1)).item() < 0.9  # the alpha masks spill over the background
    assert torch.equal(posterior, true)                     # the colours put each pixel back in its object


def test_reconstruction_error_decomposition_on_known_offsets():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_recon_spread import decompose
    inputs = torch.zeros(2, 4, 4, 3)
    samples = [inputs + offset for offset in (0.0, 0.2, 0.4)]   # three samples, each a constant off the input
    parts = decompose(samples, inputs)
    assert abs(parts["per_sample"] - (0.0 + 0.04 + 0.16) / 3) < 1e-6           # mean of the squared offsets
    assert abs(parts["spread"] - (0.04 + 0.16 + 0.04) / 3 / 2) < 1e-6          # half the mean pairwise square
    assert abs(parts["mean_vs_input"] - 0.2 ** 2) < 1e-6                      # the mean sample is 0.2 off


def test_table_cell_names_the_minute_when_the_evaluation_is_later_than_the_mark():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_learning import table_cell
    curve = [dict(minutes=0.0, fg_ari=0.0), dict(minutes=5.02, fg_ari=0.7), dict(minutes=12.0, fg_ari=0.8)]
    assert table_cell(curve, 5) == "0.700"                  # a step past the mark is the mark
    assert table_cell(curve, 10) == "0.800 (at 12.0 min)"   # evaluated every 3 minutes: not the 10-minute score
    assert table_cell(curve, 20) == "-"                     # the run was shorter


def test_ctrl_c_keeps_the_results_so_far(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bench_learning.py"), "--minutes", "10",
                             "--eval-minutes", "0.005", *TINY, "--out", str(tmp_path / "curves.json")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "curves.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err and "interrupted" in err
    curve = json.loads((tmp_path / "curves.json").read_text())["variants"]["cpu"]["curve"]
    assert len(curve) >= 1


def test_bad_variant_and_budget_are_one_line(tmp_path):
    for args, needle in [(["--variants", "nonsense"], "unknown variant 'nonsense'"),
                         (["--variants", "x: no_such_field=1"], "no_such_field"),
                         (["--minutes", "-1"], "--minutes")]:
        run = bench(tmp_path, *args)
        assert run.returncode != 0 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_frechet_bench_scores_both_distances_against_the_exact_value():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_frechet.py"), "--dim", "32", "--samples",
                          "100,80", "6,4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["100, 80", "6, 4"]
    for _, exact, ours, theirs in rows:
        assert float(exact) > 0 and float(ours.split(",")[1]) < 1e-9 and float(theirs.split(",")[1]) < 1e-4
