"""sa.py: shapes, the Slot Attention algorithm against a hand-written reference, training, resume, CLI errors."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import cli
import sa
import scenegen
import slotdiff
import trainlib
from errors import InputError

TINY = dict(resolution=32, slots=4, slot_dim=16, slot_mlp_hidden=32, enc_channels=8, dec_channels=8,
            batch_size=4, warmup=2, steps=6, num_train=16, num_val=8, log_every=1, eval_every=3, eval_images=8,
            ckpt_every=3, compile=False, amp=False, device="cpu")


def tiny_cfg(**kw) -> sa.SAConfig:
    return cli.make_config(sa.SAConfig, TINY, kw)


@pytest.mark.parametrize("full_res_kernel, slot_frame, broadcast", [(5, False, 8), (3, False, 8), (3, True, 8),
                                                                   (3, True, 16), (3, False, 32)])
def test_shapes_through_every_stage(full_res_kernel, slot_frame, broadcast):
    cfg = tiny_cfg(full_res_kernel=full_res_kernel, slot_frame=slot_frame, broadcast=broadcast)
    model = sa.SlotAutoencoder(cfg)
    assert model.decoder.cnn[-3].kernel_size == (full_res_kernel, full_res_kernel)
    upsampling = [m for m in model.decoder.cnn if isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2)]
    assert len(upsampling) == round(math.log2(32 // broadcast))     # broadcast -> 2x -> ... -> 32 px
    images = torch.rand(2, 3, 32, 32)
    slots, attn = model.encoder(images)
    assert slots.shape == (2, 4, 16 + 4 * slot_frame) and cfg.encoder.out_dim == slots.shape[-1]
    assert attn.shape == (2, 4, 32 * 32)
    recon, masks, rgb = model.decoder(slots)
    assert recon.shape == (2, 3, 32, 32) and masks.shape == (2, 4, 1, 32, 32) and rgb.shape == (2, 4, 3, 32, 32)
    torch.testing.assert_close(masks.sum(dim=1), torch.ones(2, 1, 32, 32))
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(2, 32 * 32))
    assert torch.isfinite(model(images)["loss"])


def reference_slot_attention(m: sa.SlotAttention, inputs: torch.Tensor, slots: torch.Tensor, iters: int | None = None):
    """Algorithm 1 written out with plain formulas and python loops over slots (no einsum, no nn.GRUCell), for
    iters iterations (default m.iters)."""
    def layer_norm(x, ln):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def gru(x, h, cell):
        wi, wh, bi, bh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
        d = h.shape[-1]
        gi, gh = x @ wi.T + bi, h @ wh.T + bh
        r = torch.sigmoid(gi[:, :d] + gh[:, :d])
        z = torch.sigmoid(gi[:, d:2 * d] + gh[:, d:2 * d])
        n = torch.tanh(gi[:, 2 * d:] + r * gh[:, 2 * d:])
        return (1 - z) * n + z * h

    x = layer_norm(inputs, m.norm_inputs)
    k, v = x @ m.to_k.weight.T, x @ m.to_v.weight.T
    b, num_slots, d = slots.shape
    for _ in range(iters or m.iters):
        q = layer_norm(slots, m.norm_slots) @ m.to_q.weight.T
        logits = torch.stack([(q[:, i:i + 1] * k).sum(-1) for i in range(num_slots)], 1) / math.sqrt(d)
        attn = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
        a = attn + m.eps
        updates = torch.stack([(a[:, i, :, None] * v).sum(1) / a[:, i].sum(-1, keepdim=True)
                               for i in range(num_slots)], 1)
        slots = gru(updates.reshape(-1, d), slots.reshape(-1, d), m.gru).reshape(b, num_slots, d)
        h = torch.relu(layer_norm(slots, m.norm_mlp) @ m.mlp[0].weight.T + m.mlp[0].bias)
        slots = slots + h @ m.mlp[2].weight.T + m.mlp[2].bias
    return slots, attn


@pytest.mark.parametrize("init", ["gaussian", "learned"])
def test_slot_attention_matches_reference(init):
    torch.manual_seed(0)
    m = sa.SlotAttention(num_slots=5, dim=16, input_dim=12, iters=3, mlp_hidden=24, init=init).double()
    for p in m.parameters():                     # make every weight (norms, biases too) non-trivial
        p.data.normal_(0, 0.5)
    inputs = torch.randn(3, 40, 12, dtype=torch.float64)
    torch.manual_seed(1)
    slots, attn = m(inputs)
    torch.manual_seed(1)
    initial = m.initial_slots(3)
    ref_slots, ref_attn = reference_slot_attention(m, inputs, initial)
    torch.testing.assert_close(slots, ref_slots, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-9, atol=1e-9)


def test_eval_iters_runs_more_iterations_in_eval_mode_only():
    """Training runs iters iterations; eval mode runs eval_iters, each the reference algorithm for that many."""
    torch.manual_seed(0)
    m = sa.SlotAttention(num_slots=5, dim=16, input_dim=12, iters=3, mlp_hidden=24, init="learned",
                         eval_iters=7).double()
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    inputs = torch.randn(3, 40, 12, dtype=torch.float64)
    initial = m.initial_slots(3)
    with torch.no_grad():
        trained = m.train()(inputs)
        evaluated = m.eval()(inputs)
    for (slots, attn), iters in ((trained, 3), (evaluated, 7)):
        ref_slots, ref_attn = reference_slot_attention(m, inputs, initial, iters)
        torch.testing.assert_close(slots, ref_slots, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(attn, ref_attn, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(trained[0], evaluated[0])   # 7 iterations do move the slots
    assert sa.SlotAttention(5, 16, 12, iters=3).eval_iters == 3   # 0 (the default): as trained


def test_eval_iters_is_an_evaluation_setting_a_checkpoint_accepts(tmp_path, monkeypatch):
    """--eval-iters changes how a trained model is scored, not the model: eval of a checkpoint takes it."""
    monkeypatch.chdir(tmp_path)
    ckpt = sa.train(tiny_cfg(out=str(tmp_path / "run"), steps=2))
    trained = cli.config_from_checkpoint(sa.SAConfig, trainlib.load_checkpoint(ckpt)["config"], ckpt)
    _, model, _ = sa.load(ckpt, dataclasses.replace(trained, eval_iters=5))
    assert model.encoder.slot_attention.iters == 3 and model.encoder.slot_attention.eval_iters == 5
    with pytest.raises(sa.InputError, match="--eval-iters"):
        sa.validate(tiny_cfg(eval_iters=-1))


def test_slot_attention_iterates_in_fp32_under_bf16_autocast():
    """The encoder around it may run in bf16; the iterations (logits, softmax, weighted means, GRU) do not."""
    torch.manual_seed(0)
    m = sa.SlotAttention(num_slots=5, dim=16, input_dim=12, iters=3, mlp_hidden=24, init="learned")
    inputs = torch.randn(3, 40, 12)
    with torch.no_grad():
        _, unrounded_attn = m(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            slots, attn = m(inputs.bfloat16())     # what a bf16 CNN hands over
            assert torch.is_autocast_enabled("cpu")   # and autocast is back on for what follows
    assert slots.dtype == attn.dtype == torch.float32
    # the only difference left is the inputs' rounding to bf16
    rounded_slots, rounded_attn = m(inputs.bfloat16().float())
    torch.testing.assert_close(slots, rounded_slots, rtol=0, atol=0)
    torch.testing.assert_close(attn, rounded_attn, rtol=0, atol=0)
    assert not torch.equal(attn, unrounded_attn)   # the rounding shows, so the exact match above is not vacuous


def test_gradient_modes_change_gradients_not_values():
    """full / implicit / bo-qsa compute the same slots; they differ only in where gradients flow."""
    torch.manual_seed(0)
    m = sa.SlotAttention(num_slots=4, dim=8, input_dim=6, iters=3, mlp_hidden=16, init="learned").double()
    inputs = torch.randn(2, 30, 6, dtype=torch.float64)
    outputs, grads = {}, {}
    for mode in sa.SLOT_GRADS:
        m.grad = mode
        m.zero_grad()
        slots, _ = m(inputs)
        slots.square().sum().backward()
        outputs[mode] = slots.detach()
        grads[mode] = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(outputs["full"], outputs["implicit"], rtol=0, atol=0)
    torch.testing.assert_close(outputs["full"], outputs["bo-qsa"], rtol=0, atol=1e-12)  # s + i - i rounds
    # implicit: the initial slots only reach the loss through the detached iterations -> no gradient
    assert grads["implicit"]["slots_init"] is None or not grads["implicit"]["slots_init"].any()
    assert not torch.allclose(grads["full"]["to_q.weight"], grads["implicit"]["to_q.weight"])
    # bo-qsa: the initial slots get exactly the gradient that reaches the last iteration's input slots
    m.grad = "full"
    with torch.no_grad():
        m.iters = 2
        before_last, _ = m(inputs)
        m.iters = 3
    leaf = before_last.clone().requires_grad_(True)
    m.iters, m.initial_slots = 1, lambda b: leaf
    m.zero_grad()
    last, _ = m(inputs)
    last.square().sum().backward()
    torch.testing.assert_close(grads["bo-qsa"]["slots_init"], leaf.grad.sum(0, keepdim=True))
    for name in ("to_q.weight", "to_k.weight", "gru.weight_hh"):   # and the same weight gradients as implicit
        torch.testing.assert_close(grads["bo-qsa"][name], grads["implicit"][name])


def test_xavier_init_matches_keras_defaults():
    model = sa.SlotAutoencoder(tiny_cfg(weight_init="xavier"))
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            w = module.weight
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
            assert w.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-7      # Glorot-uniform bound
            assert w.var().item() == pytest.approx(2 / (fan_in + fan_out), rel=0.35)
            assert module.bias is None or not module.bias.any()
    gru = model.encoder.slot_attention.gru
    torch.testing.assert_close(gru.weight_hh.T @ gru.weight_hh, torch.eye(gru.hidden_size), atol=1e-5, rtol=0)
    assert not gru.bias_ih.any() and not gru.bias_hh.any()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, torch.nn.LayerNorm))


def test_attention_frame_is_the_attention_weighted_centre_and_spread():
    """Slot 0 attends to a 3x5 block of a 6x8 image, slot 1 to the rest: slot 0's frame is the block's mean pixel
    position and per-axis standard deviation, computed here with numpy from the pixel coordinates."""
    height, width = 6, 8
    block = np.zeros((height, width), bool)
    block[1:4, 2:7] = True
    attn = torch.from_numpy(np.stack([block, ~block]).reshape(1, 2, -1).astype(np.float32))
    frame = sa.attention_frame(sa.attention_weights(attn), sa.frame_grid(height, width))
    xs, ys = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    for k, region in enumerate([block, ~block]):
        x, y = xs[region], ys[region]
        expected = torch.tensor([x.mean(), y.mean(), x.std(), y.std()], dtype=torch.float32)
        torch.testing.assert_close(frame[0, k], expected, atol=1e-5, rtol=1e-5)


def test_slot_frame_decoder_draws_a_moved_slot_moved():
    """With slot frames the decoder is equivariant to translation: the same slot with its centre one broadcast
    cell (4 px at 32 px) to the right is drawn 4 px to the right, wherever the convolutions see no border."""
    torch.manual_seed(0)
    cfg = tiny_cfg(slot_frame=True, full_res_kernel=3)
    decoder = sa.SlotAutoencoder(cfg).decoder.eval()
    slot = sa.example_slots(cfg.encoder, 1, slots=1)
    slot[..., 16:] = torch.tensor([-0.2, 0.1, 0.3, 0.3])
    moved = slot.clone()
    moved[..., 16] += 2 / (cfg.decoder.broadcast - 1)   # one cell of the 8x8 broadcast grid in [-1, 1]
    with torch.no_grad():
        rgb, rgb_moved = decoder(slot)[2][0, 0], decoder(moved)[2][0, 0]
    torch.testing.assert_close(rgb_moved[:, :, 16:22], rgb[:, :, 12:18], atol=1e-5, rtol=1e-5)
    assert (rgb_moved[:, :, 16:22] - rgb[:, :, 16:22]).abs().max() > 1e-2   # it did draw something that moves
    collapsed = slot.clone()
    collapsed[..., 18:] = -0.5        # a composed slot's sampled spread may be negative: clamped, still drawn
    assert torch.isfinite(decoder(collapsed)[0]).all()


def shape_attention(shape: str, angle: float, size: int = 32, half: float = 0.3) -> torch.Tensor:
    """(1, 1, size * size) attention spread evenly over one of the generator's 2-D shapes, centred, turned by
    angle, on the frame grid's pixels."""
    x, y = sa.frame_grid(size, size).T.numpy()
    u = (x * np.cos(angle) + y * np.sin(angle)) / half
    v = (-x * np.sin(angle) + y * np.cos(angle)) / half
    inside = torch.from_numpy(scenegen._inside(shape, u, v).astype(np.float32))
    return (inside / inside.sum()).view(1, 1, -1)


def moments_by_loops(attn: torch.Tensor, grid: torch.Tensor, frame: torch.Tensor, eps: float = 1e-8) -> list:
    """The 12 moments of one slot written out pixel by pixel, in attention_moments' order."""
    total = sum(float(a) + eps for a in attn)
    out = [0.0] * 12
    for a, (px, py) in zip(attn.tolist(), grid.tolist()):
        x = 2 * math.tanh((px - float(frame[0])) / float(frame[2]) / 2)
        y = 2 * math.tanh((py - float(frame[1])) / float(frame[3]) / 2)
        terms = [x * x, x * y, y * y, x ** 3, x * x * y, x * y * y, y ** 3,
                 x ** 4, x ** 3 * y, x * x * y * y, x * y ** 3, y ** 4]
        for i, t in enumerate(terms):
            out[i] += (a + eps) / total * t
    return out


def test_shape_moments_tell_how_a_shape_is_turned_where_its_frame_cannot():
    """A triangle pointing up or down, and a square upright or turned 45 degrees, have the same frame (equal
    spreads on both axes); their moments differ: the triangle's y^3 changes sign, the square's x^2 y^2 halves. A
    centred square's odd moments vanish. And the vectorised moments equal a pixel-by-pixel reference."""
    grid = sa.frame_grid(32, 32)

    def frame_and_moments(shape, angle):
        attn = shape_attention(shape, angle)
        weights = sa.attention_weights(attn)
        frame = sa.attention_frame(weights, grid)
        return attn, frame, sa.attention_moments(weights, grid, frame)[0, 0]

    up_attn, up_frame, up = frame_and_moments("triangle", 0.0)
    _, down_frame, down = frame_and_moments("triangle", math.pi)
    torch.testing.assert_close(up_frame[..., 2:], down_frame[..., 2:], atol=0.01, rtol=0.02)
    assert abs(up_frame[0, 0, 2] / up_frame[0, 0, 3] - 1) < 0.1      # a frame cannot tell how it is turned
    assert up[6] * down[6] < 0 and min(abs(up[6]), abs(down[6])) > 0.1   # y^3: the point above or below
    _, upright_frame, upright = frame_and_moments("square", 0.0)
    _, turned_frame, turned = frame_and_moments("square", math.pi / 4)
    torch.testing.assert_close(upright_frame[..., 2:], turned_frame[..., 2:], atol=0.01, rtol=0.03)
    assert abs(upright[[1, 3, 4, 5, 6, 8, 10]]).max() < 1e-3                 # symmetric: odd moments vanish
    assert upright[9] - turned[9] > 0.2                 # x^2 y^2: the corners on the diagonals or on the axes
    torch.testing.assert_close(up, torch.tensor(moments_by_loops(up_attn[0, 0], grid, up_frame[0, 0])),
                               atol=1e-5, rtol=1e-4)


def test_slot_moments_start_silent_then_reach_the_decoder_and_need_frames():
    """The moment projection starts at zero, so a new model draws exactly as the frame-only one; it gets a gradient,
    and once it has weight a slot's shape changes its mask."""
    cfg = tiny_cfg(slot_frame=True, slot_moments=True)
    model = sa.SlotAutoencoder(cfg)
    images = torch.rand(2, 3, 32, 32)
    slots, _ = model.encoder(images)
    assert slots.shape == (2, 4, 16 + 4 + 12) == (2, 4, cfg.encoder.out_dim)
    other_shape = slots.detach().clone()
    other_shape[..., 20:] += 0.5                      # the same slot and frame, another shape
    with torch.no_grad():
        assert torch.equal(model.decoder(slots)[1], model.decoder(other_shape)[1])
    model(images)["loss"].backward()
    assert model.decoder.moment_proj.weight.grad.abs().max() > 0
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.moment_proj.weight)   # as after training
        assert (model.decoder(slots)[1] - model.decoder(other_shape)[1]).abs().max() > 1e-3
    with pytest.raises(InputError, match="--slot-frame 1"):
        sa.validate(tiny_cfg(slot_frame=False, slot_moments=True))


def test_slots_zero_means_most_objects_plus_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scenes = sa.load_split("synthetic-clevr", "train", 32, 16)
    cfg = sa.with_slots_for(scenes, tiny_cfg(slots=0).encoder)
    assert cfg.slots == int(np.asarray(scenes.masks).max()) + 1
    assert sa.with_slots_for(scenes, tiny_cfg(slots=5).encoder).slots == 5
    unmarked = sa.Scenes(scenes.images, np.zeros_like(scenes.masks), "a train split without masks")
    with pytest.raises(sa.InputError, match="--slots N"):   # nothing to count: the user must say
        sa.with_slots_for(unmarked, tiny_cfg(slots=0).encoder)
    assert sa.with_slots_for(unmarked, tiny_cfg(slots=5).encoder).slots == 5


def test_gaussian_init_samples_around_mu():
    m = sa.SlotAttention(num_slots=7, dim=8, input_dim=8, init="gaussian")
    s = m.initial_slots(4000)
    torch.testing.assert_close(s.mean((0, 1)), m.slots_mu.detach().view(-1), atol=0.05, rtol=0)
    torch.testing.assert_close(s.std((0, 1)), m.slots_log_sigma.detach().exp().view(-1), atol=0.05, rtol=0.05)


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = sa.SlotAutoencoder(tiny_cfg(slot_init="learned"))
    images = torch.rand(4, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model(images)["loss"]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model(images)["loss"]
    assert after < before


def train_losses(run_dir):
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_checkpoint_and_exact_resume_with_the_average_of_the_weights(tmp_path, monkeypatch):
    """--ema-decay: the checkpoint keeps the trained weights and their average, a resumed run continues both
    bit-exactly, and everything that scores or reuses the model (load, --encoder-from) takes the average."""
    monkeypatch.chdir(tmp_path)
    full = tiny_cfg(out=str(tmp_path / "full"), ema_decay=0.9)
    sa.train(full)
    first = tiny_cfg(out=str(tmp_path / "split"), steps=3, ema_decay=0.9)
    ckpt = sa.train(first)
    state = trainlib.load_checkpoint(ckpt)
    assert state["step"] == 3 and set(state) >= {"model", "optimizer", "rng", "config", "ema"}
    resumed = tiny_cfg(out=str(tmp_path / "split"), steps=6, ema_decay=0.9)
    sa.train(resumed, resume=str(ckpt))
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")   # bit-identical continuation
    assert len(train_losses(tmp_path / "full")) == 6
    a, b = (trainlib.load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("full", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["model"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    assert any(not torch.equal(a["ema"]["model"][k], a["model"][k]) for k in a["model"])
    _, loaded, _ = sa.load(tmp_path / "full" / "ckpt.pt")
    assert all(torch.equal(value, a["ema"]["model"][key]) for key, value in loaded.state_dict().items())
    encoder = slotdiff.trained_encoder(str(tmp_path / "full" / "ckpt.pt"), full.encoder, quiet=True)
    assert all(torch.equal(value, a["ema"]["model"][f"encoder.{key}"]) for key, value in encoder.items())
    assert (tmp_path / "full" / "loss_curves.png").stat().st_size > 0


@pytest.mark.parametrize("slot_frame, slot_moments", [(False, False), (True, False), (True, True)])
def test_compositional_generation_shapes(tmp_path, monkeypatch, slot_frame, slot_moments):
    monkeypatch.chdir(tmp_path)
    # Gaussian sampling: composed frames may come out negative, which the decoder must survive
    cfg = tiny_cfg(slot_frame=slot_frame, slot_moments=slot_moments, comp_sample="gaussian")
    model = sa.SlotAutoencoder(cfg)
    train_set = sa.load_split("synthetic-clevr", "train", 32, 16)
    images = sa.compositional_generation(model, train_set, 10, cfg, torch.device("cpu"))
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8


def test_time_budget_checkpoints_and_stops_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = sa.train(tiny_cfg(out=str(tmp_path / "run"), steps=50, max_minutes=1e-9))
    state = trainlib.load_checkpoint(ckpt)
    assert state["step"] == 1 and state["finished"]   # ended by the clock: finished, not interrupted
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("fg_ari" in r for r in records)     # the last step still logs and evaluates


def test_cooldown_anneals_the_learning_rate_to_zero_at_the_end_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sa.train(tiny_cfg(out=str(tmp_path / "run"), steps=10, warmup=1, cooldown=0.5))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    plain = [trainlib.lr_warmup_step_decay(s, 4e-4, 1, 100_000, 0.5) for s in range(10)]
    assert lrs[:6] == pytest.approx(plain[:6])                       # steps 0-5: before the last half
    assert lrs[6:] == pytest.approx([plain[s] * (10 - s) / 5 for s in range(6, 10)])   # then linearly to 0


def test_amp_on_a_cpu_without_bf16_trains_in_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainlib, "cpu_has_bf16", lambda: False)
    seen = []
    original = sa.SlotAutoencoder.forward
    monkeypatch.setattr(sa.SlotAutoencoder, "forward",
                        lambda self, images: seen.append(torch.is_autocast_enabled("cpu")) or original(self, images))
    sa.train(tiny_cfg(out=str(tmp_path / "run"), steps=2, amp=True))
    assert seen and not any(seen)
    assert "no bf16 arithmetic" in capsys.readouterr().out
