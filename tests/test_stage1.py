"""Stage 1: the teacher-forcing loss by hand, timestep sampling, FSDP2 on 2 ranks == 1 process, exact resume."""
import math
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from helpers import (REPO, RELATIVE_ROUNDING, assert_adam_step, assert_close_across_processes, assert_preview_grid,
                     assert_same_run, cli_args, kill_resume_equals_straight, read_metrics, run_script, start_hooked, tiny_checkpoint)
from safetensors.torch import load_file

import common
import model as M
import sample
import stage1_teacher_forcing as S1
import toyworld

# ---- the loss, by hand ----


class RecordingModel:
    """Stands in for the DiT: returns a fixed velocity and records what it was called with."""

    def __init__(self, v):
        self.v, self.calls = v, []

    def __call__(self, x, t, context, **kw):
        self.calls.append(dict(x=x.clone(), t=t.clone(), **kw))
        return self.v


def test_teacher_forcing_loss_by_hand():
    # B=1, F=2 frames, one element each, so every number can be written out
    x0 = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1, 1)
    noise = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1, 1)
    t = torch.tensor([[200.0, 600.0]])
    weight = torch.tensor([[1.0, 0.5]])
    v = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1, 1)
    stub = RecordingModel(v)
    loss, per_frame = S1.diffusion_loss(stub, x0, noise, t, weight, context=None, teacher_forcing=True)
    # x_t = (1-σ)x0 + σε: frame 0: 0.8·1 + 0.2·0.5 = 0.9; frame 1: 0.4·(−2) + 0.6·1 = −0.2
    assert stub.calls[0]["x"].flatten().tolist() == pytest.approx([0.9, -0.2])
    # target ε − x0 = [−0.5, 3]; squared errors [0.25, 1]; weighted mean (1·0.25 + 0.5·1)/2 = 0.375
    assert per_frame.flatten().tolist() == pytest.approx([0.25, 1.0])
    assert loss.item() == pytest.approx(0.375)
    # the clean context is the exact ground truth: never noised, never modified
    assert torch.equal(stub.calls[0]["clean_x"], x0) and torch.equal(stub.calls[0]["t"], t)
    loss_bidir, _ = S1.diffusion_loss(RecordingModel(v), x0, noise, t, weight, None, teacher_forcing=False)
    assert loss_bidir.item() == pytest.approx(0.375)


def test_teacher_forcing_loss_on_a_real_model_equals_manual_forward():
    torch.manual_seed(0)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=2)
    net = M.CausalWanModel(cfg)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    x0, noise = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    t, weight, context = torch.rand(2, 3) * 1000, torch.rand(2, 3), torch.randn(2, 8, 16)
    loss, _ = S1.diffusion_loss(net, x0, noise, t, weight, context, teacher_forcing=True)
    sigma = (t / 1000).view(2, 3, 1, 1, 1)
    v = net((1 - sigma) * x0 + sigma * noise, t, context, clean_x=x0)
    expected = (((v - (noise - x0)) ** 2).mean(dim=(2, 3, 4)) * weight).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_block_timesteps_constant_within_blocks_and_on_the_grid():
    grid = M.timestep_grid(1000, 5.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, index = S1.sample_block_timesteps(g, 6, 3, grid, per_video=False)
        assert t[0] == t[1] == t[2] and t[3] == t[4] == t[5]
        assert torch.equal(t, grid[index]) and t.dtype == torch.float32
    draws = torch.stack([S1.sample_block_timesteps(g, 6, 1, grid, per_video=False)[0] for _ in range(200)])
    assert (draws[:, 0] != draws[:, 1]).any()  # frame-wise: each frame its own t
    video = S1.sample_block_timesteps(g, 6, 1, grid, per_video=True)[0]
    assert (video == video[0]).all()


def test_per_frame_noise_draws_one_t_per_frame_for_that_share_of_clips():
    grid = M.timestep_grid(1000, 5.0)
    draw = lambda g, p, causal=False: S1.sample_timesteps(g, 6, grid, causal=causal, frames_per_block=1,  # noqa: E731
                                                          per_frame_noise=p)[0]
    # off: exactly the old per-clip draw from the same generator state (old runs resume bit-exactly)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(10):
        assert torch.equal(draw(g1, 0.0), S1.sample_block_timesteps(g2, 6, 1, grid, per_video=True)[0])
    # always: no clip has one t for all frames (all six equal by chance: 1000^-5)
    g = torch.Generator().manual_seed(0)
    assert all(len(set(draw(g, 1.0).tolist())) > 1 for _ in range(50))
    # half: the per-frame share of 400 clips is 0.5 within 4 binomial standard deviations (0.1)
    per_frame = sum(len(set(draw(g, 0.5).tolist())) > 1 for _ in range(400)) / 400
    assert abs(per_frame - 0.5) < 0.1, per_frame
    # teacher forcing ignores it: the same per-frame draw as without it, from the same generator state
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(10):
        assert torch.equal(draw(g1, 0.5, causal=True), S1.sample_block_timesteps(g2, 6, 1, grid, per_video=False)[0])


def test_gaussian_weights_match_the_official_values():
    grid = M.timestep_grid(1000, 5.0)
    w = S1.gaussian_grid_weights(grid)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[0].item() == 0.0  # t = 1000 gets no weight
    at = lambda t: w[(grid - t).abs().argmin()].item()  # noqa: E731
    for t, expected in ((950, 0.32), (900, 0.63), (800, 1.21), (500, 2.08), (200, 1.21), (100, 0.64), (20, 0.13)):
        assert at(t) == pytest.approx(expected, abs=0.01), t


# ---- runs: FSDP2 equivalence and exact resume (a tiny 1-layer, 32-wide model: what these tests check does
# not depend on width) ----

SCRIPT = REPO / "stage1_teacher_forcing.py"
LR, BETA2 = 1e-3, 0.999


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from prepare_data import prepare_toy
    out = tmp_path_factory.mktemp("toy_data")
    prepare_toy(8, str(out), seed=0, shard_size=8)
    return str(out)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """init_from of the run tests: every weight random, the head too (a zero head would zero every other
    gradient at step 1, and Adam's first step would then be blind to the gradient's size)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_init") / "ckpt", seed=0, stage="stage1")


def run_args(data_dir, out_dir, init_from, **overrides):
    args = dict(model_preset="toy", init_from=init_from, data_dir=data_dir, text_encoder="toy", codec="toy",
                device="cpu", mixed_precision=False, activation_checkpointing=False, lr=LR, beta1=0.0, beta2=BETA2,
                weight_decay=0.0, text_dropout=0.5, max_steps=1, grad_accum=1, log_every=1, save_every=1,
                sample_every=0, out_dir=out_dir)
    args.update(overrides)
    return cli_args(**args)


def in_process(data, out, init, **overrides):
    S1.main(common.load_config(S1.Config, run_args(data, out, init, **overrides)))


def weights_at(run_dir, step, name="model"):
    return load_file(os.path.join(run_dir, f"step_{step:07d}", f"{name}.safetensors"))


def adam_state_at(run_dir, step):
    state = torch.load(os.path.join(run_dir, f"step_{step:07d}", "state.pt"), map_location="cpu", weights_only=True)
    return state["optimizers"]["optimizer"]["state"]


TWO_RANK = dict(batch_size=1, grad_accum=2, max_steps=4, ema_decay=0.9)


@pytest.fixture(scope="module")
def two_rank_straight(toy_data, tiny_init, tmp_path_factory):
    """An uninterrupted 2-rank FSDP2 run (torchrun, batch 1 per rank, 2 micro-steps, 4 steps, a checkpoint each
    step): compared with one process below, and with a killed-and-resumed 2-rank run."""
    out = str(tmp_path_factory.mktemp("two_rank") / "straight")
    run_script(SCRIPT, run_args(toy_data, out, tiny_init, **TWO_RANK), nproc=2)
    return out


def test_two_rank_fsdp2_steps_equal_single_process(toy_data, tiny_init, two_rank_straight, tmp_path):
    """2 ranks x batch 1 x 2 micro-steps against 1 process x batch 2 x 2 micro-steps (the same samples), from a
    non-zero init (init_from). Compared as helpers.assert_close_across_processes explains: step 1's loss,
    gradient norm and every parameter's gradient; step 2's loss within what step 1's weight difference can
    cause; and each run's steps are AdamW of the gradients it recorded, from the init_from weights."""
    single = str(tmp_path / "single")
    run_script(SCRIPT, run_args(toy_data, single, tiny_init, **{**TWO_RANK, "batch_size": 2, "max_steps": 2}))
    assert_close_across_processes(single, two_rank_straight, ("loss", "grad_norm"), at_step=1)
    # step 2 starts from weights that differ where Adam's first step followed rounding (see helpers); to
    # first order the loss moves by at most |grad|·|Δw| (Cauchy-Schwarz; x2 for the second-order rest)
    delta = math.sqrt(sum((weights_at(single, 1)[k] - weights_at(two_rank_straight, 1)[k]).pow(2).sum().item()
                          for k in weights_at(single, 1)))
    a, b = read_metrics(single)[1], read_metrics(two_rank_straight)[1]
    assert a["step"] == b["step"] == 2
    bound = 2 * a["grad_norm"] * delta + RELATIVE_ROUNDING * abs(a["loss"])
    print(f"step 2: |Δloss| {abs(a['loss'] - b['loss']):.1e} <= {bound:.1e} (|Δw| after step 1: {delta:.1e})")
    assert abs(a["loss"] - b["loss"]) <= bound
    initial = load_file(os.path.join(tiny_init, "model.safetensors"))
    for run in (single, two_rank_straight):
        for step in (1, 2):
            before = initial if step == 1 else weights_at(run, 1)
            assert_adam_step(before, weights_at(run, step), adam_state_at(run, step), LR, 0.0, 0.0, BETA2)


def test_two_rank_run_killed_in_a_checkpoint_write_then_resumed_matches_the_uninterrupted_run(
        toy_data, tiny_init, two_rank_straight, tmp_path):
    """Fault injection under torchrun: SIGKILL the whole 2-rank job (launcher and both ranks) while rank 0 is
    writing step 3's checkpoint, resume with torchrun: bit-identical to the uninterrupted 2-rank run."""
    left = kill_resume_equals_straight(SCRIPT, lambda out: run_args(toy_data, out, tiny_init, **TWO_RANK), tmp_path,
                                       two_rank_straight, ["pause_in_write:3"], nproc=2)
    assert [os.path.basename(p) for p in left] == ["step_0000002"], left


def test_resume_is_bit_identical(toy_data, tiny_init, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = dict(max_steps=4, save_every=2, batch_size=2, ema_decay=0.9)
    in_process(toy_data, straight, tiny_init, **args)
    in_process(toy_data, resumed, tiny_init, **{**args, "max_steps": 2})
    in_process(toy_data, resumed, tiny_init, **args, resume=True)
    assert_same_run(straight, resumed, num_rows=4)
    assert os.path.isfile(os.path.join(straight, "loss.png"))  # the loss curve written with each checkpoint


def test_existing_run_without_resume_is_refused(toy_data, tiny_init, tmp_path):
    out = str(tmp_path / "run")
    in_process(toy_data, out, tiny_init)
    with pytest.raises(SystemExit, match="--resume=true"):
        in_process(toy_data, out, tiny_init)


def test_unknown_config_key_fails_clearly(tmp_path):
    # run from an empty directory: a failed start must not leave a run directory anywhere (nor touch the repo's)
    result = subprocess.run([sys.executable, str(SCRIPT), "--learning_rate=1e-4"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'learning_rate'" in result.stderr
    assert os.listdir(tmp_path) == []


def test_loss_weighting_gaussian_and_uniform(toy_data, tiny_init, tmp_path, monkeypatch):
    """The per-frame weights the loss gets: the Gaussian grid weights of each frame's t (default), all ones
    with `loss_weighting: uniform` (configs/toy/tf.yaml, base.yaml)."""
    seen = []
    real = S1.diffusion_loss

    def recording(model, x0, noise, t, weight, *args, **kwargs):
        seen.append((t.clone(), weight.clone()))
        return real(model, x0, noise, t, weight, *args, **kwargs)
    monkeypatch.setattr(S1, "diffusion_loss", recording)
    grid = M.timestep_grid(1000, 5.0)
    gaussian = S1.gaussian_grid_weights(grid)
    for kind in ("gaussian", "uniform"):
        seen.clear()
        in_process(toy_data, str(tmp_path / kind), tiny_init, max_steps=2, batch_size=2, loss_weighting=kind)
        assert len(seen) == 2
        for t, weight in seen:
            index = (grid[None, None, :] - t[..., None]).abs().argmin(-1)  # [B, F] grid index of each frame's t
            expected = gaussian[index] if kind == "gaussian" else torch.ones_like(weight)
            assert torch.equal(weight, expected), kind
        assert kind == "uniform" or any((w != 1).any() for _, w in seen)  # the two settings differ


def test_sample_grid_shows_the_ema_samples_and_toybench_scores_them(toy_data, tiny_init, tmp_path):
    import encoders
    out = str(tmp_path / "run")
    cfg = common.load_config(S1.Config, run_args(toy_data, out, tiny_init, sample_every=2, max_steps=2,
                                                 sample_steps=2, num_samples=2, ema_decay=0.5))
    S1.main(cfg)
    # the grid is multi-step sampling of the EMA weights (not the raw ones) on held-out prompts, and the
    # ToyBench row scores exactly those videos
    checkpoint = common.latest_checkpoint(out)
    ema = M.CausalWanModel(M.config_from_checkpoint(checkpoint))
    M.load_weights(ema, checkpoint, use_ema=True)
    raw = weights_at(out, 2)
    assert any(not torch.equal(raw[k], v) for k, v in ema.state_dict().items())
    prompts = toyworld.heldout_prompts()[:2]
    how = sample.Sampling("multi_step", sample_steps=cfg.sample_steps, cfg=cfg.sample_guidance, shift=cfg.sample_shift)
    videos = sample.preview_grid(ema.eval(), how, encoders.load_text_encoder("toy", "cpu"),
                                 encoders.load_codec("toy", "cpu"), prompts, (12, 12, 16, 16), cfg.seed, None)
    assert_preview_grid(out, 2, videos, prompts, tmp_path)


def nan_on_calls(monkeypatch, bad_calls):
    """Make diffusion_loss return NaN on the given (1-based) calls: a numerical fault injected into a real run."""
    real, calls = S1.diffusion_loss, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        loss, per_frame = real(*args, **kwargs)
        return (loss * float("nan"), per_frame) if calls[0] in bad_calls else (loss, per_frame)
    monkeypatch.setattr(S1, "diffusion_loss", faulty)


def test_a_non_finite_step_is_skipped_and_logged(toy_data, tiny_init, tmp_path, monkeypatch):
    out = str(tmp_path / "nan_once")
    nan_on_calls(monkeypatch, {2})
    in_process(toy_data, out, tiny_init, max_steps=3, batch_size=2, ema_decay=0.9)
    for name in ("model", "ema"):  # the faulty step left weights (and EMA) untouched; the next one trained
        assert all(torch.equal(weights_at(out, 1, name)[k], weights_at(out, 2, name)[k])
                   for k in weights_at(out, 1, name)), name
        assert any(not torch.equal(weights_at(out, 2, name)[k], weights_at(out, 3, name)[k])
                   for k in weights_at(out, 2, name)), name
        assert all(torch.isfinite(v).all() for v in weights_at(out, 3, name).values())
    rows = read_metrics(out)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0]


def test_sec_per_step_is_the_mean_over_the_steps_since_the_last_row(toy_data, tiny_init, tmp_path, monkeypatch):
    """A fake clock ticks 1 s per optimizer step, so every row must say 1.0 s/step — also a last row after a
    partial interval (max_steps not a multiple of log_every) and the first row after an off-boundary resume.
    vbench_eval's Stage-2 cost multiplies this number by the step gap, so dividing by log_every undercounted."""
    clock = [1000.0]
    real_clip = common.clip_grad_norm

    def clip_and_tick(*args, **kwargs):  # called once per optimizer step
        clock[0] += 1.0
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(common, "clip_grad_norm", clip_and_tick)
    monkeypatch.setattr(S1, "time", types.SimpleNamespace(time=lambda: clock[0]))  # only this script's clock
    out = str(tmp_path / "timed")
    in_process(toy_data, out, tiny_init, max_steps=3, log_every=2, save_every=3, batch_size=2)
    in_process(toy_data, out, tiny_init, max_steps=6, log_every=2, save_every=3, batch_size=2, resume=True)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert [r["sec_per_step"] for r in rows] == [1.0, 1.0, 1.0, 1.0]


def test_non_finite_steps_in_a_row_stop_the_run_with_one_line(toy_data, tiny_init, tmp_path, monkeypatch):
    out = str(tmp_path / "nan_always")
    nan_on_calls(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit, match=r"stopped at step 3: 2 non-finite steps in a row .*last good checkpoint: "
                                         r".*step_0000002.*--resume=true") as stop:
        in_process(toy_data, out, tiny_init, max_steps=6, batch_size=2, max_nonfinite_steps=2)
    assert "\n" not in str(stop.value)
    assert common.latest_checkpoint(out).endswith("step_0000002")
    first, last = weights_at(out, 1), weights_at(out, 2)
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)


ONE_RANK = dict(max_steps=8, batch_size=1, save_every=1, ema_decay=0.9)


@pytest.fixture(scope="module")
def one_rank_straight(toy_data, tiny_init, tmp_path_factory):
    """An uninterrupted single-process run, compared with a SIGTERM-stopped and a SIGKILLed one."""
    out = str(tmp_path_factory.mktemp("one_rank") / "straight")
    run_script(SCRIPT, run_args(toy_data, out, tiny_init, **ONE_RANK))
    return out


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(toy_data, tiny_init, one_rank_straight,
                                                                            tmp_path):
    # the signal arrives at step 3's stop check (hooked_run.py waits for it there), so it lands after the
    # handler exists and before the run ends on any machine; periodic saves are off, so only SIGTERM saves
    args = lambda out: run_args(toy_data, out, tiny_init, **{**ONE_RANK, "save_every": 100})  # noqa: E731
    interrupted = str(tmp_path / "interrupted")
    event = str(tmp_path / "event")
    process = start_hooked(SCRIPT, args(interrupted), "sigterm_at_check:3", event)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=600)
    out, err = open(event + ".out").read(), open(event + ".err").read()
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM: saved step 3 and stopped" in out, out[-500:]
    assert sorted(n for n in os.listdir(interrupted) if n.startswith("step_")) == ["step_0000003"]
    run_script(SCRIPT, [*args(interrupted), "--resume=true"])
    assert_same_run(one_rank_straight, interrupted, num_rows=8)


def test_sigkill_in_a_write_and_mid_step_then_resume_matches_an_uninterrupted_run(
        toy_data, tiny_init, one_rank_straight, tmp_path):
    """Fault injection: SIGKILL the run twice at known points — inside step 3's checkpoint write (a torn
    temporary directory), then in the middle of a step of the resumed run (gradients computed, not applied) —
    resume each time, and compare with the run never killed, bit for bit."""
    # the second process resumes from step 2, so its 3rd clip call is in step 5
    left = kill_resume_equals_straight(SCRIPT, lambda out: run_args(toy_data, out, tiny_init, **ONE_RANK), tmp_path,
                                       one_rank_straight, ["pause_in_write:3", "pause_in_step:3"])
    assert [os.path.basename(p) for p in left] == ["step_0000002", "step_0000004"], left


@pytest.mark.parametrize("bad, message", [(dict(causal=True, per_frame_noise=0.5), "teacher forcing already"),
                                          (dict(causal=False, per_frame_noise=1.5), "probability")])
def test_per_frame_noise_is_checked_before_the_run(bad, message, toy_data, tiny_init, tmp_path):
    with pytest.raises(AssertionError, match=message):
        in_process(toy_data, str(tmp_path / "run"), tiny_init, **bad)
    assert not (tmp_path / "run").exists(), "nothing written"
