"""
Stage 2 of Causal Forcing++: causal consistency distillation (paper §3.2, eq. 3–4) — the paper's contribution —
and, with `method: ode`, the causal ODE baseline it replaces (Causal Forcing; paper §3.1–3.2).

Both turn the multi-step AR teacher of Stage 1 into a few-step AR student that approximates the teacher's
AR-conditional flow map f_φ(x_t^i, x_gt^{<i}, t) ↦ x_0^i (eq. 2), always teacher-forced on the ground-truth
prefix (one forward over [clean ‖ noisy] = every frame's conditional at once, model.py):

  causal CD (eq. 3)   online: x_t from a ground-truth clip; ONE Euler step of the teacher (CFG w = 3) to the
                      adjacent grid time t' = t − Δt; match the student G_θ(x_t, t) to its EMA copy
                      G_θ⁻(x̂_t', t') with stop-gradient. No trajectories, no storage.
  causal ODE (eq. 1)  offline: integrate the teacher's PF-ODE for 48 steps (CFG 6) from noise for every clip,
                      store the states at the 4 nominal steps and the endpoint, then regress G_θ(x_tj, t_j)
                      onto the endpoint. Costs 96 teacher forwards and ~6 latent copies of storage per clip.

G_θ(x_t, t) = x_t − σ_t·v_θ(x_t, t) (eq. 4, σ = t/1000) is the same for both, so the two students are directly
comparable; bench.py stage2 measures the cost of each on the same data.

Launch:
  python stage2_causal_cd.py --config configs/toy/cd.yaml                        # toy, CPU
  python stage2_causal_cd.py --config configs/toy/ode.yaml
  torchrun --nproc_per_node=8 stage2_causal_cd.py --config configs/cd.yaml       # Wan2.1-1.3B frame-wise, paper
  ... --resume=true continues a stopped run to the same result.
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import common
import model as M
import sample

# -----------------------------------------------------------------------------
# config (defaults = the paper's frame-wise Wan2.1-1.3B Stage 2; yaml files hold deltas)


@dataclass
class Config:
    method: str = "cd"                # "cd" = causal consistency distillation, "ode" = the causal ODE baseline
    # models
    teacher: str = "runs/tf"          # Stage-1 run directory (its latest checkpoint), checkpoint or official .pt
    teacher_use_ema: bool = False     # the EMA weights of the teacher checkpoint
    init_from: str | None = None      # the student's initial weights; null = the teacher
    init_use_ema: bool = False        # the EMA weights of the init_from checkpoint
    model_preset: str = "wan2.1-t2v-1.3b"  # architecture of an official .pt (which carries no config.json)
    frames_per_block: int | None = None    # None: the teacher's; set it (1 or 3) for an official .pt
    # data and text
    data_dir: str = "data/latents"
    text_encoder: str = "wan_models/Wan2.1-T2V-1.3B"
    codec: str = "wan_models/Wan2.1-T2V-1.3B"
    # causal CD (eq. 3)
    cd_grid_points: int = 48          # N: t_0 = 1000 > t_1 > … > t_47 ≈ 96.15 on the shift-5 grid, 0 excluded
    timestep_shift: float = 5.0
    cd_final_interval: bool = False   # also train t_47 → 0 (official: never; then x̂_0 itself is the target)
    guidance_scale: float = 3.0       # teacher CFG u + w(c − u) in the Euler step
    cd_weighting: str = "uniform"     # w(t) of eq. 3: "uniform" (paper, official: 1) or "inverse_gap" (1/Δσ, normalised)
    per_block_t: bool = False         # one interval per frame block instead of one for the whole clip
    ema_decay: float = 0.99           # θ⁻, updated after every optimizer step from step 0
    # causal ODE baseline
    ode_steps: int = 48               # Euler steps of the teacher's PF-ODE (same shift-5 grid)
    ode_guidance_scale: float = 6.0   # as the official trajectory data
    ode_nominal_steps: list = (1000, 750, 500, 250)  # stored states = these nominal times, warped (k = 0, 12, 24, 36)
    ode_num_clips: int = 0            # clips to make trajectories for (0 = all of data_dir)
    ode_dir: str | None = None        # where trajectory shards go (default: out_dir/ode_data)
    # optimisation (paper: lr 2e-6, AdamW (0, 0.999), wd 0.01, clip 10, global batch 64, 5K steps)
    lr: float = 2e-6
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 8
    max_steps: int = 5000
    # system
    device: str = "auto"
    mixed_precision: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = True
    seed: int = 0
    # output
    out_dir: str = "runs/stage2_cd"
    resume: bool = False
    log_every: int = 10
    save_every: int = 1000
    sample_every: int = 1000          # PNG of few-step student samples (0 = never)
    sample_steps: list = (1000, 500)  # nominal few-step list of the sample grid (warped with timestep_shift)
    first_frame_steps: list = (1000, 750, 500, 250)  # the ASD first-frame list
    sample_prompts: list = ()
    num_samples: int = 4
    wandb_project: str | None = None
    max_nonfinite_steps: int = 10     # non-finite loss/gradient: skip the step; this many in a row stop the run


# -----------------------------------------------------------------------------
# causal CD, eq. 3 step by step (pure functions)


def sample_cd_interval(generator, grid, num_frames, frames_per_block, per_block=False, final_interval=False):
    """Pick the adjacent pair (t_k, t_{k+1}) of eq. 3 with k ~ U{0, …, N−2} on the N-point grid (U{0, …, N−1}
    with the final interval, where t_N = 0). One k for the whole clip, or one per frame block.
    -> t [F], t_next [F] float32 (exact grid values, never bf16)."""
    extended = torch.cat([grid, grid.new_zeros(1)])  # t_0 … t_{N−1}, 0
    num_intervals = len(grid) - 1 + int(final_interval)
    num_draws = num_frames // frames_per_block if per_block else 1
    k = torch.randint(0, num_intervals, (num_draws,), generator=generator)
    k = k.repeat_interleave(frames_per_block if per_block else num_frames)  # [F]
    return extended[k], extended[k + 1]


def teacher_euler_step(teacher, x_t, t, t_next, x_gt, context, uncond_context, guidance_scale, cameras=None):
    """The x̂_{t−Δt} of eq. 3: one explicit Euler step of the AR teacher's PF-ODE, teacher-forced on the
    ground-truth prefix, with classifier-free guidance:
        v = v_φ(x_t | x_gt^{<i}, ∅) + w·(v_φ(x_t | x_gt^{<i}, c) − v_φ(x_t | x_gt^{<i}, ∅))
        x̂_{t'} = x_t − (σ_t − σ_{t'})·v
    x_t, x_gt [B, F, C, H, W]; t, t_next [B, F]; cond and uncond run as one batch of 2B. cameras: None or the
    frames' (world_to_camera, intrinsics) for a camera-conditioned teacher (§3.3), the same for both halves."""
    v_cond, v_uncond = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, uncond_context]),
                               clean_x=torch.cat([x_gt, x_gt]), cameras=M.cameras_twice(cameras)).float().chunk(2)
    v = M.guided(v_cond, v_uncond, guidance_scale)
    step = M.sigma_of(t, x_t) - M.sigma_of(t_next, x_t)  # σ_t − σ_{t'} [B, F, 1, 1, 1], exact fp32
    return (x_t.float() - step * v).to(x_t.dtype)


def consistency_function(model, x_t, t, x_gt, context, cameras=None):
    """Eq. 4: G_θ(x_t^i, x_gt^{<i}, t) = x_t^i − σ_t·v_θ(x_t^i | x_gt^{<i}, t), teacher-forced. At σ = 0 it is
    the identity, which is the consistency boundary condition."""
    return M.x0_from_v(x_t, model(x_t, t, context, clean_x=x_gt, cameras=cameras), t)


def cd_weight(t, t_next, kind, grid):
    """w(t) of eq. 3 per sample: 1 ('uniform', the paper's and the official choice), or the mean grid gap
    divided by this interval's gap σ_t − σ_t' ('inverse_gap': short intervals count more, mean-gap ones 1)."""
    if kind == "uniform":
        return torch.ones_like(t[:, 0])
    mean_gap = (grid[0] - grid[-1]).item() / 1000.0 / (len(grid) - 1)
    return mean_gap / ((t[:, 0] - t_next[:, 0]) / 1000.0)


def cd_loss(student, ema_student, teacher, x_gt, noise, t, t_next, context, uncond_context, guidance_scale,
            weight, cameras=None):
    """Eq. 3 with d = squared L2 (mean over elements):
        x_t = (1 − σ_t)·x_gt + σ_t·ε                                  (forward process on real data)
        x̂_{t'} = teacher_euler_step(x_t)                              (no gradient)
        target = G_θ⁻(x̂_{t'}, x_gt^{<i}, t')                          (EMA student, stop-gradient)
        loss = mean_b w_b · mean_{F,C,H,W} (G_θ(x_t, x_gt^{<i}, t) − target)²
    cameras: None, or the frames' (world_to_camera, intrinsics), given to every model call (the world model).
    Returns (loss, per-sample distances [B])."""
    x_t = M.add_noise(x_gt, noise, t)
    with torch.no_grad():
        x_hat = teacher_euler_step(teacher, x_t, t, t_next, x_gt, context, uncond_context, guidance_scale, cameras)
        target = consistency_function(ema_student, x_hat, t_next, x_gt, context, cameras)
    prediction = consistency_function(student, x_t, t, x_gt, context, cameras)
    distance = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))  # [B]
    return (weight * distance).mean(), distance


# -----------------------------------------------------------------------------
# causal ODE baseline (pure functions)


@torch.no_grad()
def teacher_ode_trajectory(teacher, noise, x_gt, context, uncond_context, guidance_scale, grid, keep):
    """The causal-ODE data of Causal Forcing: integrate the teacher's PF-ODE with Euler over `grid` (then to
    σ = 0) for every frame at once, teacher-forced on x_gt (so frame i is conditioned on x_gt^{<i}), CFG w.
    Returns the states at grid indices `keep` followed by the endpoint: [B, len(keep) + 1, F, C, H, W]."""
    x, states = noise, []
    B, num_frames = noise.shape[:2]
    for k, t_value in enumerate(grid.tolist()):
        if k in keep:
            states.append(x)
        t = torch.full((B, num_frames), t_value, device=noise.device)
        t_next = torch.full_like(t, grid[k + 1].item() if k + 1 < len(grid) else 0.0)
        x = teacher_euler_step(teacher, x, t, t_next, x_gt, context, uncond_context, guidance_scale)
    states.append(x)
    return torch.stack(states, dim=1)


def ode_regression_loss(student, states, stored_t, index, x_gt, context):
    """Eq. 1: ‖G_θ(x_{t_j}, x_gt^{<i}, t_j) − x_0‖² with j = `index` [B] among the stored states (the same j for
    all frames) and x_0 the teacher's ODE endpoint (the last stored state). Returns (loss, per-sample [B])."""
    B, num_frames = x_gt.shape[:2]
    rows = torch.arange(B, device=states.device)
    x_t = states[rows, index]  # [B, F, C, H, W]
    t = stored_t[index][:, None].expand(B, num_frames).contiguous()  # [B, F]
    prediction = consistency_function(student, x_t, t, x_gt, context)
    distance = (prediction.float() - states[:, -1].float()).pow(2).mean(dim=(1, 2, 3, 4))
    return distance.mean(), distance


# -----------------------------------------------------------------------------
# main


def generate_ode_data(cfg, teacher, text, data, dist_ctx, ode_dir):
    """Phase 1 of the causal-ODE baseline: trajectories for every clip (shards split across ranks; finished
    shards are skipped on re-runs). Returns the cost: teacher forwards, seconds and bytes written."""
    grid = M.timestep_grid(cfg.ode_steps, cfg.timestep_shift)
    stored_t = torch.tensor(M.warp_timesteps(cfg.ode_nominal_steps, cfg.timestep_shift))
    keep = [int((grid - t).abs().argmin()) for t in stored_t]
    assert torch.allclose(grid[keep], stored_t, atol=1e-2), \
        f"the nominal steps {list(cfg.ode_nominal_steps)} are not points of the {cfg.ode_steps}-step grid"
    num_clips = cfg.ode_num_clips or len(data)
    shard_size = 64
    negative = text.encode([text.negative_prompt])
    forwards, start, written = 0, time.time(), 0
    from tqdm import tqdm
    for shard in tqdm(range(dist_ctx.rank, math.ceil(num_clips / shard_size), dist_ctx.world_size),
                      desc="ODE trajectories", disable=not dist_ctx.is_main):
        json_path = os.path.join(ode_dir, f"shard_{shard:05d}.json")
        if os.path.isfile(json_path):
            continue
        indices = list(range(shard * shard_size, min(num_clips, (shard + 1) * shard_size)))
        states, clips, prompts = [], [], []
        for first in range(0, len(indices), cfg.batch_size):
            batch = indices[first:first + cfg.batch_size]
            x_gt = torch.stack([data.get(i)[0] for i in batch]).to(dist_ctx.device)
            batch_prompts = [data.prompts[i] for i in batch]
            g = common.sample_generator(cfg.seed + 1, batch[0])
            noise = torch.randn(x_gt.shape, generator=g).to(dist_ctx.device)
            context = text.encode(batch_prompts).to(dist_ctx.device)
            with common.autocast_context(dist_ctx, cfg.mixed_precision):
                trajectory = teacher_ode_trajectory(teacher, noise, x_gt, context,
                                                    negative.to(dist_ctx.device).expand_as(context),
                                                    cfg.ode_guidance_scale, grid, keep)
            forwards += 2 * cfg.ode_steps * len(batch)  # cond + uncond per step and clip
            states.append(trajectory.half().cpu())
            clips.append(x_gt.half().cpu())
            prompts += batch_prompts
        tensors = {"states": torch.cat(states), "latents": torch.cat(clips)}  # [n, 5, F, C, H, W], [n, F, C, H, W]
        common.write_shard(ode_dir, shard, tensors, dict(prompts=prompts, stored_t=stored_t.tolist(), skipped=[]))
        written += sum(v.numel() * v.element_size() for v in tensors.values())
    return dict(teacher_forwards=forwards, seconds=time.time() - start, bytes_written=written)


def main(cfg):
    # ---- setup ----
    dist_ctx = common.setup_distributed(cfg.device)
    device = dist_ctx.device
    common.print0(f"stage 2 ({'causal consistency distillation' if cfg.method == 'cd' else 'causal ODE baseline'}),"
                  f" world size {dist_ctx.world_size}, device {device}, compute "
                  f"{common.compute_dtype(dist_ctx, cfg.mixed_precision)}\n{common.format_config(cfg)}")
    assert cfg.method in ("cd", "ode"), f"method must be 'cd' or 'ode', got {cfg.method!r}"
    assert cfg.cd_weighting in ("uniform", "inverse_gap"), "cd_weighting must be uniform or inverse_gap"
    resume_from = common.resume_point(cfg.out_dir, cfg.resume)

    # ---- models: frozen teacher φ, student θ, EMA student θ⁻ ----
    def load(path, use_ema, what):
        model, model_cfg, fmt, path = common.load_model(path, use_ema=use_ema, preset=cfg.model_preset, causal=True,
                                                        frames_per_block=cfg.frames_per_block, what=what)
        common.print0(f"{what}: {path} ({fmt}{', EMA' if use_ema else ''}), {model_cfg}")
        return model, model_cfg

    teacher, model_cfg = load(cfg.teacher, cfg.teacher_use_ema, "teacher (Stage-1 AR diffusion model)")
    teacher.to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student, _ = load(cfg.init_from or cfg.teacher, cfg.init_use_ema if cfg.init_from else cfg.teacher_use_ema,
                      "student init")
    student.gradient_checkpointing = cfg.activation_checkpointing
    student.to(device).train()
    ema = common.make_ema(student).eval() if cfg.method == "cd" else None  # θ⁻ starts at θ
    for m in (teacher, student, ema):
        if m is not None:
            common.shard_model(m, dist_ctx, cfg.mixed_precision, cfg.cpu_offload)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    K = model_cfg.frames_per_block

    # ---- data and text ----
    import encoders
    text = encoders.load_text_encoder(cfg.text_encoder, device)
    negative = text.encode([text.negative_prompt]).to(device)  # [1, Lt, E]
    clips = common.LatentShards(cfg.data_dir)
    use_cameras = model_cfg.camera_dims > 0  # a camera-conditioned teacher: the world model of §3.3
    if use_cameras != clips.has_cameras():
        raise common.ConfigError(f"the teacher {'takes' if use_cameras else 'takes no'} cameras but the data in "
                                 f"{cfg.data_dir} {'has none' if use_cameras else 'carries them'}; train on data "
                                 f"that matches the teacher (prepare_data.py --toy N --world camera writes cameras)")
    if use_cameras and cfg.method == "ode":
        raise common.ConfigError("the causal ODE baseline is text-only; distil a camera-conditioned teacher with method: cd")
    cost = dict(teacher_forwards=0, seconds=0.0, bytes_written=0)
    if cfg.method == "ode":  # phase 1: offline trajectories, then train on them
        ode_dir = cfg.ode_dir or os.path.join(cfg.out_dir, "ode_data")
        os.makedirs(ode_dir, exist_ok=True)
        cost = generate_ode_data(cfg, teacher, text, clips, dist_ctx, ode_dir)
        if dist_ctx.enabled:
            torch.distributed.barrier()
        common.print0(f"ODE data: {cost['teacher_forwards']} teacher forwards, {cost['seconds']:.1f} s, "
                      f"{cost['bytes_written'] / 2**20:.1f} MiB written to {ode_dir} (rank 0's share)")
        data = common.LatentShards(ode_dir)
        stored_t = torch.tensor(M.warp_timesteps(cfg.ode_nominal_steps, cfg.timestep_shift), device=device)
        del teacher  # the regression needs no teacher
    else:
        data = clips
    order = common.DataOrder(len(data), cfg.seed)
    latent_shape = tuple(data.get(0, "latents")[0].shape)
    grid = M.timestep_grid(cfg.cd_grid_points, cfg.timestep_shift)

    # ---- resume ----
    modules, optimizers = {"model": student, "ema": ema}, {"optimizer": (student, optimizer)}
    start_step = 0
    if resume_from is not None:
        start_step = common.resume_training_checkpoint(resume_from, dist_ctx, modules, optimizers)
        common.print0(f"resumed from {resume_from} at step {start_step}")
    log = common.MetricsLog(cfg.out_dir, dist_ctx.is_main, resume_step=start_step if resume_from else None,
                            wandb_project=cfg.wandb_project, config=asdict(cfg))
    if dist_ctx.is_main and resume_from is None:
        log.log(0, **{f"ode/{k}": v for k, v in cost.items()})
    run_config = {"model_config": asdict(model_cfg), "run_config": asdict(cfg), "stage": f"stage2_{cfg.method}",
                  "teacher": cfg.teacher, "ode_cost": cost}

    # ---- training loop ----
    from tqdm import tqdm
    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist_ctx.is_main, desc=f"stage2 {cfg.method}", dynamic_ncols=True)
    # teacher forwards per rank and optimizer step: CD calls the teacher for 2 (cond + uncond) × the batch every
    # micro-step; the cumulative count is derived from the step, so a resumed run continues it
    forwards_per_step = 2 * cfg.batch_size * cfg.grad_accum if cfg.method == "cd" else 0
    step_start, logged_step = time.time(), start_step  # sec_per_step: mean since the last row
    stop = common.StopSignal()  # SIGTERM: save after this step and exit
    guard = common.NonFiniteGuard(cfg.max_nonfinite_steps, cfg.out_dir)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        total_loss = 0.0
        for micro in range(cfg.grad_accum):
            counters = order.batch_counters(step * cfg.grad_accum + micro, cfg.batch_size, dist_ctx.rank,
                                            dist_ctx.world_size)
            x_gt, prompts, generators = common.gather_batch(data, order, counters, cfg.seed)
            x_gt = x_gt.to(device)
            cameras = None
            if use_cameras:
                cameras = tuple(c.to(device) for c in common.gather_cameras(data, order, counters))
            context = text.encode(prompts).to(device)
            if dist_ctx.enabled:
                student.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with common.autocast_context(dist_ctx, cfg.mixed_precision):
                if cfg.method == "cd":
                    t, t_next, noise = [], [], []
                    for g in generators:
                        a, b = sample_cd_interval(g, grid, x_gt.shape[1], K, cfg.per_block_t, cfg.cd_final_interval)
                        t.append(a)
                        t_next.append(b)
                        noise.append(torch.randn(x_gt.shape[1:], generator=g))
                    t, t_next = torch.stack(t).to(device), torch.stack(t_next).to(device)  # [B, F]
                    loss, _ = cd_loss(student, ema, teacher, x_gt, torch.stack(noise).to(device), t, t_next, context,
                                      negative.expand_as(context), cfg.guidance_scale,
                                      cd_weight(t, t_next, cfg.cd_weighting, grid), cameras)
                else:
                    states = torch.stack([data.get(order.item(c), "states")[0] for c in counters]).to(device)
                    index = torch.stack([torch.randint(0, len(stored_t), (), generator=g) for g in generators])
                    loss, _ = ode_regression_loss(student, states, stored_t, index.to(device), x_gt, context)
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
        grad_norm = common.clip_grad_norm(student, cfg.grad_clip)
        total_loss = common.mean_across_ranks(total_loss, dist_ctx)
        if guard.ok(step + 1, loss=total_loss, grad_norm=grad_norm):
            optimizer.step()
            if ema is not None:  # θ⁻ ← 0.99·θ⁻ + 0.01·θ after every optimizer step
                common.ema_update(ema, student, cfg.ema_decay)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # ---- logging, samples, checkpoints ----
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            seconds = (time.time() - step_start) / (done - logged_step)
            log.log(done, loss=total_loss, grad_norm=grad_norm, sec_per_step=seconds,
                    teacher_forwards=done * forwards_per_step * dist_ctx.world_size, nonfinite_skipped=guard.take_skipped())
            progress.set_postfix(loss=f"{total_loss:.5f}", gnorm=f"{grad_norm:.3f}")
            step_start, logged_step = time.time(), done
        if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.max_steps):
            codec = encoders.load_codec(cfg.codec, "cpu")
            prompts = sample.preview_prompts(cfg.sample_prompts, cfg.num_samples, cfg.text_encoder, data.prompts)
            path = os.path.join(cfg.out_dir, f"samples_{done:07d}.png") if dist_ctx.is_main else None
            how = sample.Sampling("few_step", steps=tuple(cfg.sample_steps), first_block_steps=tuple(cfg.first_frame_steps),
                                  shift=cfg.timestep_shift)
            sampled = ema if ema is not None else student  # CD: the EMA weights θ⁻ (what Stage 3 starts from)
            sample.preview_grid(sampled, how, text, codec, prompts, latent_shape, cfg.seed, path,
                                log if cfg.text_encoder == "toy" else None, done, progress.write,
                                cameras=common.cameras_of(data, range(len(prompts))) if use_cameras else None)
        stopping = stop.requested(dist_ctx)
        if done % cfg.save_every == 0 or done == cfg.max_steps or stopping:
            common.save_training_checkpoint(cfg.out_dir, done, dist_ctx, modules, optimizers, run_config, log)
        if stopping:
            common.print0(f"SIGTERM: saved step {done} and stopped; continue with --resume=true")
            break
    stop.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main, Config, "stage2_causal_cd.py")
