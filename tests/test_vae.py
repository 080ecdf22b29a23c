"""vae.py: the course checkpoint's exact layout and outputs, quantisation, loading errors, latent cache, training."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import data
import trainlib
import vae
from errors import InputError

TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16)


FIXTURES = Path(__file__).parent / "fixtures"   # copied from the team's shared/fixtures (see below)
SHARED = Path(os.environ.get("SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "fixtures"


def random_course_checkpoint() -> dict:
    """The weights of shared/fixtures/vae_checkpoint_random.pth (55 MB, not shipped): the default architecture
    initialised after torch.manual_seed(0), then a N(0, 0.5^2) codebook from the same stream. The reference
    outputs in vae_io_reference.pt were computed from that file by the reference implementation."""
    torch.manual_seed(0)
    state = vae.VQVAE(vae.VAEConfig()).state_dict()
    state["quantize.embedding.weight"] = torch.randn(state["quantize.embedding.weight"].shape) * 0.5
    return state


def test_state_dict_keys_and_shapes_equal_course_checkpoint():
    lines = (FIXTURES / "vae_checkpoint_keys.tsv").read_text().splitlines()[1:]
    expected = [(key, json.loads(shape)) for key, shape in (line.split("\t") for line in lines if line)]
    ours = [(key, list(t.shape)) for key, t in vae.VQVAE(vae.VAEConfig()).state_dict().items()]
    assert len(expected) == 205
    assert ours == expected


def test_regenerated_random_checkpoint_is_the_shared_one():
    if not (SHARED / "vae_checkpoint_random.pth").is_file():
        pytest.skip(f"{SHARED} is not here (set SHARED_DIR); the next test uses the regenerated weights anyway")
    shared = torch.load(SHARED / "vae_checkpoint_random.pth", weights_only=True)
    ours = random_course_checkpoint()
    assert list(shared) == list(ours) and all(torch.equal(shared[k], ours[k]) for k in ours)


def test_random_checkpoint_reproduces_reference_outputs(tmp_path):
    ref = torch.load(FIXTURES / "vae_io_reference.pt", weights_only=True)
    torch.save(random_course_checkpoint(), tmp_path / "vae_checkpoint_random.pth")   # a raw state dict, as the course's
    model = vae.load_vae(tmp_path / "vae_checkpoint_random.pth")
    with torch.no_grad():
        latents = model.encode(ref["images"])
        decoded = model.decode(ref["latents"])
        roundtrip = model.decode(latents)
    assert latents.shape == (2, 3, 32, 32)
    assert (latents - ref["latents"]).abs().max() < 1e-4
    assert (decoded - ref["decoded"]).abs().max() < 1e-4
    assert (roundtrip - ref["decoded"]).abs().max() < 1e-4


def test_wrong_keys_name_missing_and_unexpected(tmp_path):
    state = vae.VQVAE(vae.VAEConfig()).state_dict()
    state["decoder.extra.weight"] = state.pop("quant_conv.bias")
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"1 missing keys \['quant_conv.bias'\].*1 unexpected keys \['decoder.extra"):
        vae.load_vae(path)


def test_wrong_shapes_and_foreign_config_are_input_errors(tmp_path):
    torch.save(vae.VQVAE(vae.VAEConfig(ch=32)).state_dict(), tmp_path / "raw_tiny.pth")  # raw: default config
    with pytest.raises(InputError, match="wrong shape"):
        vae.load_vae(tmp_path / "raw_tiny.pth")
    torch.save({"kind": "sa", "model": {}, "config": {"slots": 7}}, tmp_path / "sa.pt")
    with pytest.raises(InputError, match="is a sa.py checkpoint, not a vae.py one"):
        vae.load_vae(tmp_path / "sa.pt")


def test_missing_checkpoint_names_path_and_how_to_train(tmp_path):
    with pytest.raises(InputError, match=r"nope\.pth does not exist.*python vae\.py"):
        vae.load_vae(tmp_path / "nope.pth")


def test_own_checkpoint_round_trips_with_its_config(tmp_path):
    model = vae.VQVAE(TINY).eval()
    config = vae.asdict(cli.make_config(vae.TrainConfig, dict(model=TINY)))
    torch.save({"kind": "vae", "model": model.state_dict(), "config": config, "step": 3}, tmp_path / "ckpt.pt")
    loaded = vae.load_vae(tmp_path / "ckpt.pt")
    assert loaded.cfg == TINY
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))


def test_default_config_encodes_64px_to_16x16_latents():
    model = vae.VQVAE(vae.VAEConfig())
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert z.shape == (2, 3, 16, 16)
    with pytest.raises(InputError, match="divisible by 4"):
        model.encode(torch.rand(1, 3, 30, 30))


def test_quantize_returns_nearest_codebook_rows_even_under_bf16_autocast():
    torch.manual_seed(0)
    quantizer = vae.VectorQuantizer(64, 3)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(2, 3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, indices = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat.double(), quantizer.embedding.weight.double()).argmin(1)  # independent reference
    assert torch.equal(indices.flatten(), expected)
    assert z_q.dtype == torch.float32
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(-1, 3), quantizer.embedding.weight[expected])
    # chunking must not change the answer
    assert torch.equal(quantizer.nearest(flat, chunk=4), expected)


def test_straight_through_passes_decoder_gradient_to_encoder():
    model = vae.VQVAE(TINY)
    recon, codebook_loss, commitment_loss, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    recon.sum().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # the codebook learns only from the codebook loss
    torch.testing.assert_close(commitment_loss, TINY.beta * codebook_loss)  # same distance, different stop-grad


def test_encode_scenes_matches_direct_encoding_in_order():
    rng = np.random.default_rng(0)
    scenes = data.Scenes(images=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
                         masks=np.zeros((5, 16, 16), dtype=np.uint8), name="toy")
    model = vae.VQVAE(TINY)
    latents = vae.encode_scenes(model, scenes, batch_size=2, device="cpu")
    images = torch.from_numpy(scenes.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = model.encode(images)
    assert latents.shape == (5, 3, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)


def test_reseed_codes_moves_only_dead_rows_onto_latents():
    torch.manual_seed(0)
    model = vae.VQVAE(TINY)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    before = model.quantize.embedding.weight.detach().clone()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    assert vae.reseed_codes(model, images, dead) == 2
    after = model.quantize.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    with torch.no_grad():
        z = model.encode(images).permute(0, 2, 3, 1).reshape(-1, 3)
    for row in after[dead]:
        assert (z - row).abs().sum(1).min() == 0  # each revived code is exactly one of the batch's latents


def test_psnr_closed_form():
    images = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(images, 0.2)  # error 0.1 on the [0,1] scale -> 20 dB
    torch.testing.assert_close(vae.psnr(images, recon), torch.full((2,), 20.0))


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = vae.VQVAE(TINY)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    vae.reseed_codes(model, images, torch.ones(16, dtype=torch.bool))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, _, _, _ = vae.vae_loss(model, images)
    for _ in range(5):
        loss, parts, _, _ = vae.vae_loss(model, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, _, _, _ = vae.vae_loss(model, images)
    assert torch.isfinite(last) and last < 0.9 * first
    assert set(parts) == {"recon_loss", "codebook_loss", "commitment_loss"}


CLI_TINY = ["--resolution", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--n-embed", "16", "--batch-size", "4",
            "--num-train", "16", "--num-val", "4", "--steps", "6", "--warmup", "2", "--restart-every", "2",
            "--eval-every", "3", "--ckpt-every", "3", "--log-every", "2", "--amp", "no", "--device", "cpu"]


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    vae.main(CLI_TINY + ["--out", str(tmp_path / "straight")])

    real_get_batch = data.get_batch

    def ctrl_c_at_step_3(scenes, step, *args, **kwargs):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # StopOnInterrupt: finish this step, checkpoint, stop
        return real_get_batch(scenes, step, *args, **kwargs)

    monkeypatch.setattr(data, "get_batch", ctrl_c_at_step_3)
    with pytest.raises(SystemExit) as stopped:   # interrupted is not finished: exit 130, no final evaluation
        vae.main(CLI_TINY + ["--out", str(tmp_path / "resumed")])
    assert stopped.value.code == 130 and not (tmp_path / "resumed" / "val_metrics.json").exists()
    assert trainlib.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["step"] == 4
    monkeypatch.setattr(data, "get_batch", real_get_batch)
    vae.main(["--resume", str(tmp_path / "resumed" / "ckpt.pt")])

    straight = trainlib.load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    resumed = trainlib.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    logged = [r["step"] for r in trainlib.MetricsLog(tmp_path / "resumed" / "metrics.jsonl", 6).records()
              if "train_loss" in r]
    assert logged == [2, 4, 6]
    for name in ("val_metrics.json", "reconstructions.png", "loss_curves.png"):
        assert (tmp_path / "resumed" / name).is_file()
    assert 0 < json.loads((tmp_path / "resumed" / "val_metrics.json").read_text())["codebook_usage"] <= 1


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: --ch 48 is not a multiple of 32"):
        vae.main(CLI_TINY + ["--out", str(tmp_path), "--ch", "48"])
    with pytest.raises(SystemExit, match=r"error: checkpoint .*ckpt\.pt does not exist"):
        vae.main(CLI_TINY + ["--resume", str(tmp_path / "ckpt.pt")])
