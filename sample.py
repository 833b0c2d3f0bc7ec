"""
Sample videos from a frame-wise autoregressive generator (paper §2.2 inference; method_spec §7).

A few-step student (Stage 2 or 3) generates block by block with its KV cache: every block with the 1/2/4-step
list, the first block of a video from nothing with the 4-step list (the ASD trick), re-noising with fresh noise
between steps, then a clean context pass that writes the block into the cache. A multi-step AR-diffusion
model (Stage 1) is sampled the same way with Euler steps and CFG (`--sample_steps`, `--cfg`).

  python sample.py --prompt "a red circle moves left quickly"                      # the shipped toy 2-step model
  python sample.py --prompt "..." --steps 1 --stream                               # 1 step per frame, streamed
  python sample.py --ckpt runs/dmd --prompt "..." --wan_dir wan_models/Wan2.1-T2V-1.3B         # ours, Wan scale
  python sample.py --ckpt causal_forcing_pp_framewise.pt --use_ema --wan_dir wan_models/Wan2.1-T2V-1.3B --prompt "..."
  python sample.py --image first_frame.png --prompt "..."                          # I2V: the image is frame 0
  python sample.py --ckpt runs/toy/tf --use_ema --sample_steps 40 --cfg 3 --prompt "..."   # Stage-1 AR diffusion
  python sample.py --prompt "a red circle bounces slowly" --num_frames 2000 --stream     # past the trained length
  python sample.py --prompt "a red circle bounces slowly" --switch "24:a green square stays still"  # prompt switch

Past the trained clip length the KV cache rolls (model.KVCache): --window frames (default the trained length)
with --sink_frames kept from the start; per-frame cost and cache memory stay flat. --switch FRAME:PROMPT changes
the prompt from that latent frame on, by cross-attention only or by re-caching the visible frames (--switch_mode).

Writes OUT/<prompt>-<seed>.mp4 and a PNG contact sheet per prompt; prints first-frame latency and frames/s
with and without decoding. With --stream each block is decoded as soon as it exists (streaming VAE decode)
and appended to the mp4 — what an interactive application would show.
"""

import argparse
import json
import os
import re
import time

import torch

import common
import model as M

DEFAULT_CKPT = "checkpoints/toy/dmd_2step"
FEW_STEP_LISTS = {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}


class SampleError(Exception):
    """Bad input: reported as one line, before any file is written."""


# -----------------------------------------------------------------------------
# checkpoint -> model, text encoder, codec


def load_generator(args):
    """-> (model, info) where info holds the stage, text encoder / codec names and the default video size."""
    path = args.ckpt
    if not os.path.exists(path):
        raise SampleError(f"checkpoint {path!r} not found (train one, or pass --ckpt; the toy models live in "
                          f"checkpoints/toy/)")
    path = common.resolve_checkpoint(path) if os.path.isdir(path) else path
    info = dict(stage=None, text_encoder=None, codec=None, num_frames=None)
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if config_path and os.path.isfile(config_path):
        with open(config_path) as f:
            stored = json.load(f)
        run = stored.get("run_config") or {}
        info.update(stage=stored.get("stage"), text_encoder=run.get("text_encoder"), codec=run.get("codec"),
                    num_frames=run.get("num_frames"))
    model_cfg = M.config_from_checkpoint(path)
    if model_cfg is None:  # an official .pt carries no architecture: take it from the Wan folder
        if not args.wan_dir:
            raise SampleError(f"{path} has no config.json; pass --wan_dir (the Wan2.1 folder it was trained from)")
        model_cfg = M.config_from_checkpoint(args.wan_dir)
        if model_cfg is None:
            raise SampleError(f"--wan_dir {args.wan_dir!r} holds no Wan config.json")
        info["stage"] = "official"
    if args.frames_per_block is not None:
        model_cfg.frames_per_block = args.frames_per_block
    multi_step = args.sample_steps is not None or info["stage"] == "stage1"
    if not multi_step:  # few-step sampling is always autoregressive; multi-step keeps the checkpoint's attention
        model_cfg.causal = True
    model = M.CausalWanModel(model_cfg)
    try:
        fmt = M.load_weights(model, path, use_ema=args.use_ema)
    except (M.WeightLoadError, FileNotFoundError, ValueError) as e:
        raise SampleError(str(e).splitlines()[0]) from None
    info["format"], info["multi_step"], info["path"] = fmt, multi_step, path
    if info["text_encoder"] is None:  # Wan/official checkpoints: umT5 and the VAE from the Wan folder
        if not args.wan_dir:
            raise SampleError(f"{path} does not name its text encoder; pass --wan_dir")
        info["text_encoder"] = info["codec"] = args.wan_dir
    elif args.wan_dir and info["text_encoder"] != "toy":
        info["text_encoder"] = info["codec"] = args.wan_dir
    return model, info


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


def sample_one(model, info, text, codec, codec_device, prompt, args, shape, prefix=None, writer=None,
               window=None, switches=()):
    """Generate and decode one video. shape = (F, C, h, w) of the generated latents. With a writer (stream mode)
    every block is decoded and written as soon as it exists. window: rolling KV cache of that many frames (None =
    the whole video) or (window, sink frames); switches: [(latent frame, prompt)]. Returns (video [T, 3, H, W], timings)."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    F_, C, h, w = shape
    noise = torch.randn((1, F_, C, h, w), generator=torch.Generator().manual_seed(args.seed)).to(device)
    context = text.encode([prompt]).to(device)
    decoder = codec.stream_decoder() if writer is not None else None
    timings = dict(first_block=None, decode=0.0)
    decoded = []
    progress = tqdm(total=F_, desc=prompt[:40], unit="frame", disable=args.quiet)

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

    uncond = text.encode([text.negative_prompt]).to(device) if info["multi_step"] else None
    switch_contexts = {frame + (0 if prefix is None else prefix.shape[1]): text.encode([p]).to(device)
                       for frame, p in switches}  # keyed by absolute frame (after an I2V prefix)

    def before_block(rollout, start_frame):
        if start_frame in switch_contexts:
            rollout.set_context(switch_contexts[start_frame], uncond, mode=args.switch_mode)

    rolling = dict(window=window and window[0], sink_frames=window and window[1], before_block=before_block)
    with torch.no_grad():
        if info["multi_step"]:
            steps = M.timestep_grid(args.sample_steps or 40, args.shift).tolist()
            if model.cfg.causal:
                latents = M.generate(model, noise, context, steps=steps, sampler="euler", uncond_context=uncond,
                                     guidance_scale=args.cfg, prefix=prefix, on_block=on_block, **rolling)
            else:  # a bidirectional model (the toy base): the whole clip at once
                latents = M.generate_bidirectional(model, noise, context, steps=steps, uncond_context=uncond,
                                                   guidance_scale=args.cfg)
                on_block(0, 0, latents)
        else:
            first = None if args.first_frame_steps == "none" else \
                M.warp_timesteps([float(s) for s in args.first_frame_steps.split(",")], args.shift)
            latents = M.generate(model, noise, context, steps=M.warp_timesteps(FEW_STEP_LISTS[args.steps], args.shift),
                                 first_block_steps=first, prefix=prefix,
                                 generator=torch.Generator(device=device).manual_seed(args.seed + 1),
                                 on_block=on_block, **rolling)
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several videos)")
    p.add_argument("--prompt_file", help="one prompt per line")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="our checkpoint or run directory, a Wan folder, or an "
                   "official Causal-Forcing .pt (with --wan_dir)")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights (training checkpoints, official .pt)")
    p.add_argument("--wan_dir", help="Wan2.1 folder: text encoder and VAE (and the architecture for a .pt)")
    p.add_argument("--steps", type=int, choices=[1, 2, 4], default=2, help="denoising steps per frame")
    p.add_argument("--first_frame_steps", default="1000,750,500,250",
                   help="nominal list of the first frame (ASD); 'none' = the same list as every frame")
    p.add_argument("--frames_per_block", type=int, help="override the checkpoint's block size (1 or 3)")
    p.add_argument("--num_frames", type=int, help="latent frames to generate (default: the trained length; longer "
                   "rollouts use a rolling KV cache)")
    p.add_argument("--window", type=int, help="rolling KV cache of this many frames (default: the trained length "
                   "when --num_frames exceeds it, else no rolling)")
    p.add_argument("--sink_frames", type=int, help="frames of the rolling cache kept from the start (default: one "
                   "block)")
    p.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="from latent frame FRAME on, condition on PROMPT (repeatable; applies to every video)")
    p.add_argument("--switch_mode", default="recache", choices=["recache", "cross_attn"],
                   help="prompt switch: re-cache the visible frames under the new prompt, or cross-attention only")
    p.add_argument("--height", type=int, help="video height in pixels (Wan default 480)")
    p.add_argument("--width", type=int, help="video width in pixels (Wan default 832)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="I2V: this image is the first frame (clean context); frame-wise models only")
    p.add_argument("--sample_steps", type=int, help="multi-step Euler sampling (Stage-1 AR diffusion models)")
    p.add_argument("--cfg", type=float, default=3.0, help="CFG weight of multi-step sampling")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the step lists")
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
    prompts = read_prompts(args)
    if args.num_frames is not None and args.num_frames < 1:
        raise SampleError(f"--num_frames must be >= 1, got {args.num_frames}")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise SampleError(f"cannot write to --out {args.out!r} ({existing} is not a writable directory)")
    model, info = load_generator(args)
    cfg = model.cfg
    toy = info["text_encoder"] == "toy"

    # video size
    import encoders
    if toy:
        import toyworld
        height = width = toyworld.TOY_SIZE
        default_frames, fps, scale = toyworld.TOY_FRAMES, 8, 8
    else:
        height, width, default_frames, fps, scale = 480, 832, 21, 16, 1
    height, width = args.height or height, args.width or width
    num_frames = args.num_frames or info["num_frames"] or default_frames
    fps, scale = args.fps or fps, args.scale or scale
    K = cfg.frames_per_block
    prefix_frames = 1 if args.image else 0
    if args.score and (not toy or args.image):
        raise SampleError("--score is ToyBench: toy text-to-video only")
    if args.image and K != 1:
        raise SampleError(f"--image needs a frame-wise model (frames_per_block 1); this one has {K}")
    if num_frames % K:
        raise SampleError(f"--num_frames {num_frames} is not a whole number of {K}-frame blocks")
    trained_frames = info["num_frames"] or default_frames
    window = args.window
    if window is None and prefix_frames + num_frames > trained_frames:
        window = trained_frames
    if window is not None:
        if not cfg.causal:
            raise SampleError("a bidirectional model samples whole clips; --num_frames beyond its length and "
                              "--window need a causal model")
        sink = K if args.sink_frames is None else args.sink_frames
        if window % K or window < sink + K or window > cfg.rope_max_positions:
            raise SampleError(f"--window {window} must be a multiple of {K}, hold the {sink} sink frames plus one "
                              f"block, and stay within the RoPE range {cfg.rope_max_positions}")
        window = (window, sink)
    elif prefix_frames + num_frames > cfg.rope_max_positions:
        raise SampleError(f"{prefix_frames + num_frames} latent frames exceed the model's RoPE/cache range of "
                          f"{cfg.rope_max_positions}; pass --window to roll the cache")
    switches = []
    for item in args.switch:
        frame, _, switch_prompt = item.partition(":")
        if not frame.strip().isdigit() or not switch_prompt.strip():
            raise SampleError(f"--switch {item!r} is not FRAME:PROMPT (e.g. '24:a green square stays still')")
        frame = int(frame)
        if not 0 < frame < num_frames or frame % K:
            raise SampleError(f"--switch frame {frame} must be a block boundary inside the video (0 < frame < "
                              f"{num_frames}, a multiple of {K})")
        switches.append((frame, switch_prompt.strip()))
    if switches and not cfg.causal:
        raise SampleError("--switch needs a causal (frame-wise or chunk-wise) model")
    if not info["multi_step"] and args.first_frame_steps != "none":
        try:
            [float(s) for s in args.first_frame_steps.split(",")]
        except ValueError:
            raise SampleError(f"--first_frame_steps {args.first_frame_steps!r} is not a comma list of timesteps") from None

    text = encoders.load_text_encoder(info["text_encoder"], device)
    codec_device = torch.device("cpu") if toy else device
    codec = encoders.load_codec(info["codec"], codec_device)
    factor = codec.spatial_factor
    if height % (2 * factor) or width % (2 * factor):
        raise SampleError(f"--height/--width must be multiples of {2 * factor}, got {height}x{width}")
    if toy:
        import toyworld
        for prompt in prompts + [p for _, p in switches]:
            try:
                toyworld.tokenize([prompt])
            except AssertionError as e:
                raise SampleError(f"{e} (toy prompts look like 'a red circle moves left quickly')") from None
    prefix = None
    if args.image:
        image = read_image(args.image, height, width)
        prefix = codec.encode(image.to(codec_device)).to(device)  # [1, 1, C, h, w]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype).eval()
    shape = (num_frames, cfg.in_dim, height // factor, width // factor)

    os.makedirs(args.out, exist_ok=True)
    mode = (f"{args.sample_steps or 40}-step Euler, CFG {args.cfg}" if info["multi_step"] else
            f"{args.steps}-step" + (f", first frame {args.first_frame_steps}" if not args.image and
                                    args.first_frame_steps != "none" else ""))
    print(f"{info['path']} ({info['format']}{', EMA' if args.use_ema else ''}, {info['stage'] or 'unknown stage'}): "
          f"{mode}, {num_frames} latent frames, {'block' if K > 1 else 'frame'}-wise, {device}")
    results = {}
    for prompt in prompts:
        name = f"{slug(prompt)}-{args.seed}"
        mp4, png = os.path.join(args.out, name + ".mp4"), os.path.join(args.out, name + ".png")
        writer = VideoWriter(mp4, fps, scale)
        try:
            video, timings = sample_one(model, info, text, codec, codec_device, prompt, args, shape, prefix,
                                        writer if args.stream else None, window, switches)
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
