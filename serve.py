"""
A live, steerable video stream in the browser: the frame-wise student generates one frame at a time with a rolling
KV cache (model.Rollout), each frame is decoded as soon as it exists and sent over a WebSocket, and the prompt can
be changed while the stream runs (paper title: "... for Real-Time Interactive Video Generation").

  python serve.py                                              # the shipped toy 2-step student on the CPU
  python serve.py --port 8080 --switch_mode cross_attn         # switch prompts by cross-attention only
  python serve.py --ckpt runs/dmd --wan_dir wan_models/Wan2.1-T2V-1.3B --device cuda    # Wan scale, one GPU
  python serve.py --host 0.0.0.0                               # reachable from other machines (no auth!)
  python serve.py --ckpt checkpoints/toy/camera_dmd_2step      # the shipped world model: arrow keys / WASD pan the camera

Then open the printed URL. The server binds 127.0.0.1 unless --host says otherwise. Ctrl-C stops it cleanly.

The Wan-scale path (umT5 + Wan VAE with streaming decode, bf16 on CUDA, JPEG frames) uses the same code as the toy
but cannot be run on the CPU machines this repo is tested on; it is written, not tested.

Pieces, bottom-up: ServeConfig (flat, --key value or --key=value) · Engine (model, text encoder, codec; no web
code; one worker thread runs every model call, so streams never interleave inside a frame) · Stream (one client's
rollout: step() -> decoded frames) · Session (one WebSocket: messages in, frames out) · the page · main.

Protocol. Client -> server, JSON text: {"type": "start", "prompt": str}, {"type": "pause"}, {"type": "resume"},
{"type": "reset"}, {"type": "prompt", "prompt": str, "mode": "recache" | "cross_attn"}, {"type": "control", ...}
(the client's per-frame input: kept by the session and handed to every Stream.step; the text-to-video mode ignores
it). World-model mode (a camera-conditioned checkpoint, paper §3.3): {"type": "control", "pan": [dx, dy]} is the
camera's action, whole pixels per frame (|dx|, |dy| <= the toy world's CAMERA_MAX_PAN): from the next frame on, each
frame's camera moves by it; the camera of every frame goes back as {"type": "camera", "frame": i, "corner": [x, y]}
(the view's top-left corner in scene pixels) before the frame. Server -> client: JSON text {"type": "hello" |
"started" | "prompt_applied" | "paused" | "resumed" | "reset" | "error" | "busy" | "camera", ...} and one binary
message per decoded frame:
a 16-byte little-endian header (uint32 frame index, float32 generation ms of its latent block, uint16 width,
uint16 height, uint8 format 0 = raw RGB / 1 = JPEG, uint8 0, uint16 prompt epoch) followed by the pixels.
"paused" comes after the frame in flight: no frame follows it until "resume". A malformed message (not JSON, a
binary message, a wrong type or value of a field) gets an "error" message saying what is wrong and changes nothing.
"""

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Optional

import torch
from aiohttp import WSMsgType, web

import model as M
import sample

# -----------------------------------------------------------------------------
# ---- config ----


@dataclass
class ServeConfig:
    ckpt: str = sample.DEFAULT_CKPT       # our checkpoint / run dir, a Wan folder, or an official .pt (+ wan_dir)
    use_ema: bool = False                 # the EMA weights of a training checkpoint
    wan_dir: Optional[str] = None         # Wan2.1 folder: umT5 and the VAE (and the architecture of a .pt)
    host: str = "127.0.0.1"               # loopback only unless asked
    port: int = 8000                      # 0 = any free port (printed)
    device: str = "auto"                  # auto = cuda if available
    threads: int = 0                      # CPU threads of torch (0 = torch's default: all cores); on a busy machine
                                          # 1 thread can be faster than 2 (no waiting for a descheduled peer)
    steps: int = 2                        # denoising steps per frame (1, 2 or 4)
    first_frame_steps: str = "1000,750,500,250"  # frame 0's own list (ASD); "none" = the same as every frame
    shift: float = 5.0                    # timestep shift of the step lists
    window: Optional[int] = None          # frames in the rolling KV cache; default: the trained clip length
    sink_frames: Optional[int] = None     # frames kept from the start of the stream; default: one block
    switch_mode: str = "recache"          # default prompt switch: recache (LongLive) or cross_attn
    max_streams: int = 1                  # concurrent streams; one more client gets a "busy" message
    max_fps: float = 0.0                  # cap the frame rate of each stream (0 = as fast as generated)
    seed: int = 0
    fast_path: bool = True                # compiled blocks (+ CUDA graphs on a GPU), warmed up before serving;
                                          # false = the eager forward (model.fast_path)
    default_prompt: str = "a red circle bounces slowly"
    jpeg_above: int = 128 * 128           # frames with more pixels than this go as JPEG, smaller ones as raw RGB
    jpeg_quality: int = 90


def parse_config(argv=None):
    """ServeConfig from `--key value` / `--key=value` arguments (one argument per dataclass field)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    def boolean(text):
        if text.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() == "true"

    for f in fields(ServeConfig):
        if f.type is bool:  # --use_ema, --use_ema=true, --use_ema false
            p.add_argument(f"--{f.name}", type=boolean, nargs="?", const=True, default=f.default)
            continue
        kind = {int: int, float: float, Optional[int]: int}.get(f.type, str)
        p.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=f.name.upper(),
                       help=f"(default {f.default!r})")
    cfg = ServeConfig(**vars(p.parse_args(argv)))
    if cfg.steps not in sample.FEW_STEP_LISTS:
        p.error(f"--steps must be one of {sorted(sample.FEW_STEP_LISTS)}, got {cfg.steps}")
    if cfg.switch_mode not in ("recache", "cross_attn"):
        p.error(f"--switch_mode must be recache or cross_attn, got {cfg.switch_mode!r}")
    if cfg.max_streams < 1:
        p.error(f"--max_streams must be >= 1, got {cfg.max_streams}")
    return cfg


def rss_bytes():
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -----------------------------------------------------------------------------
# ---- engine: model, text encoder, codec (no web code) ----


class PromptError(ValueError):
    """A prompt the text encoder cannot take; the message is shown in the page as is."""


class Engine:
    """Everything a stream needs, loaded once. All model calls run on `executor` (one thread): streams of several
    clients take turns frame by frame, and the asyncio loop stays free to send frames and read messages."""

    def __init__(self, cfg):
        import encoders
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        # the one inference loader (sample.py), which also says what the checkpoint is
        try:
            model, info = sample.load_for_inference(cfg.ckpt, use_ema=cfg.use_ema, wan_dir=cfg.wan_dir)
        except sample.SampleError as e:
            raise SystemExit(f"serve.py: error: {e}") from None
        if info["kind"] != "few_step":
            what = {"ar_diffusion": "a Stage-1 (multi-step) checkpoint is too slow to stream",
                    "bidirectional": "a bidirectional model makes whole clips, not a stream",
                    None: "the checkpoint does not say it is a few-step student (an official .pt needs --use_ema)"}
            raise SystemExit(f"serve.py: error: {what[info['kind']]}; serve a Stage-2/3 few-step student")
        self.toy = info["text_encoder"] == "toy"
        self.info = info
        self.camera = model.cfg.camera_dims > 0  # world-model mode: the client's pans drive the camera
        if self.camera and not self.toy:
            raise SystemExit("serve.py: error: the world-model mode drives the toy camera world's camera (pans of "
                             "a pinhole over a plane); a Wan-scale camera model needs the camera convention of its "
                             "training poses, which this server does not know")
        self.max_pan = None  # world-model mode: px per frame per axis, as in the camera world's training clips
        if self.camera:
            import toyworld
            self.max_pan = toyworld.CAMERA_MAX_PAN
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.text = encoders.load_text_encoder(info["text_encoder"], self.device)
        self.codec_device = torch.device("cpu") if self.toy else self.device
        self.codec = encoders.load_codec(info["codec"], self.codec_device)
        self.height, self.width, trained_frames, _, _ = sample.video_size(model, info)
        factor = self.codec.spatial_factor
        self.latent_shape = (model.cfg.in_dim, self.height // factor, self.width // factor)  # (C, h, w)
        K = model.cfg.frames_per_block
        self.window = cfg.window or trained_frames
        self.sink_frames = K if cfg.sink_frames is None else cfg.sink_frames
        if self.window < self.sink_frames + K or self.window % K:
            raise SystemExit(f"serve.py: error: --window {self.window} must be a multiple of the {K}-frame block "
                             f"and hold the {self.sink_frames} sink frames plus one block")
        self.steps = M.warp_timesteps(sample.FEW_STEP_LISTS[cfg.steps], cfg.shift)
        self.first_block_steps = None if cfg.first_frame_steps == "none" else \
            M.warp_timesteps([float(s) for s in cfg.first_frame_steps.split(",")], cfg.shift)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.forward = M.fast_path(self.model) if cfg.fast_path else \
            M.fast_path(self.model, compile=False, cuda_graphs=False)
        self.warm_up_seconds = self.warm_up() if cfg.fast_path else 0.0

    @torch.no_grad()
    def warm_up(self):
        """Roll a throwaway stream past its first eviction, so compilation (and CUDA graph capture) happen now and
        not after the first client presses Start. Returns the seconds it took."""
        start = time.perf_counter()
        stream = self.new_stream(self.encode(self.cfg.default_prompt), seed=0)
        for _ in range(self.window + 2 * self.model.cfg.frames_per_block):
            stream.step({"pan": [0, 0]} if self.camera else None)
        stream.close()
        return time.perf_counter() - start

    def describe(self):
        c = self.model.cfg
        warmed = f" (warmed up in {self.warm_up_seconds:.1f} s)" if self.warm_up_seconds else ""
        return (f"{self.info['path']} ({self.info['stage'] or 'unknown stage'}, {c.num_layers} layers x {c.dim}), "
                f"{self.forward}{warmed}, "
                f"{self.cfg.steps}-step, {self.width}x{self.height}, rolling cache {self.window} frames "
                f"({self.sink_frames} sink), {self.device}" +
                (", world-model mode: arrow keys / WASD pan the camera" if self.camera else ""))

    def encode(self, prompt):
        """prompt -> context [1, text_len, text_dim]; raises PromptError with a message for the page."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise PromptError("the prompt is empty")
        if self.toy:
            import toyworld
            try:
                toyworld.tokenize([prompt])
            except AssertionError as e:
                words = " ".join(w for w in toyworld.VOCAB if not w.startswith("<"))
                raise PromptError(f"{e}. The toy model knows only these words: {words} "
                                  f"(e.g. 'a red circle moves left quickly')") from None
        return self.text.encode([prompt]).to(self.device)

    def new_stream(self, context, seed):
        return Stream(self, context, seed)

    def read_pan(self, controls):
        """The camera action of a control message -> (dx, dy) whole pixels per frame; raises PromptError."""
        pan = controls.get("pan", (0, 0))
        limit = self.max_pan
        if not (isinstance(pan, (list, tuple)) and len(pan) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) and abs(v) <= limit for v in pan)):
            raise PromptError(f"pan must be two whole numbers of pixels per frame in [-{limit}, {limit}], got {pan!r}")
        return tuple(pan)

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


class Stream:
    """One client's endless rollout: a rolling-cache Rollout, its noise generator and a streaming decoder.
    Lives on the engine's worker thread (every method but the constructor is called there)."""

    def __init__(self, engine, context, seed):
        self.engine = engine
        device = engine.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rollout = M.Rollout(engine.model, context, engine.latent_shape, steps=engine.steps,
                                 first_block_steps=engine.first_block_steps, generator=self.generator,
                                 window=engine.window, sink_frames=engine.sink_frames)
        self.decoder = engine.codec.stream_decoder()
        self.pixel_frames = 0  # pixel frames decoded so far (= latent frames for the toy codec)
        self.corner = (0, 0)  # world-model mode: the view's top-left corner (scene pixels) of the last frame
        self.corners = []  # ... and of the frames of the last block
        self.camera = engine.camera  # pass cameras to the model (bench.py stream turns it off to time their cost)

    @property
    def latent_frame(self):
        return self.rollout.frame

    def set_prompt(self, context, mode):
        self.rollout.set_context(context, mode=mode)

    @torch.no_grad()
    def step(self, controls=None):
        """Generate and decode the next block -> (first pixel frame index, uint8 frames [t, H, W, 3], seconds).
        controls: the client's latest per-frame input; the text-to-video mode has none to apply, the world-model
        mode moves the camera by controls["pan"] (Engine.read_pan) every frame after the first."""
        engine = self.engine
        K = engine.model.cfg.frames_per_block
        start = time.perf_counter()
        noise = torch.randn((1, K, *engine.latent_shape), generator=self.generator, device=engine.device)  # fp32,
        # as sample.py: the latents stay fp32 between steps, only the model computes in bf16 on a GPU
        cameras = None
        if self.camera:
            import toyworld
            dx, dy = engine.read_pan(controls or {})
            self.corners = []
            for f in range(self.rollout.frame, self.rollout.frame + K):
                if f > 0:
                    self.corner = (self.corner[0] + dx, self.corner[1] + dy)
                self.corners.append(self.corner)
            world_to_camera, intrinsics = toyworld.camera_poses(self.corners)  # [K, 4, 4], [K, 3, 3]
            cameras = (world_to_camera[None].to(engine.device), intrinsics[None].to(engine.device))
        x0 = self.rollout.step(noise, cameras=cameras)  # [1, K, C, h, w]
        video = self.decoder.decode_next(x0.float().to(engine.codec_device))[0]  # [t, 3, H, W]
        frames = ((video.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        index = self.pixel_frames
        self.pixel_frames += frames.shape[0]
        return index, frames.contiguous().numpy(), time.perf_counter() - start

    def close(self):
        self.rollout.close()
        self.rollout = self.decoder = None


# -----------------------------------------------------------------------------
# ---- session: one WebSocket ----

HEADER = struct.Struct("<IfHHBBH")  # frame, generation ms, width, height, format, pad, prompt epoch (16 bytes)
RAW_RGB, JPEG = 0, 1


def encode_frame(frame, index, gen_ms, epoch, cfg):
    """uint8 [H, W, 3] -> one binary message (header + raw RGB, or JPEG for large frames)."""
    H, W, _ = frame.shape
    if H * W > cfg.jpeg_above:
        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        return HEADER.pack(index, gen_ms, W, H, JPEG, 0, epoch) + buffer.getvalue()
    return HEADER.pack(index, gen_ms, W, H, RAW_RGB, 0, epoch) + frame.tobytes()


class MessageError(ValueError):
    """A malformed client message; the text goes back to the client as an error message."""


SWITCH_MODES = ("recache", "cross_attn")
CONTROL_KEYS = ("pan",)  # the keys of a control message (world-model mode)


def field(message, key, kind, default=None, choices=None):
    """message[key] checked against `kind` (a type or tuple of types; a bool is never an int) and `choices`;
    absent or null -> default. Raises MessageError with a one-line message that says what to send instead."""
    value = message.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or
            (choices is not None and value not in choices)):
        want = (f"one of {', '.join(map(repr, choices))}" if choices is not None else
                " or ".join({str: "a string", int: "an integer"}.get(k, k.__name__) for k in kinds))
        raise MessageError(f"{key!r} of a {message['type']!r} message must be {want}, got {json.dumps(value)[:100]}")
    return value


class Session:
    """Reads a client's messages and streams its frames. The generation loop runs as its own task; everything
    that touches the model goes through the engine's worker thread."""

    def __init__(self, engine, ws, stats):
        self.engine, self.ws, self.stats = engine, ws, stats
        self.stream = None
        self.running = asyncio.Event()  # set while frames should flow
        self.idle = asyncio.Event()  # set while the generation loop has no frame in flight (waits for `running`)
        self.idle.set()
        self.pending = []  # (context, prompt, mode) to apply before the next frame
        self.prompt = None
        self.epoch = 0  # increments with every applied prompt
        self.controls = {}  # the client's latest per-frame input (see Stream.step)
        self.loop = asyncio.get_running_loop()

    async def send_json(self, **message):
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    async def run_on_engine(self, fn, *args):
        return await self.loop.run_in_executor(self.engine.executor, fn, *args)

    async def encode(self, prompt):
        try:
            return await self.run_on_engine(self.engine.encode, prompt)
        except PromptError as e:
            await self.send_json(type="error", message=f"prompt not accepted: {e}", prompt=prompt)
            return None

    async def on_message(self, data):
        """One client message. A malformed one gets an error message back and changes nothing."""
        try:
            await self.handle(data)
        except MessageError as e:
            await self.send_json(type="error", message=f"message not accepted: {e}")

    async def handle(self, data):
        if not isinstance(data, str):
            raise MessageError(f"got a binary message of {len(data)} bytes; send JSON text such as "
                               f'{{"type": "start", "prompt": "..."}}')
        try:
            message = json.loads(data)
            kind = message["type"]
            assert isinstance(message, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            await self.send_json(type="error", message=f"cannot read message {data[:200]!r}: expected JSON with a 'type'")
            return
        if kind == "start":
            prompt = field(message, "prompt", str) or self.engine.cfg.default_prompt
            mode = field(message, "mode", str, choices=SWITCH_MODES)
            seed = field(message, "seed", int, default=self.engine.cfg.seed)
            if seed < 0:
                raise MessageError(f"'seed' of a 'start' message must be a non-negative integer, got {seed}")
            if self.stream is not None:  # already started: a new prompt, else resume
                if prompt != self.prompt:
                    await self.queue_prompt(prompt, mode)
                self.running.set()
                return
            context = await self.encode(prompt)
            if context is None:
                return
            self.stream = await self.run_on_engine(self.engine.new_stream, context, seed)
            self.prompt, self.epoch = prompt, 0
            self.stats["streams_started"] += 1
            await self.send_json(type="started", prompt=prompt, seed=seed)
            self.running.set()
        elif kind == "pause":
            self.running.clear()
            await self.idle.wait()  # the frame in flight is sent first: no frame follows "paused"
            await self.send_json(type="paused")
        elif kind == "resume":
            if self.stream is not None:
                self.running.set()
                await self.send_json(type="resumed")
        elif kind == "reset":
            self.running.clear()
            await self.close_stream()
            await self.send_json(type="reset")
        elif kind == "prompt":
            await self.queue_prompt(field(message, "prompt", str, default=""),
                                    field(message, "mode", str, choices=SWITCH_MODES))
        elif kind == "control":
            controls = {k: v for k, v in message.items() if k != "type"}
            unknown = sorted(set(controls) - set(CONTROL_KEYS))
            if unknown:
                raise MessageError(f"unknown control {', '.join(map(repr, unknown))}; a control message carries "
                                   f"{', '.join(map(repr, CONTROL_KEYS))}")
            if "pan" in controls and not self.engine.camera:
                raise MessageError("'pan' moves the camera of a world-model (camera-conditioned) checkpoint; this "
                                   "model has none: serve e.g. --ckpt checkpoints/toy/camera_dmd_2step")
            if self.engine.camera:
                try:
                    self.engine.read_pan(controls)
                except PromptError as e:
                    raise MessageError(str(e)) from None
            self.controls = controls
        else:
            await self.send_json(type="error", message=f"unknown message type {kind!r}")

    async def queue_prompt(self, prompt, mode):
        mode = mode or self.engine.cfg.switch_mode
        context = await self.encode(prompt)
        if context is None:
            return
        if self.stream is None:  # nothing is streaming yet: the next start will use this prompt
            await self.send_json(type="error", message="press Start first; the prompt is used when the stream starts")
            return
        self.pending.append((context, prompt.strip(), mode))

    @staticmethod
    def _step(stream, pending, controls):
        """On the worker thread: apply queued prompts, then generate the next block."""
        for context, prompt, mode in pending:
            stream.set_prompt(context, mode)
        return stream.step(controls)

    async def generate_forever(self):
        try:
            await self._generate()
        finally:  # a pause waiting for this loop must not wait forever once the loop has ended
            self.idle.set()

    async def _generate(self):
        min_interval = 1.0 / self.engine.cfg.max_fps if self.engine.cfg.max_fps > 0 else 0.0
        next_time = 0.0
        while True:
            self.idle.set()
            await self.running.wait()
            self.idle.clear()
            if self.stream is None:
                self.running.clear()
                continue
            pending, self.pending = self.pending, []
            stream = self.stream  # queued before any close of it (the worker runs jobs in order)
            first_new_frame = stream.latent_frame
            index, frames, seconds = await self.run_on_engine(self._step, stream, pending, self.controls)
            if stream is not self.stream:  # reset while this frame was being made: drop it
                continue
            if pending:
                self.epoch += len(pending)
                self.prompt = pending[-1][1]
                await self.send_json(type="prompt_applied", prompt=self.prompt, mode=pending[-1][2],
                                     frame=index, latent_frame=first_new_frame, epoch=self.epoch)
            gen_ms = 1000.0 * seconds / len(frames)
            for i, corner in enumerate(stream.corners if self.engine.camera else ()):
                await self.send_json(type="camera", frame=index + i, corner=list(corner))
            for i, frame in enumerate(frames):
                await self.ws.send_bytes(encode_frame(frame, index + i, gen_ms, self.epoch, self.engine.cfg))
            self.stats["frames_sent"] += len(frames)
            if min_interval:
                now = time.perf_counter()
                next_time = max(next_time + min_interval, now)
                await asyncio.sleep(next_time - now)

    async def close_stream(self):
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await self.run_on_engine(stream.close)  # after any frame in flight: the worker runs jobs in order


# -----------------------------------------------------------------------------
# ---- web app ----


async def page_handler(request):
    return web.Response(text=PAGE, content_type="text/html")


async def stats_handler(request):
    app = request.app
    sessions = app["sessions"]
    return web.json_response(dict(
        active_streams=sum(s.stream is not None for s in sessions), connections=len(sessions),
        streams=[dict(frame=s.stream.pixel_frames if s.stream else None, prompt=s.prompt, epoch=s.epoch,
                      camera=list(s.stream.corner) if s.stream and s.engine.camera else None) for s in sessions],
        rss_bytes=rss_bytes(), **app["stats"]))


async def websocket_handler(request):
    app = request.app
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 16)
    await ws.prepare(request)
    engine, sessions = app["engine"], app["sessions"]
    if len(sessions) >= engine.cfg.max_streams:
        app["stats"]["busy_refusals"] += 1
        await ws.send_str(json.dumps(dict(type="busy", message=f"the server is busy: it runs at most "
                                          f"{engine.cfg.max_streams} stream(s) at once (--max_streams); close "
                                          f"another tab or try again later")))
        await ws.close(code=1013, message=b"busy")
        return ws
    session = Session(engine, ws, app["stats"])
    sessions.add(session)
    await session.send_json(type="hello", width=engine.width, height=engine.height, window=engine.window,
                            sink_frames=engine.sink_frames, steps=engine.cfg.steps,
                            switch_mode=engine.cfg.switch_mode, default_prompt=engine.cfg.default_prompt,
                            model=engine.describe(), camera=engine.camera, max_pan=engine.max_pan)
    task = asyncio.create_task(session.generate_forever())
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await session.on_message(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
            if task.done():  # the generation loop died (e.g. the socket broke while sending)
                break
    finally:  # the tab closed, the socket broke or the server stops: stop generating and free the cache
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 — report, then still free the stream
            print(f"serve.py: stream ended by {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        await session.close_stream()
        sessions.discard(session)
        if not ws.closed:
            await ws.close()
    return ws


async def close_all_sockets(app):
    for session in list(app["sessions"]):
        await session.ws.close(code=1001, message=b"server shutting down")


def make_app(engine):
    app = web.Application()
    app["engine"] = engine
    app["sessions"] = set()
    app["stats"] = dict(frames_sent=0, streams_started=0, busy_refusals=0)
    app.router.add_get("/", page_handler)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/stats", stats_handler)
    app.on_shutdown.append(close_all_sockets)
    return app


async def serve(engine, ready=None):
    """Run until SIGINT/SIGTERM (or `ready[1]` is set by an embedding caller). Prints the URL."""
    cfg = engine.cfg
    runner = web.AppRunner(make_app(engine), handle_signals=False)
    await runner.setup()
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        await runner.cleanup()
        raise SystemExit(f"serve.py: error: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pass another "
                         f"--port (0 = any free port)") from None
    site = web.SockSite(runner, sock)
    await site.start()
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving {engine.describe()}", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host}: anyone who can reach this port can use the server", flush=True)
    print(f"open http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    await stop.wait()
    print("stopping: closing streams", flush=True)
    await runner.cleanup()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def main(argv=None):
    cfg = parse_config(argv)
    engine = Engine(cfg)
    try:
        asyncio.run(serve(engine))
    finally:
        engine.close()
    print("stopped", flush=True)


# -----------------------------------------------------------------------------
# ---- the page ----

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Causal Forcing++ live</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 24px; background: #111; color: #ddd; }
 #view { image-rendering: pixelated; image-rendering: crisp-edges; background: #000; width: 512px;
         border: 1px solid #444; display: block; margin: 12px 0; }
 #prompt { width: 420px; font: inherit; padding: 4px; }
 button, select { font: inherit; padding: 4px 10px; }
 #stats span { display: inline-block; margin-right: 24px; }
 #message { min-height: 1.4em; margin-top: 8px; }
 #message.error { color: #ff6b6b; } #message.info { color: #8fd18f; }
 .small { color: #888; font-size: 12px; }
</style></head>
<body>
<h3>Causal Forcing++ — live frame-wise generation</h3>
<div>
 <input id="prompt" placeholder="a red circle bounces slowly">
 <button id="start">Start</button> <button id="pause" disabled>Pause</button> <button id="reset">Reset</button>
 <select id="mode" title="how a new prompt takes over">
  <option value="recache">switch: re-cache window</option><option value="cross_attn">switch: cross-attention only</option>
 </select>
</div>
<div id="message"></div>
<canvas id="view" width="32" height="32"></canvas>
<div id="stats">
 <span>frame <b id="frame">-</b></span><span>frames/s <b id="fps">-</b></span>
 <span>frame interval <b id="interval">-</b> ms</span><span>generation <b id="gen">-</b> ms</span>
 <span>first frame <b id="first">-</b> ms</span><span id="camera_stat" hidden>camera <b id="camera">-</b></span>
</div>
<div class="small" id="model"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("view"), ctx = canvas.getContext("2d");
const demo = { frames: 0, lastIndex: -1, epoch: 0, arrivals: [], startedAt: null, firstFrameMs: null,
               lastIntervalMs: null, genMs: null, fps: 0, messages: [], recent: [], state: "idle",
               keepRecent: 400, maxPan: null, pan: [0, 0], camera: null };
window.demo = demo;
let ws = null, streaming = false;

function show(text, kind) { const m = $("message"); m.textContent = text; m.className = kind || ""; }

function connect() {
  ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (event) => (typeof event.data === "string") ? onJson(JSON.parse(event.data)) : onFrame(event.data);
  ws.onclose = (event) => { if (demo.state !== "busy") show(`disconnected (${event.code}) — reload to reconnect`, "error");
                            demo.state = demo.state === "busy" ? "busy" : "closed"; };
}

function onJson(msg) {
  demo.messages.push(msg);
  if (msg.type === "hello") {
    canvas.width = msg.width; canvas.height = msg.height;
    canvas.style.width = `${Math.max(256, Math.min(768, msg.width * Math.max(1, Math.floor(512 / msg.width))))}px`;
    $("prompt").value = $("prompt").value || msg.default_prompt; $("mode").value = msg.switch_mode;
    $("model").textContent = msg.model; demo.state = "ready";
  } else if (msg.type === "busy") { demo.state = "busy"; show(msg.message, "error"); }
  else if (msg.type === "error") { show(msg.message, "error"); }
  else if (msg.type === "started") { demo.state = "running"; show(`streaming "${msg.prompt}"`, "info"); }
  else if (msg.type === "prompt_applied") {
    demo.epoch = msg.epoch; show(`"${msg.prompt}" from frame ${msg.frame} (${msg.mode})`, "info");
  } else if (msg.type === "paused") { demo.state = "paused"; }
  else if (msg.type === "resumed") { demo.state = "running"; }
  else if (msg.type === "reset") { demo.state = "ready"; }
  else if (msg.type === "camera") { demo.camera = msg.corner; $("camera").textContent = msg.corner.join(", "); }
  if (msg.type === "hello" && msg.camera) { demo.maxPan = msg.max_pan; $("camera_stat").hidden = false; }
}

// world-model mode: held arrow keys / WASD set the camera's pan (px per frame), sent whenever it changes
const held = new Set();
const PAN_KEYS = { ArrowLeft: [-1, 0], a: [-1, 0], ArrowRight: [1, 0], d: [1, 0],
                   ArrowUp: [0, -1], w: [0, -1], ArrowDown: [0, 1], s: [0, 1] };
function sendPan() {
  let dx = 0, dy = 0;
  for (const key of held) { dx += PAN_KEYS[key][0]; dy += PAN_KEYS[key][1]; }
  const pan = [Math.sign(dx) * demo.maxPan, Math.sign(dy) * demo.maxPan];
  if (String(pan) !== String(demo.pan)) { demo.pan = pan; send({ type: "control", pan }); }
}
function onKey(event, down) {
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (!demo.maxPan || !(key in PAN_KEYS) || event.target.tagName === "INPUT") return;
  event.preventDefault();
  if (down) held.add(key); else held.delete(key);
  sendPan();
}
document.addEventListener("keydown", (event) => onKey(event, true));
document.addEventListener("keyup", (event) => onKey(event, false));

function onFrame(buffer) {
  const now = performance.now();
  const view = new DataView(buffer);
  const index = view.getUint32(0, true), genMs = view.getFloat32(4, true);
  const width = view.getUint16(8, true), height = view.getUint16(10, true), format = view.getUint8(12);
  const epoch = view.getUint16(14, true);
  const pixels = new Uint8Array(buffer, 16);
  if (format === 0) {
    const image = ctx.createImageData(width, height);
    for (let i = 0, j = 0; i < width * height; i++, j += 3) {
      image.data[4 * i] = pixels[j]; image.data[4 * i + 1] = pixels[j + 1]; image.data[4 * i + 2] = pixels[j + 2];
      image.data[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    if (width * height <= 128 * 128) {  // keep what the page shows, for tests and measurements
      const shown = ctx.getImageData(0, 0, width, height).data;
      demo.recent.push({ index, epoch, width, height, rgba: Array.from(shown) });
      if (demo.recent.length > demo.keepRecent) demo.recent.shift();
    }
  } else {
    createImageBitmap(new Blob([pixels], { type: "image/jpeg" })).then((bitmap) => ctx.drawImage(bitmap, 0, 0));
  }
  if (demo.firstFrameMs === null && demo.startedAt !== null) demo.firstFrameMs = now - demo.startedAt;
  if (demo.arrivals.length) demo.lastIntervalMs = now - demo.arrivals[demo.arrivals.length - 1];
  demo.arrivals.push(now);
  if (demo.arrivals.length > 60) demo.arrivals.shift();
  const span = demo.arrivals[demo.arrivals.length - 1] - demo.arrivals[0];
  demo.fps = demo.arrivals.length > 1 && span > 0 ? 1000 * (demo.arrivals.length - 1) / span : 0;
  demo.frames += 1; demo.lastIndex = index; demo.genMs = genMs;
  $("frame").textContent = index; $("fps").textContent = demo.fps.toFixed(1);
  $("interval").textContent = demo.lastIntervalMs === null ? "-" : demo.lastIntervalMs.toFixed(1);
  $("gen").textContent = genMs.toFixed(1);
  $("first").textContent = demo.firstFrameMs === null ? "-" : demo.firstFrameMs.toFixed(0);
}

function send(message) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message)); }

$("start").onclick = () => {
  const prompt = $("prompt").value.trim();
  if (!streaming) {
    demo.startedAt = performance.now(); demo.firstFrameMs = null; demo.arrivals = [];
    send({ type: "start", prompt });
    streaming = true; $("pause").disabled = false; $("start").textContent = "Apply prompt";
  } else {
    send({ type: "prompt", prompt, mode: $("mode").value });
  }
};
$("prompt").onkeydown = (event) => { if (event.key === "Enter") $("start").click(); };
$("pause").onclick = () => {
  if (demo.state === "paused") { send({ type: "resume" }); $("pause").textContent = "Pause"; demo.arrivals = []; }
  else { send({ type: "pause" }); $("pause").textContent = "Resume"; }
};
$("reset").onclick = () => {
  send({ type: "reset" }); streaming = false; $("start").textContent = "Start"; $("pause").disabled = true;
  $("pause").textContent = "Pause"; ctx.clearRect(0, 0, canvas.width, canvas.height);
  Object.assign(demo, { frames: 0, lastIndex: -1, epoch: 0, arrivals: [], recent: [], firstFrameMs: null });
  $("frame").textContent = "-"; $("fps").textContent = "-";
};
connect();
</script></body></html>
"""

if __name__ == "__main__":
    main()
