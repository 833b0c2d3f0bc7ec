"""
Sample videos from any checkpoint of this repo, the one sampling path (paper §2.2 inference).

What a checkpoint is decides how it is sampled (`load_for_inference` reads it off the checkpoint):
  few-step student (Stage 2 / 3)   block by block with the KV cache: every block with the 1/2/4-step list, the
                                   first block of a video with the 4-step list (the ASD trick), fresh noise
                                   between steps, then a clean context pass that writes the block into the cache
  Stage-1 AR diffusion model       the same block-by-block rollout with Euler steps and CFG (`--sample_steps`)
  bidirectional (toy base, Wan)    the whole clip at once, Euler steps with CFG; a frame-wise few-step rollout
                                   of it is refused (it was never trained to generate causally)
`sample_latents` is the sampler the stage preview grids, toy_eval.py, vbench_eval.py and bench.py call too.

  python sample.py --prompt "a red circle moves left quickly"                      # the shipped toy 2-step model
  python sample.py --prompt "..." --steps 1 --stream                               # 1 step per frame, streamed
  python sample.py --ckpt runs/dmd --prompt "..." --wan_dir wan_models/Wan2.1-T2V-1.3B         # ours, Wan scale
  python sample.py --ckpt causal_forcing_pp_framewise.pt --use_ema --wan_dir wan_models/Wan2.1-T2V-1.3B --prompt "..."
  python sample.py --image first_frame.png --prompt "..."                          # I2V: the image is frame 0
  python sample.py --ckpt runs/toy/tf --use_ema --prompt "..."                     # Stage-1 AR diffusion, 40 steps
  python sample.py --ckpt checkpoints/toy/base --prompt "..."                      # the bidirectional toy base
  python sample.py --prompt "a red circle moves left quickly" --num_frames 2000 --stream   # past the trained length
  python sample.py --prompt "a red circle moves left quickly" --switch "24:a green square stays still"  # prompt switch

Past the trained clip length the KV cache rolls (model.KVCache): --window frames (default the trained length)
with --sink_frames kept from the start; per-frame cost and cache memory stay flat. --switch FRAME:PROMPT changes
the prompt from that latent frame on, by re-caching the visible frames (default) or cross-attention only
(--switch_mode).

Writes OUT/<prompt>-<seed>.mp4 and a PNG contact sheet per prompt; prints first-frame latency and frames/s
with and without decoding. With --stream each block is decoded as soon as it exists (streaming VAE decode)
and appended to the mp4 — what an interactive application would show.
"""

import argparse
import dataclasses
import json
import os
import re
import time

import torch

import common
import model as M

DEFAULT_CKPT = "checkpoints/toy/dmd_2step"
FEW_STEP_LISTS = {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}  # nominal; warped with the shift on use
FIRST_BLOCK_STEPS = FEW_STEP_LISTS[4]  # ASD: the first block of a 1/2-step model takes 4 steps (paper §4.1)
STUDENT_STAGES = ("stage2_cd", "stage2_ode", "stage3_dmd")


class SampleError(Exception):
    """Bad input: reported as one line, before any file is written."""


# -----------------------------------------------------------------------------
# how to sample: one set of defaults


@dataclasses.dataclass
class Sampling:
    """How a model is sampled. Few-step defaults are the paper's (§4.1): 2 steps per frame, 4 for the first
    frame, shift 5. Multi-step models: 40 Euler steps with CFG u + w(c − u), w = 3 (the official Stage-1
    inference uses 50 UniPC steps; docs/official_code.md)."""
    mode: str = "few_step"                           # "few_step" (students) or "multi_step" (Euler + CFG)
    steps: tuple = tuple(FEW_STEP_LISTS[2])          # few-step: nominal list of every block
    first_block_steps: tuple | None = tuple(FIRST_BLOCK_STEPS)  # few-step: the first block's list; None = steps
    sample_steps: int = 40                           # multi-step: Euler steps on the shifted grid
    cfg: float = 3.0                                 # multi-step: CFG weight w
    shift: float = 5.0                               # timestep shift of every list
    context_t: float = 0.0                           # t of the context pass that writes a block into the cache

    def __post_init__(self):
        assert self.mode in ("few_step", "multi_step"), f"mode must be few_step or multi_step, got {self.mode!r}"

    def describe(self):
        if self.mode == "multi_step":
            return f"{self.sample_steps}-step Euler, CFG {self.cfg:g}"
        first = f", first block {','.join(f'{s:g}' for s in self.first_block_steps)}" if self.first_block_steps else ""
        return f"{len(self.steps)}-step{first}"


@torch.no_grad()
def sample_latents(model, how, noise, context, uncond_context=None, *, prefix=None, generator=None, on_block=None,
                   window=None, sink_frames=None, before_block=None, cameras=None):
    """The one sampler. noise [B, F, C, H, W] -> latents [B, F, C, H, W] (without the prefix).
    A causal model is rolled out block by block with the KV cache (model.generate); a bidirectional one is
    denoised as a whole clip (model.generate_bidirectional). uncond_context: the negative prompt's embedding
    [B, Lt, E] (multi-step CFG); prefix: clean latents written into the cache first (I2V); generator: the
    few-step re-noising; on_block(block, start_frame, x0) after every block (streaming, timing). Causal models
    only: window / sink_frames roll the KV cache (rollouts past the trained length), before_block(rollout,
    start_frame) runs before every block (prompt switching, model.Rollout.set_context). cameras: the
    (world_to_camera, intrinsics) of the prefix and generated frames, for a camera-conditioned (PRoPE) model."""
    rolling = dict(window=window, sink_frames=sink_frames, before_block=before_block, cameras=cameras)
    if how.mode == "few_step":
        assert model.cfg.causal, "a few-step rollout needs a causal model"
        return M.generate(model, noise, context, steps=M.warp_timesteps(how.steps, how.shift),
                          first_block_steps=M.warp_timesteps(how.first_block_steps, how.shift)
                          if how.first_block_steps else None,
                          context_t=how.context_t, prefix=prefix, generator=generator, on_block=on_block, **rolling)
    steps = M.timestep_grid(how.sample_steps, how.shift).tolist()
    if model.cfg.causal:
        return M.generate(model, noise, context, steps=steps, sampler="euler", uncond_context=uncond_context,
                          guidance_scale=how.cfg, prefix=prefix, on_block=on_block, **rolling)
    assert prefix is None, "a bidirectional model takes no clean prefix"
    assert window is None and before_block is None, "a bidirectional model samples whole clips: no rolling cache"
    latents = M.generate_bidirectional(model, noise, context, steps=steps, uncond_context=uncond_context,
                                       guidance_scale=how.cfg, cameras=cameras)
    if on_block is not None:
        on_block(0, 0, latents)
    return latents


# -----------------------------------------------------------------------------
# the one inference loader: checkpoint -> model, what it is, its text encoder and codec


def checkpoint_kind(stage, fmt, use_ema, causal):
    """'few_step', 'ar_diffusion', 'bidirectional', or None when the checkpoint does not say (an official .pt
    loaded without --use_ema, where the Stage-1 model and early students look alike; a causal state dict)."""
    if stage in STUDENT_STAGES:
        return "few_step"
    if stage == "stage1":
        return "ar_diffusion" if causal else "bidirectional"
    if fmt in ("wan", "wan-sharded", "diffusers") or (fmt == "ours" and not causal):  # Wan2.1 itself, a base
        return "bidirectional"
    if fmt == "official-pt" and use_ema:  # only the distilled students keep EMA weights (official Stage 1 has none)
        return "few_step"
    return None


def load_for_inference(path, *, use_ema=False, wan_dir=None, frames_per_block=None):
    """-> (model in eval mode, info). info: path, format, stage, kind (checkpoint_kind), text_encoder and codec
    (names for encoders.py) and num_frames (the trained length, or None). An official .pt takes its
    architecture, text encoder and VAE from the Wan folder `wan_dir` ('toy': the toy world's)."""
    if not os.path.exists(path):
        hint = common.how_to_make(path) or "train one, or pass --ckpt; the toy models live in checkpoints/toy/"
        raise SampleError(f"checkpoint {path!r} not found ({hint})")
    resolved = common.resolve_checkpoint(path) if os.path.isdir(path) else path
    stored = {}
    if os.path.isdir(resolved) and os.path.isfile(os.path.join(resolved, "config.json")):
        with open(os.path.join(resolved, "config.json")) as f:
            stored = json.load(f)
    run = stored.get("run_config") or {}
    if M.config_from_checkpoint(resolved) is None and not wan_dir:  # an official .pt
        raise SampleError(f"{resolved} has no config.json; pass --wan_dir (the Wan2.1 folder it was trained from)")
    try:
        model, model_cfg, fmt, resolved = common.load_model(resolved, use_ema=use_ema, preset=wan_dir,
                                                            frames_per_block=frames_per_block)
    except common.CheckpointError as e:
        raise SampleError(str(e)) from None
    stage = stored.get("stage") or ("official" if fmt == "official-pt" else None)
    kind = checkpoint_kind(stored.get("stage"), fmt, use_ema, model_cfg.causal)
    if kind is not None:  # unknown: keep the stored attention
        model_cfg.causal = kind != "bidirectional"
    info = dict(path=resolved, format=fmt, stage=stage, kind=kind, text_encoder=run.get("text_encoder"),
                codec=run.get("codec"), num_frames=run.get("num_frames"))
    if info["text_encoder"] is None:  # Wan/official checkpoints: umT5 and the VAE from the Wan folder
        if not wan_dir:
            raise SampleError(f"{resolved} does not name its text encoder; pass --wan_dir")
        info["text_encoder"] = info["codec"] = wan_dir
    elif wan_dir and info["text_encoder"] != "toy":
        info["text_encoder"] = info["codec"] = wan_dir
    return model.eval(), info


def choose_sampling(info, steps=None, sample_steps=None, first_frame_steps="default", cfg=3.0, shift=5.0):
    """The Sampling for this checkpoint: its kind's default, or what was asked for if that is a valid way to
    sample it. steps: 1/2/4 (few-step); sample_steps: Euler steps (multi-step); first_frame_steps: 'default'
    (the ASD 4-step list), 'none' (the same list as every block) or a comma list of nominal timesteps."""
    kind, what = info["kind"], f"{info['path']} ({info['stage'] or info['format']})"
    if steps is not None and sample_steps is not None:
        raise SampleError("pass --steps (few-step rollout) or --sample_steps (multi-step Euler), not both")
    if steps is None and sample_steps is None:
        if kind is None:
            raise SampleError(f"{what} does not say whether it is a few-step student or the Stage-1 AR diffusion "
                              f"model: pass --steps 2 (student) or --sample_steps 40 (Stage 1)")
        if kind == "few_step":
            steps = 2
    if steps is not None:
        if kind == "bidirectional":
            raise SampleError(f"{what} is a bidirectional model: it denoises the whole clip at once; sample it with "
                              f"--sample_steps N (a frame-wise --steps rollout needs a Stage-2/3 student)")
        if steps not in FEW_STEP_LISTS:
            raise SampleError(f"--steps must be one of {sorted(FEW_STEP_LISTS)}, got {steps}")
        if first_frame_steps == "default":
            first = FIRST_BLOCK_STEPS
        elif first_frame_steps == "none":
            first = None
        else:
            try:
                first = [float(s) for s in first_frame_steps.split(",")]
            except ValueError:
                raise SampleError(f"--first_frame_steps {first_frame_steps!r} is not a comma list of timesteps") from None
        return Sampling("few_step", steps=tuple(FEW_STEP_LISTS[steps]), first_block_steps=first and tuple(first),
                        shift=shift)
    return Sampling("multi_step", sample_steps=sample_steps or Sampling.sample_steps, cfg=cfg, shift=shift)


def video_size(model, info, num_frames=None, height=None, width=None):
    """-> (height, width, latent frames, fps, upscale) of the videos to make: the checkpoint's trained length
    and the toy or Wan size unless given; one SampleError line if they do not fit the model."""
    cfg = model.cfg
    if info["text_encoder"] == "toy":
        import toyworld
        default = (toyworld.TOY_SIZE, toyworld.TOY_SIZE, toyworld.TOY_FRAMES, 8, 8)
    else:
        default = (480, 832, 21, 16, 1)  # Wan2.1 T2V: 81 frames = 21 latent frames at 16 fps
    height, width = height or default[0], width or default[1]
    if num_frames is not None and num_frames < 1:
        raise SampleError(f"--num_frames must be >= 1, got {num_frames}")
    num_frames = num_frames or info["num_frames"] or default[2]
    K = cfg.frames_per_block
    if num_frames % K:
        raise SampleError(f"--num_frames {num_frames} is not a whole number of {K}-frame blocks")
    return height, width, num_frames, default[3], default[4]


def rolling_window(model, info, num_frames, prefix_frames, window=None, sink_frames=None):
    """-> None (one absolute KV cache for the whole video) or (window, sink frames) of a rolling cache: asked for,
    or the trained length when the video is longer than that. One SampleError line if it cannot work."""
    cfg, K = model.cfg, model.cfg.frames_per_block
    trained = info["num_frames"] or video_size(model, info)[2]
    if window is None and prefix_frames + num_frames > trained:
        window = trained
    if window is None:
        return None
    if not cfg.causal:
        raise SampleError("a bidirectional model samples whole clips; --num_frames beyond its length and --window "
                          "need a causal model")
    sink = K if sink_frames is None else sink_frames
    if window % K or window < sink + K or window > cfg.rope_max_positions:
        raise SampleError(f"--window {window} must be a multiple of {K}, hold the {sink} sink frames plus one block, "
                          f"and stay within the RoPE range {cfg.rope_max_positions}")
    return window, sink


def parse_switches(items, num_frames, K):
    """--switch FRAME:PROMPT items -> [(latent frame, prompt)]; one SampleError line for a malformed one."""
    switches = []
    for item in items:
        frame, _, prompt = item.partition(":")
        if not frame.strip().isdigit() or not prompt.strip():
            raise SampleError(f"--switch {item!r} is not FRAME:PROMPT (e.g. '24:a green square stays still')")
        frame = int(frame)
        if not 0 < frame < num_frames or frame % K:
            raise SampleError(f"--switch frame {frame} must be a block boundary inside the video (0 < frame < "
                              f"{num_frames}, a multiple of {K})")
        switches.append((frame, prompt.strip()))
    return switches


def check_toy_prompts(prompts):
    import toyworld
    for prompt in prompts:
        try:
            toyworld.tokenize([prompt])
        except AssertionError as e:
            raise SampleError(f"{e} (toy prompts look like 'a red circle moves left quickly')") from None


# -----------------------------------------------------------------------------
# the preview grid of a training run (every stage calls this)


def preview_prompts(configured, num, text_encoder, prompts):
    """Prompts of a run's periodic sample grid: the configured ones, else held-out toy prompts, else the
    first of the run's own prompts."""
    if configured:
        return list(configured)
    if text_encoder == "toy":
        import toyworld
        return toyworld.heldout_prompts()[:num]
    return list(prompts[:num])


@torch.no_grad()
def preview_grid(model, how, text, codec, prompts, shape, seed, path, toybench_log=None, step=None, write=print,
                 cameras=None):
    """Sample one video per prompt (shape = [F, C, H, W] of the latents), write them as a PNG grid to `path`
    (None: this rank writes nothing) and, given a MetricsLog as toybench_log (toy runs), log their ToyBench.
    cameras (camera-conditioned models): the videos' (world_to_camera, intrinsics); a toy run then also logs
    how far the camera pans seen in the videos are from the ones the cameras command (toyworld.pan_error)."""
    device = next(model.parameters()).device
    B = len(prompts)
    noise = torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed + 12345)).to(device)
    context = text.encode(prompts).to(device)
    uncond = text.encode([text.negative_prompt] * B).to(device) if how.mode == "multi_step" else None
    was_training = model.training
    model.eval()
    if cameras is not None:
        cameras = tuple(c.to(device) for c in cameras)
    latents = sample_latents(model, how, noise, context, uncond,
                             generator=torch.Generator(device=device).manual_seed(seed), cameras=cameras)
    model.train(was_training)
    videos = codec.decode(latents.float().cpu())  # [B, T, 3, H, W] in [-1, 1]
    if path is not None:
        common.save_png_grid(videos, path, scale=2)
        if toybench_log is not None:
            import toyworld
            if cameras is None:
                scores = toyworld.score(videos, prompts)
                toybench_log.log(step, **{f"toybench/{k}": scores[k] for k in ("total", "quality", "semantic")})
                write(f"step {step}: ToyBench total {scores['total']:.3f} quality {scores['quality']:.3f} "
                      f"semantic {scores['semantic']:.3f}")
            else:
                error = sum(toyworld.pan_error(v, toyworld.pans_of_cameras(w.cpu()))
                            for v, w in zip(videos, cameras[0])) / len(prompts)
                toybench_log.log(step, **{"toybench/pan_error": error})
                write(f"step {step}: camera pan error {error:.2f} px/frame")
    return videos


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise SampleError(f"cannot read --prompt_file: {e}") from None
    if not prompts:
        raise SampleError("no prompt: pass --prompt \"...\" (repeatable) or --prompt_file FILE")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise SampleError(f"prompt {empty[0] + 1} is empty")
    return [p.strip() for p in prompts]


def read_image(path, height, width):
    """An RGB image of exactly the video size -> [1, 1, 3, H, W] in [-1, 1]. Another size is an error rather
    than a silent resize or crop: which of the two is right depends on the image."""
    import imageio.v3 as iio
    try:
        array = iio.imread(path)
    except Exception as e:  # noqa: BLE001 — any decoder failure is the same user error
        raise SampleError(f"cannot read --image {path!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    image = torch.from_numpy(array.copy())
    if image.ndim == 2:
        image = image[:, :, None].expand(-1, -1, 3)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SampleError(f"--image {path!r} is not an RGB image (shape {tuple(image.shape)})")
    image = image[:, :, :3].permute(2, 0, 1).float()[None] / 127.5 - 1.0  # [1, 3, h, w]
    if tuple(image.shape[2:]) != (height, width):
        raise SampleError(f"--image {path!r} is {image.shape[3]}x{image.shape[2]} but the video is {width}x{height}; "
                          f"resize or crop it to {width}x{height} (or pass --width/--height to match the image)")
    return image[:, None]  # [1, 1, 3, H, W]


def slug(prompt, limit=80):
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:limit] or "video"


# -----------------------------------------------------------------------------
# one video


def sample_one(model, how, text, codec, codec_device, prompt, seed, shape, prefix=None, writer=None, quiet=False,
               window=None, switches=(), switch_mode="recache"):
    """Generate and decode one video. shape = (F, C, h, w) of the generated latents. With a writer (stream mode)
    every block is decoded and written as soon as it exists. window: None or (frames, sink frames) of a rolling
    KV cache; switches: [(latent frame, prompt)], applied by `switch_mode`. Returns (video [T, 3, H, W], timings)."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    F_, C, h, w = shape
    noise = torch.randn((1, F_, C, h, w), generator=torch.Generator().manual_seed(seed)).to(device)
    context = text.encode([prompt]).to(device)
    uncond = text.encode([text.negative_prompt]).to(device) if how.mode == "multi_step" else None
    decoder = codec.stream_decoder() if writer is not None else None
    timings = dict(first_block=None, decode=0.0)
    decoded = []
    progress = tqdm(total=F_, desc=prompt[:40], unit="frame", disable=quiet)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def emit(latents):
        start = time.time()
        frames = decoder.decode_next(latents.float().to(codec_device))[0].cpu()  # [t, 3, H, W]
        writer.append(frames)
        decoded.append(frames)
        timings["decode"] += time.time() - start

    start = time.time()
    if decoder is not None and prefix is not None:
        emit(prefix)

    def on_block(block, start_frame, x0):
        if timings["first_block"] is None:
            sync()
            timings["first_block"] = time.time() - start
        if decoder is not None:
            emit(x0)
        progress.update(x0.shape[1])

    offset = 0 if prefix is None else prefix.shape[1]   # switch frames count generated frames, after an I2V prefix
    switch_contexts = {offset + frame: text.encode([p]).to(device) for frame, p in switches}

    def before_block(rollout, start_frame):
        if start_frame in switch_contexts:
            rollout.set_context(switch_contexts[start_frame], uncond, mode=switch_mode)

    latents = sample_latents(model, how, noise, context, uncond, prefix=prefix, on_block=on_block,
                             generator=torch.Generator(device=device).manual_seed(seed + 1),
                             window=window and window[0], sink_frames=window and window[1],
                             before_block=before_block if switches else None)
    sync()
    timings["generate"] = time.time() - start - timings["decode"]
    progress.close()
    if decoder is not None:
        video = torch.cat(decoded)
    else:
        begin = time.time()
        full = latents if prefix is None else torch.cat([prefix, latents], dim=1)
        video = codec.decode(full.float().to(codec_device))[0].cpu()
        timings["decode"] = time.time() - begin
    return video, timings


class VideoWriter:
    """mp4 via imageio-ffmpeg, written to a temporary name and renamed by close(); abort() removes it."""

    def __init__(self, path, fps, scale):
        import imageio.v2 as iio
        self.path, self.tmp, self.scale = path, path + ".tmp.mp4", scale
        self.writer = iio.get_writer(self.tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                     ffmpeg_log_level="error")
        self.frames = 0

    def append(self, video):
        for frame in common.to_uint8_frames(video):  # [H, W, 3]
            if self.scale > 1:
                frame = frame.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
            self.writer.append_data(frame)
            self.frames += 1

    def close(self):
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# -----------------------------------------------------------------------------
# main


def add_sampling_arguments(p):
    """The flags that choose a checkpoint's sampling and video size: sample.py's and vbench_eval.py's, one set."""
    p.add_argument("--use_ema", action="store_true", help="the EMA weights (training checkpoints, official .pt)")
    p.add_argument("--wan_dir", help="Wan2.1 folder: text encoder and VAE (and the architecture for a .pt)")
    p.add_argument("--steps", type=int, choices=sorted(FEW_STEP_LISTS), help="few-step rollout: denoising steps "
                   "per frame (students: default 2)")
    p.add_argument("--first_frame_steps", default="default",
                   help="nominal list of the first frame (default: the ASD list 1000,750,500,250); 'none' = the "
                   "same list as every frame")
    p.add_argument("--sample_steps", type=int, help=f"multi-step Euler sampling (Stage-1 AR diffusion and "
                   f"bidirectional models: default {Sampling.sample_steps})")
    p.add_argument("--cfg", type=float, default=Sampling.cfg, help="CFG weight of multi-step sampling")
    p.add_argument("--shift", type=float, default=Sampling.shift, help="timestep shift of the step lists")
    p.add_argument("--frames_per_block", type=int, help="override the checkpoint's block size (1 or 3)")
    p.add_argument("--num_frames", type=int, help="latent frames to generate (default: the trained length; longer "
                   "rollouts of causal models roll the KV cache)")
    p.add_argument("--height", type=int, help="video height in pixels (Wan default 480)")
    p.add_argument("--width", type=int, help="video width in pixels (Wan default 832)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several videos)")
    p.add_argument("--prompt_file", help="one prompt per line")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="our checkpoint or run directory, a Wan folder, or an "
                   "official Causal-Forcing .pt (with --wan_dir)")
    add_sampling_arguments(p)
    p.add_argument("--window", type=int, help="rolling KV cache of this many frames (default: the trained length "
                   "when --num_frames exceeds it, else no rolling)")
    p.add_argument("--sink_frames", type=int, help="frames of the rolling cache kept from the start (default: one "
                   "block)")
    p.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="from latent frame FRAME on, condition on PROMPT (repeatable; applies to every video)")
    p.add_argument("--switch_mode", default="recache", choices=["recache", "cross_attn"],
                   help="prompt switch: re-cache the visible frames under the new prompt, or cross-attention only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="run the readable eager forward instead of the fast path "
                   "(model.fast_path: compiled blocks, CUDA graphs on a GPU; docs/performance.md)")
    p.add_argument("--image", help="I2V: this image is the first frame (clean context); frame-wise models only")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--fps", type=int, help="frames per second of the mp4 (Wan 16, toy 8)")
    p.add_argument("--scale", type=int, help="nearest-neighbour upscaling of the mp4 (toy default 8)")
    p.add_argument("--stream", action="store_true", help="decode and write each block as soon as it exists")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--score", action="store_true", help="toy models: print the ToyBench scores of the videos")
    return p.parse_args(argv)


def main(argv=None):
    """Returns {prompt: video [T, 3, H, W]} (for tests); raises SampleError on bad input before writing."""
    args = parse_args(argv)
    problem = common.mp4_writer_problem()  # before anything is computed, so no video is made and then lost
    if problem:
        raise SampleError(problem)
    prompts = read_prompts(args)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise SampleError(f"cannot write to --out {args.out!r} ({existing} is not a writable directory)")
    model, info = load_for_inference(args.ckpt, use_ema=args.use_ema, wan_dir=args.wan_dir,
                                     frames_per_block=args.frames_per_block)
    how = choose_sampling(info, args.steps, args.sample_steps, args.first_frame_steps, args.cfg, args.shift)
    cfg = model.cfg
    toy = info["text_encoder"] == "toy"
    K = cfg.frames_per_block
    if args.score and (not toy or args.image):
        raise SampleError("--score is ToyBench: toy text-to-video only")
    if args.image and (K != 1 or not cfg.causal):
        raise SampleError(f"--image needs a frame-wise causal model (frames_per_block 1); this one has {K}"
                          + ("" if cfg.causal else " and is bidirectional"))
    height, width, num_frames, fps, scale = video_size(model, info, args.num_frames, args.height, args.width)
    fps, scale = args.fps or fps, args.scale or scale
    prefix_frames = 1 if args.image else 0
    window = rolling_window(model, info, num_frames, prefix_frames, args.window, args.sink_frames)
    if window is None and prefix_frames + num_frames > cfg.rope_max_positions:
        raise SampleError(f"{prefix_frames + num_frames} latent frames exceed the model's RoPE/cache range of "
                          f"{cfg.rope_max_positions}; pass --window to roll the cache")
    switches = parse_switches(args.switch, num_frames, K)
    if switches and not cfg.causal:
        raise SampleError("--switch needs a causal (frame-wise or chunk-wise) model")

    import encoders
    text = encoders.load_text_encoder(info["text_encoder"], device)
    codec_device = torch.device("cpu") if toy else device
    codec = encoders.load_codec(info["codec"], codec_device)
    factor = codec.spatial_factor
    if height % (2 * factor) or width % (2 * factor):
        raise SampleError(f"--height/--width must be multiples of {2 * factor}, got {height}x{width}")
    if toy:
        check_toy_prompts(prompts + [p for _, p in switches])
    prefix = None
    if args.image:
        image = read_image(args.image, height, width)
        prefix = codec.encode(image.to(codec_device)).to(device)  # [1, 1, C, h, w]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype).eval()
    forward = M.fast_path(model, compile=False, cuda_graphs=False) if args.eager else M.fast_path(model)
    shape = (num_frames, cfg.in_dim, height // factor, width // factor)

    os.makedirs(args.out, exist_ok=True)
    if args.image and how.mode == "few_step":  # I2V: frame 0 is the image, so no block gets the first-block list
        how = dataclasses.replace(how, first_block_steps=None)
    mode = how.describe()
    layout = ("block" if K > 1 else "frame") + "-wise" if cfg.causal else "whole clip at once"
    print(f"{info['path']} ({info['format']}{', EMA' if args.use_ema else ''}, {info['stage'] or info['kind']}): "
          f"{mode}, {num_frames} latent frames, {layout}, {device}, {forward}")
    results = {}
    for prompt in prompts:
        name = f"{slug(prompt)}-{args.seed}"
        mp4, png = os.path.join(args.out, name + ".mp4"), os.path.join(args.out, name + ".png")
        writer = VideoWriter(mp4, fps, scale)
        try:
            video, timings = sample_one(model, how, text, codec, codec_device, prompt, args.seed, shape, prefix,
                                        writer if args.stream else None, quiet=args.quiet, window=window,
                                        switches=switches, switch_mode=args.switch_mode)
            if not args.stream:
                writer.append(video)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        common.save_png_grid(video[None], png, max_frames=16, scale=max(1, scale // 2))
        frames = video.shape[0]
        print(f"  {mp4}  ({frames} frames)  first block {timings['first_block'] * 1000:.0f} ms, "
              f"{frames / timings['generate']:.1f} frames/s without decoding, "
              f"{frames / (timings['generate'] + timings['decode']):.1f} with decoding")
        results[prompt] = video
    if args.score:
        import toyworld
        toyworld.print_table({f"{os.path.basename(info['path'].rstrip('/'))} ({mode})":
                              toyworld.score(torch.stack(list(results.values())), list(results))})
    return results


if __name__ == "__main__":
    try:
        main()
    except SampleError as e:
        raise SystemExit(f"sample.py: error: {e}")
