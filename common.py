"""
Shared infrastructure of the stage scripts — no algorithm code lives here (the losses and rollouts each stage
teaches are in that stage's file). Sections:

  config        a flat dataclass of defaults per script + yaml deltas (--config) + --key=value overrides;
                unknown keys and wrong types are errors; --help lists the keys from the dataclass itself
  distributed   torchrun setup (nccl on CUDA, gloo on CPU), per-rank seeds, rank-0-only side effects
  FSDP2         fully_shard per block + root, mixed precision, full state dicts
  checkpoints   atomic checkpoint directories with a `latest` pointer; exact resume; one model loader
  EMA           a trailing copy of the model, updated after every optimizer step
  data          the latent-shard format (written by prepare_data.py and Stage 2's ODE baseline) and a
                deterministic, resumable order over it
  logging       stdout + JSONL metrics (+ optional wandb), a loss-curve PNG
  media         mp4 and PNG writing
"""

import functools
import glob
import inspect
import json
import math
import os
import re
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
    then `--key=value` (or `--key value`) overrides. Unknown keys, wrong types and malformed arguments raise ConfigError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(config_cls))
        raise SystemExit(0)
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
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"cannot parse argument {arg!r}; use --config FILE.yaml and --key=value (or --key value)")
        if "=" in arg:  # --key=value
            key, value = arg[2:].split("=", 1)
            i += 1
        else:  # --key value, as argparse users type it
            key = arg[2:]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} has no value; write --{key}=VALUE or --{key} VALUE")
            value = argv[i + 1]
            i += 2
        apply("the command line", key, value)
    return config_cls(**values)


def format_config(cfg):
    return "\n".join(f"  {k} = {v!r}" for k, v in asdict(cfg).items())


# what the keys every stage shares mean, for --help; a Config field's own comment takes precedence
SHARED_KEY_MEANINGS = dict(
    lr="AdamW learning rate", beta1="AdamW beta1", beta2="AdamW beta2", weight_decay="AdamW weight decay",
    grad_clip="clip the global gradient norm to this", warmup_steps="linear learning-rate warm-up over this many "
    "optimizer steps (0 = none)", batch_size="clips per rank and micro-step", grad_accum="micro-steps per "
    "optimizer step", max_steps="optimizer steps of the whole run", device="auto = cuda if available, else cpu",
    mixed_precision="bf16 compute (CUDA, and CPUs with native bf16), fp32 weights and reduce",
    cpu_offload="FSDP2 CPU offload of parameters, gradients and optimizer state (needs torchrun)",
    activation_checkpointing="recompute each block's activations in the backward pass (less memory)",
    seed="seed of the data order, noise and timesteps", out_dir="run directory: checkpoints, metrics, sample PNGs",
    resume="continue from out_dir/latest (a fresh run refuses a directory that holds checkpoints)",
    log_every="optimizer steps between log lines", save_every="optimizer steps between checkpoints",
    sample_prompts="prompts of the periodic sample grid (empty: held-out toy prompts, or the run's own)",
    num_samples="videos in the periodic sample grid", wandb_project="also log to this wandb project (null = no)",
    data_dir="latent shards written by prepare_data.py", text_encoder='"toy" or a Wan folder (umT5-XXL)',
    codec='"toy" or a Wan folder (the Wan VAE)', timestep_shift="shift of the timestep grid (5 = Wan, 1 = none)",
)


def config_comments(config_cls):
    """{field: one-line meaning} from the source of the dataclass: a field's inline comment plus the comment-only
    lines indented under it; the keys of SHARED_KEY_MEANINGS where a field has none."""
    comments, last = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        m = re.match(r"\s{4}(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m:
            last = m.group(1)
            comments[last] = (m.group(2) or "").strip()
        elif last and re.match(r"\s{5,}#", line):  # a comment continued under the field's comment
            comments[last] = f"{comments[last]} {line.strip()[1:].strip()}".strip()
        else:
            last = None
    return {f.name: comments.get(f.name) or SHARED_KEY_MEANINGS.get(f.name, "") for f in fields(config_cls)}


def config_help(config_cls, config_dir=None):
    """--help of a script whose config is `config_cls`: its purpose (first paragraph of the module docstring),
    every key with type, default and meaning, the yaml files in configs/ that set it, and an example command."""
    module = sys.modules[config_cls.__module__]
    script = os.path.basename(getattr(module, "__file__", None) or "script.py")
    doc = (module.__doc__ or "").strip()
    purpose = " ".join(doc.split("\n\n")[0].split())
    config_dir = config_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    hints, meanings, known = typing.get_type_hints(config_cls), config_comments(config_cls), config_cls.__dataclass_fields__
    import yaml
    # this script's yaml files: every key is one of its keys, and the name is of a family its docstring launches
    # (configs/toy/cd.yaml -> cd: cd_chunkwise.yaml, camera_cd.yaml, ...; tf.yaml has Stage-2 keys only)
    family = lambda path: os.path.basename(path).removeprefix("camera_").split("_")[0].split(".")[0]
    families = {family(p) for p in re.findall(r"configs/[\w/]+\.yaml", doc)}
    set_by = {name: [] for name in known}  # key -> the yaml files that set it
    for path in sorted(glob.glob(os.path.join(config_dir, "*.yaml")) + glob.glob(os.path.join(config_dir, "*", "*.yaml"))):
        with open(path) as f:
            delta = yaml.safe_load(f) or {}
        if (isinstance(delta, dict) and delta and set(delta) <= set(known) and
                (not families or family(path) in families)):
            for key in delta:
                set_by[key].append(os.path.relpath(path, os.path.dirname(config_dir)))
    yamls = sorted({p for paths in set_by.values() for p in paths})
    launches = [line.strip().split("  #")[0].strip() for line in doc.splitlines() if f"{script} --config" in line]
    example = launches[0] if launches else f"python {script} --config {yamls[0] if yamls else 'FILE.yaml'}"
    typename = lambda t: t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")
    lines = [f"{script}: {purpose}", "",
             f"usage: python {script} [--config FILE.yaml ...] [--key=value | --key value ...]",
             "  the defaults below <- each --config file (deltas, in order) <- --key=value overrides", "",
             "config keys (type = default: meaning; set in: the yaml files of configs/ that set it):"]
    for f in fields(config_cls):
        lines.append(f"  --{f.name} ({typename(hints[f.name])} = {f.default!r}): {meanings[f.name] or '-'}")
        if set_by[f.name]:
            lines.append(f"      set in: {', '.join(set_by[f.name])}")
    lines += ["", f"example:\n  {example}\n  {example} --max_steps=10 --out_dir=runs/try   # override keys"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# distributed: torchrun environment, rank-0-only side effects, per-rank seeds


class Dist:
    """rank, world_size, local_rank, device and is_main of this process. `enabled` = launched by torchrun (a
    process group exists, FSDP2 is used), also with --nproc_per_node=1: that is how one GPU gets CPU offload."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launched=False):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.launched = launched

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.launched


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
    return Dist(rank, world_size, local_rank, device, launched=True)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# FSDP2: shard each transformer block and the root
#
# Under torchrun every model is wrapped with fully_shard: blocks one by one, then the root. On
# CUDA with mixed_precision the parameters are gathered in bf16 and gradients reduced in fp32; the time
# embedding MLPs and the head keep fp32 parameters, as the original Wan computes them in fp32. Forward inputs
# are never cast by FSDP (cast_forward_inputs=False): timesteps must stay fp32 and the model casts its own
# activations. A single process (a laptop, one GPU) uses the plain module, with bf16 autocast on CUDA.


def shard_model(model, dist_ctx, mixed_precision=True, cpu_offload=False):
    """Apply FSDP2 in place when launched by torchrun; returns the model (a no-op for a plain `python` run)."""
    if not dist_ctx.enabled:
        if cpu_offload:
            raise ValueError("cpu_offload needs FSDP2: launch with torchrun (--nproc_per_node=1 for one GPU)")
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    on_cuda = dist_ctx.device.type == "cuda"
    low = torch.bfloat16 if (mixed_precision and on_cuda) else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                                  cast_forward_inputs=False)
    fp32_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None, cast_forward_inputs=False)
    # pinned host memory speeds up copies to an accelerator and cannot be allocated without one (a CPU-only run)
    offload = CPUOffloadPolicy(pin_memory=on_cuda) if cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    for fp32_module in (model.time_embedding, model.time_projection, model.head):
        fully_shard(fp32_module, mp_policy=fp32_policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return model


@functools.cache
def cpu_has_native_bf16():
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX). There bf16 autocast trains the
    toy ~1.5-1.8x faster than fp32; on an AVX2-only CPU bf16 is emulated and ~7x slower. Read from the CPU's own
    flags (never guessed from the vendor): torch's probes, else /proc/cpuinfo."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        return any(p() for p in probes if p is not None)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(dist_ctx, mixed_precision=True):
    """The autocast dtype of the training forward: bf16 on CUDA, and on CPUs with native bf16; fp32 elsewhere
    (and always fp32 with mixed_precision=false: tests pin it so their numbers do not depend on the CPU)."""
    if not mixed_precision:
        return torch.float32
    if dist_ctx.device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast_context(dist_ctx, mixed_precision=True):
    """bf16 autocast where compute_dtype chose bf16 (FSDP2 on CUDA handles precision itself), else a no-op.
    Parameters, optimizer state and the loss reduction stay fp32 either way."""
    import contextlib
    dtype = compute_dtype(dist_ctx, mixed_precision)
    if dtype == torch.bfloat16 and not (dist_ctx.enabled and dist_ctx.device.type == "cuda"):
        return torch.autocast(dist_ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_model_state(model):
    """The full (unsharded) state dict on CPU; a collective under FSDP2 (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(model, max_norm):
    """Total gradient norm (before clipping) as a float; works for plain and FSDP2 (DTensor) parameters."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


# -----------------------------------------------------------------------------
# data: the latent-shard format, in one place
#
# A shard is two files: shard_00000.safetensors (tensor "latents" [N, F, C, h, w], float16, in the codec's
# normalised latent space; Stage 2's ODE baseline adds "states"; camera data adds "world_to_camera" [N, F, 4, 4]
# and "intrinsics" [N, F, 3, 3], float32, one camera per latent frame) and shard_00000.json ({"prompts": [N strings],
# per-sample metadata, "skipped": [...], "settings": {...}}). Both are written to temporary names and renamed,
# the JSON last, so a shard exists exactly when its JSON does: an interrupted writer never leaves a half-written
# shard that looks finished.


def shard_paths(out_dir, index):
    from pathlib import Path
    return Path(out_dir) / f"shard_{index:05d}.safetensors", Path(out_dir) / f"shard_{index:05d}.json"


def _atomic_write(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir, index, latents, record):
    """latents [N, F, C, h, w] (N may be 0: then only the JSON is written, recording what was skipped), or a
    dict of tensors with N rows each that includes "latents" (the Stage-2 ODE trajectories add "states")."""
    from safetensors.torch import save_file
    tensors = latents if isinstance(latents, dict) else {"latents": latents}
    count = tensors["latents"].shape[0]
    tensor_path, json_path = shard_paths(out_dir, index)
    assert len(record["prompts"]) == count, f"{count} latents but {len(record['prompts'])} prompts"
    assert all(v.shape[0] == count for v in tensors.values()), "every shard tensor needs one row per clip"
    if count > 0:
        _atomic_write(tensor_path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
    _atomic_write(json_path, lambda p: p.write_text(json.dumps(record, ensure_ascii=False, indent=1)))  # last: the marker


def list_shards(data_dir):
    """Finished, non-empty shards, in order (a shard is finished when its JSON exists)."""
    from pathlib import Path
    return [p.with_suffix(".safetensors") for p in sorted(Path(data_dir).glob("shard_*.json"))
            if p.with_suffix(".safetensors").exists()]


def load_shard(path):
    """-> latents [N, F, C, h, w] float32, prompts [N]."""
    from pathlib import Path

    from safetensors.torch import load_file
    path = Path(path)
    latents = load_file(str(path))["latents"].float()
    prompts = json.loads(path.with_suffix(".json").read_text())["prompts"]
    assert latents.shape[0] == len(prompts), f"{path}: {latents.shape[0]} latents but {len(prompts)} prompts"
    return latents, prompts


# The order. Sample counter j (counted over the whole run) maps to epoch j // N and item perm_epoch[j % N], with
# perm_epoch a permutation seeded by (seed, epoch). Global micro-batch k holds counters [k·G, (k+1)·G) with
# G = world_size · batch_size, and rank r takes its contiguous slice. The whole data position is therefore
# one integer, and a run on 2 ranks sees exactly the samples of a 1-rank run with twice the batch.


class LatentShards:
    """All finished shards of a directory, read lazily row by row (safetensors memory map)."""

    def __init__(self, data_dir, tensor="latents"):
        self.tensor = tensor
        self.paths = list_shards(data_dir)
        if not self.paths:
            raise FileNotFoundError(f"no finished latent shards in {data_dir}; run prepare_data.py first "
                                    f"(e.g. python prepare_data.py --toy 4096 --out {data_dir})")
        self.index, self.prompts = [], []
        for shard, path in enumerate(self.paths):
            with open(os.path.splitext(path)[0] + ".json") as f:
                prompts = json.load(f)["prompts"]
            self.index += [(shard, row) for row in range(len(prompts))]
            self.prompts += prompts
        self._handles = {}

    def __len__(self):
        return len(self.index)

    def _handle(self, shard):
        from safetensors import safe_open
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.paths[shard]), framework="pt")
        return self._handles[shard]

    def get(self, i, tensor=None):
        """-> row i of the shard tensor (default `latents` [F, C, H, W]) as float32, prompt."""
        shard, row = self.index[i]
        return self._handle(shard).get_slice(tensor or self.tensor)[row].float(), self.prompts[i]

    def has_cameras(self):
        """True when every shard carries per-frame cameras (world_to_camera and intrinsics); an error if only
        some do (a directory mixing the two would train half the clips without their action)."""
        with_cameras = [{"world_to_camera", "intrinsics"} <= set(self._handle(s).keys()) for s in range(len(self.paths))]
        assert all(with_cameras) or not any(with_cameras), \
            f"only {sum(with_cameras)} of {len(self.paths)} shards in {os.path.dirname(self.paths[0])} carry cameras"
        return all(with_cameras)

    def cameras(self, i):
        """-> (world_to_camera [F, 4, 4], intrinsics [F, 3, 3]) of row i, float32."""
        shard, row = self.index[i]
        handle = self._handle(shard)
        return handle.get_slice("world_to_camera")[row].float(), handle.get_slice("intrinsics")[row].float()


class DataOrder:
    def __init__(self, num_items, seed):
        self.num_items, self.seed = num_items, seed
        self._perms = {}

    def item(self, counter):
        epoch, position = divmod(counter, self.num_items)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.num_items, generator=torch.Generator().manual_seed(
                self.seed * 7919 + epoch))}
        return self._perms[epoch][position].item()

    def batch_counters(self, micro_batch, batch_size, rank, world_size):
        """Sample counters of this rank in global micro-batch `micro_batch`."""
        first = micro_batch * batch_size * world_size + rank * batch_size
        return list(range(first, first + batch_size))


def gather_batch(data, order, counters, seed):
    """The samples behind this rank's sample counters -> x0 [B, F, C, H, W] float32, prompts [B] and one
    generator per sample (for its noise, timesteps and text dropout)."""
    items = [data.get(order.item(c)) for c in counters]
    return (torch.stack([latents for latents, _ in items]), [prompt for _, prompt in items],
            [sample_generator(seed, c) for c in counters])


def cameras_of(data, items):
    """Rows `items` of a LatentShards with cameras -> (world_to_camera [B, F, 4, 4], intrinsics [B, F, 3, 3])."""
    rows = [data.cameras(i) for i in items]
    return torch.stack([w for w, _ in rows]), torch.stack([k for _, k in rows])


def gather_cameras(data, order, counters):
    """The cameras of the same samples as gather_batch."""
    return cameras_of(data, [order.item(c) for c in counters])


def sample_generator(seed, counter, device="cpu"):
    """The generator of one training sample: its noise, timestep and text dropout depend only on the run seed
    and the sample counter — not on the rank layout or on when the run was resumed."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + counter)


# -----------------------------------------------------------------------------
# checkpoints: atomic directories with a `latest` pointer
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
        replaced_done = stale.endswith(".replaced") and _is_complete(os.path.join(out_dir, stale[:-len(".replaced")]))
        if stale.startswith(".tmp_step_") or replaced_done:
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
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is as readable as any other output
    if os.path.exists(final):  # re-saving a step: move the old copy aside until the new one is in place
        aside = final + ".replaced"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)  # a kill between these two renames is repaired by latest_checkpoint()
        shutil.rmtree(aside)
    else:
        os.rename(tmp, final)
    pointer_tmp = os.path.join(out_dir, ".latest.tmp")
    with open(pointer_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(out_dir, "latest"))
    _fsync_dir(out_dir)
    return final


def resolve_checkpoint(path):
    """A run directory (with a `latest` pointer) -> its newest checkpoint; anything else is returned as is."""
    return latest_checkpoint(path) if os.path.isfile(os.path.join(path, "latest")) else path


# ---- one loader: checkpoint -> model (stages, sample.py, toy_eval.py, vbench_eval.py, bench.py) ----


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit; the message is one line saying which and what to run."""


def how_to_make(path):
    """'make it with: python SCRIPT --config CONFIG' for the config under configs/ whose out_dir is `path`
    (the script is read off the config's keys), or None when no config writes there."""
    import glob

    import yaml
    here = os.path.dirname(os.path.abspath(__file__))
    world = os.environ.get("WORLD_SIZE")
    launcher = f"torchrun --nproc_per_node={world}" if world else "python"
    for config in sorted(glob.glob(os.path.join(here, "configs", "**", "*.yaml"), recursive=True)):
        with open(config) as f:
            delta = yaml.safe_load(f) or {}
        if isinstance(delta, dict) and os.path.normpath(str(delta.get("out_dir", ""))) == os.path.normpath(path):
            script = ("stage3_asym_dmd.py" if "generator" in delta or "real_score" in delta else
                      "stage2_causal_cd.py" if "teacher" in delta or "method" in delta else "stage1_teacher_forcing.py")
            return f"make it with: {launcher} {script} --config {os.path.relpath(config, here)}"
    return None


def load_model(path, *, use_ema=False, preset=None, causal=None, frames_per_block=None, camera_dims=None,
               what="checkpoint"):
    """Any checkpoint -> (CausalWanModel, WanConfig, format, resolved path), strictly (model.load_weights).
    path: our run directory (its latest checkpoint) or checkpoint directory, a Wan or diffusers folder, or an
    official Causal-Forcing .pt, whose architecture comes from `preset` (a preset name or a Wan folder; the .pt
    carries no config.json).
    causal / frames_per_block set the attention the model runs with (None keeps the stored one); camera_dims
    (None keeps the stored one) gives a model without cameras PRoPE channels, e.g. Wan fine-tuned into the
    camera-conditioned base of §3.3 (no new weights: the channels only change their positional encoding). Every
    problem is one CheckpointError line; a missing run names the command that makes it."""
    import model as M
    if not os.path.exists(path):
        hint = how_to_make(path)
        raise CheckpointError(f"{what} {path!r} not found" + (f"; {hint}" if hint else ""))
    path = resolve_checkpoint(path) if os.path.isdir(path) else path
    model_cfg = M.config_from_checkpoint(path)
    if model_cfg is None:
        if not preset:
            raise CheckpointError(f"{what} {path} has no config.json (an official .pt carries no architecture); "
                                  f"name it with model_preset: one of {sorted(M.PRESETS)} or a Wan folder")
        if preset in M.PRESETS:
            model_cfg = M.WanConfig.from_preset(preset)
        elif os.path.isdir(preset) and M.config_from_checkpoint(preset) is not None:
            model_cfg = M.config_from_checkpoint(preset)
        else:
            raise CheckpointError(f"model_preset {preset!r} is neither one of {sorted(M.PRESETS)} nor a folder "
                                  f"with a Wan config.json")
    if causal is not None:
        model_cfg.causal = causal
    if frames_per_block is not None:
        model_cfg.frames_per_block = frames_per_block
    if camera_dims is not None:
        model_cfg = M.WanConfig(**{**asdict(model_cfg), "camera_dims": camera_dims})  # validated again
    model = M.CausalWanModel(model_cfg)
    try:
        fmt = M.load_weights(model, path, use_ema=use_ema)
    except (M.WeightLoadError, ValueError) as err:
        raise CheckpointError(f"{what}: {str(err).splitlines()[0]}") from None
    return model, model_cfg, fmt, path


def run_main(main, config_cls, script):
    """A stage's __main__: a bad config, a missing/unfit checkpoint or missing data ends the run with one line."""
    try:
        main(load_config(config_cls))
    except (ConfigError, CheckpointError, FileNotFoundError) as err:  # missing data/prompts: one line too
        raise SystemExit(f"{script}: error: {err}") from None


def resume_point(out_dir, resume):
    """The checkpoint to continue from (--resume=true), or None for a fresh run; a fresh run into a directory
    that already holds checkpoints is refused, so nothing is overwritten by accident."""
    latest = latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if not resume and latest is not None:
        raise SystemExit(f"{out_dir} already holds checkpoints; pass --resume=true to continue, or choose "
                         f"another --out_dir")
    return latest


def latest_checkpoint(out_dir):
    """The directory `latest` points to, or None when the run has no complete checkpoint yet."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, f.read().strip())
    if not _is_complete(path) and _is_complete(path + ".replaced"):  # killed while re-saving this step
        os.rename(path + ".replaced", path)
        print0(f"restored {path} from the copy a killed re-save left aside")
    if not _is_complete(path):
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def _is_complete(path):
    return os.path.isfile(os.path.join(path, "state.pt")) and os.path.isfile(os.path.join(path, "config.json"))


def load_checkpoint_state(path):
    """(weights {name: state_dict}, state, config) of one checkpoint directory. Weights-only loading."""
    from safetensors.torch import load_file
    weights = {name[:-len(".safetensors")]: load_file(os.path.join(path, name))
               for name in sorted(os.listdir(path)) if name.endswith(".safetensors")}
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return weights, state, config


def save_training_checkpoint(out_dir, step, dist_ctx, modules, optimizers, run_config, log=None,
                             curve_keys=("loss", "grad_norm")):
    """Gather and save everything a run needs to continue exactly (a collective under FSDP2: call on every
    rank). modules: {'model': m, 'ema': m, 'critic': m} (None entries skipped); optimizers: {name: (module,
    optimizer)}. The RNG state of every rank is kept; data position and sample randomness derive from step."""
    weights = {name: full_model_state(m) for name, m in modules.items() if m is not None}
    state = {"step": step, "optimizers": {name: full_optimizer_state(m, opt) for name, (m, opt) in optimizers.items()}}
    rng = [None] * dist_ctx.world_size
    if dist_ctx.enabled:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    state["rng"] = rng
    path = None
    if dist_ctx.is_main:
        path = save_checkpoint(out_dir, step, weights, state, run_config)
        if log is not None:
            plot_curves(log.rows(), list(curve_keys), os.path.join(out_dir, "loss.png"))
        print(f"saved {path}", flush=True)
    if dist_ctx.enabled:
        dist.barrier()
    return path


def resume_training_checkpoint(path, dist_ctx, modules, optimizers):
    """Load a checkpoint written by save_training_checkpoint into the (possibly sharded) modules and
    optimizers and restore this rank's RNG. Returns the step to continue from."""
    weights, state, _ = load_checkpoint_state(path)
    for name, m in modules.items():
        if m is not None:
            assert name in weights, f"{path} has no {name}.safetensors to resume from"
            load_full_model_state(m, weights[name])
    for name, (m, opt) in optimizers.items():
        load_full_optimizer_state(m, opt, state["optimizers"][name])
    assert len(state["rng"]) == dist_ctx.world_size, \
        f"{path} was written by {len(state['rng'])} ranks; resume with the same number of ranks"
    set_rng_state(state["rng"][dist_ctx.rank])
    return state["step"]


def export_weights(checkpoint, out_dir, use_ema=True, dtype=torch.float16, note=""):
    """Write a small inference checkpoint (model.safetensors in `dtype` + config.json) from a training
    checkpoint directory: the EMA weights by default. This is how checkpoints/toy/* are made."""
    from safetensors.torch import load_file, save_file
    checkpoint = resolve_checkpoint(checkpoint)
    name = "ema.safetensors" if use_ema else "model.safetensors"
    weights = load_file(os.path.join(checkpoint, name))
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    tmp = tempfile.mkdtemp(prefix=".tmp_export_", dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"model_config": config["model_config"], "stage": config.get("stage"), "exported_from": checkpoint,
                   "weights": name,
                   "dtype": str(dtype).replace("torch.", ""), "step": config.get("step"), "note": note,
                   "run_config": config.get("run_config"), "git_commit": config.get("git_commit")}, f, indent=2)
    os.chmod(tmp, 0o755)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


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
# SIGTERM (preemption, scancel, kill): finish the step, save a checkpoint, exit cleanly


class StopSignal:
    """Installs a SIGTERM handler that only sets a flag. requested(dist_ctx) is checked once per step; under
    torchrun the flag is max-reduced so every rank stops after the same step (a rank leaving alone would hang
    the others' collectives). The loop then saves a checkpoint and returns; --resume=true continues exactly."""

    def __init__(self):
        import signal
        self.flag = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def close(self):
        """Put the previous SIGTERM handler back (main() may run inside a longer-lived process, e.g. tests)."""
        import signal
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, dist_ctx):
        if not dist_ctx.enabled:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0], device=dist_ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


# -----------------------------------------------------------------------------
# numerical faults: a non-finite loss or gradient skips the optimizer step instead of poisoning the weights


class NonFiniteGuard:
    """Call ok(step, loss, grad_norm) after backward and clipping, before optimizer.step(). A non-finite value
    (on every rank alike: pass values already reduced across ranks) skips the step — the caller drops the
    gradients and leaves optimizer and EMA untouched — and is counted; `max_consecutive` skips in a row stop the
    run with one line, leaving the last checkpoint on disk as the last good one."""

    def __init__(self, max_consecutive, out_dir):
        assert max_consecutive >= 1, f"max_nonfinite_steps must be >= 1, got {max_consecutive}"
        self.max_consecutive, self.out_dir = max_consecutive, out_dir
        self.consecutive = 0
        self.skipped = 0  # since the last take_skipped() (logged per interval)

    def ok(self, step, **values):
        if all(math.isfinite(v) for v in values.values()):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        shown = ", ".join(f"{k} {v:.3g}" for k, v in values.items())
        print0(f"step {step}: non-finite {shown}; step skipped ({self.consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            last = latest_checkpoint(self.out_dir) if os.path.isdir(self.out_dir) else None
            raise SystemExit(f"stopped at step {step}: {self.consecutive} non-finite steps in a row ({shown}); last "
                             f"good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data, then "
                             f"--resume=true")
        return False

    def take_skipped(self):
        skipped, self.skipped = self.skipped, 0
        return skipped


# -----------------------------------------------------------------------------
# EMA: a second copy of the model whose weights trail the trained ones (sharded like them under FSDP2, so
# the update is local to each rank and the EMA model can run forward passes: the Stage-2 target θ⁻,
# the sampled weights of every stage)


def make_ema(model):
    """A frozen copy of `model` to be updated with ema_update (create it before sharding)."""
    import copy
    return copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """θ⁻ ← decay·θ⁻ + (1 − decay)·θ for every parameter (in the parameters' own fp32 storage)."""
    for m in ema_model.modules():  # FSDP2 leaves the root's parameters unsharded after a forward that has no
        if hasattr(m, "reshard"):  # backward (the Stage-2 target θ⁻): register the sharded ones again
            m.reshard()
    for (name_ema, p_ema), (name, p) in zip(ema_model.named_parameters(), model.named_parameters()):
        assert name_ema == name, f"EMA parameter {name_ema} does not line up with {name}"
        p_ema.lerp_(p.detach(), 1.0 - decay)


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
                lines = [line for line in f if line.strip()]
            if lines and not lines[-1].endswith("\n"):  # the process was killed in the middle of this row
                lines = lines[:-1]
            rows = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
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


def mean_across_ranks(value, dist_ctx):
    """The mean of a Python float over all ranks (for logging)."""
    if not dist_ctx.enabled:
        return value
    tensor = torch.tensor(value, device=dist_ctx.device)
    dist.all_reduce(tensor)
    return tensor.item() / dist_ctx.world_size


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


def mp4_writer_problem():
    """None if imageio can write mp4 here (imageio-ffmpeg and its ffmpeg), else one line saying what to install.
    Ask before computing a video: without the plugin imageio picks another writer, which fails on the first frame."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return "imageio cannot write mp4 here: the imageio-ffmpeg package is missing (pip install imageio-ffmpeg)"
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        return f"imageio-ffmpeg finds no ffmpeg executable ({str(e).splitlines()[0]}); pip install --force-reinstall " \
               f"imageio-ffmpeg (its wheel carries one) or set IMAGEIO_FFMPEG_EXE"
    return None


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
