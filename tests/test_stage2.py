"""Stage 2: causal CD (eq. 3-4) by hand, gradient isolation, the ODE baseline vs generate(), toy runs."""
import os

import pytest
import torch
from helpers import (REPO, assert_preview_grid, assert_adam_step, assert_close_across_processes, assert_same_run, cli_args,
                     kill_resume_equals_straight, read_metrics, run_script, tiny_checkpoint)
from safetensors.torch import load_file

import common
import model as M
import sample
import stage2_causal_cd as S2
import toyworld


def tiny_model(seed):
    torch.manual_seed(seed)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=2)
    model = M.CausalWanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class ConstantVelocity:
    """A stub network: v = a constant per conditioning (keyed by the context's first value); records calls."""

    def __init__(self, by_context):
        self.by_context, self.calls = by_context, []

    def __call__(self, x, t, context, clean_x=None, **kw):
        self.calls.append(dict(x=x.clone(), t=t.clone(), clean_x=clean_x))
        return torch.stack([torch.full_like(x[0], self.by_context[float(c[0, 0])]) for c in context])


# ---- eq. 3 step by step ----


def test_teacher_step_is_an_euler_step_on_the_cfg_velocity():
    x_t = torch.full((1, 2, 1, 1, 1), 0.5)
    x_gt = torch.zeros(1, 2, 1, 1, 1)
    cond, uncond = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    teacher = ConstantVelocity({1.0: 2.0, 0.0: 1.0})  # v_c = 2, v_u = 1
    t, t_next = torch.tensor([[900.0, 900.0]]), torch.tensor([[850.0, 850.0]])
    x_hat = S2.teacher_euler_step(teacher, x_t, t, t_next, x_gt, cond, uncond, guidance_scale=3.0)
    # v = 1 + 3·(2 − 1) = 4;  x̂ = 0.5 − (0.90 − 0.85)·4 = 0.3
    assert x_hat.flatten().tolist() == pytest.approx([0.3, 0.3])
    assert torch.equal(teacher.calls[0]["clean_x"], torch.cat([x_gt, x_gt]))  # teacher-forced on the GT prefix


def test_cd_loss_by_hand_and_ema_target_at_t_prime():
    x_gt = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    noise = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    cond, uncond = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    t, t_next = torch.full((1, 2), 500.0), torch.full((1, 2), 400.0)
    teacher = ConstantVelocity({1.0: 1.0, 0.0: 0.0})  # v = 0 + 3·1 = 3
    ema = ConstantVelocity({1.0: 0.5, 0.0: 0.0})
    student = ConstantVelocity({1.0: 2.0, 0.0: 0.0})
    loss, distance = S2.cd_loss(student, ema, teacher, x_gt, noise, t, t_next, cond, uncond, 3.0,
                                weight=torch.tensor([2.0]))
    # x_t = 0.5·x_gt + 0.5·ε = [0.5, 0];  x̂ = x_t − 0.1·3 = [0.2, −0.3]
    # target = x̂ − 0.4·0.5 = [0.0, −0.5];  prediction = x_t − 0.5·2 = [−0.5, −1]
    # distance = mean([0.25, 0.25]) = 0.25; loss = 2 · 0.25 = 0.5
    assert ema.calls[0]["t"].flatten().tolist() == [400.0, 400.0]  # the EMA target is evaluated at t'
    assert ema.calls[0]["x"].flatten().tolist() == pytest.approx([0.2, -0.3])
    assert student.calls[0]["t"].flatten().tolist() == [500.0, 500.0]
    assert distance.tolist() == pytest.approx([0.25]) and loss.item() == pytest.approx(0.5)


def test_cd_loss_on_real_models_equals_manual_computation_and_isolates_gradients():
    student, ema, teacher = tiny_model(0), tiny_model(1), tiny_model(2)
    for m in (ema, teacher):
        m.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x_gt, noise = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    cond, uncond = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    t, t_next = torch.tensor([[937.5] * 3, [625.0] * 3]), torch.tensor([[930.0] * 3, [600.0] * 3])
    loss, _ = S2.cd_loss(student, ema, teacher, x_gt, noise, t, t_next, cond, uncond, 3.0, torch.ones(2))
    with torch.no_grad():
        sig = lambda tt: (tt / 1000).view(2, 3, 1, 1, 1)  # noqa: E731
        x_t = (1 - sig(t)) * x_gt + sig(t) * noise
        v = teacher(x_t, t, uncond, clean_x=x_gt) + 3 * (teacher(x_t, t, cond, clean_x=x_gt) - teacher(x_t, t, uncond, clean_x=x_gt))
        x_hat = x_t - (sig(t) - sig(t_next)) * v
        target = x_hat - sig(t_next) * ema(x_hat, t_next, cond, clean_x=x_gt)
        prediction = x_t - sig(t) * student(x_t, t, cond, clean_x=x_gt)
        expected = (prediction - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for m in (ema, teacher) for p in m.parameters())  # no gradient reaches φ or θ⁻
    assert sum(p.grad.abs().sum() for p in student.parameters()) > 0


def test_cd_intervals_exclude_the_final_interval_unless_asked():
    grid = M.timestep_grid(48, 5.0)
    g = torch.Generator().manual_seed(0)
    draws = [S2.sample_cd_interval(g, grid, 6, 1) for _ in range(2000)]
    assert all((t == t[0]).all() and (tn == tn[0]).all() for t, tn in draws)  # one t for the whole clip
    ks = {int((grid - t[0]).abs().argmin()) for t, _ in draws}
    assert ks == set(range(47))  # k ~ U{0..46}
    assert all(tn[0] > 0 and torch.equal(tn[0], grid[int((grid - t[0]).abs().argmin()) + 1]) for t, tn in draws)
    final = [S2.sample_cd_interval(g, grid, 6, 1, final_interval=True)[1][0].item() for _ in range(2000)]
    assert 0.0 in final
    t, _ = S2.sample_cd_interval(g, grid, 6, 3, per_block=True)
    assert t[0] == t[1] == t[2] and t[3] == t[4] == t[5]


def test_ode_trajectory_endpoint_equals_teacher_sampling_through_generate():
    teacher = tiny_model(3)
    g = torch.Generator().manual_seed(1)
    x_gt, noise = torch.randn(1, 3, 4, 4, 4, generator=g), torch.randn(1, 3, 4, 4, 4, generator=g)
    cond, uncond = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    grid = M.timestep_grid(8, 5.0)
    states = S2.teacher_ode_trajectory(teacher, noise, x_gt, cond, uncond, 6.0, grid, keep=[0, 2, 4, 6])
    assert states.shape == (1, 5, 3, 4, 4, 4) and torch.equal(states[:, 0], noise)
    sampled = M.generate(teacher, noise, cond, steps=grid.tolist(), sampler="euler", uncond_context=uncond,
                         guidance_scale=6.0, teacher_context=x_gt)
    err = ((states[:, -1] - sampled).abs().max() / sampled.abs().max()).item()
    # two code paths (teacher-forced batch vs generate's per-block calls) reorder fp32 sums of <= 96 terms over
    # 8 steps: <= 8·~10·96·u ≈ 5e-5 relative on any CPU; a wrong step or CFG weight is O(1e-2) or more
    assert err <= 1e-4, err


def test_ode_regression_loss_by_hand():
    states = torch.stack([torch.full((1, 2, 1, 1, 1), v) for v in (1.0, 0.5, 0.2)], dim=1)  # 2 states + endpoint
    stored_t = torch.tensor([1000.0, 500.0])
    student = ConstantVelocity({1.0: 1.0})
    loss, _ = S2.ode_regression_loss(student, states, stored_t, torch.tensor([1]), torch.zeros(1, 2, 1, 1, 1),
                                     torch.ones(1, 3, 4))
    # input = state 1 (0.5) at t = 500: x0 = 0.5 − 0.5·1 = 0; endpoint 0.2 -> 0.04
    assert student.calls[0]["t"].flatten().tolist() == [500.0, 500.0]
    assert loss.item() == pytest.approx(0.04)


# ---- toy runs (a tiny 1-layer, 32-wide teacher: what these tests check does not depend on width) ----

SCRIPT = REPO / "stage2_causal_cd.py"
LR, BETA2, EMA_DECAY = 1e-3, 0.999, 0.9


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    from prepare_data import prepare_toy
    root = tmp_path_factory.mktemp("stage2")
    data = str(root / "data")
    prepare_toy(8, data, seed=0, shard_size=8)
    return data, tiny_checkpoint(root / "tf", seed=0, stage="stage1")  # every weight random, the head too


def stage2_args(data, teacher, out_dir, **overrides):
    args = dict(teacher=teacher, data_dir=data, text_encoder="toy", codec="toy", device="cpu", mixed_precision=False,
                activation_checkpointing=False, lr=LR, beta1=0.0, beta2=BETA2, weight_decay=0.0,
                ema_decay=EMA_DECAY, batch_size=2, grad_accum=1, max_steps=2, log_every=1, save_every=2,
                sample_every=0, out_dir=out_dir)
    args.update(overrides)
    return cli_args(**args)


def losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def weights_at(run_dir, step, name="model"):
    return load_file(os.path.join(run_dir, f"step_{step:07d}", f"{name}.safetensors"))


def adam_state_at(run_dir, step):
    state = torch.load(os.path.join(run_dir, f"step_{step:07d}", "state.pt"), map_location="cpu", weights_only=True)
    return state["optimizers"]["optimizer"]["state"]


def fixed_cd_loss(student_weights, target_weights, teacher_dir, data, grid_points):
    """The CD loss on a fixed batch (all 8 clips, two fixed noise draws) summed over every interval of the grid,
    with a fixed target network: what a training curve whose every step draws its own batch, noise and
    interval cannot show."""
    import encoders

    def net(weights):
        model = common.load_model(teacher_dir, causal=True)[0].eval().requires_grad_(False)
        if weights is not None:
            model.load_state_dict(weights)
        return model
    student, target, teacher = net(student_weights), net(target_weights), net(None)
    clips = common.LatentShards(data)
    x_gt = torch.stack([clips.get(i)[0] for i in range(len(clips))])
    text = encoders.load_text_encoder("toy", "cpu")
    context, uncond = text.encode(clips.prompts), text.encode([text.negative_prompt] * len(clips))
    grid = M.timestep_grid(grid_points, 5.0)
    total = 0.0
    with torch.no_grad():
        for seed in (0, 1):
            noise = torch.randn(x_gt.shape, generator=torch.Generator().manual_seed(seed))
            for k in range(grid_points - 1):
                t, t_next = (torch.full(x_gt.shape[:2], grid[i].item()) for i in (k, k + 1))
                total += S2.cd_loss(student, target, teacher, x_gt, noise, t, t_next, context, uncond, 3.0,
                                    torch.ones(len(clips)))[0].item()
    return total


def test_toy_cd_run_lowers_the_cd_loss_on_a_fixed_batch_and_resumes_exactly(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    # a stationary objective: the target θ⁻ stays θ_0 (ema_decay 1) and the grid has 3 points (2 intervals)
    args = dict(cd_grid_points=3, ema_decay=1.0, lr=3e-4, batch_size=4, max_steps=12, save_every=6)
    straight = str(tmp_path / "cd")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, straight, **args)))
    # on a fixed batch, noise and intervals, against the same target, the trained student is much closer
    initial = load_file(os.path.join(teacher, "model.safetensors"))
    before = fixed_cd_loss(initial, initial, teacher, data, 3)
    after = fixed_cd_loss(weights_at(straight, 12), initial, teacher, data, 3)
    print(f"CD loss on a fixed batch and intervals: {before:.2e} at the start, {after:.2e} after 12 steps")
    assert after < 0.5 * before, (before, after)
    resumed = str(tmp_path / "cd_resumed")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, resumed, **{**args, "max_steps": 6})))
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, resumed, **args, resume="true")))
    assert_same_run(straight, resumed, num_rows=1 + 12)  # the step-0 row holds the (here zero) ODE data cost
    # cumulative teacher forwards: cond + uncond for a batch of 4 per step, continued across the resume
    forwards = [r["teacher_forwards"] for r in read_metrics(resumed) if "loss" in r]
    assert forwards == [2 * 4 * step for step in range(1, 13)], forwards


def test_toy_ode_run_stores_trajectories_and_reports_cost(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    out = str(tmp_path / "ode")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, out, method="ode", ode_steps=8,
                                                      ode_nominal_steps="[1000, 500]")))
    shard = load_file(os.path.join(out, "ode_data", "shard_00000.safetensors"))
    assert shard["states"].shape == (8, 3, 12, 12, 16, 16) and shard["latents"].shape == (8, 12, 12, 16, 16)
    first = read_metrics(out)[0]
    assert first["ode/teacher_forwards"] == 2 * 8 * 8  # cond + uncond, 8 steps, 8 clips
    assert first["ode/bytes_written"] == sum(v.numel() * v.element_size() for v in shard.values())
    assert len(losses(out)) == 2


def test_toy_cd_sample_grid_shows_the_ema_student(toy_teacher, tmp_path):
    import encoders
    data, teacher = toy_teacher
    out = str(tmp_path / "cd_grid")
    cfg = common.load_config(S2.Config, stage2_args(data, teacher, out, max_steps=2, sample_every=2, num_samples=2))
    S2.main(cfg)
    checkpoint = common.latest_checkpoint(out)
    ema = M.CausalWanModel(M.config_from_checkpoint(checkpoint))
    M.load_weights(ema, checkpoint, use_ema=True)
    assert any(not torch.equal(weights_at(out, 2)[k], v) for k, v in ema.state_dict().items())
    prompts = toyworld.heldout_prompts()[:2]
    how = sample.Sampling("few_step", steps=tuple(cfg.sample_steps), first_block_steps=tuple(cfg.first_frame_steps),
                          shift=cfg.timestep_shift)
    videos = sample.preview_grid(ema.eval(), how, encoders.load_text_encoder("toy", "cpu"),
                                 encoders.load_codec("toy", "cpu"), prompts, (12, 12, 16, 16), cfg.seed, None)
    assert_preview_grid(out, 2, videos, prompts, tmp_path)


def test_two_rank_fsdp2_cd_step_equals_single_process(toy_teacher, tmp_path):
    """Stage 2 under torchrun: teacher, student and EMA student sharded on 2 gloo ranks (batch 1 each, 2
    micro-steps) against one process with batch 2; compared as helpers.assert_close_across_processes explains.
    Each run's step is AdamW of its recorded gradient from the teacher's weights, and its EMA moved 1 − decay
    of the way to the new weights."""
    data, teacher = toy_teacher
    single, sharded = str(tmp_path / "single"), str(tmp_path / "fsdp")
    overrides = dict(grad_accum=2, max_steps=1, save_every=1)
    run_script(SCRIPT, stage2_args(data, teacher, single, batch_size=2, **overrides))
    run_script(SCRIPT, stage2_args(data, teacher, sharded, batch_size=1, **overrides), nproc=2)
    assert_close_across_processes(single, sharded, ("loss", "grad_norm"))
    initial = load_file(os.path.join(teacher, "model.safetensors"))
    for run in (single, sharded):
        assert_adam_step(initial, weights_at(run, 1), adam_state_at(run, 1), LR, 0.0, 0.0, BETA2)
        ema, model = weights_at(run, 1, "ema"), weights_at(run, 1)
        for k in initial:  # θ⁻ = lerp(θ⁻_0, θ_1, 1 − decay), a few fp32 roundings
            torch.testing.assert_close(ema[k], torch.lerp(initial[k], model[k], 1 - EMA_DECAY), rtol=0,
                                       atol=4 * 6e-8 * (initial[k].abs().max().item() + 1e-3))


def test_cd_run_killed_in_a_checkpoint_write_resumes_to_the_uninterrupted_result(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    args = lambda out: stage2_args(data, teacher, out, max_steps=6, save_every=1)  # noqa: E731
    straight = str(tmp_path / "straight")
    run_script(SCRIPT, args(straight))
    # killed inside step 3's checkpoint write: a torn temporary directory, step 2 stays latest
    left = kill_resume_equals_straight(SCRIPT, args, tmp_path, straight, ["pause_in_write:3"])
    assert [os.path.basename(p) for p in left] == ["step_0000002"], left
