"""SlotDiffusion: noise schedule and sampler against closed forms, UNet shapes and initialisation, training."""
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import metrics
import sa
import scenegen
import slotdiff
import trainlib
import vae
from errors import InputError
from helpers import randomise_zero_inits as randomise
from slotdiff import Diffusion, DiffusionConfig, ResBlock, SDConfig, SlotDiffusion, SlotTransformer, UNet, UNetConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU two spinning threads per process can
    make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLOT_DIM = 12
TINY_UNET = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, dropout=0.0)


def tiny_unet() -> UNet:
    return UNet(TINY_UNET, SLOT_DIM)


def randomise_zero_inits(module: torch.nn.Module) -> None:
    randomise(module, scale=0.05)


# ----------------------------------------------------------------------------------------------------------
# forward process

@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_beta_schedule_endpoints_monotone_and_cumprod(schedule):
    diffusion = Diffusion(DiffusionConfig(beta_schedule=schedule))
    betas = diffusion.betas.double().numpy()
    assert len(betas) == 1000
    assert betas[0] == pytest.approx(0.0015, rel=1e-6)
    assert betas[-1] == pytest.approx(0.0195, rel=1e-6)
    assert np.all(np.diff(betas) > 0)
    if schedule == "linear":  # equal increments
        np.testing.assert_allclose(np.diff(betas), (0.0195 - 0.0015) / 999, rtol=1e-4)
    else:  # equal increments of sqrt(beta)
        np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.0195 ** 0.5 - 0.0015 ** 0.5) / 999, rtol=1e-4)
    # a_bar_t = prod_{s<=t} (1 - beta_s), computed independently as exp(sum log(1 - beta)) in float64
    expected = np.exp(np.cumsum(np.log1p(-betas)))
    np.testing.assert_allclose(diffusion.alphas_cumprod.double().numpy(), expected, rtol=1e-5)
    assert 0 < diffusion.alphas_cumprod[-1] < 1e-2  # the chain ends (nearly) at pure noise


def test_unknown_schedule_is_an_input_error():
    from errors import InputError
    with pytest.raises(InputError, match="beta-schedule"):
        Diffusion(DiffusionConfig(beta_schedule="cosine"))


def test_q_sample_matches_closed_form():
    diffusion = Diffusion(DiffusionConfig())
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    a_bar = np.exp(np.cumsum(np.log1p(-np.linspace(0.0015, 0.0195, 1000))))[t.numpy()]
    expected = (np.sqrt(a_bar)[:, None, None, None] * x0.double().numpy()
                + np.sqrt(1 - a_bar)[:, None, None, None] * noise.double().numpy())
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_step_coefficients_with_true_noise_give_posterior_mean():
    """If eps is the noise that made x_t from x0, Algorithm 2's mean equals the closed-form posterior mean
    mu~(x_t, x0) = sqrt(a_bar_prev) beta / (1 - a_bar) x0 + sqrt(alpha) (1 - a_bar_prev) / (1 - a_bar) x_t,
    and the noise is scaled by the posterior std sqrt(beta-tilde); checked at three steps of the real chain."""
    diffusion = Diffusion(DiffusionConfig())
    ts, coefs = diffusion.step_coefficients()
    a_bars = diffusion.alphas_cumprod64
    for i in (0, 400, 998):
        t = int(ts[i])
        a_bar, a_bar_prev = float(a_bars[t]), float(a_bars[t - 1])
        alpha, beta = a_bar / a_bar_prev, 1 - a_bar / a_bar_prev
        x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
        x_t = math.sqrt(a_bar) * x0 + math.sqrt(1 - a_bar) * eps
        c_x, c_eps, sigma = coefs[i].tolist()
        expected = (math.sqrt(a_bar_prev) * beta / (1 - a_bar) * x0
                    + math.sqrt(alpha) * (1 - a_bar_prev) / (1 - a_bar) * x_t)
        torch.testing.assert_close(c_x * x_t - c_eps * eps, expected)
        assert sigma == pytest.approx(math.sqrt((1 - a_bar_prev) / (1 - a_bar) * beta), rel=1e-12)
    assert ts[-1] == 0 and coefs[-1, 2] == 0  # the last step, t = 0, adds no noise


# ----------------------------------------------------------------------------------------------------------
# UNet

@pytest.mark.parametrize("num_slots", [1, 3, 11])
@pytest.mark.parametrize("latent_size", [8, 16])
def test_unet_output_shape_matches_input(num_slots, latent_size):
    unet = tiny_unet()
    x = torch.randn(2, 3, latent_size, latent_size)
    out = unet(x, torch.tensor([0, 999]), torch.randn(2, num_slots, SLOT_DIM))
    assert out.shape == x.shape


def test_unet_output_depends_on_slots_and_timestep():
    unet = tiny_unet().eval()
    randomise_zero_inits(unet)
    x, slots = torch.randn(1, 3, 8, 8), torch.randn(1, 3, SLOT_DIM)
    out = unet(x, torch.tensor([5]), slots)
    assert not torch.allclose(out, unet(x, torch.tensor([600]), slots))
    assert not torch.allclose(out, unet(x, torch.tensor([5]), torch.randn(1, 3, SLOT_DIM)))
    # slots are a set: permuting them must not change the prediction (cross-attention is permutation invariant)
    torch.testing.assert_close(out, unet(x, torch.tensor([5]), slots[:, [2, 0, 1]]))


def test_slot_attention_sits_below_the_full_latent_resolution_and_in_the_middle():
    """Latent 8x8, levels 8/4: the paper's UNet attends to the slots below full resolution (and in the middle,
    which always has one); the output follows the slots."""
    sizes = {4}
    unet = UNet(TINY_UNET, SLOT_DIM).eval()
    randomise_zero_inits(unet)
    seen = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[-1]))
             for layer in (*unet.down, *unet.up) for m in layer if isinstance(m, SlotTransformer)]
    x, slots = torch.randn(1, 3, 8, 8), torch.randn(1, 3, SLOT_DIM)
    out = unet(x, torch.tensor([5]), slots)
    for hook in hooks:
        hook.remove()
    assert set(seen) == sizes
    assert any(isinstance(m, SlotTransformer) for m in unet.middle)
    assert not torch.allclose(out, unet(x, torch.tensor([5]), torch.randn(1, 3, SLOT_DIM)))


@pytest.mark.parametrize("resample, size_out", [("down", 4), ("up", 16)])
def test_resampling_resblocks_change_resolution_by_two(resample, size_out):
    block = ResBlock(16, 24, time_dim=32, resample=resample)
    out = block(torch.randn(2, 16, 8, 8), torch.randn(2, 32))
    assert out.shape == (2, 24, size_out, size_out)


def test_down_resblock_skip_path_is_average_pooling():
    """With the residual branch zero-initialised, a fresh down-sampling block is exactly 2x2 average pooling."""
    block = ResBlock(8, 8, time_dim=4, resample="down")
    x = torch.randn(1, 8, 6, 6)
    expected = x.reshape(1, 8, 3, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(block(x, torch.randn(1, 4)), expected)


def test_fresh_transformer_block_is_identity():
    block = SlotTransformer(16, slot_dim=12, head_dim=8)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 5, 12)), x)


def test_group_norm_rule_keeps_at_least_four_channels_per_group():
    for channels, groups in [(32, 8), (64, 16), (96, 24), (128, 32), (192, 32), (256, 32)]:
        assert slotdiff.group_norm(channels).num_groups == groups


# ----------------------------------------------------------------------------------------------------------
# sampler and training

def test_sampler_is_finite_shaped_and_deterministic_for_a_seed():
    unet, diffusion = tiny_unet().eval(), Diffusion(DiffusionConfig())
    randomise_zero_inits(unet)
    slots = torch.randn(3, 4, SLOT_DIM)
    a = diffusion.sample(unet, slots, (3, 8, 8), seed=1, steps=5, progress=False)
    b = diffusion.sample(unet, slots, (3, 8, 8), seed=1, steps=5, progress=False)
    c = diffusion.sample(unet, slots, (3, 8, 8), seed=2, steps=5, progress=False)
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sampler_with_an_oracle_denoiser_recovers_x0():
    """A model that knows x0 predicts eps = (x_t - sqrt(a_bar) x0) / sqrt(1 - a_bar); ancestral sampling with it
    must land on x0 whatever the subset of timesteps (the last step adds no noise)."""
    diffusion = Diffusion(DiffusionConfig())
    x0 = torch.randn(2, 3, 4, 4)

    def oracle(x, t, slots):
        a_bar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a_bar.sqrt() * x0) / (1 - a_bar).sqrt()

    out = diffusion.sample(oracle, torch.zeros(2, 1, 1), (3, 4, 4), steps=8, progress=False)
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)


def test_generation_samples_equal_chunks_and_returns_scenes_in_order():
    """evaluate samples 64 reconstructions + 500 composed scenes at --sample-batch 250: three chunks of 188, where
    250 + 250 + 64 padded to 250 sampled 186 scenes for nothing. Each scene's image must come from its own slots."""
    assert [slotdiff.sampling_chunk(n, 250) for n in (564, 500, 64, 251, 1)] == [188, 250, 64, 126, 1]
    calls = []

    def sample(slots, shape, seed):   # the latent of a scene is its slots' value
        calls.append((len(slots), seed))
        return slots[:, :1, :1, None].expand(-1, *shape)

    cfg = SDConfig(encoder=replace(SDConfig().encoder, resolution=16), sample_batch=5, seed=5)
    vqvae = type("FakeVAE", (), dict(cfg=vae.VAEConfig()))()
    ids = torch.arange(7, dtype=torch.float32) / 10          # 7 scenes, distinct grey levels after to_uint8
    images = slotdiff.generate(torch.nn.Identity(), vqvae, ids.view(7, 1, 1).expand(7, 2, SLOT_DIM), cfg, "cpu",
                               sample=sample, decode=lambda z: z)
    assert calls == [(4, 5), (4, 6)]          # 4 + 3 padded to 4 (5 + 2 padded to 5 before): one shape to compile
    np.testing.assert_array_equal(images[:, 0, 0, 0], data.to_uint8(ids.view(7, 1, 1, 1))[:, 0, 0, 0])


def test_respaced_chain_is_strided_and_ends_at_the_last_timestep():
    diffusion = Diffusion(DiffusionConfig())
    ts, a_bar, a_bar_prev = diffusion.chain(10)
    assert ts.tolist() == list(range(99, 1000, 100))
    torch.testing.assert_close(a_bar_prev[1:], diffusion.alphas_cumprod64[ts[:-1]])
    assert torch.equal(diffusion.chain()[0], torch.arange(1000))   # all T: the plain chain
    with pytest.raises(InputError, match="must divide the 1000-step schedule for DDPM; use one of 1, 2, 4, 5, 8"):
        diffusion.chain(300)


def test_ode_chain_is_even_in_log_snr_from_the_last_timestep_to_the_first():
    diffusion = Diffusion(DiffusionConfig())
    ts, a_bar, a_bar_prev = diffusion.chain(20, "dpm-solver++")
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 20 and (ts.diff() > 0).all()
    log_snr = 0.5 * torch.log(a_bar / (1 - a_bar))
    steps = log_snr.diff()
    assert steps.max() / steps.min() < 1.5                  # even up to rounding t to whole timesteps
    assert diffusion.chain(300, "ddim")[0].numel() <= 300   # any number of steps, not only divisors of T


def gaussian_data_unet(diffusion: Diffusion, mean: float, std: float):
    """The exact epsilon-prediction when the data are N(mean, std^2) in every dimension: E[eps | x_t] =
    sqrt(1 - a_bar) (x_t - sqrt(a_bar) mean) / (a_bar std^2 + 1 - a_bar)."""
    def unet(x, t, slots):
        a_bar = diffusion.alphas_cumprod64[t].view(-1, 1, 1, 1)
        return ((1 - a_bar).sqrt() * (x.double() - a_bar.sqrt() * mean) / (a_bar * std ** 2 + 1 - a_bar)).float()
    return unet


def test_ode_samplers_solve_the_probability_flow_ode_of_gaussian_data():
    """For Gaussian data the probability-flow ODE (Song et al. 2021) is affine and keeps each value's standard
    score: x_T maps to mean + std * (x_T - sqrt(a_bar_T) mean) / sqrt(a_bar_T std^2 + 1 - a_bar_T), exactly.
    DDIM (first order) and DPM-Solver++(2M) (second order) must converge to it, the second much faster."""
    diffusion, mean, std = Diffusion(DiffusionConfig()), 0.5, 0.3
    unet, slots = gaussian_data_unet(diffusion, mean, std), torch.zeros(64, 1, 1)
    x_T = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double()   # sample()'s draw
    a_bar_T = float(diffusion.alphas_cumprod64[-1])
    exact = mean + std * (x_T - math.sqrt(a_bar_T) * mean) / math.sqrt(a_bar_T * std ** 2 + 1 - a_bar_T)

    def error(sampler: str, steps: int) -> float:
        x = diffusion.sample(unet, slots, (1, 4, 4), seed=0, steps=steps, sampler=sampler, progress=False)
        return (x.double() - exact).abs().max().item()
    ddim = [error("ddim", steps) for steps in (10, 20, 40)]
    assert ddim[0] > ddim[1] > ddim[2] and 1.6 < ddim[0] / ddim[1] < 2.4 and ddim[2] < 0.1   # first order
    assert error("dpm-solver++", 10) < 0.015 and error("dpm-solver++", 20) < 0.005            # about 25-50x closer
    assert error("ddim", 1000) < 0.03     # the last step's x0 = E[x_0 | x_1] is the only error left


def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    unet, diffusion = tiny_unet(), Diffusion(DiffusionConfig())
    randomise_zero_inits(unet)
    x0, slots = torch.randn(4, 3, 8, 8), torch.randn(4, 3, SLOT_DIM)
    t, noise = torch.tensor([10, 200, 500, 900]), torch.randn(4, 3, 8, 8)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    before = diffusion.loss(unet, x0, slots, t, noise)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = diffusion.loss(unet, x0, slots, t, noise)
    assert after < before


# ----------------------------------------------------------------------------------------------------------
# joint model, data plumbing, command line

def tiny_joint_config(**overrides) -> SDConfig:
    cfg = dict(resolution=16, slots=3, slot_dim=SLOT_DIM, slot_mlp_hidden=16, enc_channels=8, unet=TINY_UNET)
    return cli.make_config(SDConfig, cfg, overrides)


def test_batch_indices_match_data_get_batch():
    """slotdiff pairs each image with its cached latent through data.batch_indices: it must pick exactly the scenes
    data.get_batch picks, across epoch boundaries and DDP ranks."""
    rng = np.random.default_rng(0)
    scenes = data.Scenes(rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8), np.zeros((10, 4, 4), np.uint8), "t")
    for step, rank, world in [(0, 0, 1), (3, 0, 1), (7, 1, 2), (12, 2, 3)]:
        images, _ = data.get_batch(scenes, step, 4, seed=5, device="cpu", rank=rank, world_size=world)
        index = data.batch_indices(len(scenes), step, 4, seed=5, rank=rank, world_size=world)
        expected = torch.from_numpy(scenes.images[index]).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(images, expected)


def test_attention_masks_upsample_and_argmax():
    """Hand-made 2x2 maps where slot k wins cell k: at 4x4 every 2x2 block belongs to its cell's slot."""
    attn = torch.full((1, 4, 4), 0.1)
    for k in range(4):
        attn[0, k, k] = 0.7
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    torch.testing.assert_close(sa.attention_masks(attn, 4, 4)[0], expected)


def test_encoder_attention_sums_to_one_over_slots_and_gives_image_sized_masks():
    model = SlotDiffusion(tiny_joint_config())
    images = torch.rand(2, 3, 16, 16)
    out = model(images, torch.randn(2, 3, 4, 4))
    assert out["attn"].shape == (2, 3, 16 * 16)
    torch.testing.assert_close(out["attn"].sum(dim=1), torch.ones(2, 256))
    masks = sa.attention_masks(out["attn"], 16, 16)
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.long
    assert 0 <= masks.min() and masks.max() < 3


@pytest.mark.parametrize("slot_moments", [False, True])
def test_slot_frames_and_moments_reach_the_unet_as_more_numbers_per_slot(slot_moments):
    model = SlotDiffusion(tiny_joint_config(slot_frame=True, slot_moments=slot_moments))
    images = torch.rand(2, 3, 16, 16)
    slots, _ = model.encoder(images)
    assert slots.shape == (2, 3, SLOT_DIM + 4 + 12 * slot_moments)
    out = model(images, torch.randn(2, 3, 4, 4), torch.tensor([10, 500]), torch.randn(2, 3, 4, 4))
    assert torch.isfinite(out["loss"])


def test_joint_training_step_lowers_the_loss_and_trains_the_encoder():
    torch.manual_seed(0)
    model = SlotDiffusion(tiny_joint_config())
    randomise_zero_inits(model.unet)  # otherwise no gradient reaches the encoder on the first step
    images, latents = torch.rand(4, 3, 16, 16), torch.randn(4, 3, 4, 4)
    t, noise = torch.tensor([10, 200, 500, 900]), torch.randn(4, 3, 4, 4)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same Gaussian slot initialisation every time
        return model(images, latents, t, noise)["loss"]

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    assert model.encoder.cnn[0].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert loss() < before


def test_encoder_steps_freeze_the_encoder_after_its_horizon_while_the_unet_trains():
    cfg = tiny_joint_config(encoder_steps=4, warmup=1, steps=100, amp=False)
    assert slotdiff.lr_scale(2, cfg, "encoder") < slotdiff.lr_scale(2, cfg, "unet")   # its cosine is shorter
    assert slotdiff.lr_scale(4, cfg, "encoder") == slotdiff.lr_scale(50, cfg, "encoder") == 0.0
    assert slotdiff.lr_scale(50, cfg, "unet") > 0.5
    cooled = replace(cfg, cooldown=0.25)   # --cooldown scales the UNet down over the budget's last quarter ...
    assert slotdiff.lr_scale(50, cooled, "unet", progress=0.75) == pytest.approx(slotdiff.lr_scale(50, cfg, "unet"))
    assert slotdiff.lr_scale(50, cooled, "unet", progress=0.875) == pytest.approx(slotdiff.lr_scale(50, cfg) / 2)
    # ... while an encoder with its own horizon keeps it, even if the budget runs out first
    assert slotdiff.lr_scale(2, cooled, "encoder", progress=0.99) == slotdiff.lr_scale(2, cfg, "encoder") > 0
    no_horizon = replace(cooled, encoder_steps=0)   # then the encoder follows the UNet's schedule, cool-down included
    assert slotdiff.lr_scale(2, no_horizon, "encoder", progress=1.0) == 0.0
    torch.manual_seed(0)
    model = SlotDiffusion(cfg)
    randomise_zero_inits(model.unet)  # otherwise no gradient reaches the encoder
    opt, scaler = slotdiff.make_optimizer(model, cfg), trainlib.make_grad_scaler(torch.device("cpu"), False)
    images, latents = torch.rand(4, 3, 16, 16), torch.randn(4, 3, 4, 4)

    def weights(part: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in part.parameters()])

    for step, encoder_moves in [(2, True), (4, False)]:
        encoder, unet = weights(model.encoder), weights(model.unet)
        slotdiff.train_step(model, model, opt, scaler, images, latents, step, cfg)
        assert not torch.equal(weights(model.unet), unet)
        assert (not torch.equal(weights(model.encoder), encoder)) == encoder_moves


def test_encoder_delay_holds_the_encoder_still_then_runs_its_schedule_shifted():
    cfg = tiny_joint_config(encoder_steps=10, encoder_delay=3, warmup=2, steps=100, amp=False)
    undelayed = replace(cfg, encoder_delay=0, encoder_steps=7)
    assert [slotdiff.lr_scale(s, cfg, "encoder") for s in range(3)] == [0.0, 0.0, 0.0]
    # after the delay: the same warm-up and cosine, started 3 steps late, still ending at --encoder-steps
    for step in range(3, 12):
        assert slotdiff.lr_scale(step, cfg, "encoder") == pytest.approx(slotdiff.lr_scale(step - 3, undelayed,
                                                                                           "encoder"))
    assert slotdiff.lr_scale(10, cfg, "encoder") == 0.0
    assert slotdiff.lr_scale(1, cfg, "unet") == slotdiff.lr_scale(1, undelayed, "unet") > 0   # the UNet is not delayed
    torch.manual_seed(0)
    model = SlotDiffusion(cfg)
    randomise_zero_inits(model.unet)  # otherwise no gradient reaches the encoder
    opt, scaler = slotdiff.make_optimizer(model, cfg), trainlib.make_grad_scaler(torch.device("cpu"), False)
    images, latents = torch.rand(4, 3, 16, 16), torch.randn(4, 3, 4, 4)
    for step, encoder_moves in [(0, False), (2, False), (4, True)]:
        encoder = [p.detach().clone() for p in model.encoder.parameters()]
        slotdiff.train_step(model, model, opt, scaler, images, latents, step, cfg)
        moved = any(not torch.equal(p, q) for p, q in zip(model.encoder.parameters(), encoder))
        assert moved == encoder_moves


@pytest.fixture
def tiny_vae(tmp_path) -> str:
    cfg = cli.make_config(vae.TrainConfig, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16))
    path = tmp_path / "tiny_vae.pt"
    torch.save(dict(kind="vae", model=vae.VQVAE(cfg.model).state_dict(), config=asdict(cfg)), path)
    return str(path)


TINY_CLI = ["--resolution", "16", "--num-train", "16", "--num-val", "8", "--slots", "3", "--slot-dim", "16",
            "--slot-mlp-hidden", "16", "--enc-channels", "8", "--base-channels", "16", "--channel-mult", "1,2",
            "--num-res-blocks", "1", "--head-dim", "8", "--batch-size", "4", "--warmup", "1", "--log-every", "1",
            "--eval-every", "2", "--eval-images", "8", "--ckpt-every", "2", "--compile", "0", "--device", "cpu",
            "--sample-steps", "5", "--sample-batch", "4", "--num-gen", "6", "--ema-decay", "0.9"]


def test_cli_trains_resumes_exactly_and_evaluates(tmp_path, tiny_vae, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # data and latent caches go to tmp_path/.cache
    fid_inputs = []  # FID itself is tested in test_metrics.py; here, what it is given

    def fake_stats(images, device=None, batch_size=32, name="", cache_dir=None):
        fid_inputs.append(np.asarray(images).shape)
        return np.asarray(images).shape

    monkeypatch.setattr(slotdiff.metrics, "fid_stats", fake_stats)
    monkeypatch.setattr(slotdiff.metrics, "fid", lambda real, fake, device=None, batch_size=32: 1.0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the encoder's updates end at step 3 (--encoder-steps): a resume must keep that schedule too
    # --latent-scale 0: the scale measured on the training latents must be the same number when resuming
    slotdiff.main(TINY_CLI + ["--vae", tiny_vae, "--steps", "4", "--encoder-steps", "3", "--latent-scale", "0",
                              "--out", str(straight), "--no-eval"])
    note = "note: the slot encoder trains from step 0 (--encoder-delay) to step 3 (--encoder-steps)"
    assert note in capsys.readouterr().out
    slotdiff.main(TINY_CLI + ["--vae", tiny_vae, "--steps", "2", "--encoder-steps", "3", "--latent-scale", "0",
                              "--out", str(split), "--no-eval"])
    slotdiff.main(["--resume", str(split / "ckpt.pt"), "--steps", "4"])  # + the final evaluation

    a = trainlib.load_checkpoint(straight / "ckpt.pt")
    b = trainlib.load_checkpoint(split / "ckpt.pt")
    assert a["step"] == b["step"] == 4
    assert a["config"]["diffusion"]["latent_scale"] == b["config"]["diffusion"]["latent_scale"] > 0
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(a["ema"]["model"][key], b["ema"]["model"][key], rtol=0, atol=0, msg=key)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    _, loaded, _, _ = slotdiff.load(split / "ckpt.pt")   # evaluation and export use the averaged weights
    assert all(torch.equal(value, b["ema"]["model"][key]) for key, value in loaded.state_dict().items())
    assert any(not torch.equal(b["ema"]["model"][key], b["model"][key]) for key in b["model"])

    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    result = json.loads((split / "val_metrics.json").read_text())
    for key in ("ari", "fg_ari", "mbo", "fg_ari_one_segment_baseline", "recon_mse", "fid", "recon_fid",
                "vae_recon_fid", "val_loss"):
        assert np.isfinite(result[key]), key
    # val vs generated, vs reconstructed, vs the VAE's own decode
    assert fid_inputs == [(8, 16, 16, 3), (6, 16, 16, 3), (8, 16, 16, 3), (8, 16, 16, 3)]
    assert result["fg_ari_one_segment_baseline"] == 0.0  # one segment for all pixels: FG-ARI of a constant is 0
    for name in ("loss_curves.png", "reconstructions.png", "comp_grid.png"):
        assert (split / name).stat().st_size > 0
    assert len(list((split / "comp_gen").glob("*.png"))) == 6

    # `eval` re-evaluates a checkpoint with its own settings; flags override them
    slotdiff.main(["eval", "--ckpt", str(split / "ckpt.pt"), "--num-gen", "3"])
    assert json.loads((split / "val_metrics.json").read_text())["generated_images"] == 3
    assert fid_inputs[-4:] == [(8, 16, 16, 3), (3, 16, 16, 3), (8, 16, 16, 3), (8, 16, 16, 3)]

    # resuming a checkpoint that kept no average while --ema-decay is set: said, and the average starts there
    trainlib.save_checkpoint({k: v for k, v in b.items() if k != "ema"}, split / "ckpt.pt")
    capsys.readouterr()
    slotdiff.main(["--resume", str(split / "ckpt.pt"), "--steps", "5", "--no-eval"])
    assert "kept no weight average: --ema-decay 0.9 starts it from the restored weights" in capsys.readouterr().out
    assert trainlib.load_checkpoint(split / "ckpt.pt")["ema"]["updates"] == 1


def write_folder_dataset(root: Path, counts: dict[str, int]) -> None:
    """A dataset folder as a user might bring one: non-square JPEG images, colour masks named by number
    (img_0003.jpg / mask_3.png), no val split."""
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
    for split, n in counts.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            image, ids = scenegen.render_scene(1000 * len(split) + i, 32, 2, 4, style="clevr")
            Image.fromarray(image).resize((40, 30)).save(root / split / "images" / f"img_{i:04d}.jpg")
            Image.fromarray(colours[ids]).resize((40, 30), Image.NEAREST).save(root / split / "masks" / f"mask_{i}.png")


def test_a_dataset_folder_end_to_end_sa_then_slotdiff(tmp_path, tiny_vae, monkeypatch, capsys):
    """--data PATH through both scripts as a new user runs them: sa.py trains and evaluates, slotdiff.py starts
    its encoder from that checkpoint, trains and evaluates; --slots 0 reads the slot count from the masks, the
    missing val split is replaced by test, and every result and picture is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(metrics, "fid", lambda real, fake, device=None, batch_size=32: 1.0)   # tested in test_metrics
    monkeypatch.setattr(metrics, "fid_stats", lambda images, device=None, batch_size=32, name="", cache_dir=None:
                        np.asarray(images).shape)
    write_folder_dataset(tmp_path / "mydata", {"train": 12, "test": 6})
    encoder = ["--data", str(tmp_path / "mydata"), "--resolution", "16", "--slots", "0", "--slot-dim", "16",
               "--slot-mlp-hidden", "16", "--enc-channels", "8", "--batch-size", "4", "--steps", "2",
               "--eval-images", "6", "--compile", "0", "--amp", "0", "--device", "cpu"]
    sa.main(encoder + ["--dec-channels", "8", "--num-gen", "4", "--out", "sa_run"])
    sa_result = json.loads((tmp_path / "sa_run" / "val_metrics.json").read_text())
    sa_result["recon_fid"] = 42.5   # the mocked FID is 1.0 for every image set: mark Slot Attention's own value
    (tmp_path / "sa_run" / "val_metrics.json").write_text(json.dumps(sa_result))
    sd_only = ["--base-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1", "--head-dim", "8",
               "--sample-steps", "5", "--sample-batch", "4", "--num-gen", "4"]
    slotdiff.main(encoder + sd_only + ["--vae", tiny_vae, "--encoder-from", "sa_run/ckpt.pt", "--out", "sd_run"])
    out = capsys.readouterr().out
    most = int(data.load_split(str(tmp_path / "mydata"), "train", 16).masks.max())   # ids are 0..n per image
    assert f"--slots 0: {most + 1} slots" in out and out.count("no val split; validating on its test split") == 1
    # SlotDiffusion's reconstruction FID is reported beside that of the Slot Attention run its encoder came from
    assert "Slot Attention's mixture decoder in sa_run/ckpt.pt: 42.50" in out
    assert json.loads((tmp_path / "sd_run" / "val_metrics.json").read_text())["encoder_run_recon_fid"] == 42.5
    for run, pictures in (("sa_run", ("samples.png", "comp_grid.png", "loss_curves.png")),
                          ("sd_run", ("reconstructions.png", "comp_grid.png", "loss_curves.png"))):
        result = json.loads((tmp_path / run / "val_metrics.json").read_text())
        assert result["val_images"] == 6 and result["generated_images"] == 4
        assert all(np.isfinite(result[key]) for key in ("ari", "fg_ari", "mbo", "fid")), run
        assert all((tmp_path / run / name).stat().st_size > 0 for name in pictures), run


def test_no_slot_attention_comparison_without_its_checkpoint_and_evaluation(tmp_path):
    """The encoder run's reconstruction FID is only quoted from an evaluated run whose checkpoint is still there (a
    deleted one must not fail an evaluation at its very end)."""
    run = tmp_path / "sa_run"
    run.mkdir()
    cfg = cli.make_config(SDConfig, dict(encoder_from=str(run / "ckpt.pt")))
    assert slotdiff.encoder_run_recon_fid(cfg, 6) is None                     # never evaluated, no checkpoint
    (run / "val_metrics.json").write_text(json.dumps(dict(recon_fid=42.5, val_images=6)))
    assert slotdiff.encoder_run_recon_fid(cfg, 6) is None                     # evaluated, checkpoint deleted since
    assert slotdiff.encoder_run_recon_fid(cli.make_config(SDConfig, {}), 6) is None   # trained from scratch


def test_without_vae_flag_a_vae_is_trained_once_then_reused(tmp_path, monkeypatch):
    """The wiring only (vae.py's own tests train VAEs): a stand-in vae.train writes a checkpoint the way vae.py
    does; an unfinished one (step < steps) must be resumed, a finished one reused."""
    monkeypatch.chdir(tmp_path)
    trainings = []

    def fake_train(cfg, resume=None):
        trainings.append((cfg, resume))
        cfg = cli.with_overrides(cfg, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16, steps=2))
        state = dict(kind="vae", model=vae.VQVAE(cfg.model).state_dict(), config=asdict(cfg), step=len(trainings))
        (Path(cfg.out) / "ckpt.pt").parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(cfg.out) / "ckpt.pt")

    monkeypatch.setattr(vae, "train", fake_train)
    cfg = cli.make_config(SDConfig, dict(resolution=32, num_train=8, device="cpu"))
    images = data.Scenes(np.zeros((8, 32, 32, 3), np.uint8), np.zeros((8, 32, 32), np.uint8), "folder:train")
    path = slotdiff.ensure_vae(cfg, images)  # trains, but stops half-way (step 1 of 2)
    first, resume = trainings[0]
    assert first.resolution == 32 and first.model == vae.PRESETS["cpu"]["model"] and resume is None
    assert Path(path).is_absolute()
    assert slotdiff.ensure_vae(cfg, images) == path  # unfinished: resumed
    assert len(trainings) == 2 and trainings[1][1] is not None
    assert slotdiff.ensure_vae(cfg, images) == path  # finished: reused, no third training
    assert len(trainings) == 2
    assert vae.load_vae(path).cfg.n_embed == 16
    edited = data.Scenes(np.ones_like(images.images), images.masks, images.name)   # the folder changed in place
    assert slotdiff.ensure_vae(cfg, edited) != path and len(trainings) == 3   # a new VAE, not the stale one
    monkeypatch.setitem(vae.PRESETS, "cpu", {**vae.PRESETS["cpu"], "steps": 9})
    assert slotdiff.ensure_vae(cfg, images) != path and len(trainings) == 4   # the preset changed: a new VAE too
    assert slotdiff.ensure_vae(replace(cfg, vae="given.pt"), images) == str(Path("given.pt").resolve())


def test_cached_latents_follow_the_pixels_not_the_name(tmp_path):
    """A dataset folder edited in place keeps its name (and size): its cached latents must be those of the new
    images, not the old ones."""
    vqvae = vae.VQVAE(vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16)).eval()
    rng = np.random.default_rng(0)
    before = data.Scenes(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), np.zeros((3, 16, 16), np.uint8),
                         "folder:train")
    after = data.Scenes(255 - before.images, before.masks, before.name)
    cpu = torch.device("cpu")
    cached = [slotdiff.cached_latents(vqvae, "vae", scenes, cpu, 2, cache_dir=str(tmp_path))
              for scenes in (before, after)]
    torch.testing.assert_close(cached[1], vae.encode_scenes(vqvae, after, 2, cpu))
    assert not torch.equal(cached[0], cached[1])
    assert len(list((tmp_path / "latents").iterdir())) == 2


def test_latent_scale_zero_gives_unit_variance_latents_and_generation_divides_it_out(tmp_path, monkeypatch):
    """--latent-scale 0 (LDM's rescaling): the diffusion sees the training latents at unit std, the resolved
    number goes into the config (and so the checkpoint), and generation hands the VAE decoder latents divided by
    it again; a given scale is used as it is."""
    monkeypatch.chdir(tmp_path)
    vqvae = vae.VQVAE(vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16)).eval()
    rng = np.random.default_rng(0)
    train_set, val_set = (data.Scenes(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                                      np.zeros((n, 16, 16), np.uint8), name) for n, name in ((6, "x:train"), (3, "x:val")))
    cpu = torch.device("cpu")
    raw = vae.encode_scenes(vqvae, train_set, 2, cpu)
    cfg, train, val = slotdiff.diffusion_latents(tiny_joint_config(latent_scale=0), vqvae, "vae", train_set,
                                                 val_set, cpu)
    scale = cfg.diffusion.latent_scale
    assert scale == pytest.approx(1 / raw.std().item()) and scale != 1
    assert train.std().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(val, vae.encode_scenes(vqvae, val_set, 2, cpu) * scale)
    given, train2, _ = slotdiff.diffusion_latents(tiny_joint_config(latent_scale=2.0), vqvae, "vae", train_set,
                                                  val_set, cpu)
    assert given.diffusion.latent_scale == 2.0 and torch.equal(train2, raw * 2)

    decoded = []
    slots = torch.rand(2, 3, SLOT_DIM)
    slotdiff.generate(torch.nn.Identity(), vqvae, slots, cfg, cpu,
                      sample=lambda s, shape, seed: torch.full((len(s), *shape), 3.0),
                      decode=lambda z: decoded.append(z) or torch.zeros(len(z), 3, 16, 16))
    torch.testing.assert_close(decoded[0], torch.full_like(decoded[0], 3.0 / scale))


def test_a_vae_the_clock_stopped_is_reused_not_trained_again(tmp_path, monkeypatch):
    """vae.py's cpu preset stops at 12000 steps or 20 minutes: a checkpoint that says finished at step 1 of 2 (the
    clock ended it) is the cached VAE; without that mark it would be resumed for another 20 minutes each run."""
    monkeypatch.chdir(tmp_path)
    trainings = []

    def fake_train(cfg, resume=None):
        trainings.append(resume)
        assert cfg.max_minutes == vae.PRESETS["cpu"]["max_minutes"] > 0
        cfg = cli.with_overrides(cfg, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16, steps=2))
        state = dict(kind="vae", model=vae.VQVAE(cfg.model).state_dict(), config=asdict(cfg), step=1, finished=True)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(cfg.out) / "ckpt.pt")

    monkeypatch.setattr(vae, "train", fake_train)
    cfg = cli.make_config(SDConfig, dict(resolution=32, num_train=8, device="cpu"))
    images = data.Scenes(np.zeros((8, 32, 32, 3), np.uint8), np.zeros((8, 32, 32), np.uint8), "folder:train")
    assert slotdiff.ensure_vae(cfg, images) == slotdiff.ensure_vae(cfg, images) and trainings == [None]
