"""Stage 3: self-rollout vs generate(), gradient truncation, the DMD gradient and critic loss by hand, which
network each update touches, a toy run with exact resume."""
import os

import pytest
import torch
from helpers import assert_same_run, read_metrics

import common
import model as M
import stage1_teacher_forcing as S1
import stage3_asym_dmd as S3


def tiny_model(seed, frames_per_block=1, causal=True):
    torch.manual_seed(seed)
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=2, frames_per_block=frames_per_block, causal=causal)
    model = M.CausalWanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rollout_inputs(num_frames=4, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_frames, 4, 4, 6, generator=g), torch.randn(batch, 8, 16, generator=g)


TWO_STEP = M.warp_timesteps([1000, 500], 5.0)
FOUR_STEP = M.warp_timesteps([1000, 750, 500, 250], 5.0)
TWO_STEP_F32, FOUR_STEP_F32 = (torch.tensor(s, dtype=torch.float32).tolist() for s in (TWO_STEP, FOUR_STEP))


# ---- self-rollout ----


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_rollout_without_grad_exiting_at_the_last_step_equals_generate(frames_per_block):
    model = tiny_model(0, frames_per_block).eval()
    noise, context = rollout_inputs()
    with torch.no_grad():
        ours = S3.self_rollout(model, noise, context, TWO_STEP, FOUR_STEP, exit_first=3, exit_other=1,
                               generator=torch.Generator().manual_seed(5))
    reference = M.generate(model, noise, context, steps=TWO_STEP, first_block_steps=FOUR_STEP,
                           generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


class RecordingModel(torch.nn.Module):
    """Wraps a model and records (start_frame, t) of every cached call."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg, self.calls = model, model.cfg, []

    def tokens_per_frame(self, H, W):
        return self.inner.tokens_per_frame(H, W)

    def forward(self, x, t, context, **kw):
        self.calls.append((kw["start_frame"], float(t[0, 0]), torch.is_grad_enabled()))
        return self.inner(x, t, context, **kw)


def test_first_block_runs_the_four_step_list_and_its_own_exit():
    model = RecordingModel(tiny_model(1))
    noise, context = rollout_inputs(num_frames=3)
    S3.self_rollout(model, noise, context, TWO_STEP, FOUR_STEP, exit_first=2, exit_other=1,
                    generator=torch.Generator().manual_seed(0))
    by_frame = {f: [(t, grad) for start, t, grad in model.calls if start == f] for f in range(3)}
    # block 0: 4-step list, exit at step 2 (the only grad call), then the context pass at t = 0
    four, two = FOUR_STEP_F32, TWO_STEP_F32  # the model receives float32 timesteps
    assert by_frame[0] == [(four[0], False), (four[1], False), (four[2], True), (0.0, False)]
    for f in (1, 2):  # later blocks: the 2-step list, exit at step 1
        assert by_frame[f] == [(two[0], False), (two[1], True), (0.0, False)]
    model.calls.clear()
    S3.self_rollout(model, noise, context, TWO_STEP, None, exit_first=1, exit_other=1,
                    generator=torch.Generator().manual_seed(0))
    assert [t for start, t, _ in model.calls if start == 0] == [*TWO_STEP_F32, 0.0]  # no ASD list


def test_gradient_reaches_only_the_exit_step_forward_of_each_block():
    model = tiny_model(2)
    noise, context = rollout_inputs(num_frames=3)
    noise.requires_grad_(True)
    out = S3.self_rollout(model, noise, context, TWO_STEP, FOUR_STEP, 0, 0, torch.Generator().manual_seed(0))
    # exit 0: every block is a one-shot prediction from its noise; block 1 *sees* block 0 through the cache ...
    (grad_noise,) = torch.autograd.grad(out[:, 1].sum(), noise, retain_graph=True)
    assert grad_noise[:, 1].abs().sum() > 0
    assert torch.equal(grad_noise[:, 0], torch.zeros_like(grad_noise[:, 0]))  # ... but no gradient flows back
    with torch.no_grad():
        changed = noise.detach().clone()
        changed[:, 0] += 1.0
        out_changed = S3.self_rollout(model, changed, context, TWO_STEP, FOUR_STEP, 0, 0,
                                      torch.Generator().manual_seed(0))
    assert not torch.allclose(out_changed[:, 1], out[:, 1].detach())
    # exit > 0: the exit step's input was made under no_grad, so nothing reaches the noise at all
    out = S3.self_rollout(model, noise, context, TWO_STEP, FOUR_STEP, 2, 1, torch.Generator().manual_seed(0))
    out.sum().backward()
    assert noise.grad is None
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


def test_exit_steps_are_drawn_from_each_list():
    g = torch.Generator().manual_seed(0)
    draws = [S3.sample_exit_steps(g, 2, 4) for _ in range(400)]
    assert {a for a, _ in draws} == {0, 1, 2, 3} and {b for _, b in draws} == {0, 1}
    assert all(a == b for a, b in (S3.sample_exit_steps(g, 4, 0) for _ in range(20)))


# ---- DMD by hand ----


def test_dmd_gradient_and_generator_loss_by_hand():
    x = torch.tensor([1.0, 3.0]).view(1, 1, 1, 1, 2).requires_grad_(True)
    x0_real = torch.tensor([0.0, 1.0]).view(1, 1, 1, 1, 2)
    x0_fake = torch.tensor([2.0, 2.0]).view(1, 1, 1, 1, 2)
    gradient = S3.dmd_gradient(x.detach(), x0_fake, x0_real)
    # normaliser = mean(|1 − 0|, |3 − 1|) = 1.5;  gradient = ([2, 2] − [0, 1]) / 1.5 = [4/3, 2/3]
    assert gradient.flatten().tolist() == pytest.approx([4 / 3, 2 / 3])
    loss = S3.dmd_generator_loss(x, gradient)
    assert loss.item() == pytest.approx(0.5 * (16 / 9 + 4 / 9) / 2)  # 0.5·mean(gradient²) = 5/9
    loss.backward()
    assert x.grad.flatten().tolist() == pytest.approx([2 / 3, 1 / 3])  # gradient / numel


def test_dmd_gradient_is_normalised_per_sample():
    x = torch.zeros(2, 1, 1, 1, 2)
    x0_real = torch.tensor([[1.0, 1.0], [4.0, 4.0]]).view(2, 1, 1, 1, 2)
    gradient = S3.dmd_gradient(x, x0_real + 2.0, x0_real)
    assert gradient.flatten().tolist() == pytest.approx([2.0, 2.0, 0.5, 0.5])


def test_real_score_is_standard_cfg_with_weight_four():
    class Stub:
        def __call__(self, x, t, context, causal=None):
            assert causal is False  # the real score is bidirectional
            return torch.stack([torch.full_like(x[0], float(c[0, 0])) for c in context])  # v = context value
    x_t = torch.full((1, 1, 1, 1, 1), 0.5)
    t = torch.full((1, 1), 500.0)
    x0 = S3.real_score_x0(Stub(), x_t, t, torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0), 4.0)
    # v = 1 + 4·(2 − 1) = 5;  x0 = 0.5 − 0.5·5 = −2  (the official c + 3(c − u) gives the same 5)
    assert x0.item() == pytest.approx(-2.0)


def test_critic_loss_by_hand():
    class Stub:
        def __call__(self, x_t, t, context, causal=None):
            assert causal is False
            self.x_t, self.t = x_t, t
            return torch.full_like(x_t, 0.5)
    fake = Stub()
    x, noise = torch.tensor([1.0, -1.0]).view(1, 1, 1, 1, 2), torch.tensor([0.0, 2.0]).view(1, 1, 1, 1, 2)
    loss = S3.critic_loss(fake, x, noise, torch.full((1, 1), 250.0), None)
    # x_t = 0.75·x + 0.25·ε = [0.75, −0.25];  target ε − x = [−1, 3];  loss = mean(1.5², 2.5²) = 4.25
    assert fake.x_t.flatten().tolist() == pytest.approx([0.75, -0.25])
    assert loss.item() == pytest.approx(4.25)


def test_dmd_timesteps_follow_the_shifted_uniform_and_the_clamp():
    t = S3.sample_dmd_timesteps([torch.Generator().manual_seed(i) for i in range(100_000)], 5.0, 20.0, 980.0)
    assert t.dtype == torch.float32 and t.min() == 20.0 and t.max() == 980.0
    # u ≥ 0.908 maps above 980 (92 of the 1000 values); u ≤ 0.004 maps below 20 (5 values)
    assert (t == 980.0).float().mean().item() == pytest.approx(0.092, abs=0.005)
    assert (t == 20.0).float().mean().item() == pytest.approx(0.005, abs=0.0015)
    inside = t[(t > 20) & (t < 980)]
    u = inside.double() / 1000 / (5 - 4 * inside.double() / 1000)  # inverse shift: should be k/1000
    assert torch.allclose(u * 1000, (u * 1000).round(), atol=1e-3)


def test_generator_pass_grads_only_the_generator_and_critic_pass_only_the_critic():
    generator, real, fake = tiny_model(3), tiny_model(4, causal=False), tiny_model(5, causal=False)
    real.requires_grad_(False)
    noise, context = rollout_inputs(num_frames=2)
    x = S3.self_rollout(generator, noise, context, TWO_STEP, FOUR_STEP, 1, 1, torch.Generator().manual_seed(0))
    t = torch.full((2, 2), 600.0)
    with torch.no_grad():
        x_t = M.add_noise(x.detach(), torch.randn_like(x), t)
        x0_fake = M.x0_from_v(x_t, fake(x_t, t, context, causal=False), t)
        x0_real = S3.real_score_x0(real, x_t, t, context, torch.zeros_like(context), 4.0)
    S3.dmd_generator_loss(x, S3.dmd_gradient(x.detach(), x0_fake, x0_real)).backward()
    assert all(p.grad is not None for p in generator.blocks.parameters())
    assert all(p.grad is None for p in list(fake.parameters()) + list(real.parameters()))
    generator.zero_grad(set_to_none=True)
    with torch.no_grad():
        x = S3.self_rollout(generator, noise, context, TWO_STEP, FOUR_STEP, 0, 1, torch.Generator().manual_seed(1))
    S3.critic_loss(fake, x, torch.randn_like(x), t, context).backward()
    assert all(p.grad is None for p in list(generator.parameters()) + list(real.parameters()))
    assert all(p.grad is not None for p in fake.blocks.parameters())


# ---- toy run ----


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from prepare_data import prepare_toy
    root = tmp_path_factory.mktemp("stage3")
    data = str(root / "data")
    prepare_toy(8, data, seed=0, shard_size=8)
    base = str(root / "base")
    args = dict(model_preset="toy", init_from=None, causal="false", data_dir=data, text_encoder="toy", codec="toy",
                device="cpu", mixed_precision=False, activation_checkpointing=False, lr=1e-3, beta1=0.9,
                batch_size=2, grad_accum=1, max_steps=2, save_every=1, sample_every=0, out_dir=base)
    S1.main(common.load_config(S1.Config, [f"--{k}={'null' if v is None else v}" for k, v in args.items()]))
    return data, base  # base/step_0000001 and base/step_0000002 (latest): two different bidirectional models


def stage3_args(data, base, out_dir, **overrides):
    # real score = the base, fake score and generator = the base one step earlier, so x0_fake ≠ x0_real and the
    # DMD gradient is far from zero from the first step
    earlier = os.path.join(base, "step_0000001")
    args = dict(generator=earlier, generator_use_ema="false", real_score=base, fake_score=earlier, prompts=data,
                text_encoder="toy", codec="toy", num_frames=3, latent_height=16, latent_width=16, device="cpu",
                mixed_precision="false", activation_checkpointing="true", lr=1e-3, critic_lr=1e-3, batch_size=1,
                grad_accum=2, critic_updates=2, max_steps=4, ema_start=2, log_every=1, save_every=2,
                sample_every=0, out_dir=out_dir)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def metrics(out_dir):
    return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in read_metrics(out_dir)]


def test_toy_dmd_run_trains_both_networks_and_resumes_exactly(toy_base, tmp_path):
    from safetensors.torch import load_file
    data, base = toy_base
    straight = str(tmp_path / "dmd")
    S3.main(common.load_config(S3.Config, stage3_args(data, base, straight)))
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["critic_loss"] > 0 and r["generator_loss"] > 0 for r in rows)
    resumed = str(tmp_path / "dmd_resumed")
    S3.main(common.load_config(S3.Config, stage3_args(data, base, resumed, max_steps=2)))
    S3.main(common.load_config(S3.Config, stage3_args(data, base, resumed, resume="true")))
    assert_same_run(straight, resumed, num_rows=4)  # every weight file of the last checkpoint + every metrics row
    initial = load_file(os.path.join(base, "step_0000001", "model.safetensors"))
    final = {name: load_file(os.path.join(common.latest_checkpoint(straight), f"{name}.safetensors"))
             for name in ("model", "ema", "critic")}
    for name, weights in final.items():
        assert any(not torch.equal(weights[k], initial[k]) for k in weights), f"{name} never changed"
    # generator and critic moved apart (each got only its own updates); the EMA trails the generator after step 2
    key = "blocks.0.self_attn.q.weight"
    assert not torch.equal(final["model"][key], final["critic"][key])
    assert not torch.equal(final["ema"][key], final["model"][key])
    at_start = load_file(os.path.join(straight, "step_0000002", "ema.safetensors"))
    model_at_start = load_file(os.path.join(straight, "step_0000002", "model.safetensors"))
    assert torch.equal(at_start[key], model_at_start[key])  # until ema_start the EMA is a copy


def test_toy_dmd_sample_grid_and_bad_prompt_source(toy_base, tmp_path):
    data, base = toy_base
    out = str(tmp_path / "grid")
    S3.main(common.load_config(S3.Config, stage3_args(data, base, out, max_steps=1, sample_every=1, num_samples=2,
                                                      critic_updates=1, grad_accum=1)))
    assert os.path.isfile(os.path.join(out, "samples_0000001.png"))
    with pytest.raises(FileNotFoundError, match="neither a prompt file"):
        S3.load_prompts(str(tmp_path / "missing.txt"))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle moves left quickly\n\n a blue square stays still \n")
    assert S3.load_prompts(str(prompt_file)) == ["a red circle moves left quickly", "a blue square stays still"]


def test_two_rank_fsdp2_run_equals_single_process(toy_base, tmp_path):
    """Generator, EMA, real and fake score all under FSDP2 on 2 gloo ranks (batch 1 each) against one process
    with batch 2: each sample draws its randomness from its own counter, so both see the same samples."""
    import subprocess
    import sys
    from pathlib import Path
    from safetensors.torch import load_file
    data, base = toy_base
    repo = Path(__file__).resolve().parents[1]
    single = str(tmp_path / "single")
    # the reference runs in its own process with one thread, like each rank: a different thread count changes
    # the CPU kernels' reduction order, which on CI's machine moved ~50x more weights past 1e-6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(repo / "stage3_asym_dmd.py"),
                             *stage3_args(data, base, single, batch_size=2, grad_accum=1, max_steps=1,
                                          critic_updates=2, save_every=1)],
                            cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "stage3_asym_dmd.py"), *stage3_args(data, base, fsdp, batch_size=1, grad_accum=1, max_steps=1,
                                                           critic_updates=2, save_every=1)]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # losses and gradient norms (before clipping) cover the forward and backward of all three networks
    for key in ("generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm"):
        x, y = metrics(single)[0][key], metrics(fsdp)[0][key]
        assert abs(x - y) <= 1e-5 * abs(x), (key, x, y)
    # weights after one AdamW step: equal to 1e-6 except where a gradient element is ~0, since Adam's first
    # step is lr·g/|g| and rounding can flip the sign of a vanishing g (at most 2·lr apart there)
    for name in ("model", "critic"):
        a = load_file(os.path.join(common.latest_checkpoint(single), f"{name}.safetensors"))
        b = load_file(os.path.join(common.latest_checkpoint(fsdp), f"{name}.safetensors"))
        differ = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a)
        total = sum(a[k].numel() for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"stage 3 {name}: FSDP2 2 ranks vs single process: {differ} of {total} weights differ by > 1e-6, "
              f"max {worst:.1e}")
        assert differ <= 5e-4 * total and worst <= 2e-3 + 1e-6, (name, differ, worst)


def test_dmd_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(toy_base, tmp_path):
    from pathlib import Path
    from helpers import sigkill_resume_equals_straight
    data, base = toy_base
    script = Path(__file__).resolve().parents[1] / "stage3_asym_dmd.py"
    killed_at = sigkill_resume_equals_straight(
        script, lambda out: stage3_args(data, base, out, max_steps=6, save_every=1, grad_accum=1),
        tmp_path, kill_after_rows=2)
    print(f"stage 3 SIGKILL left {killed_at} as latest; resumed run == uninterrupted run, bit for bit "
          "(generator, EMA, critic)")
