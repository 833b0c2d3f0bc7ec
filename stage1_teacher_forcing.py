"""
Stage 1 of Causal Forcing++: multi-step autoregressive diffusion by teacher forcing (paper §2.2, "Stage 1";
inherited from Causal Forcing). The bidirectional Wan2.1 DiT is fine-tuned into a frame-wise (or chunk-wise)
AR diffusion model: every frame is denoised from the *ground-truth* earlier frames, all frames at once in one
teacher-forcing forward over [clean ‖ noisy] (model.py). It is the AR teacher of Stage 2.

With `causal: false` the same file trains a plain bidirectional flow-matching model — how the toy world gets
its "pretrained Wan" (the toy base model in checkpoints/toy/base/).

The loss is flow matching (paper §2.1): x_t = (1−σ)·x0 + σ·ε, target v = ε − x0, σ = t/1000 exactly. As the
official code does, t is a uniform index on the shift-5 grid of 1000 points (so high noise dominates),
constant within each frame block, and the per-frame loss is weighted by a Gaussian in t; unlike the official
code, σ and t are exact fp32 values (no bf16 timesteps; docs/official_code.md).

Launch:
  python stage1_teacher_forcing.py --config configs/toy/base.yaml             # toy base model, CPU
  python stage1_teacher_forcing.py --config configs/toy/tf.yaml               # toy AR teacher, CPU
  torchrun --nproc_per_node=8 stage1_teacher_forcing.py --config configs/tf.yaml   # Wan2.1-1.3B, frame-wise
  ... --resume=true continues a stopped run from out_dir/latest to the same result.
"""

import os
import time
from dataclasses import asdict, dataclass

import torch

import common
import model as M
import sample

# -----------------------------------------------------------------------------
# config (defaults = the paper's frame-wise Wan2.1-1.3B Stage 1; yaml files hold deltas)


@dataclass
class Config:
    # model
    model_preset: str = "wan2.1-t2v-1.3b"  # the architecture when init_from is null or an official .pt
    init_from: str | None = "wan_models/Wan2.1-T2V-1.3B"  # Wan/diffusers folder, our checkpoint, official .pt, null
    init_use_ema: bool = False        # take the EMA weights of an init checkpoint that has them
    causal: bool = True               # True: teacher forcing (Stage 1); False: bidirectional flow matching
    frames_per_block: int = 1         # 1 = frame-wise, 3 = chunk-wise
    camera_dims: int | None = None    # PRoPE channels per head for camera-conditioned training (§3.3; the data
                                      # must carry cameras); None keeps the preset's / init checkpoint's
    per_frame_noise: float = 0.0      # bidirectional only: share of clips that draw one timestep per frame
                                      # instead of one per clip (docs/toy_world.md: it teaches the toy base to
                                      # carry an object from a cleaner frame to a noisier one)
    # data and text
    data_dir: str = "data/latents"    # shards written by prepare_data.py
    text_encoder: str = "wan_models/Wan2.1-T2V-1.3B"  # "toy" or a Wan folder (umT5-XXL)
    text_dropout: float = 0.0         # prompt -> negative prompt with this probability (classifier-free guidance)
    # flow matching
    timestep_shift: float = 5.0       # t = 1000·shift(u), u a uniform index on the grid (1.0: uniform σ)
    num_train_timesteps: int = 1000   # size of the shifted grid t is drawn from
    loss_weighting: str = "gaussian"  # "gaussian" (official, zero weight at t = 1000) or "uniform"
    # optimisation
    lr: float = 2e-6
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    warmup_steps: int = 0
    batch_size: int = 1               # per rank and micro-step; global batch = world_size · batch_size · grad_accum
    grad_accum: int = 8
    max_steps: int = 20000
    ema_decay: float = 0.0            # 0 = no EMA (as the official Stage 1)
    ema_warmup: bool = False          # decay min(ema_decay, (1+step)/(10+step)): for training from scratch, so
                                      # the EMA does not keep a share of the random initial weights
    # system
    device: str = "auto"
    mixed_precision: bool = True      # bf16 compute (CUDA, and CPUs with native bf16), fp32 weights and reduce
    cpu_offload: bool = False
    activation_checkpointing: bool = True
    seed: int = 0
    # output
    out_dir: str = "runs/stage1_tf"
    resume: bool = False              # continue from out_dir/latest
    log_every: int = 10
    save_every: int = 1000
    sample_every: int = 1000          # PNG grid of multi-step samples (0 = never)
    sample_steps: int = 40            # Euler steps of the sample grid (as sample.py)
    sample_shift: float = 5.0         # shift of the sample grid's Euler steps (independent of training's)
    sample_guidance: float = 3.0      # CFG weight u + w(c − u) of the sample grid
    sample_prompts: list = ()         # empty: the first prompts of the data (toy: held-out prompts)
    num_samples: int = 4
    codec: str = "wan_models/Wan2.1-T2V-1.3B"  # "toy" or a Wan folder (VAE) to decode the sample grid
    wandb_project: str | None = None
    max_nonfinite_steps: int = 10     # non-finite loss/gradient: skip the step; this many in a row stop the run


# -----------------------------------------------------------------------------
# the Stage-1 loss, as pure functions


def gaussian_grid_weights(grid):
    """The official code's loss weight per grid point: y = exp(−2((t − N/2)/N)²), w = (y − min y)·N/Σ(y − min y);
    mean 1, largest at t = 500, zero at the highest-noise point (docs/official_code.md)."""
    N = len(grid)
    y = torch.exp(-2 * ((grid.double() - N / 2) / N) ** 2)
    y = y - y.min()
    return (y * N / y.sum()).float()


def sample_block_timesteps(generator, num_frames, frames_per_block, grid, per_video):
    """One sample's timesteps [F]: a uniform index on the shifted grid, shared within each block (or by the
    whole video when per_video) -> (t [F] float32, grid index [F])."""
    num_draws = 1 if per_video else num_frames // frames_per_block
    index = torch.randint(0, len(grid), (num_draws,), generator=generator)
    index = index.repeat_interleave(num_frames if per_video else frames_per_block)  # [F]
    return grid[index], index


def sample_timesteps(generator, num_frames, grid, *, causal, frames_per_block, per_frame_noise):
    """One training sample's timesteps [F] -> (t, grid index). Teacher forcing: one per block. Bidirectional:
    one for the whole clip, or, with probability per_frame_noise, one per frame (so some frames are cleaner than
    their neighbours and the model learns to carry what it sees across frames)."""
    per_video = not causal
    if per_video and per_frame_noise > 0:  # no extra draw when off, so the random stream of older runs is unchanged
        per_video = bool(torch.rand((), generator=generator) >= per_frame_noise)
    return sample_block_timesteps(generator, num_frames, frames_per_block, grid, per_video)


def diffusion_loss(model, x0, noise, t, weight, context, teacher_forcing, cameras=None):
    """Weighted flow-matching loss.  x_t = (1−σ)x0 + σε;  v̂ = model(x_t, t | clean x0 as context);
    per frame ℓ_f = mean_{C,H,W} (v̂ − (ε − x0))²;  loss = mean_{B,F} w(t_f)·ℓ_f.
    x0, noise [B, F, C, H, W]; t, weight [B, F]; cameras None or the frames' (world_to_camera, intrinsics).
    Returns (loss, per-frame losses [B, F])."""
    x_t = M.add_noise(x0, noise, t)
    if teacher_forcing:  # the clean copy is the exact ground truth at t = 0: no noise is ever added to it
        v = model(x_t, t, context, clean_x=x0, cameras=cameras)
    else:
        v = model(x_t, t, context, causal=False, cameras=cameras)
    per_frame = (v.float() - (noise.float() - x0.float())).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    return (per_frame * weight).mean(), per_frame


def lr_at(step, cfg):
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr


# -----------------------------------------------------------------------------
# main


def main(cfg):
    # ---- setup ----
    dist_ctx = common.setup_distributed(cfg.device)
    device = dist_ctx.device
    common.print0(f"stage 1 ({'teacher forcing' if cfg.causal else 'bidirectional'}), world size "
                  f"{dist_ctx.world_size}, device {device}, compute {common.compute_dtype(dist_ctx, cfg.mixed_precision)}\n"
                  f"{common.format_config(cfg)}")
    assert cfg.loss_weighting in ("gaussian", "uniform"), "loss_weighting must be gaussian or uniform"
    if cfg.camera_dims is not None and (cfg.camera_dims < 0 or cfg.camera_dims % 4):
        raise common.ConfigError(f"camera_dims must be a multiple of 4 (PRoPE acts on 4-channel groups), got {cfg.camera_dims}")
    assert 0 <= cfg.per_frame_noise <= 1, f"per_frame_noise is a probability in [0, 1], got {cfg.per_frame_noise}"
    assert cfg.per_frame_noise == 0 or not cfg.causal, \
        "per_frame_noise is for the bidirectional base (causal=false); teacher forcing already draws t per frame"
    resume_from = common.resume_point(cfg.out_dir, cfg.resume)

    # ---- model ----
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 shards each rank's copy)
    if cfg.init_from:  # the architecture of the init checkpoint (model_preset only for an official .pt)
        model, model_cfg, fmt, path = common.load_model(cfg.init_from, use_ema=cfg.init_use_ema, preset=cfg.model_preset,
                                                        causal=cfg.causal, frames_per_block=cfg.frames_per_block,
                                                        camera_dims=cfg.camera_dims, what="init_from")
        common.print0(f"initialised from {path} ({fmt}): {model_cfg}")
    else:
        cameras = {} if cfg.camera_dims is None else dict(camera_dims=cfg.camera_dims)
        model_cfg = M.WanConfig.from_preset(cfg.model_preset, causal=cfg.causal, frames_per_block=cfg.frames_per_block,
                                            **cameras)
        model = M.CausalWanModel(model_cfg)
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.to(device).train()
    ema = common.make_ema(model).eval() if cfg.ema_decay > 0 else None  # the weights we sample and ship
    common.shard_model(model, dist_ctx, cfg.mixed_precision, cfg.cpu_offload)
    if ema is not None:
        common.shard_model(ema, dist_ctx, cfg.mixed_precision, cfg.cpu_offload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)

    # ---- data and text ----
    import encoders
    data = common.LatentShards(cfg.data_dir)
    order = common.DataOrder(len(data), cfg.seed)
    text = encoders.load_text_encoder(cfg.text_encoder, device)
    negative = text.encode([text.negative_prompt]).to(device)  # [1, Lt, E]
    latent_shape = tuple(data.get(0)[0].shape)  # [F, C, H, W]
    assert latent_shape[1] == model_cfg.in_dim, \
        f"data latents have {latent_shape[1]} channels but the model takes {model_cfg.in_dim}"
    use_cameras = model_cfg.camera_dims > 0
    if use_cameras != data.has_cameras():
        raise common.ConfigError(
            f"the model has {model_cfg.camera_dims} camera channels but the data in {cfg.data_dir} has no cameras; "
            f"write it with prepare_data.py --toy N --world camera" if use_cameras else
            f"the data in {cfg.data_dir} carries cameras but the model has none; set camera_dims (e.g. 16)")
    grid = M.timestep_grid(cfg.num_train_timesteps, cfg.timestep_shift)
    grid_weights = gaussian_grid_weights(grid) if cfg.loss_weighting == "gaussian" else torch.ones_like(grid)
    common.print0(f"data: {len(data)} clips of {latent_shape} in {cfg.data_dir}; model: {model.num_params():,} "
                  f"parameters; global batch {dist_ctx.world_size * cfg.batch_size * cfg.grad_accum}")

    # ---- resume ----
    modules, optimizers = {"model": model, "ema": ema}, {"optimizer": (model, optimizer)}
    start_step = 0
    if resume_from is not None:
        start_step = common.resume_training_checkpoint(resume_from, dist_ctx, modules, optimizers)
        common.print0(f"resumed from {resume_from} at step {start_step}")
    log = common.MetricsLog(cfg.out_dir, dist_ctx.is_main, resume_step=start_step if resume_from else None,
                            wandb_project=cfg.wandb_project, config=asdict(cfg))
    run_config = {"model_config": asdict(model_cfg), "run_config": asdict(cfg), "stage": "stage1"}

    # ---- training loop ----
    from tqdm import tqdm
    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist_ctx.is_main, desc="stage1", dynamic_ncols=True)
    step_start, logged_step = time.time(), start_step  # sec_per_step: mean since the last row
    stop = common.StopSignal()  # SIGTERM: save after this step and exit
    guard = common.NonFiniteGuard(cfg.max_nonfinite_steps, cfg.out_dir)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        total_loss = 0.0
        for micro in range(cfg.grad_accum):
            counters = order.batch_counters(step * cfg.grad_accum + micro, cfg.batch_size, dist_ctx.rank,
                                            dist_ctx.world_size)
            x0, prompts, generators = common.gather_batch(data, order, counters, cfg.seed)
            cameras = None
            if use_cameras:
                cameras = tuple(c.to(device) for c in common.gather_cameras(data, order, counters))
            noise, t, weight, drop = [], [], [], []
            for g in generators:  # every random draw of a sample comes from its own generator
                t_sample, index = sample_timesteps(g, x0.shape[1], grid, causal=cfg.causal,
                                                   frames_per_block=cfg.frames_per_block,
                                                   per_frame_noise=cfg.per_frame_noise)
                noise.append(torch.randn(x0.shape[1:], generator=g))
                drop.append(bool(torch.rand((), generator=g) < cfg.text_dropout))
                t.append(t_sample)
                weight.append(grid_weights[index])
            x0, noise = x0.to(device), torch.stack(noise).to(device)  # [B, F, C, H, W]
            t, weight = torch.stack(t).to(device), torch.stack(weight).to(device)  # [B, F]
            context = text.encode(prompts).to(device)  # [B, Lt, E]
            dropped = torch.tensor(drop, device=device)
            context = torch.where(dropped[:, None, None], negative, context)
            if dist_ctx.enabled:  # reduce gradients only after the last micro-step
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with common.autocast_context(dist_ctx, cfg.mixed_precision):
                loss, _ = diffusion_loss(model, x0, noise, t, weight, context, teacher_forcing=cfg.causal,
                                         cameras=cameras)
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
        grad_norm = common.clip_grad_norm(model, cfg.grad_clip)
        total_loss = common.mean_across_ranks(total_loss, dist_ctx)
        if guard.ok(step + 1, loss=total_loss, grad_norm=grad_norm):
            optimizer.step()
            if ema is not None:
                decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
                common.ema_update(ema, model, decay)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # ---- logging, samples, checkpoints ----
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            seconds = (time.time() - step_start) / (done - logged_step)
            log.log(done, loss=total_loss, grad_norm=grad_norm, lr=lr_at(step, cfg), sec_per_step=seconds,
                    nonfinite_skipped=guard.take_skipped())
            progress.set_postfix(loss=f"{total_loss:.4f}", gnorm=f"{grad_norm:.2f}")
            step_start, logged_step = time.time(), done
        if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.max_steps):
            codec = encoders.load_codec(cfg.codec, "cpu")
            prompts = sample.preview_prompts(cfg.sample_prompts, cfg.num_samples, cfg.text_encoder, data.prompts)
            path = os.path.join(cfg.out_dir, f"samples_{done:07d}.png") if dist_ctx.is_main else None
            how = sample.Sampling("multi_step", sample_steps=cfg.sample_steps, cfg=cfg.sample_guidance,
                                  shift=cfg.sample_shift)
            # a camera model's preview is sampled under the cameras of the first clips of the data
            preview_cameras = common.cameras_of(data, range(len(prompts))) if use_cameras else None
            sample.preview_grid(ema if ema is not None else model, how, text, codec, prompts, latent_shape, cfg.seed,
                                path, log if cfg.text_encoder == "toy" else None, done, progress.write,
                                cameras=preview_cameras)
        stopping = stop.requested(dist_ctx)
        if done % cfg.save_every == 0 or done == cfg.max_steps or stopping:
            common.save_training_checkpoint(cfg.out_dir, done, dist_ctx, modules, optimizers, run_config, log)
        if stopping:
            common.print0(f"SIGTERM: saved step {done} and stopped; continue with --resume=true")
            break
    stop.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main, Config, "stage1_teacher_forcing.py")
