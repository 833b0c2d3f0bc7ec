"""Stage 3: self-rollout vs generate(), gradient truncation, the DMD gradient and critic loss by hand, which
network each update touches, a toy run with exact resume."""
import os

import pytest
import torch
from helpers import (REPO, assert_preview_grid, assert_adam_step, assert_close_across_processes, assert_same_run, cli_args,
                     kill_resume_equals_straight, read_metrics, run_script, tiny_checkpoint)
from safetensors.torch import load_file

import common
import model as M
import sample
import stage3_asym_dmd as S3
import toyworld


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
        def __call__(self, x, t, context, causal=None, cameras=None):
            assert causal is False and cameras is None  # the real score is bidirectional; a text-only run
            return torch.stack([torch.full_like(x[0], float(c[0, 0])) for c in context])  # v = context value
    x_t = torch.full((1, 1, 1, 1, 1), 0.5)
    t = torch.full((1, 1), 500.0)
    x0 = S3.real_score_x0(Stub(), x_t, t, torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0), 4.0)
    # v = 1 + 4·(2 − 1) = 5;  x0 = 0.5 − 0.5·5 = −2  (the official c + 3(c − u) gives the same 5)
    assert x0.item() == pytest.approx(-2.0)


def test_critic_loss_by_hand():
    class Stub:
        def __call__(self, x_t, t, context, causal=None, cameras=None):
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
    gradient = S3.dmd_gradient(x.detach(), x0_fake, x0_real)
    params = list(generator.blocks.parameters())
    # the generator's parameters get exactly the DMD gradient pushed back through the rollout: the
    # vector-Jacobian product of gradient/numel (what d loss/dx is), computed here independently of the loss
    expected = torch.autograd.grad(x, params, grad_outputs=gradient / x.numel(), retain_graph=True)
    S3.dmd_generator_loss(x, gradient).backward()
    for p, e in zip(params, expected):  # same graph, same process: only the float64 loss's last rounding differs
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in list(fake.parameters()) + list(real.parameters()))
    generator.zero_grad(set_to_none=True)
    with torch.no_grad():
        x = S3.self_rollout(generator, noise, context, TWO_STEP, FOUR_STEP, 0, 1, torch.Generator().manual_seed(1))
    S3.critic_loss(fake, x, torch.randn_like(x), t, context).backward()
    assert all(p.grad is None for p in list(generator.parameters()) + list(real.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.blocks.parameters())


# ---- toy runs (a tiny 1-layer, 32-wide generator, real and fake score: what these tests check does not
# depend on width) ----

LR, CRITIC_LR, BETA2 = 1e-3, 1e-3, 0.999


@pytest.fixture(scope="module")
def dmd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(toyworld.heldout_prompts()[:6]) + "\n")
    # the generator checkpoint holds different raw and EMA weights, so loading the wrong one is visible; real
    # and fake score differ, so x0_fake != x0_real and the DMD gradient is far from zero from the first step
    return dict(generator=tiny_checkpoint(root / "gen", seed=1, ema_seed=2), real=tiny_checkpoint(root / "real", 3, False),
                fake=tiny_checkpoint(root / "fake", 4, False), prompts=str(prompts))


def stage3_args(models, out_dir, **overrides):
    args = dict(generator=models["generator"], generator_use_ema="true", real_score=models["real"],
                fake_score=models["fake"], prompts=models["prompts"], text_encoder="toy", codec="toy", num_frames=3,
                latent_height=16, latent_width=16, device="cpu", mixed_precision="false",
                activation_checkpointing="true", lr=LR, critic_lr=CRITIC_LR, beta1=0.0, beta2=BETA2, weight_decay=0.0,
                batch_size=1, grad_accum=1, critic_updates=2, max_steps=4, ema_start=2, log_every=1, save_every=1,
                sample_every=0, out_dir=out_dir)
    args.update(overrides)
    return cli_args(**args)


SCRIPT = REPO / "stage3_asym_dmd.py"


@pytest.fixture(scope="module")
def dmd_straight(dmd_models, tmp_path_factory):
    """The uninterrupted 4-step run the resume and kill tests compare with (a fresh process, one thread)."""
    out = str(tmp_path_factory.mktemp("dmd_straight") / "run")
    run_script(SCRIPT, stage3_args(dmd_models, out))
    return out


def weights_at(run_dir, step, name):
    return load_file(os.path.join(run_dir, f"step_{step:07d}", f"{name}.safetensors"))


def optimizer_state(run_dir, step, name):
    state = torch.load(os.path.join(run_dir, f"step_{step:07d}", "state.pt"), map_location="cpu", weights_only=True)
    return state["optimizers"][name]["state"]


def test_toy_dmd_run_trains_both_networks_from_the_right_weights_and_resumes_exactly(dmd_models, dmd_straight,
                                                                                     tmp_path):
    rows = read_metrics(dmd_straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1 of the generator is AdamW applied to the Stage-2 EMA weights (generator_use_ema=true) with the
    # moments it recorded; and the DMD gradient is not zero: Adam's first step is about lr·sign(g) wherever
    # |g| >> eps, so most weights of every parameter moved by more than lr/2 (an all-zero gradient moves none)
    initial = load_file(os.path.join(dmd_models["generator"], "ema.safetensors"))
    state = optimizer_state(dmd_straight, 1, "optimizer")
    after = weights_at(dmd_straight, 1, "model")
    assert_adam_step(initial, after, state, LR, 0.0, 0.0, BETA2)
    moved = {k: ((after[k] - initial[k]).abs() > LR / 2).float().mean().item() for k in state}
    assert min(moved.values()) > 0.5, moved
    # the critic (2 updates in step 1) moved off the fake score's weights the same way
    fake = load_file(os.path.join(dmd_models["fake"], "model.safetensors"))
    critic = weights_at(dmd_straight, 1, "critic")
    moved = {k: ((critic[k] - fake[k]).abs() > CRITIC_LR / 2).float().mean().item() for k in fake}
    assert min(moved.values()) > 0.5, moved
    for step in (2, 3, 4):  # every later generator step is AdamW on the previous step's weights
        assert_adam_step(weights_at(dmd_straight, step - 1, "model"), weights_at(dmd_straight, step, "model"),
                         optimizer_state(dmd_straight, step, "optimizer"), LR, 0.0, 0.0, BETA2)
    # the EMA copies the generator until ema_start = 2, then trails it: ema_3 = 0.99·ema_2 + 0.01·model_3
    key = "blocks.0.self_attn.q.weight"
    assert torch.equal(weights_at(dmd_straight, 2, "ema")[key], weights_at(dmd_straight, 2, "model")[key])
    expected = torch.lerp(weights_at(dmd_straight, 2, "ema")[key], weights_at(dmd_straight, 3, "model")[key], 0.01)
    torch.testing.assert_close(weights_at(dmd_straight, 3, "ema")[key], expected, rtol=0, atol=1e-7)
    assert not torch.equal(weights_at(dmd_straight, 4, "model")[key], weights_at(dmd_straight, 4, "critic")[key])
    # a run stopped at step 2 and continued to step 4 ends where the uninterrupted run ends, bit for bit
    resumed = str(tmp_path / "resumed")
    run_script(SCRIPT, stage3_args(dmd_models, resumed, max_steps=2))
    run_script(SCRIPT, stage3_args(dmd_models, resumed, resume="true"))
    assert_same_run(dmd_straight, resumed, num_rows=4)  # every weight file of the last checkpoint + every row


def test_generator_use_ema_false_starts_from_the_raw_weights(dmd_models, tmp_path):
    out = str(tmp_path / "raw")
    S3.main(common.load_config(S3.Config, stage3_args(dmd_models, out, generator_use_ema="false", max_steps=1,
                                                      critic_updates=1)))
    initial = load_file(os.path.join(dmd_models["generator"], "model.safetensors"))
    assert_adam_step(initial, weights_at(out, 1, "model"), optimizer_state(out, 1, "optimizer"), LR, 0.0, 0.0, BETA2)


def test_toy_dmd_sample_grid_shows_the_ema_rollouts_and_bad_prompt_source(dmd_models, tmp_path):
    import encoders
    out = str(tmp_path / "grid")
    cfg = common.load_config(S3.Config, stage3_args(dmd_models, out, max_steps=3, sample_every=3, num_samples=2,
                                                    critic_updates=1, ema_start=1))
    S3.main(cfg)
    # the grid is model.generate() of the EMA weights (here trailing the generator) on the held-out prompts,
    # and its ToyBench row scores those videos
    ema = M.CausalWanModel(M.config_from_checkpoint(common.latest_checkpoint(out)))
    M.load_weights(ema, common.latest_checkpoint(out), use_ema=True)
    raw = load_file(os.path.join(common.latest_checkpoint(out), "model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in ema.state_dict().items())  # EMA != raw weights here
    prompts = toyworld.heldout_prompts()[:2]
    how = sample.Sampling("few_step", steps=tuple(cfg.denoising_steps), shift=cfg.timestep_shift,
                          first_block_steps=tuple(cfg.first_block_steps) or None, context_t=cfg.context_t)
    videos = sample.preview_grid(ema.eval(), how, encoders.load_text_encoder("toy", "cpu"),
                                 encoders.load_codec("toy", "cpu"), prompts, (3, 12, 16, 16), cfg.seed, None)
    assert_preview_grid(out, 3, videos, prompts, tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a prompt file"):
        S3.load_prompts(str(tmp_path / "missing.txt"))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle moves left quickly\n\n a blue square stays still \n")
    assert S3.load_prompts(str(prompt_file)) == ["a red circle moves left quickly", "a blue square stays still"]


def test_empty_first_block_list_rolls_out_every_block_with_the_same_list(dmd_models, tmp_path, monkeypatch):
    """`first_block_steps: []` (configs/toy/dmd_4step.yaml): no ASD list; one exit step for every block."""
    calls = []
    real_rollout = S3.self_rollout

    def recording(model, noise, context, steps, first_block_steps, exit_first, exit_other, *args, **kwargs):
        calls.append((list(steps), first_block_steps, exit_first, exit_other))
        return real_rollout(model, noise, context, steps, first_block_steps, exit_first, exit_other, *args, **kwargs)
    monkeypatch.setattr(S3, "self_rollout", recording)
    S3.main(common.load_config(S3.Config, stage3_args(dmd_models, str(tmp_path / "run"), max_steps=2,
                                                      denoising_steps="[1000, 750, 500, 250]", first_block_steps="[]")))
    four = M.warp_timesteps([1000, 750, 500, 250], 5.0)
    assert len(calls) == 2 * 3 and all(c[0] == four and c[1] is None and c[2] == c[3] for c in calls), calls
    assert len({c[3] for c in calls}) > 1  # the exit step is drawn per rollout


def test_two_rank_fsdp2_run_equals_single_process(dmd_models, tmp_path):
    """Generator, EMA, real and fake score under FSDP2 on 2 gloo ranks (batch 1 each, 2 micro-steps) against
    one process with batch 2: each sample draws its randomness from its own counter, so both see the same
    samples. Compared (helpers.assert_close_across_processes): generator and critic losses and gradient norms,
    and every parameter's gradient (Adam's exp_avg with beta1 = 0); each run's critic step is then checked to
    be AdamW of its own gradient. The generator's lr is 0 here, so the critic's rollouts come from the same
    generator in both runs and nothing compared passes through a rounding-sensitive Adam step."""
    overrides = dict(lr=0.0, grad_accum=2, max_steps=1, critic_updates=1)
    single, sharded = str(tmp_path / "single"), str(tmp_path / "fsdp")
    run_script(SCRIPT, stage3_args(dmd_models, single, batch_size=2, **overrides))
    run_script(SCRIPT, stage3_args(dmd_models, sharded, batch_size=1, **overrides), nproc=2)
    assert_close_across_processes(single, sharded, ("generator_loss", "critic_loss", "generator_grad_norm",
                                                    "critic_grad_norm"), ("optimizer", "critic_optimizer"))
    # FSDP2's CPU-offload policy (configs/dmd_small.yaml: one process under torchrun, parameters, gradients
    # and optimizer state in CPU memory) does the same step
    offloaded = str(tmp_path / "offload")
    run_script(SCRIPT, stage3_args(dmd_models, offloaded, batch_size=2, cpu_offload="true", **overrides), nproc=1)
    assert_close_across_processes(single, offloaded, ("generator_loss", "critic_loss", "generator_grad_norm",
                                                      "critic_grad_norm"), ("optimizer", "critic_optimizer"))
    fake = load_file(os.path.join(dmd_models["fake"], "model.safetensors"))
    for run in (single, sharded, offloaded):
        assert_adam_step(fake, weights_at(run, 1, "critic"), optimizer_state(run, 1, "critic_optimizer"),
                         CRITIC_LR, 0.0, 0.0, BETA2)


def test_cpu_offload_without_torchrun_is_refused():
    import types
    with pytest.raises(ValueError, match="cpu_offload needs FSDP2: launch with torchrun"):
        common.shard_model(torch.nn.Linear(2, 2), types.SimpleNamespace(enabled=False), cpu_offload=True)


def test_dmd_run_killed_mid_step_resumes_to_the_uninterrupted_result(dmd_models, dmd_straight, tmp_path):
    # killed in step 2's first critic update (clip call 5: step 1 has 3, one per update), gradients computed
    # but not applied: step 1 stays latest, and the resumed run must redo step 2's generator update too
    left = kill_resume_equals_straight(SCRIPT, lambda out: stage3_args(dmd_models, out), tmp_path, dmd_straight,
                                       ["pause_in_step:5"])
    assert [os.path.basename(p) for p in left] == ["step_0000001"], left
