"""
Probe worlds for the toy-world redesign: render candidate worlds into the shard format, and judge a model
trained on them by (1) its flow-matching loss with the true prompt vs the direction word flipped, (2) the exact
(Bayes) denoiser's loss on the same draws, (3) held-out direction of 40-step samples.

  python experiments/toy_world_probe.py data --world comet --n 16384 --out data/probe_comet
  python stage1_teacher_forcing.py --config configs/toy/base.yaml --data_dir=data/probe_comet \
      --out_dir=runs/probe_comet --max_steps=3000 --sample_every=0 --save_every=250 --resume=true
  python experiments/toy_world_probe.py judge --world comet --ckpt runs/probe_comet --samples 1
  python experiments/toy_world_probe.py transport --world v1 --ckpt checkpoints/toy/base --sigmas 0.97,0.9

Worlds (one object, 32x32, 12 frames, on a torus: positions wrap, so motion is defined for any number of
frames and the start position says nothing about the direction): "torus", whole-token-ish motion (slowly 2,
quickly 4 px/frame; the toy codec + patchify make 4-px tokens); "comet", the same with a 2-px trail behind a
moving object (2 px per px/frame of speed), so every single frame shows where the object is going.
The current world (toyworld.py) is judged with `toy_eval.py oracle` and `toy_eval.py score`.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root: toyworld, model, toy_eval
import toyworld as TW  # noqa: E402

SIZE, FRAMES, OBJ = 32, 12, 8
SPEEDS = {"slowly": 2, "quickly": 4}
MOTIONS = ("left", "right", "up", "down", "still")
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
HELDOUT = (
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "up"),
    ("yellow", "circle", "down"), ("magenta", "square", "left"), ("cyan", "triangle", "still"),
    ("white", "circle", "right"), ("red", "triangle", "down"), ("green", "circle", "up"),
    ("blue", "square", "left"), ("yellow", "triangle", "right"), ("cyan", "circle", "up"),
)


def velocity(obj):
    s = SPEEDS[obj["speed"]] if obj["speed"] else 0
    dx, dy = VELOCITY[obj["motion"]]
    return dx * s, dy * s


def sprite(obj, world):
    """The object's pixels as a boolean mask on a (SIZE x SIZE) canvas with its top-left corner at (0, 0),
    before wrapping: the shape, plus (world 'comet') a 2-px trail behind it, 2 px per px/frame of speed."""
    canvas = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    canvas[:OBJ, :OBJ] = TW.TEMPLATES[obj["shape"]]
    vx, vy = velocity(obj)
    if world == "comet" and (vx or vy):
        length = 2 * max(abs(vx), abs(vy))
        mid = OBJ // 2
        if vx:
            xs = range(-length, 0) if vx > 0 else range(OBJ, OBJ + length)
            for x in xs:
                canvas[mid - 1:mid + 1, x % SIZE] = True
        else:
            ys = range(-length, 0) if vy > 0 else range(OBJ, OBJ + length)
            for y in ys:
                canvas[y % SIZE, mid - 1:mid + 1] = True
    return canvas


def draw(objects, starts, world, frames=FRAMES):
    """[T, 3, H, W] in [-1, 1] on a torus: positions wrap around the edges."""
    video = torch.zeros(frames, 3, SIZE, SIZE)
    for obj, (x0, y0) in zip(objects, starts):
        mask = sprite(obj, world)
        colour = torch.tensor(TW.COLOURS[obj["colour"]]).view(3, 1)
        vx, vy = velocity(obj)
        for t in range(frames):
            m = torch.roll(mask, shifts=(y0 + vy * t, x0 + vx * t), dims=(0, 1))
            video[t][:, m] = colour
    return video * 2 - 1


def sample_object(rng):
    while True:
        motion = rng.choice(MOTIONS)
        obj = dict(colour=rng.choice(list(TW.COLOURS)), shape=rng.choice(TW.SHAPES), motion=motion,
                   speed=None if motion == "still" else rng.choice(list(SPEEDS)))
        if (obj["colour"], obj["shape"], obj["motion"]) not in HELDOUT:
            return obj


def heldout_prompts():
    out = []
    for c, s, m in HELDOUT:
        for sp in ([None] if m == "still" else list(SPEEDS)):
            out.append(TW.make_prompt([dict(colour=c, shape=s, motion=m, speed=sp)]))
    return out


def make_data(world, n, out, seed=0, shard_size=512):
    import prepare_data
    codec = TW.ToyCodec()
    Path(out).mkdir(parents=True, exist_ok=True)
    for k in range(math.ceil(n / shard_size)):
        videos, prompts, objs = [], [], []
        for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
            rng = random.Random(f"probe-{world}-{seed}-{i}")
            obj = sample_object(rng)
            start = (rng.randrange(SIZE), rng.randrange(SIZE))
            videos.append(draw([obj], [start], world))
            prompts.append(TW.make_prompt([obj]))
            objs.append([obj])
        latents = codec.encode(torch.stack(videos)).half()
        prepare_data.write_shard(out, k, latents, dict(prompts=prompts, objects=objs, skipped=[],
                                                       settings=dict(probe=world, seed=seed)))
    print(f"{n} clips of world {world} in {out}")


def moving_clips(rng, n, world):
    """n one-object clips of a probe world that move (not "still"), each from any start -> (objects, [n, T, 3, H, W])."""
    objs, clips = [], []
    while len(objs) < n:
        o = sample_object(rng)
        if o["motion"] != "still":
            objs.append(o)
            clips.append(draw([o], [(rng.randrange(SIZE), rng.randrange(SIZE))], world))
    return objs, torch.stack(clips)


# ---- exact denoiser ----

def candidates(obj, world, open_direction=False):
    """Every clip the prompt allows (all start positions; all four directions if open_direction) [N, T, 3, H, W]."""
    motions = ("left", "right", "up", "down") if open_direction and obj["motion"] != "still" else (obj["motion"],)
    clips = []
    for m in motions:
        o = dict(obj, motion=m)
        base = draw([o], [(0, 0)], world)                       # [T, 3, H, W]
        for y in range(SIZE):
            for x in range(SIZE):
                clips.append(torch.roll(base, shifts=(y, x), dims=(2, 3)))
    return torch.stack(clips)


# ---- judge ----

def circular_track(video, colour):
    """Per-frame circular-mean position (x, y) of the pixels near `colour` -> unwrapped track [T, 2] and
    detected [T]."""
    rgb = (video + 1) / 2
    target = torch.tensor(TW.COLOURS[colour]).view(1, 3, 1, 1)
    mask = ((rgb - target) ** 2).sum(1) < TW.COLOUR_TOL ** 2          # [T, H, W]
    angle = torch.arange(SIZE) * 2 * math.pi / SIZE
    pos, det = [], []
    for m in mask:
        det.append(m.sum() >= 12)
        w = m.float()
        px = torch.atan2((w * angle.sin()[None]).sum(), (w * angle.cos()[None]).sum()) * SIZE / (2 * math.pi)
        py = torch.atan2((w * angle.sin()[:, None]).sum(), (w * angle.cos()[:, None]).sum()) * SIZE / (2 * math.pi)
        pos.append(torch.stack([px, py]))
    pos = torch.stack(pos)
    step = torch.remainder(pos[1:] - pos[:-1] + SIZE / 2, SIZE) - SIZE / 2
    track = torch.cat([pos[:1], pos[:1] + step.cumsum(0)])
    return track, torch.stack(det)


def judge_direction(video, prompt):
    obj = TW.parse_prompt(prompt)[0]
    track, det = circular_track(video, obj["colour"])
    if det.float().mean() < 0.5:
        return 0.0, 0.0
    t = torch.arange(len(track)).float()
    t = t - t.mean()
    v = (t[:, None] * (track - track.mean(0))).sum(0) / (t ** 2).sum()
    vx, vy = v.tolist()
    speed = math.hypot(vx, vy)
    m = obj["motion"]
    if m == "still":
        return float(speed < 0.3), float(speed < 0.5)
    along, across = (vx, vy) if m in ("left", "right") else (vy, vx)
    sign = -1 if m in ("left", "up") else 1
    s = SPEEDS[obj["speed"]]
    return float(sign * along >= 0.4 and abs(across) <= 0.5 * abs(along)), float(0.5 * s <= speed < 1.5 * s)


@torch.no_grad()
def judge(args):
    """Oracle-gap table (toy_eval.oracle_gap) on one-object moving clips of the probe world, then held-out
    direction / speed / colour of 40-step CFG samples."""
    import sample
    import toy_eval
    net, _ = toy_eval.load_model(args.ckpt, args.use_ema)   # the one inference loader
    text, codec = TW.ToyTextEncoder(), TW.ToyCodec()
    objs, clips = moving_clips(random.Random("probe-judge"), args.clips, args.world)
    x0 = codec.encode(clips)                                            # [N, T, 12, 16, 16]
    rows = toy_eval.oracle_gap(net, text, x0, [TW.make_prompt([o]) for o in objs],
                               lambda i, open_direction: codec.encode(candidates(objs[i], args.world, open_direction)).flatten(1),
                               [float(s) for s in args.sigmas.split(",")], seed=1)
    print(f"{args.ckpt} on world {args.world}, {args.clips} clips")
    print(toy_eval.format_oracle_table(rows), flush=True)
    out = dict(ckpt=args.ckpt, world=args.world, rows={str(k): v for k, v in rows.items()})
    if args.samples:
        hp = [p for p in heldout_prompts() for _ in range(args.samples)]
        videos = toy_eval.sample_toy(net, hp, how=sample.Sampling("multi_step", sample_steps=40, cfg=args.cfg))
        judged = [judge_direction(v, p) for v, p in zip(videos, hp)]
        out.update(heldout_direction=sum(j[0] for j in judged) / len(judged),
                   heldout_speed=sum(j[1] for j in judged) / len(judged),
                   heldout_colour=sum(TW.score_video(v, p)["colour"] for v, p in zip(videos, hp)) / len(hp))
        print(f"held-out x{args.samples}: direction {100 * out['heldout_direction']:.1f} speed "
              f"{100 * out['heldout_speed']:.1f} colour {100 * out['heldout_colour']:.1f}")
        if args.png:
            import common
            common.save_png_grid(videos[::args.samples][:12], args.png, scale=2)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


@torch.no_grad()
def transport(args):
    """Does the model carry a clean frame's object to the other frames with the prompted velocity? Frame 0 of
    one-object moving clips is given clean (t = 0), frames 1.. are noised at σ; per-frame flow-matching loss with
    the true prompt and with the direction word flipped. A model that moves the object the prompted way has a
    much lower loss on frames 1.. with the true prompt; one that only copies it in place has the same loss for
    both. Worlds: "v1" (toyworld.py) or a probe world."""
    import model as M
    import toy_eval
    net, _ = toy_eval.load_model(args.ckpt, args.use_ema)
    text, codec = TW.ToyTextEncoder(), TW.ToyCodec()
    rng = random.Random("probe-transport")
    objs, clips = toy_eval.moving_clips(rng, args.clips) if args.world == "v1" else \
        moving_clips(rng, args.clips, args.world)
    x0 = codec.encode(clips)                                                # [N, T, 12, 16, 16]
    prompts = [TW.make_prompt([o]) for o in objs]
    context = text.encode(prompts)
    flipped = text.encode([toy_eval.flip_direction(p) for p in prompts])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    print(f"{args.ckpt} on world {args.world}, {args.clips} clips; frame 0 clean, frames 1.. at σ; loss per frame")
    out = {}
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        t = torch.full(x0.shape[:2], sigma * 1000.0)
        t[:, 0] = 0.0
        x_t = M.add_noise(x0, noise, t)
        rows = {}
        for name, ctx in (("true", context), ("flipped", flipped)):
            v = net(x_t, t, ctx, causal=False)
            rows[name] = (v.float() - (noise - x0))[:, 1:].pow(2).mean(dim=(0, 2, 3, 4)).tolist()   # frames 1..
        out[sigma] = rows
        for name, losses in rows.items():
            print(f"σ {sigma} {name:>8}: mean {sum(losses) / len(losses):.4f} | " + " ".join(f"{x:.3f}" for x in losses))
        gain = [f - t_ for f, t_ in zip(rows["flipped"], rows["true"])]
        print(f"σ {sigma} flipped − true: mean {sum(gain) / len(gain):+.4f} | " + " ".join(f"{x:+.3f}" for x in gain))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(ckpt=args.ckpt, world=args.world, rows=out), indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["data", "judge", "transport"])
    p.add_argument("--world", default="torus", choices=["torus", "comet", "v1"])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--out")
    p.add_argument("--ckpt")
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--sigmas", default="0.97,0.95,0.9,0.8,0.6")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--samples", type=int, default=1, help="0: the loss table only")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--png")
    p.add_argument("--json")
    a = p.parse_args()
    assert a.world != "v1" or a.cmd == "transport", "world v1 is toyworld.py: use prepare_data.py and toy_eval.py"
    if a.cmd == "data":
        make_data(a.world, a.n, a.out)
    elif a.cmd == "judge":
        judge(a)
    else:
        transport(a)
