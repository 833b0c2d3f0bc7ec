"""
Stage 3 of Causal Forcing++: asymmetric DMD with student self-rollout (paper §2.2 "Stage 3", §4.1).

The causal-CD student of Stage 2 (a few-step AR generator G_θ) is refined by distribution matching distillation
against a *bidirectional* teacher — "asymmetric": the student is causal, the scores are not:

  self-rollout   G_θ generates the whole clip block by block with its own KV cache, as at inference: the first
                 block with the 4-step list (ASD trick), later blocks with the 1/2/4-step list; one random exit
                 step per rollout (own one for the first block); gradient only through the exit-step forward.
  DMD (gen.)     t ~ shifted uniform in [20, 980]; x_t = noised rollout; the gradient of the reverse KL is
                 x0_fake(x_t) − x0_real(x_t), normalised per sample by mean|x − x0_real| (DMD eq. 8), pushed
                 into G_θ through the rollout.   real score = frozen bidirectional model with CFG (w = 4);
                 fake score (critic) = trainable bidirectional model initialised from the base.
  critic         flow matching on fresh no-grad rollouts: the fake score tracks the student's distribution.
                 5 critic updates per generator update.

Units: one `step` here is one generator update (and its 5 critic updates). The official code counts critic
iterations, so its "1K steps" = 200 of ours, and its EMA start at iteration 200 = our step 40 (docs/official_code.md).

Launch:
  python stage3_asym_dmd.py --config configs/toy/dmd_2step.yaml                 # toy, CPU, ~12 min
  torchrun --nproc_per_node=8 stage3_asym_dmd.py --config configs/dmd.yaml      # frame-wise 2-step, paper
  ... --resume=true continues a stopped run to the same result.
"""

import os
import time
from dataclasses import asdict, dataclass

import torch

import common
import model as M
import sample

# -----------------------------------------------------------------------------
# config (defaults = the paper's frame-wise 2-step Wan2.1-1.3B Stage 3; yaml files hold deltas)


@dataclass
class Config:
    # models
    generator: str = "runs/cd"        # Stage-2 run directory (its latest checkpoint), checkpoint or official .pt
    generator_use_ema: bool = True    # start from θ⁻ of causal CD, the weights Stage 2 exists to produce
    real_score: str = "wan_models/Wan2.1-T2V-14B"   # frozen bidirectional teacher (paper and official: 14B)
    real_use_ema: bool = False        # the EMA weights of the real_score checkpoint
    fake_score: str = "wan_models/Wan2.1-T2V-1.3B"  # the critic's initial weights: the 1.3B base (official code)
    fake_use_ema: bool = False        # the EMA weights of the fake_score checkpoint
    model_preset: str = "wan2.1-t2v-1.3b"           # architecture of an official .pt generator / fake score
    real_model_preset: str = "wan2.1-t2v-14b"       # ... and of an official .pt real score
    frames_per_block: int | None = None             # None: the generator's; set it (1 or 3) for an official .pt
    # prompts and text (Stage 3 needs no videos)
    prompts: str = "prompts/vidprom_filtered_extended.txt"  # a .txt (one prompt per line) or a latent-shard dir
    text_encoder: str = "wan_models/Wan2.1-T2V-1.3B"
    codec: str = "wan_models/Wan2.1-T2V-1.3B"
    # self-rollout
    num_frames: int = 21              # latent frames per rollout (81 video frames)
    latent_height: int = 60           # 480 px / 8
    latent_width: int = 104           # 832 px / 8
    denoising_steps: list = (1000, 500)               # nominal list of every block (warped with timestep_shift)
    first_block_steps: list = (1000, 750, 500, 250)   # the ASD first block; [] = the same list as the others
    timestep_shift: float = 5.0
    context_t: float = 0.0            # t of the context pass that writes a finished block into the cache
    # DMD
    real_guidance_scale: float = 4.0  # u + w(c − u); the official c + 3(c − u) is w = 4
    dmd_min_t: float = 20.0           # lowest DMD timestep t: lower draws are clamped up to it
    dmd_max_t: float = 980.0          # highest DMD timestep t: higher draws are clamped down to it
    critic_updates: int = 5           # critic updates per generator update
    # optimisation (paper / official: G 2e-6, critic 4e-7, AdamW (0, 0.999), wd 0.01, clip 10, batch 64)
    lr: float = 2e-6
    critic_lr: float = 4e-7           # learning rate of the fake score (critic)
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    batch_size: int = 1
    grad_accum: int = 8
    max_steps: int = 200              # generator updates (= 1000 official iterations)
    ema_decay: float = 0.99           # of the generator's EMA (the weights to sample and export)
    ema_start: int = 40               # generator updates before the EMA starts trailing (until then it copies)
    # system
    device: str = "auto"
    mixed_precision: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = True
    seed: int = 0
    # output
    out_dir: str = "runs/dmd"
    resume: bool = False
    log_every: int = 5
    save_every: int = 50
    sample_every: int = 50            # PNG of rollouts of the EMA generator (0 = never)
    sample_prompts: list = ()
    num_samples: int = 4
    wandb_project: str | None = None
    max_nonfinite_steps: int = 10     # non-finite loss/gradient: skip the update; this many in a row stop the run


# -----------------------------------------------------------------------------
# self-rollout with the KV cache (paper §2.2, Stage 3), as a pure function


def randn_like(x, generator):
    """Gaussian noise shaped like x from one generator, or from one generator per sample (a list): then each
    sample's noise depends only on its own generator, whatever the batch and rank layout."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == x.shape[0], f"{len(generator)} generators for a batch of {x.shape[0]}"
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sample_exit_steps(generator, num_steps, num_first_steps):
    """The exit step of this rollout: e_other ~ U{0..S−1} shared by every non-first block and e_first ~
    U{0..S_first−1} for the first block (equal to e_other when there is no first-block list)."""
    exit_other = int(torch.randint(0, num_steps, (), generator=generator))
    exit_first = int(torch.randint(0, num_first_steps, (), generator=generator)) if num_first_steps else exit_other
    return exit_first, exit_other


def self_rollout(model, noise, context, steps, first_block_steps, exit_first, exit_other, generator, context_t=0.0,
                 cache_dtype=None, cameras=None):
    """The student generates a clip as it does at inference (model.generate's "renoise" sampler), but stops
    each block at its exit step: block output = the x0-prediction of step `exit` (so with exit 0 it is a
    one-shot prediction from pure noise). Per block of K frames:
        for i < exit (no grad):  x0 = G_θ(x, t_i);  x ← (1 − σ_{i+1})·x0 + σ_{i+1}·ε_fresh
        i = exit:                x0 = G_θ(x, t_exit)   ← the only forward that carries gradient (if enabled)
        context pass (no grad):  G_θ(x0 [+ noise at context_t], context_t) writes the block into the KV cache
    Later blocks therefore condition on the student's own outputs (self forcing). The cache is written only
    by no-grad calls, so backward never sees a changed cache (model.KVCache).
    noise [B, F, C, H, W]; steps / first_block_steps: warped lists (first_block_steps None = steps); generator:
    one torch.Generator or one per sample (randn_like) for the fresh noise; cache_dtype:
    the KV cache's storage (default: the parameters' dtype; bf16 under mixed precision on GPU halves it);
    cameras: None or the frames' (world_to_camera [B, F, 4, 4], intrinsics [B, F, 3, 3]), each block's slice
    given to its denoising calls and its context pass (the action-conditioned world model, §3.3).
    Returns x0 of every block [B, F, C, H, W]."""
    cfg = model.cfg
    B, num_frames, C, H, W = noise.shape
    K = cfg.frames_per_block
    assert num_frames % K == 0, f"{num_frames} frames are not a whole number of {K}-frame blocks"
    first_block_steps = first_block_steps or steps
    assert 0 <= exit_first < len(first_block_steps) and 0 <= exit_other < len(steps), \
        f"exit steps ({exit_first}, {exit_other}) outside the lists {first_block_steps} / {steps}"
    cache = M.KVCache(cfg, B, num_frames, model.tokens_per_frame(H, W), noise.device,
                      cache_dtype or next(model.parameters()).dtype)

    def x0_prediction(x, t_value, f0):
        t = torch.full((B, K), float(t_value), device=x.device)
        return M.x0_from_v(x, model(x, t, context, cache=cache, start_frame=f0,
                                    cameras=M.cameras_for_frames(cameras, f0, K)), t)

    outputs = []
    for block, f0 in enumerate(range(0, num_frames, K)):
        step_list, exit_step = (first_block_steps, exit_first) if block == 0 else (steps, exit_other)
        x = noise[:, f0:f0 + K]  # [B, K, C, H, W]
        with torch.no_grad():
            for i in range(exit_step):
                x0 = x0_prediction(x, step_list[i], f0)
                x = M.add_noise(x0, randn_like(x0, generator), step_list[i + 1])
        x0 = x0_prediction(x, step_list[exit_step], f0)  # grad-enabled if the caller is
        outputs.append(x0)
        with torch.no_grad():
            x_context = x0.detach()
            if context_t > 0:
                x_context = M.add_noise(x_context, randn_like(x_context, generator), context_t)
            model(x_context, torch.full((B, K), float(context_t), device=x0.device), context, cache=cache,
                  start_frame=f0, cameras=M.cameras_for_frames(cameras, f0, K))
    return torch.cat(outputs, dim=1)  # [B, F, C, H, W]


# -----------------------------------------------------------------------------
# the DMD generator loss and the critic loss (paper §2.2, Stage 3; DMD eq. 7–8), as pure functions


def sample_dmd_timesteps(generators, shift, min_t, max_t):
    """One t per sample (one generator each): u ~ U{0, …, 999}/1000, t = 1000·shift(u), clamped to [min_t, max_t]
    (≈9% of draws land on max_t at shift 5). σ = t/1000 exactly (the official code looks σ up on a grid;
    docs/official_code.md). -> [B] float32 on the generators' device."""
    u = torch.stack([torch.randint(0, 1000, (), generator=g, device=g.device) for g in generators]).double() / 1000.0
    return (1000.0 * M.shift_sigma(u, shift)).clamp(min_t, max_t).float()


def real_score_x0(real_score, x_t, t, context, uncond_context, guidance_scale, cameras=None):
    """x0 of the frozen bidirectional teacher with CFG u + w(c − u) (on v, hence on x0: the weights sum to 1).
    x_t [B, F, C, H, W]; t [B, F]; cameras: None or the frames' cameras, the same for both halves."""
    v_cond, v_uncond = real_score(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, uncond_context]),
                                  causal=False, cameras=M.cameras_twice(cameras)).float().chunk(2)
    return M.x0_from_v(x_t.float(), M.guided(v_cond, v_uncond, guidance_scale), t)


def dmd_gradient(x, x0_fake, x0_real):
    """DMD eq. 7–8: ∇_x KL ≈ (x0_fake − x0_real) / mean_{F,C,H,W}|x − x0_real| (per sample). [B, F, C, H, W]"""
    normaliser = (x.float() - x0_real.float()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # [B, 1, 1, 1, 1]
    return (x0_fake.float() - x0_real.float()) / normaliser


def dmd_generator_loss(x, gradient):
    """0.5·mean((x − sg(x − gradient))²): a scalar whose derivative w.r.t. the rollout x is gradient / numel,
    so backward carries the DMD gradient into G_θ through the exit-step forwards. Computed in float64."""
    target = (x.detach().double() - gradient.double())
    return 0.5 * (x.double() - target).pow(2).mean()


def critic_loss(fake_score, x, noise, t, context, cameras=None):
    """Flow matching of the fake score on the student's samples: x_t = (1−σ)x + σε, loss = mean (v_fake − (ε − x))².
    x (a no-grad rollout), noise [B, F, C, H, W]; t [B, F]; cameras: None or the rollout's cameras."""
    x_t = M.add_noise(x, noise, t)
    v = fake_score(x_t, t, context, causal=False, cameras=cameras)
    return (v.float() - (noise.float() - x.float())).pow(2).mean()


# -----------------------------------------------------------------------------
# prompts and the periodic sample grid


def load_prompts(source):
    """Prompts of Stage 3: a text file with one prompt per line, or the captions of a latent-shard directory."""
    if os.path.isdir(source):
        return common.LatentShards(source).prompts
    if not os.path.isfile(source):
        raise FileNotFoundError(f"prompts {source!r} is neither a prompt file (one per line) nor a shard directory")
    with open(source) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{source} holds no prompts")
    return prompts


# -----------------------------------------------------------------------------
# main


def main(cfg):
    # ---- setup ----
    dist_ctx = common.setup_distributed(cfg.device)
    device = dist_ctx.device
    common.print0(f"stage 3 (asymmetric DMD), world size {dist_ctx.world_size}, device {device}, compute "
                  f"{common.compute_dtype(dist_ctx, cfg.mixed_precision)}\n"
                  f"{common.format_config(cfg)}")
    assert cfg.critic_updates >= 1, f"critic_updates must be >= 1, got {cfg.critic_updates}"
    assert 0 <= cfg.dmd_min_t < cfg.dmd_max_t <= 1000, "need 0 <= dmd_min_t < dmd_max_t <= 1000"
    resume_from = common.resume_point(cfg.out_dir, cfg.resume)

    # ---- models: generator G_θ (causal), real score (frozen), fake score / critic (trainable) ----
    torch.manual_seed(cfg.seed)
    def load(path, use_ema, causal, preset, what, frames_per_block=None):
        model, model_cfg, fmt, path = common.load_model(path, use_ema=use_ema, preset=preset, causal=causal,
                                                        frames_per_block=frames_per_block, what=what)
        common.print0(f"{what}: {path} ({fmt}{', EMA' if use_ema else ''}), {model.num_params():,} parameters")
        return model, model_cfg

    generator, gen_cfg = load(cfg.generator, cfg.generator_use_ema, True, cfg.model_preset,
                              "generator (Stage-2 student)", cfg.frames_per_block)
    real, real_cfg = load(cfg.real_score, cfg.real_use_ema, False, cfg.real_model_preset, "real score (frozen)")
    fake, fake_cfg = load(cfg.fake_score, cfg.fake_use_ema, False, cfg.model_preset, "fake score (critic)")
    for name, c in (("real score", real_cfg), ("fake score", fake_cfg)):
        assert (c.in_dim, c.text_dim, c.patch_size) == (gen_cfg.in_dim, gen_cfg.text_dim, gen_cfg.patch_size), \
            f"the {name} works on other latents/text than the generator: {c} vs {gen_cfg}"
    generator.gradient_checkpointing = fake.gradient_checkpointing = cfg.activation_checkpointing
    generator.to(device).train()
    fake.to(device).train()
    real.to(device).eval().requires_grad_(False)
    ema = common.make_ema(generator).eval()  # copies G_θ until ema_start, then trails it
    for m in (generator, ema, real, fake):
        common.shard_model(m, dist_ctx, cfg.mixed_precision, cfg.cpu_offload)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    critic_optimizer = torch.optim.AdamW(fake.parameters(), lr=cfg.critic_lr, betas=(cfg.beta1, cfg.beta2),
                                         weight_decay=cfg.weight_decay)

    # ---- prompts, text, schedules ----
    import encoders
    prompts = load_prompts(cfg.prompts)
    camera_models = {name: c.camera_dims > 0 for name, c in
                     (("generator", gen_cfg), ("real score", real_cfg), ("fake score", fake_cfg))}
    use_cameras = camera_models["generator"]  # the action-conditioned world model of §3.3
    if len(set(camera_models.values())) > 1:
        raise common.ConfigError(f"generator, real and fake score must all take cameras or none: {camera_models}")
    camera_data = None
    if use_cameras:  # the rollouts run under the cameras of the shards the prompts come from
        camera_data = common.LatentShards(cfg.prompts) if os.path.isdir(cfg.prompts) else None
        if camera_data is None or not camera_data.has_cameras():
            raise common.ConfigError(f"a camera-conditioned generator needs prompts from a shard directory with "
                                     f"cameras (prepare_data.py --toy N --world camera); {cfg.prompts} has none")
        assert camera_data.cameras(0)[0].shape[0] == cfg.num_frames, \
            f"the shards' cameras cover {camera_data.cameras(0)[0].shape[0]} frames, the rollout {cfg.num_frames}"
    order = common.DataOrder(len(prompts), cfg.seed)
    text = encoders.load_text_encoder(cfg.text_encoder, device)
    negative = text.encode([text.negative_prompt]).to(device)  # [1, Lt, E]
    shape = (cfg.num_frames, gen_cfg.in_dim, cfg.latent_height, cfg.latent_width)  # [F, C, H, W]
    steps = M.warp_timesteps(cfg.denoising_steps, cfg.timestep_shift)
    first_steps = M.warp_timesteps(cfg.first_block_steps, cfg.timestep_shift) if cfg.first_block_steps else None
    common.print0(f"{len(prompts)} prompts from {cfg.prompts}; rollout {shape}, block steps {steps}, first block "
                  f"{first_steps or steps}; global batch {dist_ctx.world_size * cfg.batch_size * cfg.grad_accum}")

    # ---- resume ----
    modules = {"model": generator, "ema": ema, "critic": fake}
    optimizers = {"optimizer": (generator, optimizer), "critic_optimizer": (fake, critic_optimizer)}
    start_step = 0
    if resume_from is not None:
        start_step = common.resume_training_checkpoint(resume_from, dist_ctx, modules, optimizers)
        common.print0(f"resumed from {resume_from} at step {start_step}")
    log = common.MetricsLog(cfg.out_dir, dist_ctx.is_main, resume_step=start_step if resume_from else None,
                            wandb_project=cfg.wandb_project, config=asdict(cfg))
    run_config = {"model_config": asdict(gen_cfg), "run_config": asdict(cfg), "stage": "stage3_dmd",
                  "generator": cfg.generator, "real_score": cfg.real_score, "fake_score": cfg.fake_score}

    def micro_batch(step, phase, micro):
        """Prompts, text and randomness of one micro-batch. phase 0 = generator update, 1.. = critic updates:
        every phase draws its own prompts ("another prompt batch"). Each sample draws its noise and t from its
        own generator, seeded by its global sample counter, and the exit steps come from the micro-batch index:
        so 2 ranks x batch 1 see exactly what 1 rank x batch 2 sees, and a resumed run repeats an
        uninterrupted one."""
        index = (step * (1 + cfg.critic_updates) + phase) * cfg.grad_accum + micro
        counters = order.batch_counters(index, cfg.batch_size, dist_ctx.rank, dist_ctx.world_size)
        batch_prompts = [prompts[order.item(c)] for c in counters]
        context = text.encode(batch_prompts).to(device)
        generators = [common.sample_generator(cfg.seed, c, device) for c in counters]
        shared = common.sample_generator(cfg.seed + 1, index)  # exit steps: the same on every rank
        exits = sample_exit_steps(shared, len(steps), len(first_steps) if first_steps else 0)
        noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])  # [B, F, C, H, W]
        cameras = None
        if use_cameras:
            cameras = tuple(c.to(device) for c in common.gather_cameras(camera_data, order, counters))
        return context, generators, exits, noise, cameras

    cache_dtype = torch.bfloat16 if (cfg.mixed_precision and device.type == "cuda") else None

    def rollout(context, g, exits, noise, cameras):
        return self_rollout(generator, noise, context, steps, first_steps, *exits, g, cfg.context_t, cache_dtype,
                            cameras)

    # ---- training loop: 1 generator update, then `critic_updates` critic updates ----
    from tqdm import tqdm
    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist_ctx.is_main, desc="stage3 dmd", dynamic_ncols=True)
    step_start, logged_step = time.time(), start_step  # sec_per_step: mean since the last row
    stop = common.StopSignal()  # SIGTERM: save after this step and exit
    guard = common.NonFiniteGuard(cfg.max_nonfinite_steps, cfg.out_dir)
    for step in progress:
        # -- generator: DMD through the self-rollout (real and fake scores only evaluated) --
        generator_loss = 0.0
        for micro in range(cfg.grad_accum):
            context, g, exits, noise, cameras = micro_batch(step, 0, micro)
            if dist_ctx.enabled:
                generator.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with common.autocast_context(dist_ctx, cfg.mixed_precision):
                x = rollout(context, g, exits, noise, cameras)  # [B, F, C, H, W], gradient through the exit steps
                with torch.no_grad():
                    t = sample_dmd_timesteps(g, cfg.timestep_shift, cfg.dmd_min_t, cfg.dmd_max_t)
                    t = t.to(device)[:, None].expand(-1, cfg.num_frames).contiguous()  # [B, F], same t every frame
                    x_t = M.add_noise(x.detach(), randn_like(x.detach(), g), t)
                    x0_fake = M.x0_from_v(x_t.float(), fake(x_t, t, context, causal=False, cameras=cameras).float(), t)
                    x0_real = real_score_x0(real, x_t, t, context, negative.expand_as(context),
                                            cfg.real_guidance_scale, cameras)
                    gradient = dmd_gradient(x.detach(), x0_fake, x0_real)
                loss = dmd_generator_loss(x, gradient)
            (loss / cfg.grad_accum).backward()
            generator_loss += loss.item() / cfg.grad_accum
        generator_grad_norm = common.clip_grad_norm(generator, cfg.grad_clip)
        generator_loss = common.mean_across_ranks(generator_loss, dist_ctx)
        if guard.ok(step + 1, generator_loss=generator_loss, generator_grad_norm=generator_grad_norm):
            optimizer.step()
            common.ema_update(ema, generator, cfg.ema_decay if step + 1 > cfg.ema_start else 0.0)
        optimizer.zero_grad(set_to_none=True)

        # -- critic: flow matching on fresh no-grad rollouts --
        critic_losses, critic_grad_norms = [], []
        for phase in range(1, cfg.critic_updates + 1):
            total = 0.0
            for micro in range(cfg.grad_accum):
                context, g, exits, noise, cameras = micro_batch(step, phase, micro)
                if dist_ctx.enabled:
                    fake.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
                with common.autocast_context(dist_ctx, cfg.mixed_precision):
                    with torch.no_grad():
                        x = rollout(context, g, exits, noise, cameras)
                    t = sample_dmd_timesteps(g, cfg.timestep_shift, cfg.dmd_min_t, cfg.dmd_max_t)
                    t = t.to(device)[:, None].expand(-1, cfg.num_frames).contiguous()  # [B, F]
                    loss = critic_loss(fake, x, randn_like(x, g), t, context, cameras)
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            critic_grad_norms.append(common.clip_grad_norm(fake, cfg.grad_clip))
            total = common.mean_across_ranks(total, dist_ctx)
            if guard.ok(step + 1, critic_loss=total, critic_grad_norm=critic_grad_norms[-1]):
                critic_optimizer.step()
            critic_optimizer.zero_grad(set_to_none=True)
            critic_losses.append(total)
        done = step + 1

        # ---- logging, samples, checkpoints ----
        critic_value = sum(critic_losses) / len(critic_losses)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            seconds = (time.time() - step_start) / (done - logged_step)
            log.log(done, generator_loss=generator_loss, critic_loss=critic_value,
                    generator_grad_norm=generator_grad_norm, critic_grad_norm=max(critic_grad_norms),
                    sec_per_step=seconds, nonfinite_skipped=guard.take_skipped())
            progress.set_postfix(gen=f"{generator_loss:.4f}", critic=f"{critic_value:.4f}")
            step_start, logged_step = time.time(), done
        if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.max_steps):
            codec = encoders.load_codec(cfg.codec, "cpu")
            preview = sample.preview_prompts(cfg.sample_prompts, cfg.num_samples, cfg.text_encoder, prompts)
            path = os.path.join(cfg.out_dir, f"samples_{done:07d}.png") if dist_ctx.is_main else None
            how = sample.Sampling("few_step", steps=tuple(cfg.denoising_steps), shift=cfg.timestep_shift,
                                  first_block_steps=tuple(cfg.first_block_steps) or None, context_t=cfg.context_t)
            sample.preview_grid(ema, how, text, codec, preview, shape, cfg.seed, path,
                                log if cfg.text_encoder == "toy" else None, done, progress.write,
                                cameras=common.cameras_of(camera_data, range(len(preview))) if use_cameras else None)
        stopping = stop.requested(dist_ctx)
        if done % cfg.save_every == 0 or done == cfg.max_steps or stopping:
            common.save_training_checkpoint(cfg.out_dir, done, dist_ctx, modules, optimizers, run_config, log,
                                            curve_keys=("generator_loss", "critic_loss", "generator_grad_norm"))
        if stopping:
            common.print0(f"SIGTERM: saved step {done} and stopped; continue with --resume=true")
            break
    stop.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main, Config, "stage3_asym_dmd.py")
