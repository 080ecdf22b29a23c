"""trainlib.py: schedules, atomic checkpoints, RNG capture, metrics log truncation on resume, Ctrl-C handling."""
import copy
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainlib
from errors import InputError


def test_warmup_cosine_endpoints_and_monotone_decay():
    lrs = [trainlib.lr_warmup_cosine(s, 1.0, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))           # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # then decays
    assert lrs[60] == pytest.approx(0.55)                              # half way: (1 + 0.1) / 2
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_warmup_cosine_follows_the_clock_when_it_is_further_along():
    """spent: the share of a --max-minutes budget used; a run the clock stops at step 20 of 110 ends annealed."""
    f = lambda step, spent: trainlib.lr_warmup_cosine(step, 1.0, warmup=10, total=110, min_ratio=0.1, spent=spent)
    assert f(20, 0.0) == pytest.approx(trainlib.lr_warmup_cosine(20, 1.0, 10, 110, 0.1))
    assert f(20, 0.5) == pytest.approx(0.55) and f(20, 1.0) == pytest.approx(0.1)
    assert f(100, 0.5) == pytest.approx(f(100, 0.0))   # the steps further along: they decide
    assert f(5, 0.9) == pytest.approx(0.6)             # warm-up stays a function of the step


def test_step_decay_halves_every_period_after_warmup():
    f = lambda s: trainlib.lr_warmup_step_decay(s, 4e-4, warmup=100, decay_every=1000, decay_rate=0.5)
    assert f(0) == pytest.approx(4e-4 / 100 * 0.5 ** (0 / 1000))
    assert f(1000) == pytest.approx(2e-4) and f(2000) == pytest.approx(1e-4)


def test_cooldown_falls_linearly_to_zero_over_the_last_share_of_the_budget():
    f = lambda progress: trainlib.cooldown_factor(progress, fraction=0.2)
    assert f(0.0) == f(0.75) == 1.0 and f(0.8) == pytest.approx(1.0)  # untouched before the last fifth
    assert f(0.9) == pytest.approx(0.5) and f(0.95) == pytest.approx(0.25)
    assert f(1.0) == 0.0 and f(1.3) == 0.0                           # never negative past the budget
    assert trainlib.cooldown_factor(0.99, fraction=0.0) == 1.0       # off


def test_time_budget_reports_the_share_spent(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(trainlib.time, "monotonic", lambda: clock[0])
    budget = trainlib.TimeBudget(minutes=10)
    clock[0] += 150
    assert budget.spent() == pytest.approx(0.25) and not budget.expired()
    clock[0] += 451
    assert budget.spent() > 1 and budget.expired()
    assert trainlib.TimeBudget(minutes=0).spent() == 0.0            # no budget: the steps alone count


def test_checkpoint_is_atomic_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    trainlib.save_checkpoint({"w": torch.arange(3)}, path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        trainlib.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(trainlib.load_checkpoint(path)["w"], torch.arange(3))   # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]                 # no temp file left behind


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        trainlib.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable"):
        trainlib.load_checkpoint(bad)


def test_rng_state_restores_all_generators():
    state = trainlib.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    trainlib.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_metrics_log_drops_records_after_resume_step(tmp_path):
    log = trainlib.MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log(step=s, train_loss=float(s))
    resumed = trainlib.MetricsLog(tmp_path / "m.jsonl", resume_step=3)
    assert [r["step"] for r in resumed.records()] == [1, 2, 3]
    fresh = trainlib.MetricsLog(tmp_path / "m.jsonl")
    assert fresh.records() == []


def test_first_ctrl_c_only_requests_a_stop():
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when run as a background job
    with trainlib.StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_loss_curve_plot_is_written(tmp_path):
    records = [{"step": s, "train_loss": 1 / s} for s in range(1, 20)] + [{"step": 10, "val_loss": 0.2}]
    trainlib.plot_loss_curves(records, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


class _RunsCode:
    """Unpickling this calls os.system: what a hostile 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))                 # a bare ~90-byte pickle
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {}, "config": _RunsCode(marker)}, wrapped)  # hidden inside an otherwise normal dict
    for path in (raw, wrapped):
        with pytest.raises(InputError, match=r"(refusing to load|unreadable).*could run code"):
            trainlib.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["sa.py", "eval", "--ckpt", "{evil}"],
    ["sa.py", "--resume", "{evil}"],
    ["slotdiff.py", "--vae", "{evil}", "--steps", "1"],
    ["slotdiff.py", "eval", "--ckpt", "{evil}"],
    ["vae.py", "--resume", "{evil}"],
    ["slotdiff.py", "--resume", "{evil}"],
    ["export.py", "--ckpt", "{evil}"],
])
def test_every_script_refuses_a_code_carrying_checkpoint(argv, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "step": _RunsCode(marker)}, evil)
    root = Path(__file__).resolve().parents[1]
    args = [a.format(evil=evil, folder=tmp_path) for a in argv]
    run = subprocess.run([sys.executable, str(root / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "refusing to load" in run.stderr and "posix.system" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not marker.exists()


def test_compile_notice_reports_the_last_first_step_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the cache folder is relative to the working directory, as the data cache
    assert "first run in this folder" in trainlib.compile_notice("SlotDiffusion")
    trainlib.record_compile_time("SlotDiffusion", 61.24)
    trainlib.record_compile_time("Slot Attention + SBD", 19.1)
    assert "(cached in .cache/inductor: ~61 s last time)" in trainlib.compile_notice("SlotDiffusion")
    monkeypatch.setattr(trainlib, "CHOSEN_COMPILE_CACHE", "/data/kernels")   # the user's TORCHINDUCTOR_CACHE_DIR
    assert "(cached in /data/kernels: ~61 s last time)" in trainlib.compile_notice("SlotDiffusion")
    (tmp_path / ".cache" / "inductor" / "first_step_seconds.json").write_text("{not json")
    assert "first run in this folder" in trainlib.compile_notice("SlotDiffusion")   # a broken file is no error
    assert trainlib.compile_model(torch.nn.Linear(2, 2), enabled=False).__class__ is torch.nn.Linear


def test_compiled_code_is_cached_in_the_project_not_in_tmp(tmp_path, monkeypatch):
    """Building an optimiser imports torch._dynamo, which points TORCHINDUCTOR_CACHE_DIR at /tmp/torchinductor_<user>;
    the compiled kernels must still land in .cache/inductor, or in a folder the user chose."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = torch.nn.Linear(3, 2)
    torch.optim.Adam(model.parameters())
    compiled = trainlib.compile_model(model)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".cache" / "inductor")
    torch.testing.assert_close(compiled(torch.ones(1, 3)), model(torch.ones(1, 3)))
    assert any(p.is_file() for p in (tmp_path / ".cache" / "inductor").rglob("*") if p.suffix != ".json")
    monkeypatch.setattr(trainlib, "CHOSEN_COMPILE_CACHE", str(tmp_path / "mine"))
    trainlib.compile_model(model)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_ema_is_the_ramped_exponential_average_and_round_trips():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = trainlib.EMA(model, decay=0.3)
    expected = 0.0
    for n, weight in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        model.weight.data.fill_(weight)
        ema.update(model)
        decay = min(0.3, (1 + n) / (10 + n))   # 2/11, 3/12, then capped at 0.3
        expected = decay * expected + (1 - decay) * weight
        torch.testing.assert_close(ema.model.weight, torch.full((1, 2), expected))
    assert not ema.model.weight.requires_grad and (model.weight == 4.0).all()   # the trained weights untouched
    copy = trainlib.EMA(torch.nn.Linear(2, 1, bias=False), decay=0.3)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 4 and torch.equal(copy.model.weight, ema.model.weight)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_on_a_cpu_autocasts_to_bf16_only_where_the_hardware_has_it(monkeypatch, native_bf16):
    # on an AVX2-only CPU bf16 is emulated (12.8x slower than fp32 in bench_sa): --amp must then stay in fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    with trainlib.autocast(cpu, enabled=True):
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert trainlib.amp_dtype(cpu) == (torch.bfloat16 if native_bf16 else None)
    with trainlib.autocast(cpu, enabled=False):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_fused_adam_takes_the_steps_of_torchs_reference_adam_and_resumes_from_its_state():
    """trainlib.adam (fused) against torch's per-tensor loop, over param groups with their own learning rates and
    clipped gradients; then a state the loop wrote (checkpoints from before the fused optimiser) continues in it."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    groups = lambda net: [dict(params=net[0].parameters(), lr=3e-2), dict(params=net[2].parameters(), lr=1e-2)]
    fused = trainlib.adam(groups(nets[0]), betas=(0.9, 0.99))
    reference = torch.optim.Adam(groups(nets[1]), betas=(0.9, 0.99), foreach=False)
    scaler = trainlib.make_grad_scaler(torch.device("cpu"), False)
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    for _ in range(20):
        for net, opt in zip(nets, (fused, reference)):
            trainlib.optimizer_step(((net(x) - y) ** 2).mean(), opt, scaler, net, grad_clip=0.5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = trainlib.adam(groups(nets[0]), betas=(0.9, 0.99))
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))   # as torch.load gives it: no shared moments
    nets[1].load_state_dict(nets[0].state_dict())     # both nets continue from the same weights and moments
    for net, opt in zip(nets, (resumed, reference)):
        trainlib.optimizer_step(((net(x) - y) ** 2).mean(), opt, scaler, net, grad_clip=0.5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_end_of_a_run_says_when_its_segmentation_fell_well_below_its_peak():
    rising = [{"step": 100, "fg_ari": 0.5}, {"step": 150, "train_loss": 0.1}, {"step": 200, "fg_ari": 0.8}]
    assert trainlib.decline_note(rising) is None
    assert trainlib.decline_note(rising + [{"step": 300, "fg_ari": 0.78}]) is None   # within 0.03 of the peak
    note = trainlib.decline_note(rising + [{"step": 300, "fg_ari": 0.7}])
    assert note == ("note: val FG-ARI (periodic eval subset) ended at 0.700, 0.100 below its peak of 0.800 at step "
                    "200; the checkpoint holds the last step")
    assert trainlib.decline_note([{"step": 1, "train_loss": 0.1}]) is None   # no masks, no scores


def test_training_bar_eta_is_the_budget_left_even_after_an_evaluation_pause(monkeypatch):
    """Under a time budget the bar's ETA must be the time left of it, at every update after the first half
    minute: 20 steps a second with a 1.5 s evaluation pause (tqdm's default smoothing and a 1000-unit bar were off
    by up to a minute, and showed 22 minutes left of 20 on a real run)."""
    clock = [1000.0]
    monkeypatch.setattr(trainlib.time, "monotonic", lambda: clock[0])
    progress = trainlib.TrainProgress(0, 100_000, minutes=20)
    bar = progress.bar
    bar._time = lambda: clock[0]                       # tqdm's own clock
    bar.start_t = bar.last_print_t = clock[0]
    errors = []
    for step in range(1, 2000):
        clock[0] += 0.05 + (1.5 if step == 560 else 0)
        progress.update(step)
        meter, elapsed = bar.format_dict, clock[0] - 1000
        if elapsed > 30:
            rate = meter["rate"] or meter["n"] / meter["elapsed"]
            errors.append(abs((meter["total"] - meter["n"]) / rate - (20 * 60 - elapsed)))
    progress.close()
    assert max(errors) < 2
