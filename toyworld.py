"""
The toy world: the embedded default that lets every stage run, and be measured, on 2 CPU cores.

It replaces the three things that make real video distillation expensive or unmeasurable:
  - data:    procedural 32x32 RGB clips of 1-2 coloured shapes moving on a black background, each with
             a prompt from a tiny grammar ("a red circle moves left quickly and a blue square stays still").
             Everything is deterministic from a seed. A fixed list of (colour, shape, motion) triples is held
             out of training and used for evaluation (compositional generalisation).
  - VAE:     a lossless pixel space-to-depth codec (factor 2, no temporal compression) with the same
             interface as the Wan VAE wrapper in encoders.py.
  - umT5:    a word-level tokenizer + a tiny frozen `transformers.UMT5EncoderModel` with weights drawn
             from a fixed seed (no download), zero-padded after the prompt like Wan.
and adds what real data lacks: a ground truth. ToyBench scores generated clips with deterministic pixel
metrics (no learned models), aggregated the way VBench aggregates (quality 4 : semantic 1).

Conventions (README): pixel videos are float [B, T, 3, H, W] in [-1, 1]; latents [B, F, C, h, w].
This file imports only torch (transformers lazily, inside ToyTextEncoder), never diffusers.
"""

import math
import random

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# ---- constants (other files agree on these names and values) ----

TOY_FRAMES = 12            # frames per clip (no temporal compression, so also latent frames)
TOY_SIZE = 32              # clips are TOY_SIZE x TOY_SIZE pixels
TOY_CODEC_FACTOR = 2       # space-to-depth factor of the pixel codec
TOY_LATENT_CHANNELS = 3 * TOY_CODEC_FACTOR ** 2   # 12
TOY_LATENT_SIZE = TOY_SIZE // TOY_CODEC_FACTOR    # 16
TOY_TEXT_DIM = 32          # width of the toy text embedding (Wan: 4096)
TOY_TEXT_LEN = 16          # padded prompt length (Wan: 512); the longest grammar prompt is 12 words + </s>
TOY_NEGATIVE_PROMPT = ""   # unconditional branch: the empty prompt, which encodes to the end token alone
TOY_TEXT_SEED = 0          # seed of the frozen toy text encoder weights; changing it invalidates checkpoints

OBJECT_SIZE = 8                        # every shape fits an 8x8 box
MAX_POS = TOY_SIZE - OBJECT_SIZE       # top-left corner lives in [0, MAX_POS] so the object is fully visible
MIN_GAP = 2                            # two objects never come closer than this many pixels (no occlusion)

# RGB in [0, 1]; pure colours, so every pixel of a clip is exactly -1 or +1 in [-1, 1] (lossless in fp16)
BACKGROUND = (0.0, 0.0, 0.0)
COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bounce", "still")
SPEEDS = {"slowly": 1, "quickly": 2}   # pixels per frame; 2x apart so speed is easy to read from a clip

# (colour, shape, motion) triples that never appear in training data, in any clause. Each colour, shape and
# motion still appears in training with other partners, so evaluation measures composition, not vocabulary.
HELDOUT = (
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "up"),
    ("yellow", "circle", "down"), ("magenta", "square", "bounce"), ("cyan", "triangle", "still"),
    ("white", "circle", "right"), ("red", "triangle", "down"), ("green", "circle", "bounce"),
    ("blue", "square", "left"), ("yellow", "triangle", "right"), ("cyan", "circle", "up"),
)


# -----------------------------------------------------------------------------
# ---- shapes ----

def _shape_templates():
    """Boolean 8x8 masks. Their fill ratios differ (square 1.0, circle ~0.8, triangle ~0.6) so shape is readable."""
    c = torch.arange(OBJECT_SIZE, dtype=torch.float32) + 0.5 - OBJECT_SIZE / 2   # pixel centres, symmetric
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = OBJECT_SIZE / 2
    row = torch.arange(OBJECT_SIZE, dtype=torch.float32)[:, None].expand(OBJECT_SIZE, OBJECT_SIZE)
    return {
        "circle": xx ** 2 + yy ** 2 <= r ** 2,
        "square": torch.ones(OBJECT_SIZE, OBJECT_SIZE, dtype=torch.bool),
        "triangle": xx.abs() <= (row + 1) / 2,   # apex up: row r is ~r+1 pixels wide
    }


TEMPLATES = _shape_templates()
TEMPLATE_AREA = {name: int(m.sum()) for name, m in TEMPLATES.items()}


# -----------------------------------------------------------------------------
# ---- prompt grammar ----
# An object is a dict {colour, shape, motion, speed}; speed is None exactly when motion is "still".

def clause(obj):
    phrase = {"bounce": "bounces", "still": "stays still"}.get(obj["motion"], f"moves {obj['motion']}")
    words = f"a {obj['colour']} {obj['shape']} {phrase}"
    return words if obj["motion"] == "still" else f"{words} {obj['speed']}"


def make_prompt(objects):
    return " and ".join(clause(o) for o in objects)


def parse_prompt(prompt):
    """Inverse of make_prompt. Raises ValueError on anything the grammar cannot produce."""
    objects = []
    for part in prompt.strip().split(" and "):
        w = part.split()
        ok = len(w) >= 4 and w[0] == "a" and w[1] in COLOURS and w[2] in SHAPES
        if ok and w[3:] == ["stays", "still"]:
            motion, speed = "still", None
        elif ok and len(w) == 6 and w[3] == "moves" and w[4] in MOTIONS[:4] and w[5] in SPEEDS:
            motion, speed = w[4], w[5]
        elif ok and len(w) == 5 and w[3] == "bounces" and w[4] in SPEEDS:
            motion, speed = "bounce", w[4]
        else:
            raise ValueError(f"not a toy-world prompt: {prompt!r} (bad clause {part!r})")
        objects.append(dict(colour=w[1], shape=w[2], motion=motion, speed=speed))
    assert 1 <= len(objects) <= 2, f"toy prompts have 1 or 2 objects, got {len(objects)}: {prompt!r}"
    assert len({o["colour"] for o in objects}) == len(objects), f"objects must have distinct colours: {prompt!r}"
    return objects


def is_heldout(obj):
    return (obj["colour"], obj["shape"], obj["motion"]) in HELDOUT


def heldout_prompts():
    """The evaluation prompts: every held-out triple as a single object, at every speed (23 prompts)."""
    prompts = []
    for colour, shape, motion in HELDOUT:
        for speed in ([None] if motion == "still" else list(SPEEDS)):
            prompts.append(make_prompt([dict(colour=colour, shape=shape, motion=motion, speed=speed)]))
    return prompts


# -----------------------------------------------------------------------------
# ---- renderer ----

def trajectory(obj, x0, y0, frames=TOY_FRAMES):
    """Top-left corners [(x, y)] per frame. Linear motions never reach a wall inside the clip; "bounce" falls
    at its speed and reflects off the floor (y = MAX_POS) once, so it is the only motion that touches a wall."""
    s = SPEEDS[obj["speed"]] if obj["speed"] is not None else 0
    dx, dy = {"left": (-s, 0), "right": (s, 0), "up": (0, -s), "down": (0, s), "bounce": (0, s), "still": (0, 0)}[obj["motion"]]
    points = []
    for t in range(frames):
        x, y = x0 + dx * t, y0 + dy * t
        if obj["motion"] == "bounce" and y > MAX_POS:
            y = 2 * MAX_POS - y   # mirror about the floor
        assert 0 <= x <= MAX_POS and 0 <= y <= MAX_POS, f"object leaves the frame at t={t}: {obj} from ({x0}, {y0})"
        points.append((x, y))
    return points


def _random_start(obj, rng, frames=TOY_FRAMES):
    s = SPEEDS[obj["speed"]] if obj["speed"] is not None else 0
    travel = s * (frames - 1)
    free = lambda: rng.randint(0, MAX_POS)
    m = obj["motion"]
    if m == "left":
        return rng.randint(travel, MAX_POS), free()
    if m == "right":
        return rng.randint(0, MAX_POS - travel), free()
    if m == "up":
        return free(), rng.randint(travel, MAX_POS)
    if m == "down":
        return free(), rng.randint(0, MAX_POS - travel)
    if m == "bounce":
        # hit the floor exactly (no half step) at a frame in the middle half of the clip, so the fall and
        # the rise are both long enough to see
        k = rng.randint(frames // 4, frames - frames // 4 - 1)
        return free(), MAX_POS - s * k
    return free(), free()


def _overlap(path_a, path_b):
    limit = OBJECT_SIZE + MIN_GAP
    return any(abs(xa - xb) < limit and abs(ya - yb) < limit for (xa, ya), (xb, yb) in zip(path_a, path_b))


def place(objects, rng, frames=TOY_FRAMES):
    """Start positions -> one trajectory per object, rejection-sampled so objects never overlap."""
    for _ in range(1000):
        paths = [trajectory(o, *_random_start(o, rng, frames), frames=frames) for o in objects]
        if len(paths) == 1 or not _overlap(paths[0], paths[1]):
            return paths
    raise RuntimeError(f"could not place {objects} without overlap in 1000 tries")


def draw(objects, paths, frames=TOY_FRAMES):
    """Paint the clip: [T, 3, H, W] in [-1, 1]."""
    video = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(frames, 1, TOY_SIZE, TOY_SIZE)  # [T, 3, H, W]
    for obj, path in zip(objects, paths):
        mask = TEMPLATES[obj["shape"]]
        colour = torch.tensor(COLOURS[obj["colour"]]).view(3, 1)
        for t, (x, y) in enumerate(path):
            patch = video[t, :, y:y + OBJECT_SIZE, x:x + OBJECT_SIZE]   # [3, 8, 8] view
            patch[:, mask] = colour
    return video * 2 - 1


def render(objects, seed, frames=TOY_FRAMES):
    """Objects (dicts or a prompt string) + seed -> [T, 3, H, W] in [-1, 1]. The seed picks the positions."""
    if isinstance(objects, str):
        objects = parse_prompt(objects)
    rng = random.Random(f"toy-render-{seed}")
    return draw(objects, place(objects, rng, frames), frames)


def sample_objects(rng, p_two=0.3):
    """Random training attributes: 1 object (2 with probability p_two), never a held-out triple,
    distinct colours."""
    objects = []
    while len(objects) < (2 if rng.random() < p_two else 1):
        motion = rng.choice(MOTIONS)
        obj = dict(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), motion=motion,
                   speed=None if motion == "still" else rng.choice(list(SPEEDS)))
        if is_heldout(obj) or any(o["colour"] == obj["colour"] for o in objects):
            continue
        objects.append(obj)
    return objects


def sample_training_videos(n, seed, start=0, p_two=0.3):
    """Training clips start..start+n-1 of the stream with this seed. Video i depends only on (seed, i), so the
    stream does not depend on how it is cut into shards.
    Returns videos [n, T, 3, H, W] in [-1, 1], prompts [n], and per-video metadata (attributes, index)."""
    videos, prompts, meta = [], [], []
    for i in range(start, start + n):
        rng = random.Random(f"toy-train-{seed}-{i}")
        objects = sample_objects(rng, p_two)
        videos.append(draw(objects, place(objects, rng)))
        prompts.append(make_prompt(objects))
        meta.append(dict(index=i, objects=objects))
    return torch.stack(videos), prompts, meta   # [n, T, 3, H, W]


# -----------------------------------------------------------------------------
# ---- the camera world: the action-conditioned world model of paper §3.3 ----
# The scene is a CAMERA_WORLD_SIZE² torus (it wraps, so a camera can pan forever and every rollout has a ground
# truth): the prompt's objects move through it as their clauses say (linear motions wrap around, "bounce" falls
# and reflects off the floor and the ceiling of the scene), over a static background of grey landmarks, one per
# LANDMARK_CELL² cell at a random offset, so that every view shows some and a pan is visible even when no object
# is in view. The camera sees a TOY_SIZE² window. Its action is the pan: a whole number of pixels per frame on each
# axis, |pan| <= CAMERA_MAX_PAN, changing by one pixel per frame on one axis with probability PAN_CHANGE per frame
# (smooth pans). Each frame carries the real camera that sees that window: a pinhole at height 0 looking down +z
# at the scene plane z = 1, with world units of TOY_SIZE pixels and focal length 1 in normalised image
# coordinates (model.normalised_intrinsics), so scene pixel (u, v) is the world point (u, v, TOY_SIZE) / TOY_SIZE.
# The view's top-left corner is kept unwrapped (it grows without bound) and only the rendering wraps. A clip
# frames its subject, the first object: whole in frame 0, and kept in view for as many frames as the pans allow.

CAMERA_WORLD_SIZE = 64     # the scene torus, in pixels
CAMERA_MAX_PAN = 2         # px per frame on each axis
PAN_CHANGE = 0.2           # per-frame probability that the pan changes (by one px/frame on one axis)
LANDMARK_CELL = 16         # one landmark per 16x16 cell of the scene: 16 landmarks, 4 cells per view
LANDMARK_SIZE = 6          # grey 6x6 squares: 14% of the scene, enough for the loss to care where they are
LANDMARK_GREY = 0.5        # in [0, 1]; 0.0 in [-1, 1], exact in fp16
CAMERA_MAX_POS = CAMERA_WORLD_SIZE - OBJECT_SIZE   # bounce reflects between y = 0 and y = CAMERA_MAX_POS


def camera_world_path(obj, x0, y0, frames, wrap=True):
    """Top-left corners [(x, y)] per frame in the scene, wrapped into [0, CAMERA_WORLD_SIZE) (wrap=False: the
    unwrapped positions, to compare with the unwrapped view corners)."""
    s = SPEEDS[obj["speed"]] if obj["speed"] is not None else 0
    dx, dy = {"left": (-s, 0), "right": (s, 0), "up": (0, -s), "down": (0, s), "bounce": (0, s), "still": (0, 0)}[obj["motion"]]
    points = []
    for t in range(frames):
        x, y = x0 + dx * t, y0 + dy * t
        if obj["motion"] == "bounce":  # a triangle wave between the ceiling and the floor
            y = y % (2 * CAMERA_MAX_POS)
            y = y if y <= CAMERA_MAX_POS else 2 * CAMERA_MAX_POS - y
        points.append((x % CAMERA_WORLD_SIZE, y % CAMERA_WORLD_SIZE) if wrap else (x, y))
    return points


def frame_subject(path, pans, rng):
    """The view's first top-left corner: among those that show the subject (the first object, unwrapped `path`)
    whole in frame 0, one that keeps it whole in view for the most frames under `pans` (uniform among ties)."""
    free = TOY_SIZE - OBJECT_SIZE
    x0, y0 = path[0]
    best, corners = -1, []
    for ox in range(free + 1):
        for oy in range(free + 1):
            views = view_corners((x0 - ox, y0 - oy), pans)
            seen = sum(0 <= x - cx <= free and 0 <= y - cy <= free for (x, y), (cx, cy) in zip(path, views))
            if seen > best:
                best, corners = seen, []
            if seen == best:
                corners.append((x0 - ox, y0 - oy))
    return rng.choice(corners)


def camera_pans(rng, frames, pan=None):
    """The camera's action: a pan (dx, dy) in px for each of the frames-1 transitions, a smooth random walk
    starting from `pan` (default: uniform)."""
    pan = pan or (rng.randint(-CAMERA_MAX_PAN, CAMERA_MAX_PAN), rng.randint(-CAMERA_MAX_PAN, CAMERA_MAX_PAN))
    pans = []
    for _ in range(frames - 1):
        if rng.random() < PAN_CHANGE:
            axis = rng.randrange(2)
            options = [v for v in (pan[axis] - 1, pan[axis] + 1) if abs(v) <= CAMERA_MAX_PAN]
            pan = (rng.choice(options), pan[1]) if axis == 0 else (pan[0], rng.choice(options))
        pans.append(pan)
    return pans


def view_corners(start, pans):
    """Unwrapped top-left corners of the view, one per frame: start, then start + the running sum of pans."""
    corners = [tuple(start)]
    for dx, dy in pans:
        corners.append((corners[-1][0] + dx, corners[-1][1] + dy))
    return corners


def camera_poses(corners):
    """The pinhole camera that sees each view: world_to_camera [F, 4, 4] (no rotation; the camera sits above the
    view's centre) and normalised intrinsics [F, 3, 3] (focal 1, principal point at the image centre)."""
    frames = len(corners)
    world_to_camera = torch.eye(4, dtype=torch.float32).repeat(frames, 1, 1)
    centre = (torch.tensor(corners, dtype=torch.float64) + TOY_SIZE / 2) / TOY_SIZE   # [F, 2] world units
    world_to_camera[:, :2, 3] = (-centre).float()
    intrinsics = torch.eye(3, dtype=torch.float32).repeat(frames, 1, 1)
    return world_to_camera, intrinsics


def sample_landmarks(rng):
    """Top-left corners of the grey landmarks: one per LANDMARK_CELL² cell, at a random offset inside it."""
    cells = range(0, CAMERA_WORLD_SIZE, LANDMARK_CELL)
    return [(cx + rng.randint(0, LANDMARK_CELL - LANDMARK_SIZE), cy + rng.randint(0, LANDMARK_CELL - LANDMARK_SIZE))
            for cy in cells for cx in cells]


def draw_scene(objects, positions, landmarks):
    """The whole scene at one instant: [3, CAMERA_WORLD_SIZE, CAMERA_WORLD_SIZE] in [0, 1], objects over landmarks."""
    N = CAMERA_WORLD_SIZE
    scene = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, N, N)
    for x, y in landmarks:
        scene[:, y:y + LANDMARK_SIZE, x:x + LANDMARK_SIZE] = LANDMARK_GREY
    for obj, (x, y) in zip(objects, positions):
        rows, cols = torch.arange(y, y + OBJECT_SIZE) % N, torch.arange(x, x + OBJECT_SIZE) % N   # wraps around
        patch = scene[:, rows][:, :, cols]   # [3, 8, 8] copy
        patch[:, TEMPLATES[obj["shape"]]] = torch.tensor(COLOURS[obj["colour"]]).view(3, 1)
        scene[:, rows[:, None], cols[None, :]] = patch
    return scene


def view_of(scene, corner):
    """The TOY_SIZE² window of the scene torus whose top-left corner is `corner` (unwrapped)."""
    N = CAMERA_WORLD_SIZE
    rows = torch.arange(corner[1], corner[1] + TOY_SIZE) % N
    cols = torch.arange(corner[0], corner[0] + TOY_SIZE) % N
    return scene[:, rows[:, None], cols[None, :]]   # [3, TOY_SIZE, TOY_SIZE]


def place_in_scene(objects, rng, frames):
    """Start corners of the objects in the scene, rejection-sampled so two objects never overlap within the clip."""
    for _ in range(1000):
        starts = []
        for obj in objects:
            y = rng.randrange(CAMERA_WORLD_SIZE)
            if obj["motion"] == "bounce":  # as in the objects world: it hits the floor in the middle half of the clip
                y = CAMERA_MAX_POS - SPEEDS[obj["speed"]] * rng.randint(frames // 4, frames - frames // 4 - 1)
            starts.append((rng.randrange(CAMERA_WORLD_SIZE), y))
        paths = [camera_world_path(o, x, y, frames) for o, (x, y) in zip(objects, starts)]
        if len(paths) == 1 or not _torus_overlap(paths[0], paths[1]):
            return starts
    raise RuntimeError(f"could not place {objects} without overlap in 1000 tries")


def _torus_overlap(path_a, path_b):
    limit, N = OBJECT_SIZE + MIN_GAP, CAMERA_WORLD_SIZE
    near = lambda a, b: min((a - b) % N, (b - a) % N) < limit
    return any(near(xa, xb) and near(ya, yb) for (xa, ya), (xb, yb) in zip(path_a, path_b))


def render_camera_clip(objects, seed, frames=TOY_FRAMES, pans=None):
    """Objects (dicts or a prompt) + seed -> dict: video [T, 3, H, W] in [-1, 1], world_to_camera [T, 4, 4],
    intrinsics [T, 3, 3], pans [(dx, dy)] * (T-1), corners, and the scene layout. `pans` overrides the random
    camera path (the commanded actions of an evaluation)."""
    if isinstance(objects, str):
        objects = parse_prompt(objects)
    rng = random.Random(f"toy-camera-{seed}")
    landmarks = sample_landmarks(rng)
    starts = place_in_scene(objects, rng, frames)
    pans = camera_pans(rng, frames) if pans is None else [tuple(p) for p in pans]
    assert len(pans) == frames - 1, f"{frames} frames need {frames - 1} pans, got {len(pans)}"
    corners = view_corners(frame_subject(camera_world_path(objects[0], *starts[0], frames, wrap=False), pans, rng), pans)
    paths = [camera_world_path(o, x, y, frames) for o, (x, y) in zip(objects, starts)]
    video = torch.stack([view_of(draw_scene(objects, [p[t] for p in paths], landmarks), corners[t])
                         for t in range(frames)]) * 2 - 1   # [T, 3, H, W]
    world_to_camera, intrinsics = camera_poses(corners)
    return dict(video=video, world_to_camera=world_to_camera, intrinsics=intrinsics, pans=pans, corners=corners,
                landmarks=landmarks, starts=starts)


def sample_camera_training_videos(n, seed, start=0, p_two=0.3):
    """Camera-world training clips start..start+n-1 (video i depends only on (seed, i)) -> videos [n, T, 3, H, W],
    prompts [n], world_to_camera [n, T, 4, 4], intrinsics [n, T, 3, 3], metadata."""
    videos, prompts, poses, intrinsics, meta = [], [], [], [], []
    for i in range(start, start + n):
        objects = sample_objects(random.Random(f"toy-camera-train-{seed}-{i}"), p_two)
        clip = render_camera_clip(objects, f"train-{seed}-{i}")
        videos.append(clip["video"])
        prompts.append(make_prompt(objects))
        poses.append(clip["world_to_camera"])
        intrinsics.append(clip["intrinsics"])
        meta.append(dict(index=i, objects=objects, pans=clip["pans"]))
    return torch.stack(videos), prompts, torch.stack(poses), torch.stack(intrinsics), meta


# -----------------------------------------------------------------------------
# ---- the exact denoiser: the toy world's physical limit ----
# For a one-object prompt the renderer's only free choice is the start position, drawn uniformly from a known
# set (`start_positions`). So the clean clip given the prompt is uniform over a few hundred candidate clips, and
# the Bayes-optimal denoiser is exact:  E[x0 | x_t] = Σ_i softmax_i(−|x_t − (1−σ)c_i|² / 2σ²) · c_i.
# Its flow-matching loss is the lowest any model can reach on the same draws; a model's loss over it (the
# "oracle gap", per σ) says how far training is from what the data allow.

def start_positions(obj, frames=TOY_FRAMES):
    """Every top-left corner `_random_start` can draw for one object, as a list of (x, y)."""
    s = SPEEDS[obj["speed"]] if obj["speed"] is not None else 0
    travel, free = s * (frames - 1), range(0, MAX_POS + 1)
    xs, ys = {"left": (range(travel, MAX_POS + 1), free), "right": (range(0, MAX_POS - travel + 1), free),
              "up": (free, range(travel, MAX_POS + 1)), "down": (free, range(0, MAX_POS - travel + 1)),
              "still": (free, free)}.get(obj["motion"], (free, None))
    if obj["motion"] == "bounce":
        ys = [MAX_POS - s * k for k in range(frames // 4, frames - frames // 4)]
    return [(x, y) for y in ys for x in xs]


def candidate_clips(obj, frames=TOY_FRAMES):
    """All clips a one-object prompt can render to: [N, T, 3, H, W] in [-1, 1], one per start position."""
    return torch.stack([draw([obj], [trajectory(obj, x, y, frames)], frames) for x, y in start_positions(obj, frames)])


def exact_x0(x_t, sigma, candidates):
    """E[x0 | x_t] when x0 is uniform over `candidates` [N, D] and x_t = (1−σ)x0 + σε, ε ~ N(0, I): x_t [D] -> [D].
    Works in any space the noise is added in (the toy codec is a permutation, so pixels or latents alike)."""
    assert 0 < sigma <= 1 and x_t.ndim == 1 and candidates.shape[1] == x_t.shape[0], \
        f"exact_x0 wants x_t [D], candidates [N, D], 0 < sigma <= 1; got {tuple(x_t.shape)}, {tuple(candidates.shape)}, {sigma}"
    c = candidates.double()
    logits = ((1 - sigma) * (c @ x_t.double()) - 0.5 * (1 - sigma) ** 2 * (c * c).sum(1)) / sigma ** 2   # [N]
    return (torch.softmax(logits, 0) @ c).to(x_t.dtype)


# -----------------------------------------------------------------------------
# ---- pixel codec (stands in for the VAE) ----

class ToyCodec:
    """Lossless space-to-depth: [B, T, 3, H, W] <-> [B, T, 12, H/2, W/2]. No temporal compression.
    Same interface as encoders.WanVAE. Latents are the raw pixel values (mostly -1: black background);
    no normalisation, because the toy DiT trains fine on them and the round trip stays exact."""

    latent_channels = TOY_LATENT_CHANNELS
    spatial_factor = TOY_CODEC_FACTOR
    temporal_factor = 1

    def frames_to_latent_frames(self, frames):
        return frames

    def encode(self, video):
        B, T, C, H, W = video.shape
        p = self.spatial_factor
        assert C == 3 and H % p == 0 and W % p == 0, f"ToyCodec.encode wants [B, T, 3, H, W] with H, W divisible by {p}, got {tuple(video.shape)}"
        x = video.reshape(B, T, C, H // p, p, W // p, p)          # [B, T, C, h, p, w, p]
        x = x.permute(0, 1, 2, 4, 6, 3, 5)                         # [B, T, C, p, p, h, w]
        return x.reshape(B, T, C * p * p, H // p, W // p)          # [B, T, 12, h, w]

    def decode(self, latents):
        """Exact inverse of encode, then clamped to [-1, 1] like the VAE wrapper (a no-op on encoded clips;
        generated latents can overshoot)."""
        B, F_, C, h, w = latents.shape
        p = self.spatial_factor
        assert C == self.latent_channels, f"ToyCodec.decode wants {self.latent_channels} channels, got {tuple(latents.shape)}"
        x = latents.reshape(B, F_, 3, p, p, h, w)                   # [B, T, C, p, p, h, w]
        x = x.permute(0, 1, 2, 5, 3, 6, 4)                          # [B, T, C, h, p, w, p]
        return x.reshape(B, F_, 3, h * p, w * p).clamp(-1, 1)      # [B, T, 3, H, W]

    def stream_decoder(self):
        return _ToyStreamDecoder(self)


class _ToyStreamDecoder:
    """The pixel codec has no temporal receptive field, so streaming is frame-wise decode (no cache)."""

    def __init__(self, codec):
        self.codec = codec

    def decode_next(self, latents):
        return self.codec.decode(latents)


# -----------------------------------------------------------------------------
# ---- text encoder ----

VOCAB = ["<pad>", "</s>"] + sorted({"a", "and", "moves", "bounces", "stays", "still", *COLOURS, *SHAPES,
                                      *MOTIONS[:4], *SPEEDS})
PAD_ID, EOS_ID = 0, 1   # T5 conventions: pad 0, end-of-sequence 1, no BOS


def tokenize(prompts, text_len=TOY_TEXT_LEN):
    """Word-level, T5-style: ids + </s>, zero-padded. Unknown words are an error (no <unk> fallback).
    Returns input_ids [B, L] and attention_mask [B, L]."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.full((len(prompts), text_len), PAD_ID, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        words = prompt.lower().split()
        unknown = [w for w in words if w not in index]
        assert not unknown, f"words {unknown} of prompt {prompt!r} are not in the toy vocabulary"
        assert len(words) + 1 <= text_len, f"prompt {prompt!r} has {len(words)} words + </s> > text_len {text_len}"
        ids[b, :len(words) + 1] = torch.tensor([index[w] for w in words] + [EOS_ID])
    return ids, (ids != PAD_ID).long()


class ToyTextEncoder:
    """Tiny frozen umT5 encoder (2 layers, d_model 32): prompts -> [B, TOY_TEXT_LEN, TOY_TEXT_DIM] float32,
    rows after each prompt's </s> exactly zero, as Wan's text pipeline produces (docs/wan_formats.md).

    The weights are drawn by this file from a fixed seed, parameter by parameter in name order, instead of
    relying on transformers' initialisers: shipped toy checkpoints depend on these exact embeddings, and a
    library upgrade must not silently change them (tests pin a checksum)."""

    text_len = TOY_TEXT_LEN
    text_dim = TOY_TEXT_DIM
    negative_prompt = TOY_NEGATIVE_PROMPT

    def __init__(self, device="cpu", seed=TOY_TEXT_SEED):
        from transformers import UMT5Config, UMT5EncoderModel   # lazy: `import toyworld` stays torch-only
        config = UMT5Config(vocab_size=len(VOCAB), d_model=TOY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=PAD_ID,
                            eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID)
        model = UMT5EncoderModel(config).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if name.endswith("layer_norm.weight"):
                    p.fill_(1.0)
                else:
                    # embeddings and bias tables ~ N(0, 1); linear layers ~ N(0, 1/fan_in) to keep activations O(1)
                    std = 1.0 if ("shared" in name or "relative_attention_bias" in name) else p.shape[1] ** -0.5
                    p.normal_(0.0, std, generator=gen)
        self.model = model.requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts):
        assert isinstance(prompts, (list, tuple)), f"encode wants a list of prompts, got {type(prompts)}"
        ids, mask = tokenize(prompts, self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()   # [B, L, D]
        return out * mask[:, :, None]   # zero the pad rows, as Wan does before the DiT


# -----------------------------------------------------------------------------
# ---- ToyBench: deterministic pixel metrics ----
# Every clip is segmented by colour: each pixel gets the nearest palette entry (background or one of the 7
# colours) if it is within COLOUR_TOL of it, otherwise "unclassified". For each object the prompt asks for,
# its colour's pixels are cleaned by a 3x3 majority vote (a pixel is "core" if >= 5 of its 9 neighbours have the
# colour), and the object mask is the colour's pixels within 1 px of the core. This ignores salt-and-pepper
# noise, keeps blurry-but-solid objects, and needs no learned model. Per frame we get: detected (area >= 12 px),
# area, centroid, and the shape whose 8x8 template best matches the mask's bounding box (IoU).
#
# Semantic metrics (does the clip do what the prompt says), per object then averaged over objects:
#   colour     fraction of frames in which a solid blob of the prompted colour is present.
#   shape      fraction of frames in which that blob is classified as the prompted shape.
#   direction  1 if the trajectory (least-squares velocity over detected frames) goes the prompted way:
#              left/right/up/down = dominant axis and sign, |v| >= 0.4 px/frame; still = |v| < 0.3 and never
#              more than 1.5 px from its mean position; bounce = moves down >= 2 px to a lowest point strictly
#              inside the clip, then up >= 2 px, horizontally still. 0 if detected in fewer than half the frames.
#   speed      1 if the measured speed is in the prompted band: slowly [0.5, 1.5), quickly [1.5, 3) px/frame
#              (|velocity| for linear motions, mean |dy| per frame for bounce), still < 0.5.
# Quality metrics (is it a clean, stable clip, whatever the prompt says):
#   persistence  fraction of frames in which each object is detected with area in [0.5, 1.8] x its template.
#   background   per frame 1 - (fraction of pixels more than 2 px from any object that are not background)
#                / 0.05, floored at 0: 5% stray pixels (about one extra object) scores 0.
#   consistency  fraction of frame transitions in which each object is detected on both sides, keeps its area
#                within x1.33, and moves by its own median step +- 0.75 px (smooth, flicker-free motion).
#   dynamic      VBench's dynamic degree, prompt-aware: over clips whose prompt asks for motion, the fraction
#                with clear motion (>= 8 px change by more than 0.5 between consecutive frames in at least half
#                of the transitions). Clips with only still objects are left out of it. Counts as quality,
#                as in VBench, so that a frozen model cannot win on consistency alone.
# Aggregation as VBench: quality = mean of the 4 quality metrics, semantic = mean of the 4 semantic metrics,
# total = (4 quality + 1 semantic) / 5. (VBench min-max normalises each dimension first; ours are natively in
# [0, 1] with 0 = worst, so that step is the identity.)
# Drift (separate, exposure bias): per frame quality q_t = mean(object persisted, background score);
# drift_gap = mean q over the first third - mean q over the last third; drift = 1 - max(0, drift_gap), so
# 1 = no degradation over the clip.
# Ground-truth clips score 1.0 on every metric; blank, noise, wrong-colour, reversed and frozen clips fail.

COLOUR_TOL = 0.35          # max RGB distance (in [0, 1] units) to a palette entry; entries are >= 1 apart
DETECT_AREA = 12           # pixels
BACKGROUND_DIRT = 0.05     # fraction of stray pixels that brings the background score to 0
QUALITY_KEYS = ("persistence", "background", "consistency", "dynamic_degree")
SEMANTIC_KEYS = ("colour", "shape", "direction", "speed")
PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()])   # [K, 3]; index 0 is the background
COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}


def _label_pixels(video):
    """[T, 3, H, W] in [-1, 1] -> palette index per pixel [T, H, W]; -1 = no palette colour nearby."""
    rgb = (video.float().cpu() + 1) / 2
    dist2 = torch.stack([((rgb - c.view(1, 3, 1, 1)) ** 2).sum(1) for c in PALETTE], 1)   # [T, K, H, W] squared
    d2, label = dist2.min(dim=1)                                                          # [T, H, W]
    label[d2 > COLOUR_TOL ** 2] = -1
    return label


def _object_masks(label, colour):
    raw = (label == COLOUR_INDEX[colour]).float()[:, None]                      # [T, 1, H, W]
    core = F.avg_pool2d(raw, 3, 1, 1, count_include_pad=True) * 9 >= 5 - 1e-4  # 3x3 majority vote
    near_core = F.max_pool2d(core.float(), 3, 1, 1) > 0
    return (raw > 0) & near_core                                                # [T, 1, H, W]


def _classify_shape(mask):
    """[H, W] bool -> the shape whose template has the highest IoU with the mask's bounding box."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].float()[None, None]           # [1, 1, h, w]
    crop = F.interpolate(crop, size=(OBJECT_SIZE, OBJECT_SIZE), mode="bilinear", align_corners=False)[0, 0] > 0.5
    iou = {s: (crop & m).sum().item() / max((crop | m).sum().item(), 1) for s, m in TEMPLATES.items()}
    return max(iou, key=iou.get)


def _fit_velocity(ts, pos):
    """Least-squares slope of positions [N, 2] over times [N] -> (vx, vy) px/frame."""
    t = ts - ts.mean()
    return ((t[:, None] * (pos - pos.mean(0))).sum(0) / (t ** 2).sum()).tolist()


def _score_object(label, obj):
    T = label.shape[0]
    mask = _object_masks(label, obj["colour"])[:, 0]                   # [T, H, W]
    area = mask.sum((1, 2)).float()                                    # [T]
    detected = area >= DETECT_AREA
    expected = TEMPLATE_AREA[obj["shape"]]
    persisted = detected & (area >= 0.5 * expected) & (area <= 1.8 * expected)
    ys, xs = torch.meshgrid(torch.arange(label.shape[1], dtype=torch.float32), torch.arange(label.shape[2], dtype=torch.float32), indexing="ij")
    w = mask.float()
    pos = torch.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], 1) / area.clamp(min=1)[:, None]   # [T, 2] centroid (x, y)
    shape_ok = torch.tensor([bool(detected[t]) and _classify_shape(mask[t]) == obj["shape"] for t in range(T)])

    # motion, from the detected frames only
    direction = speed_ok = 0.0
    idx = detected.nonzero()[:, 0]
    if len(idx) >= T / 2:
        ts, p = idx.float(), pos[idx]
        vx, vy = _fit_velocity(ts, p)
        v = math.hypot(vx, vy)
        m = obj["motion"]
        if m in ("left", "right", "up", "down"):
            along, across = (vx, vy) if m in ("left", "right") else (vy, vx)
            sign = -1 if m in ("left", "up") else 1
            direction = float(sign * along >= 0.4 and abs(across) <= 0.5 * abs(along))
        elif m == "still":
            direction = float(v < 0.3 and (p - p.mean(0)).norm(dim=1).max() <= 1.5)
        else:   # bounce: down to a lowest point strictly inside the clip, then up
            y = p[:, 1]
            k = int(y.argmax())
            direction = float(0 < k < len(y) - 1 and y[k] - y[0] >= 2 and y[k] - y[-1] >= 2 and abs(vx) < 0.3)
            v = (y[1:] - y[:-1]).abs().mean().item() / max(1e-6, (ts[1:] - ts[:-1]).mean().item())
        lo, hi = {"slowly": (0.5, 1.5), "quickly": (1.5, 3.0), None: (0.0, 0.5)}[obj["speed"]]
        speed_ok = float(lo <= v < hi)

    # temporal consistency: per transition, present on both sides, stable area, its own usual step size
    step = (pos[1:] - pos[:-1]).norm(dim=1)                           # [T-1]
    both = detected[1:] & detected[:-1]
    ratio = area[1:] / area[:-1].clamp(min=1)
    usual = step[both].median() if both.any() else torch.tensor(0.0)
    consistent = both & (ratio >= 0.75) & (ratio <= 1 / 0.75) & ((step - usual).abs() <= 0.75)

    return dict(colour=detected.float().mean().item(), shape=shape_ok.float().mean().item(),
                direction=direction, speed=speed_ok, persistence=persisted.float().mean().item(),
                consistency=consistent.float().mean().item(), persisted_t=persisted.float(), mask=mask)


def score_video(video, prompt):
    """One clip [T, 3, H, W] in [-1, 1] + its prompt -> dict of metrics in [0, 1] (see the notes above)."""
    T, C, H, W = video.shape
    assert C == 3 and T >= 3, f"score_video wants [T>=3, 3, H, W], got {tuple(video.shape)}"
    objects = parse_prompt(prompt)
    label = _label_pixels(video)                                       # [T, H, W]
    per_obj = [_score_object(label, o) for o in objects]
    out = {k: sum(r[k] for r in per_obj) / len(per_obj) for k in SEMANTIC_KEYS + ("persistence", "consistency")}

    # background: everything that is not a prompted object (grown by 2 px for blurry edges) should be background
    objects_mask = F.max_pool2d(torch.stack([r["mask"] for r in per_obj]).any(0).float()[:, None], 5, 1, 2)[:, 0] > 0
    dirty = ((label != 0) & ~objects_mask).sum((1, 2)).float() / (~objects_mask).sum((1, 2)).clamp(min=1)   # [T]
    background_t = (1 - dirty / BACKGROUND_DIRT).clamp(min=0)
    out["background"] = background_t.mean().item()

    # dynamic degree (only defined when the prompt asks for motion)
    changed = ((video[1:] - video[:-1]).abs().amax(1) > 0.5).sum((1, 2))   # [T-1] pixels changed per transition
    moving_prompt = any(o["motion"] != "still" for o in objects)
    out["dynamic_degree"] = float((changed >= 8).float().mean() >= 0.5) if moving_prompt else None

    # drift: per-frame quality, first third vs last third
    q_t = (torch.stack([r["persisted_t"] for r in per_obj]).mean(0) + background_t) / 2   # [T]
    third = T // 3
    out["drift_gap"] = (q_t[:third].mean() - q_t[-third:].mean()).item()
    out["drift"] = 1 - max(0.0, out["drift_gap"])

    quality = [out[k] for k in QUALITY_KEYS if out[k] is not None]
    out["quality"] = sum(quality) / len(quality)
    out["semantic"] = sum(out[k] for k in SEMANTIC_KEYS) / len(SEMANTIC_KEYS)
    out["total"] = (4 * out["quality"] + out["semantic"]) / 5
    return out


# Camera world (action following). The pan between two consecutive frames is read off the static background:
# each pixel's greyness (1 at the landmark grey, falling linearly to 0 at RGB distance 0.5 from it, so objects,
# which move on their own, count as background) is compared between frame t+1 and frame t moved by (dx, dy),
# over the pixels the two views share; the estimate is the whole-pixel (dx, dy), |dx|, |dy| <= PAN_SEARCH,
# with the smallest mean absolute difference. A clip that ignores the commanded pan is off by the pan itself.

PAN_SEARCH = CAMERA_MAX_PAN + 2


def estimate_pans(video, search=PAN_SEARCH):
    """[T, 3, H, W] in [-1, 1] -> the estimated pans [T-1, 2] (dx, dy) in whole pixels, camera motion (the content
    moves the other way: frame t+1 at (y, x) shows what frame t showed at (y + dy, x + dx))."""
    T, C, H, W = video.shape
    assert C == 3 and T >= 2, f"estimate_pans wants [T>=2, 3, H, W], got {tuple(video.shape)}"
    rgb = (video.float().cpu() + 1) / 2
    grey = (1 - (rgb - LANDMARK_GREY).norm(dim=1, keepdim=True) / 0.5).clamp(min=0)   # [T, 1, H, W] greyness
    pans = []
    for t in range(T - 1):
        before, after = grey[t], grey[t + 1]
        best = None
        for dy in range(-search, search + 1):
            for dx in range(-search, search + 1):
                # after[y, x] = before[y + dy, x + dx] on the shared rows/columns
                a = after[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
                b = before[:, max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)]
                error = (a - b).abs().mean().item()
                if best is None or error < best[0]:
                    best = (error, dx, dy)
        pans.append(best[1:])
    return torch.tensor(pans, dtype=torch.float32)   # [T-1, 2]


def pans_of_cameras(world_to_camera):
    """The pans [T-1, 2] in pixels that camera-world cameras [T, 4, 4] command (camera_poses inverted)."""
    centre = -world_to_camera[:, :2, 3].double() * TOY_SIZE   # [T, 2] view centres in scene pixels
    return (centre[1:] - centre[:-1]).float()


def pan_error(video, pans):
    """Action following: mean Euclidean distance (px per frame) between the pans estimated from the clip and the
    commanded ones [T-1, 2]."""
    commanded = torch.as_tensor(pans, dtype=torch.float32)
    estimated = estimate_pans(video)
    assert commanded.shape == estimated.shape, f"{video.shape[0]} frames need {estimated.shape[0]} pans, got {tuple(commanded.shape)}"
    return (estimated - commanded).norm(dim=1).mean().item()


def revisit_consistency(video, still_colours=()):
    """For a clip whose camera returns to where it started: IoU of the static scene (landmark pixels, and the
    pixels of objects that stay still) in the first and the last frame. [T, 3, H, W] -> float in [0, 1]."""
    rgb = (video.float().cpu() + 1) / 2
    static = (rgb - LANDMARK_GREY).norm(dim=1) < COLOUR_TOL   # [T, H, W]
    label = _label_pixels(video)
    for colour in still_colours:
        static |= label == COLOUR_INDEX[colour]
    first, last = static[0], static[-1]
    union = (first | last).sum().item()
    return (first & last).sum().item() / union if union else 0.0


REVISIT_AWAY = 5   # frames the camera pans away (at CAMERA_MAX_PAN) before it pans back


def camera_eval_set(samples):
    """The camera-world evaluation: every held-out prompt x `samples`, each under three commanded camera paths
    -> [dict(prompt, seed, kind, pans)]. kind "still": no pan (ToyBench semantic of the objects); "pan": a
    smooth random path (action following); "revisit": CAMERA_MAX_PAN px/frame away for REVISIT_AWAY frames,
    one still frame, and back to the start (revisit consistency; horizontal for even samples, vertical for odd)."""
    items = []
    for prompt in heldout_prompts():
        for s in range(samples):
            away = (CAMERA_MAX_PAN, 0) if s % 2 == 0 else (0, CAMERA_MAX_PAN)
            back = (-away[0], -away[1])
            paths = {"still": [(0, 0)] * (TOY_FRAMES - 1),
                     "pan": camera_pans(random.Random(f"toy-camera-eval-{prompt}-{s}"), TOY_FRAMES),
                     "revisit": [away] * REVISIT_AWAY + [(0, 0)] * (TOY_FRAMES - 1 - 2 * REVISIT_AWAY) + [back] * REVISIT_AWAY}
            for kind, pans in paths.items():
                items.append(dict(prompt=prompt, seed=f"eval-{s}", kind=kind, pans=pans))
    return items


def aggregate(per_video):
    """Per-video metric dicts -> set-level means, and quality / semantic / total aggregated VBench-style."""
    out = {}
    for k in SEMANTIC_KEYS + QUALITY_KEYS + ("drift", "drift_gap"):
        vals = [r[k] for r in per_video if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None   # dynamic_degree is None if no prompt asks for motion
    quality = [out[k] for k in QUALITY_KEYS if out[k] is not None]
    out["quality"] = sum(quality) / len(quality)
    out["semantic"] = sum(out[k] for k in SEMANTIC_KEYS) / len(SEMANTIC_KEYS)
    out["total"] = (4 * out["quality"] + out["semantic"]) / 5
    return out


def bootstrap_standard_error(per_video, key="total", resamples=1000, seed=0):
    """Standard error of the set-level `key` from resampling the videos with replacement: how far apart two
    checkpoints' scores must be before this many videos can tell them apart."""
    assert per_video, "bootstrap_standard_error needs at least one video"
    gen = torch.Generator().manual_seed(seed)
    n = len(per_video)
    values = torch.tensor([aggregate([per_video[i] for i in torch.randint(0, n, (n,), generator=gen).tolist()])[key]
                           for _ in range(resamples)], dtype=torch.float64)   # [resamples]
    return values.std().item()


def score(videos, prompts):
    """ToyBench over a set: videos [B, T, 3, H, W] in [-1, 1] + prompts [B] -> dict with per-metric means,
    quality / semantic / total aggregated VBench-style (from the set-level means), drift, and per-video dicts."""
    B = videos.shape[0]
    assert videos.ndim == 5 and B == len(prompts), f"score wants [B, T, 3, H, W] and B prompts, got {tuple(videos.shape)} and {len(prompts)}"
    per_video = [score_video(videos[b], prompts[b]) for b in range(B)]
    return dict(aggregate(per_video), num_videos=B, per_video=per_video)


TABLE_COLUMNS = ("total", "quality", "semantic") + SEMANTIC_KEYS + QUALITY_KEYS + ("drift",)


def format_table(rows):
    """rows: {name: score dict} -> a fixed-width table in percent."""
    short = {"dynamic_degree": "dynamic", "persistence": "persist", "consistency": "consist", "background": "backgr", "direction": "direct"}
    heads = [short.get(c, c) for c in TABLE_COLUMNS]
    width = max([len("name")] + [len(n) for n in rows])
    lines = [f"{'name':<{width}} " + " ".join(f"{h:>8}" for h in heads)]
    for name, r in rows.items():
        cells = ["     n/a" if r.get(c) is None else f"{100 * r[c]:8.1f}" for c in TABLE_COLUMNS]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def print_table(rows):
    print(format_table(rows))
