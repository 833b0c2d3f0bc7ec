"""
Shared infrastructure of the stage scripts — no algorithm code lives here (the losses and rollouts each stage
teaches are in that stage's file). Sections:

  config        a flat dataclass of defaults per script + yaml deltas (--config) + --key=value overrides;
                unknown keys and wrong types are errors
  distributed   torchrun setup (nccl on CUDA, gloo on CPU), per-rank seeds, rank-0-only side effects
  checkpoints   atomic checkpoint directories (DESIGN §5) with a `latest` pointer
  EMA           an fp32 shadow of the trainable parameters
  logging       stdout + JSONL metrics (+ optional wandb), a loss-curve PNG
  media         mp4 and PNG writing
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# config: dataclass defaults <- yaml deltas <- --key=value


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that says what to fix."""


def _coerce(key, value, annotation):
    """Check/convert one value against its field annotation. Ints are accepted where floats are expected and
    numeric strings are parsed (yaml reads '1e-4' as a string); nothing else is converted silently."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # Optional[X] / X | None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = options[0]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            import yaml
            value = yaml.safe_load(value)
        if isinstance(value, (list, tuple)):
            return list(value) if (annotation is list or origin is list) else tuple(value)
    else:
        raise ConfigError(f"config key '{key}' has an unsupported annotation {annotation}")
    raise ConfigError(f"config key '{key}' expects {getattr(annotation, '__name__', annotation)}, "
                      f"got {value!r} ({type(value).__name__})")


def load_config(config_cls, argv=None):
    """Build `config_cls` from its defaults, then each `--config FILE.yaml` (deltas only, applied in order),
    then `--key=value` overrides. Unknown keys, wrong types and malformed arguments raise ConfigError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in fields(config_cls)}
    values = {}

    def apply(source, key, value):
        if key not in known:
            close = [k for k in known if k.split("_")[0] == key.split("_")[0]][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}; valid keys are the fields of "
                              f"{config_cls.__name__}")
        values[key] = _coerce(key, value, hints[key])

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            i += 1 if "=" in arg else 2
            if path is None or not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            import yaml
            with open(path) as f:
                delta = yaml.safe_load(f) or {}
            if not isinstance(delta, dict):
                raise ConfigError(f"{path}: a config file must be a flat mapping of key: value")
            for key, value in delta.items():
                apply(path, key, value)
            continue
        if not (arg.startswith("--") and "=" in arg):
            raise ConfigError(f"cannot parse argument {arg!r}; use --config FILE.yaml and --key=value")
        key, value = arg[2:].split("=", 1)
        apply("the command line", key, value)
        i += 1
    return config_cls(**values)


def format_config(cfg):
    return "\n".join(f"  {k} = {v!r}" for k, v in asdict(cfg).items())


# -----------------------------------------------------------------------------
# distributed: torchrun environment, rank-0-only side effects, per-rank seeds


class Dist:
    """rank, world_size, local_rank, device and is_main of this process (single process when not launched
    by torchrun)."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup_distributed(device_name="auto"):
    """Init the process group from torchrun's environment: nccl on CUDA, gloo on CPU."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if device_name == "cuda" else torch.device("cpu")
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def rank_generator(seed, rank, device="cpu"):
    """A torch.Generator seeded from the config seed and the rank (every rank draws different noise)."""
    return torch.Generator(device=device).manual_seed(seed * 1000003 + rank)


# -----------------------------------------------------------------------------
# checkpoints: atomic directories with a `latest` pointer (DESIGN §5)
#
#   out_dir/step_000100/  model.safetensors  ema.safetensors  critic.safetensors  state.pt  config.json
#   out_dir/latest        text file naming the newest complete directory
# A directory is written under a temporary name, fsynced and renamed; `latest` is replaced atomically after
# it. A run killed mid-write leaves a stray temp dir and the previous checkpoint intact and pointed to.


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir, step, weights, state, config):
    """weights: {'model': state_dict, 'ema': ..., 'critic': ...} (tensors, saved as safetensors);
    state: optimizer states, step, RNG, data position (saved as state.pt, loadable with weights_only=True);
    config: JSON-serialisable dict (model config, resolved run config). Returns the checkpoint path."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # leftovers of a write that was killed: never a checkpoint
        if stale.startswith(".tmp_step_"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    final = os.path.join(out_dir, f"step_{step:07d}")
    tmp = tempfile.mkdtemp(prefix=f".tmp_step_{step:07d}_", dir=out_dir)
    for name, tensors in weights.items():
        if tensors is not None:
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**config, "step": step, "git_commit": git_commit()}, f, indent=2, default=str)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = os.path.join(out_dir, ".latest.tmp")
    with open(pointer_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(out_dir, "latest"))
    _fsync_dir(out_dir)
    return final


def latest_checkpoint(out_dir):
    """The directory `latest` points to, or None when the run has no complete checkpoint yet."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint_state(path):
    """(weights {name: state_dict}, state, config) of one checkpoint directory. Weights-only loading."""
    from safetensors.torch import load_file
    weights = {name[:-len(".safetensors")]: load_file(os.path.join(path, name))
               for name in sorted(os.listdir(path)) if name.endswith(".safetensors")}
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return weights, state, config


def rng_state():
    """Every RNG a run draws from, for exact resume (explicit generators are saved by their owners)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32:
    shadow ← decay·shadow + (1 − decay)·param, called after every optimizer step."""

    def __init__(self, model):
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, decay):
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model):
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        assert not missing and not unexpected, f"EMA state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
        for name, value in state.items():
            self.shadow[name].copy_(value)


# -----------------------------------------------------------------------------
# logging: stdout + JSONL (+ wandb), loss-curve PNG


class MetricsLog:
    """Appends one JSON object per logged step to out_dir/metrics.jsonl (rank 0 only). On resume, rows of
    steps after the resumed step are dropped so the file matches an uninterrupted run."""

    def __init__(self, out_dir, enabled=True, resume_step=None, wandb_project=None, config=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(rows)
        elif resume_step is None and os.path.isfile(self.path):
            os.remove(self.path)
        if wandb_project:
            import wandb  # optional dependency, only when asked for
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                               for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def rows(self):
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows, keys, path):
    """A small PNG of the given metrics against step. Needs matplotlib; returns False without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log" if points and min(p[1] for p in points) > 0 else "linear")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# media: mp4 and PNG


def to_uint8_frames(video):
    """[T, 3, H, W] in [-1, 1] -> numpy uint8 [T, H, W, 3]."""
    assert video.ndim == 4 and video.shape[1] == 3, f"expected a video [T, 3, H, W], got {tuple(video.shape)}"
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).numpy()


def save_png_grid(videos, path, max_frames=12, scale=1):
    """Rows = videos [N, T, 3, H, W] in [-1, 1], columns = frames. Written atomically."""
    import imageio.v3 as iio
    import numpy as np
    rows = []
    for video in videos:
        frames = to_uint8_frames(video[:max_frames])  # [T, H, W, 3]
        rows.append(np.concatenate(list(frames), axis=1))  # [H, T·W, 3]
    grid = np.concatenate(rows, axis=0)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    tmp = path + ".tmp.png"
    iio.imwrite(tmp, grid)
    os.replace(tmp, path)
    return path
