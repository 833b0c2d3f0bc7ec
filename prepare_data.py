"""
Videos + captions -> latent shards, the training data of every stage.

A shard is two files in the output directory:
  shard_00000.safetensors   tensor "latents" [N, F, C, h, w], float16 (normalised latent space of the codec)
  shard_00000.json          {"prompts": [N strings], "videos"/"objects": per-sample metadata,
                             "skipped": [{"video", "reason"}], "settings": {...}}
Both are written to temporary names and renamed, the JSON last: a shard exists exactly when its JSON does, so
an interrupted run never leaves a half-written shard that looks finished, and re-running skips finished shards.
Which input lands in which shard depends only on its position in the captions file (shard k holds entries
k*shard_size ...), so a re-run after a crash produces the same shards.

Real videos:  python prepare_data.py --videos DIR --captions captions.csv --out data/real --wan_dir Wan2.1-T2V-1.3B
  The captions file is CSV with a header containing `video` and `caption`, or JSONL with those keys; `video`
  is a path relative to --videos. Each clip: its first --num_frames (4k+1) frames, resized to cover
  --height x --width and centre-cropped, encoded in batches by the Wan VAE. Unreadable or too-short videos are
  skipped, reported and counted; they never stop the run.
  Cameras (the action-conditioned world model, paper §3.3): an optional `poses` column names a JSON file per
  video (relative to --videos) with one camera per video frame, {"world_to_camera": [N x 4x4], "intrinsics":
  [N x 3x3] (or one 3x3 for all frames), "width": W, "height": H}, intrinsics in pixels of the W x H source
  frames, origin at the image's top-left corner. Latent frame k takes the camera of video frame 4k (the last
  frame of its group of 4; frame 0 alone for k = 0); the intrinsics follow the resize and crop and are stored
  normalised (docs/world_model.md). Either every row has poses or none.
Toy world:    python prepare_data.py --toy 2048 --out data/toy [--seed 0]
  Renders toyworld clips (never a held-out combination) and stores their pixel-codec latents.
  --world camera: the camera world (paper §3.3): every clip also stores its per-frame cameras.
The format (writer and readers) lives in common.py: write_shard, list_shards, load_shard, LatentShards.
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import list_shards, load_shard, shard_paths, write_shard  # noqa: F401 (the shard format)

# -----------------------------------------------------------------------------
# ---- shard files (the format itself lives in common.py) ----

def _shard_done(out_dir, index, settings):
    """True if shard `index` was finished by an earlier run with the same settings (a mismatch is an error:
    mixing resolutions or codecs in one directory would silently corrupt training)."""
    _, json_path = shard_paths(out_dir, index)
    if not json_path.exists():
        return None
    record = json.loads(json_path.read_text())
    assert record["settings"] == settings, f"{json_path} was written with {record['settings']}, this run uses {settings}"
    return record


# -----------------------------------------------------------------------------
# ---- reading real videos ----

def read_captions(path):
    """CSV (header with `video`, `caption`) or JSONL (objects with those keys) -> [{"video", "caption"}]."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        assert "video" in row and "caption" in row, f"{path} row {i}: needs `video` and `caption`, has {sorted(row)}"
    with_poses = [bool(r.get("poses")) for r in rows]
    assert all(with_poses) or not any(with_poses), \
        f"{path}: {sum(with_poses)} of {len(rows)} rows name a `poses` file; give every video its poses or none"
    return [{"video": r["video"], "caption": r["caption"], **({"poses": r["poses"]} if r.get("poses") else {})}
            for r in rows]


def read_poses(path, num_frames, temporal_factor, height, width):
    """A pose file (see the module docstring) -> the cameras of the latent frames: world_to_camera [F, 4, 4]
    and intrinsics [F, 3, 3] normalised for the height x width frames that resize_center_crop makes."""
    record = json.loads(Path(path).read_text())
    world_to_camera = torch.tensor(record["world_to_camera"], dtype=torch.float64)
    intrinsics = torch.tensor(record["intrinsics"], dtype=torch.float64)
    if intrinsics.ndim == 2:
        intrinsics = intrinsics.expand(len(world_to_camera), 3, 3)
    assert world_to_camera.ndim == 3 and world_to_camera.shape[1:] == (4, 4), \
        f"world_to_camera must be a list of 4x4 matrices, got shape {tuple(world_to_camera.shape)}"
    assert intrinsics.shape == world_to_camera.shape[:1] + (3, 3), \
        f"intrinsics must be one 3x3 or one per frame, got shape {tuple(intrinsics.shape)}"
    if len(world_to_camera) < num_frames:
        raise ValueError(f"poses cover {len(world_to_camera)} frames < {num_frames}")
    frames = [0] + [temporal_factor * k for k in range(1, (num_frames - 1) // temporal_factor + 1)]
    H0, W0 = record["height"], record["width"]
    # resize_center_crop: scale to cover (per-axis scale from the rounded size), then crop the centre
    scale = max(height / H0, width / W0)
    size = (max(height, round(H0 * scale)), max(width, round(W0 * scale)))
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    K = intrinsics[frames].clone()
    K[:, 0] *= size[1] / W0   # fx, skew, cx in resized pixels
    K[:, 1] *= size[0] / H0
    K[:, 0, 2] -= left
    K[:, 1, 2] -= top
    import model as M
    normalised = M.normalised_intrinsics(K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], width, height)
    normalised[:, 0, 1] = (K[:, 0, 1] / width).float()   # skew, normalised like fx
    return world_to_camera[frames].float(), normalised


def resize_center_crop(frames, height, width):
    """uint8 [T, H0, W0, 3] -> float [T, 3, height, width] in [-1, 1]: scale to cover, then centre-crop."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()                  # [T, 3, H0, W0]
    H0, W0 = x.shape[2:]
    scale = max(height / H0, width / W0)
    size = (max(height, round(H0 * scale)), max(width, round(W0 * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]                         # [T, 3, height, width]
    return (x / 127.5 - 1).clamp(-1, 1)   # bilinear can overshoot [0, 255] by rounding only


def read_video(path, num_frames, height, width):
    """The first `num_frames` frames -> [T, 3, height, width] in [-1, 1]. Raises ValueError if too short."""
    import imageio.v2 as imageio
    frames = []
    with imageio.get_reader(str(path), "ffmpeg") as reader:
        for frame in reader:
            frames.append(frame[..., :3])
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"too short: {len(frames)} frames < {num_frames}")
    return resize_center_crop(torch.stack([torch.as_tensor(f) for f in frames]), height, width)


# -----------------------------------------------------------------------------
# ---- preparing shards ----

@torch.no_grad()
def prepare_videos(entries, video_dir, out_dir, codec, height, width, num_frames, shard_size=256, batch_size=4,
                   device="cpu"):
    """Encode `entries` ([{"video", "caption"}]) into shards with `codec` (anything with encode()).
    Returns a summary dict; skipped videos are listed with their reason."""
    assert (num_frames - 1) % codec.temporal_factor == 0, f"num_frames {num_frames} must be {codec.temporal_factor}k+1 for this codec"
    assert height % codec.spatial_factor == 0 and width % codec.spatial_factor == 0, f"{height}x{width} not divisible by {codec.spatial_factor}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(height=height, width=width, num_frames=num_frames, codec=type(codec).__name__)
    with_poses = bool(entries) and "poses" in entries[0]
    if with_poses:  # absent without poses, so older shard directories keep matching
        settings["poses"] = True
    summary = dict(written=0, skipped=[], shards_written=0, shards_reused=0)
    bar = tqdm(total=len(entries), desc="videos", unit="video")
    for k in range(math.ceil(len(entries) / shard_size)):
        chunk = entries[k * shard_size:(k + 1) * shard_size]
        done = _shard_done(out_dir, k, settings)
        if done is not None:
            summary["written"] += len(done["prompts"])
            summary["skipped"] += done["skipped"]
            summary["shards_reused"] += 1
            bar.update(len(chunk))
            continue
        good, skipped = [], []
        for entry in chunk:
            try:
                video = read_video(Path(video_dir) / entry["video"], num_frames, height, width)
                cameras = read_poses(Path(video_dir) / entry["poses"], num_frames, codec.temporal_factor, height,
                                     width) if with_poses else None
                good.append((entry, video, cameras))
            except Exception as e:   # any decoder failure means "unreadable": record it and go on
                skipped.append({"video": entry["video"], "reason": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
                tqdm.write(f"skipping {entry['video']}: {skipped[-1]['reason']}")
            bar.update(1)
        latents = []
        for i in range(0, len(good), batch_size):
            batch = torch.stack([v for _, v, _ in good[i:i + batch_size]]).to(device)   # [b, T, 3, H, W]
            latents.append(codec.encode(batch).to("cpu", torch.float16))                # [b, F, C, h, w]
        tensors = dict(latents=torch.cat(latents) if latents else torch.zeros(0))
        if with_poses and good:
            tensors["world_to_camera"] = torch.stack([c[0] for _, _, c in good])   # [N, F, 4, 4]
            tensors["intrinsics"] = torch.stack([c[1] for _, _, c in good])        # [N, F, 3, 3]
            assert tensors["world_to_camera"].shape[1] == tensors["latents"].shape[1], \
                f"{tensors['world_to_camera'].shape[1]} cameras for {tensors['latents'].shape[1]} latent frames"
        write_shard(out_dir, k, tensors, dict(prompts=[e["caption"] for e, _, _ in good],
                                              videos=[e["video"] for e, _, _ in good], skipped=skipped, settings=settings))
        summary["written"] += len(good)
        summary["skipped"] += skipped
        summary["shards_written"] += 1
    bar.close()
    return summary


@torch.no_grad()
def prepare_toy(n, out_dir, seed=0, shard_size=512, world="objects"):
    """n toy-world training clips -> shards of ToyCodec latents (float16, exact for the toy palette).
    world "camera": camera-world clips, with their cameras (world_to_camera, intrinsics) in the shard."""
    import toyworld
    assert world in ("objects", "camera"), f"unknown toy world {world!r}; use objects or camera"
    codec = toyworld.ToyCodec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(toy=True, seed=seed, frames=toyworld.TOY_FRAMES, size=toyworld.TOY_SIZE, codec="ToyCodec")
    if world == "camera":  # absent for the objects world, so its older shards keep matching
        settings["world"] = "camera"
    summary = dict(written=0, skipped=[], shards_written=0, shards_reused=0)
    for k in tqdm(range(math.ceil(n / shard_size)), desc="toy shards", unit="shard"):
        start = k * shard_size
        count = min(shard_size, n - start)
        done = _shard_done(out_dir, k, settings)
        if done is not None:
            assert len(done["prompts"]) == count, f"shard {k} holds {len(done['prompts'])} clips, expected {count}"
            summary["written"] += count
            summary["shards_reused"] += 1
            continue
        tensors = {}
        if world == "camera":
            videos, prompts, world_to_camera, intrinsics, meta = toyworld.sample_camera_training_videos(count, seed, start=start)
            tensors = dict(world_to_camera=world_to_camera, intrinsics=intrinsics)   # [n, T, 4, 4], [n, T, 3, 3]
        else:
            videos, prompts, meta = toyworld.sample_training_videos(count, seed, start=start)   # [n, T, 3, H, W]
        latents = codec.encode(videos).half()                                                # [n, T, 12, 16, 16]
        assert torch.equal(codec.decode(latents.float()), videos), "fp16 toy latents must be lossless"
        record = dict(prompts=prompts, objects=[m["objects"] for m in meta], index=[m["index"] for m in meta],
                      skipped=[], settings=settings)
        if world == "camera":
            record["pans"] = [m["pans"] for m in meta]
        write_shard(out_dir, k, dict(latents=latents, **tensors), record)
        summary["written"] += count
        summary["shards_written"] += 1
    return summary


def print_summary(summary, out_dir):
    print(f"{out_dir}: {summary['written']} clips in shards ({summary['shards_written']} written now, "
          f"{summary['shards_reused']} already finished), {len(summary['skipped'])} skipped")
    for s in summary["skipped"]:
        print(f"  skipped {s['video']}: {s['reason']}")


# -----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory of shards")
    p.add_argument("--toy", type=int, default=0, help="write N toy-world clips instead of encoding videos")
    p.add_argument("--seed", type=int, default=0, help="toy-world seed")
    p.add_argument("--world", default="objects", choices=("objects", "camera"),
                   help="toy world: objects (the text-to-video world) or camera (clips with per-frame cameras)")
    p.add_argument("--videos", help="directory of videos")
    p.add_argument("--captions", help="CSV or JSONL with `video` and `caption`")
    p.add_argument("--wan_dir", help="Wan2.1 folder (Wan2.1_VAE.pth) or diffusers VAE folder")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--num_frames", type=int, default=81, help="4k+1 pixel frames (81 -> 21 latent frames)")
    p.add_argument("--shard_size", type=int, default=None, help="clips per shard (default: 512 toy, 256 real)")
    p.add_argument("--batch_size", type=int, default=4, help="videos per VAE encode call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.toy < 0:
        p.error(f"--toy must be a number of clips (>= 1), got {args.toy}")
    if not args.toy and not (args.videos and args.captions and args.wan_dir):
        p.error("real data needs --videos, --captions and --wan_dir (or --toy N for N toy-world clips)")
    for name in ("shard_size", "batch_size", "height", "width", "num_frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    t0 = time.time()
    if args.toy:
        summary = prepare_toy(args.toy, args.out, args.seed, args.shard_size or 512, args.world)
    else:
        import encoders
        codec = encoders.load_codec(args.wan_dir, args.device)
        summary = prepare_videos(read_captions(args.captions), args.videos, args.out, codec, args.height, args.width,
                                 args.num_frames, args.shard_size or 256, args.batch_size, args.device)
    print_summary(summary, args.out)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
