"""Stage 2: causal CD (eq. 3-4) by hand, gradient isolation, the ODE baseline vs generate(), toy runs."""
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, read_metrics, sigkill_resume_equals_straight

import common
import model as M
import stage1_teacher_forcing as S1
import stage2_causal_cd as S2


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
    assert err <= 1e-5, err


def test_ode_regression_loss_by_hand():
    states = torch.stack([torch.full((1, 2, 1, 1, 1), v) for v in (1.0, 0.5, 0.2)], dim=1)  # 2 states + endpoint
    stored_t = torch.tensor([1000.0, 500.0])
    student = ConstantVelocity({1.0: 1.0})
    loss, _ = S2.ode_regression_loss(student, states, stored_t, torch.tensor([1]), torch.zeros(1, 2, 1, 1, 1),
                                     torch.ones(1, 3, 4))
    # input = state 1 (0.5) at t = 500: x0 = 0.5 − 0.5·1 = 0; endpoint 0.2 -> 0.04
    assert student.calls[0]["t"].flatten().tolist() == [500.0, 500.0]
    assert loss.item() == pytest.approx(0.04)


# ---- toy runs ----


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    from prepare_data import prepare_toy
    root = tmp_path_factory.mktemp("stage2")
    data = str(root / "data")
    prepare_toy(8, data, seed=0, shard_size=8)
    teacher = str(root / "tf")
    args = dict(model_preset="toy", init_from=None, data_dir=data, text_encoder="toy", codec="toy", device="cpu",
                mixed_precision=False, activation_checkpointing=False, lr=1e-3, beta1=0.9, batch_size=2,
                grad_accum=1, max_steps=2, save_every=2, sample_every=0, out_dir=teacher)
    S1.main(common.load_config(S1.Config, [f"--{k}={'null' if v is None else v}" for k, v in args.items()]))
    return data, teacher


def stage2_args(data, teacher, out_dir, **overrides):
    args = dict(teacher=teacher, data_dir=data, text_encoder="toy", codec="toy", device="cpu", mixed_precision=False,
                activation_checkpointing=False, lr=1e-3, beta1=0.9, batch_size=2, grad_accum=1, max_steps=2,
                log_every=1, save_every=2, sample_every=0, out_dir=out_dir)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def test_toy_cd_run_lowers_the_cd_loss_and_resumes_exactly(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    straight = str(tmp_path / "cd")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, straight, max_steps=12, save_every=6)))
    curve = losses(straight)
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3]), curve
    resumed = str(tmp_path / "cd_resumed")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, resumed, max_steps=6, save_every=6)))
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, resumed, max_steps=12, save_every=6,
                                                      resume="true")))
    assert_same_run(straight, resumed, num_rows=1 + 12)  # the step-0 row holds the (here zero) ODE data cost
    # cumulative teacher forwards: cond + uncond for a batch of 2 per step, continued across the resume
    forwards = [r["teacher_forwards"] for r in read_metrics(resumed) if "loss" in r]
    assert forwards == [2 * 2 * step for step in range(1, 13)], forwards


def test_toy_ode_run_stores_trajectories_and_reports_cost(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    out = str(tmp_path / "ode")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, out, method="ode", ode_steps=8,
                                                      ode_nominal_steps="[1000, 500]", beta1=0.9)))
    from safetensors.torch import load_file
    shard = load_file(os.path.join(out, "ode_data", "shard_00000.safetensors"))
    assert shard["states"].shape == (8, 3, 12, 12, 16, 16) and shard["latents"].shape == (8, 12, 12, 16, 16)
    first = read_metrics(out)[0]
    assert first["ode/teacher_forwards"] == 2 * 8 * 8  # cond + uncond, 8 steps, 8 clips
    assert first["ode/bytes_written"] == sum(v.numel() * v.element_size() for v in shard.values())
    assert len(losses(out)) == 2


def test_toy_cd_sample_grid(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    out = str(tmp_path / "cd_grid")
    S2.main(common.load_config(S2.Config, stage2_args(data, teacher, out, max_steps=1, sample_every=1, num_samples=2)))
    assert os.path.isfile(os.path.join(out, "samples_0000001.png"))


def test_cd_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    script = Path(__file__).resolve().parents[1] / "stage2_causal_cd.py"
    killed_at = sigkill_resume_equals_straight(
        script, lambda out: stage2_args(data, teacher, out, max_steps=10, save_every=1), tmp_path, kill_after_rows=4)
    print(f"stage 2 SIGKILL left {killed_at} as latest; resumed run == uninterrupted run, bit for bit")
