"""
VBench evaluation of a checkpoint (ToyBench and Table 2 on the toy world: toy_eval.py).

The VBench standard-mode protocol in three resumable steps (docs/evaluation.md).

  1. generate (with --ckpt)  every distinct prompt of --prompts x --samples (default 5) videos, sharded over
     torchrun ranks, as OUT/videos/{full prompt}-{i}.mp4 at 16 fps — the names VBench's standard mode looks
     for (docs/evaluation.md). --extended_prompts (a file aligned line by line) generates from the long text and
     names by the short one. Finished videos are skipped on a rerun; every video's seed is
     recorded (OUT/manifest.rank{r}.jsonl journals, merged into OUT/manifest.jsonl). First-frame latency and
     throughput, without decoding (as the paper reports them, §4 and Table 1) and with it, are measured on the way:
     latency = prompt encoded -> first block of latents done (frame 0, with its 4-step ASD list), + its streamed
     VAE decode; throughput = decoded frames / generation seconds (+ all decoding). Medians in OUT/timing.json.
  2. evaluate (with --vbench_cmd)  VBench runs in its own environment (it pins transformers 4.33.2 and
     numpy < 2), one call per dimension, offline: weights come from $VBENCH_CACHE_DIR and the
     files each requested dimension needs are checked before anything else happens.
  3. aggregate  Total / Quality / Semantic with VBench's normalisation constants and weights;
     a missing dimension is an error, never a silent 0. Table on stdout, OUT/scores.json and OUT/scores.csv.

  torchrun --standalone --nproc_per_node=8 vbench_eval.py --ckpt runs/dmd \\
      --wan_dir wan_models/Wan2.1-T2V-1.3B --prompts VBench/prompts/all_dimension.txt \\
      --extended_prompts VBench/prompts/augmented_prompts/Wan2.1-T2V-1.3B/all_dimension_aug_wanx_seed42.txt \\
      --out eval/dmd                                                     # generate 946 prompts x 5 on 8 GPUs
  VBENCH_CACHE_DIR=/data/vbench_weights python vbench_eval.py \\
      --prompts VBench/prompts/all_dimension.txt --out eval/dmd \\
      --vbench_cmd "/opt/vbench-venv/bin/vbench evaluate --ngpus 8"      # evaluate them, then aggregate
  python vbench_eval.py --results a_eval_results.json b_eval_results.json --out eval/x
                                                                        # aggregate VBench result files only
  python vbench_eval.py --ckpt runs/dmd --prompts p.txt --rank 3 --world_size 8 --out eval/dmd
                                                                        # one shard as a separate job (SLURM)

--vbench_cmd is the start of a command line (VBench's `vbench evaluate` entry point of another venv, or that
venv's python with VBench's evaluate.py); for each dimension we append `--videos_path OUT/videos --dimension D
--output_path OUT/vbench_results/D --load_ckpt_from_local True`, run it with HF_HUB_OFFLINE=1, and read
OUT/vbench_results/D/*_eval_results.json (a dimension whose result is newer than every video is reused).
The four GRiT dimensions need detectron2 in the VBench environment; --dimensions evaluates
a subset (the table then shows raw scores only: Total/Quality/Semantic need all 16).
Bad input is one line (SystemExit) before any file is written; videos are written to a temporary name and
renamed, so an interrupted run leaves no partial mp4 under its final name.
"""

import argparse
import glob
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import time

import torch

import common
import sample

# -----------------------------------------------------------------------------
# VBench constants

# key -> (group, weight, Min, Max). VBench's scripts/constant.py (same numbers in the leaderboard app), as
# listed in docs/evaluation.md. Result-JSON keys use underscores; constant.py spells them with spaces.
VBENCH_DIMENSIONS = {
    "subject_consistency": ("quality", 1.0, 0.1462, 1.0),
    "background_consistency": ("quality", 1.0, 0.2615, 1.0),
    "temporal_flickering": ("quality", 1.0, 0.6293, 1.0),
    "motion_smoothness": ("quality", 1.0, 0.706, 0.9975),
    "dynamic_degree": ("quality", 0.5, 0.0, 1.0),
    "aesthetic_quality": ("quality", 1.0, 0.0, 1.0),
    "imaging_quality": ("quality", 1.0, 0.0, 1.0),
    "object_class": ("semantic", 1.0, 0.0, 1.0),
    "multiple_objects": ("semantic", 1.0, 0.0, 1.0),
    "human_action": ("semantic", 1.0, 0.0, 1.0),
    "color": ("semantic", 1.0, 0.0, 1.0),
    "spatial_relationship": ("semantic", 1.0, 0.0, 1.0),
    "scene": ("semantic", 1.0, 0.0, 0.8222),
    "appearance_style": ("semantic", 1.0, 0.0009, 0.2855),
    "temporal_style": ("semantic", 1.0, 0.0, 0.364),
    "overall_consistency": ("semantic", 1.0, 0.0, 0.364),
}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0   # Total = (4·Quality + 1·Semantic) / 5

# Files each dimension loads from $VBENCH_CACHE_DIR with local=True, read from VBench's
# vbench/utils.py::init_submodules, the dimension files and pretrained/*/model_path.txt. A trailing "/" is a
# directory (DINO is loaded from a git clone through torch.hub). temporal_flickering needs no weights.
REQUIRED_WEIGHT_FILES = {
    "subject_consistency": ("dino_model/dino_vitbase16_pretrain.pth", "dino_model/facebookresearch_dino_main/"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": ("grit_model/grit_b_densecap_objectdet.pth",),
    "multiple_objects": ("grit_model/grit_b_densecap_objectdet.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "color": ("grit_model/grit_b_densecap_objectdet.pth",),
    "spatial_relationship": ("grit_model/grit_b_densecap_objectdet.pth",),
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"),
}
# ... and what GRiT and Tag2Text read from the Hugging Face hub cache instead (docs/evaluation.md)
REQUIRED_HUB_MODELS = {dimension: ("bert-base-uncased",) for dimension in
                       ("object_class", "multiple_objects", "color", "spatial_relationship", "scene")}

SAMPLES_PER_PROMPT = 5      # standard mode looks for {prompt}-0 ... {prompt}-4
VBENCH_FPS = 16             # the real fps: the container fps changes dynamic_degree's frame sampling (§3)
MAX_FILENAME_BYTES = 255    # NAME_MAX; VBench's longest prompt gives 216 bytes
TEMPORARY_SUFFIX = ".tmp.mp4"   # sample.VideoWriter writes {name}.tmp.mp4 and renames it when done
VIDEO_SEED_STRIDE = 2       # sample.sample_one draws noise from seed and re-noising from seed + 1


class VBenchError(ValueError):
    """Bad input or a failed evaluation step; the message is one line that says what to fix."""


# -----------------------------------------------------------------------------
# pure functions: file names, shards, weight files, scores


def video_filename(prompt, index):
    """The name VBench's standard mode looks for: the full prompt (never truncated — it is matched
    character for character, and human_action even parses its label out of it), '-', the sample index."""
    if not prompt or prompt != prompt.strip():
        raise VBenchError(f"prompt {prompt!r} is empty or has leading/trailing whitespace")
    if "/" in prompt or "\0" in prompt:
        raise VBenchError(f"prompt {prompt[:60]!r}... contains '/' or NUL, which cannot be part of a file name "
                          f"(no VBench prompt does)")
    name = f"{prompt}-{index}.mp4"
    longest = len((name + TEMPORARY_SUFFIX).encode("utf-8"))   # the name while the video is being written
    if longest > MAX_FILENAME_BYTES:
        raise VBenchError(f"file name of prompt {prompt[:60]!r}... needs {longest} bytes (with the temporary "
                          f"suffix), over the {MAX_FILENAME_BYTES}-byte limit, and VBench needs the untruncated prompt")
    return name


def suite_jobs(prompts, samples):
    """Every (prompt index, sample index) of the suite, in a fixed order. A prompt listed twice (VBench's
    all_dimension.txt has two) is generated once: both lines name the same files."""
    first_line = {}
    for i, prompt in enumerate(prompts):
        first_line.setdefault(prompt, i)
    return [(i, s) for i in sorted(first_line.values()) for s in range(samples)]


def shard_assignment(prompts, samples, rank, world):
    """The (prompt index, sample index) jobs of one rank: job j of suite_jobs goes to rank j % world, so
    every video is made exactly once and ranks get equal work in any world size."""
    assert world >= 1 and 0 <= rank < world, f"rank {rank} is not in a world of {world}"
    return suite_jobs(prompts, samples)[rank::world]


def video_seed(base_seed, job_index):
    """Depends only on the suite order, not on ranks: any world size (and a resume) makes the same video."""
    return base_seed + VIDEO_SEED_STRIDE * job_index


def check_dimensions(dimensions):
    unknown = [d for d in dimensions if d not in VBENCH_DIMENSIONS]
    if unknown:
        raise VBenchError(f"unknown VBench dimension(s) {', '.join(unknown)}; "
                          f"the 16 are {', '.join(VBENCH_DIMENSIONS)}")
    return list(dict.fromkeys(dimensions))


def required_weight_files(dimensions):
    """Paths under $VBENCH_CACHE_DIR that VBench loads for these dimensions (sorted, no duplicates)."""
    return sorted({path for d in check_dimensions(dimensions) for path in REQUIRED_WEIGHT_FILES[d]})


def default_hub_cache():
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")


def missing_weight_files(cache_dir, dimensions, hub_cache=None):
    """What VBench would try to download for these dimensions: files missing under cache_dir, and Hugging
    Face models missing from the hub cache (named 'huggingface hub: <model>')."""
    missing = [path for path in required_weight_files(dimensions)
               if not (os.path.isdir if path.endswith("/") else os.path.isfile)(os.path.join(cache_dir, path))]
    hub_cache = hub_cache or default_hub_cache()
    for name in sorted({m for d in dimensions for m in REQUIRED_HUB_MODELS.get(d, ())}):
        snapshots = os.path.join(hub_cache, f"models--{name.replace('/', '--')}", "snapshots")
        if not (os.path.isdir(snapshots) and os.listdir(snapshots)):
            missing.append(f"huggingface hub: {name}")
    return missing


def check_fractions(per_dimension_raw):
    for dimension, raw in per_dimension_raw.items():
        if not (isinstance(raw, (int, float)) and math.isfinite(raw) and 0.0 <= raw <= 1.0):
            raise VBenchError(f"{dimension} = {raw!r} is not a fraction in [0, 1] (VBench writes fractions, "
                              f"published tables show percents)")


def normalise(dimension, raw):
    """(raw − Min) / (Max − Min) with VBench's constants; raw is the fraction VBench writes. Not clamped
    (VBench does not clamp either)."""
    _, _, minimum, maximum = VBENCH_DIMENSIONS[check_dimensions([dimension])[0]]
    return (raw - minimum) / (maximum - minimum)


def aggregate(per_dimension_raw):
    """{dimension: raw fraction} for all 16 -> {'total', 'quality', 'semantic', 'normalised': {...}}.
    Quality / Semantic = weighted mean of the normalised scores of their group (weights sum to 6.5 and 9);
    Total = (4·Quality + 1·Semantic) / 5. A missing dimension is refused: VBench's cal_final_score.py would
    count it as 0, which is wrong and, for dimensions with Min > 0, even negative (docs/evaluation.md)."""
    check_dimensions(list(per_dimension_raw))
    missing = [d for d in VBENCH_DIMENSIONS if d not in per_dimension_raw]
    if missing:
        raise VBenchError(f"cannot aggregate: {len(missing)} dimension(s) have no result: {', '.join(missing)}")
    check_fractions(per_dimension_raw)
    normalised = {d: normalise(d, per_dimension_raw[d]) for d in VBENCH_DIMENSIONS}
    group_score = {}
    for group in ("quality", "semantic"):
        members = [d for d, (g, _, _, _) in VBENCH_DIMENSIONS.items() if g == group]
        weights = {d: VBENCH_DIMENSIONS[d][1] for d in members}
        group_score[group] = sum(weights[d] * normalised[d] for d in members) / sum(weights.values())
    total = (QUALITY_WEIGHT * group_score["quality"] + SEMANTIC_WEIGHT * group_score["semantic"]) / \
        (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"total": total, **group_score, "normalised": normalised}


def parse_vbench_results(data, source="VBench result"):
    """VBench's {name}_eval_results.json = {dimension: [aggregate score, [per-video results]]}
    -> {dimension: aggregate score}."""
    if not isinstance(data, dict):
        raise VBenchError(f"{source}: expected a JSON object {{dimension: [score, per-video list]}}")
    scores = {}
    for dimension, value in data.items():
        if dimension not in VBENCH_DIMENSIONS:
            raise VBenchError(f"{source}: unknown dimension {dimension!r} "
                              f"(this aggregates the 16 VBench T2V dimensions)")
        if not (isinstance(value, list) and value and isinstance(value[0], (int, float))
                and not isinstance(value[0], bool) and math.isfinite(value[0])):
            raise VBenchError(f"{source}: {dimension} should be [score, per-video list], got {str(value)[:80]}")
        scores[dimension] = float(value[0])
    return scores


def read_prompt_file(path, what="--prompts"):
    """One prompt per line, surrounding whitespace stripped. Empty lines are an error (they would silently
    shift an aligned extended-prompt file); trailing empty lines at the end of the file are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise VBenchError(f"cannot read {what} {path!r}: {e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise VBenchError(f"{what} {path!r} holds no prompt")
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise VBenchError(f"{what} {path!r}: line {empty[0]} is empty")
    return lines


def timing_summary(entries):
    """Medians over the videos that carry timings (the median ignores the warm-up of each rank's first
    video): first-frame latency and frames/s, each without and with decoding."""
    keys = ("first_frame_latency_s", "first_frame_latency_with_decoding_s", "frames_per_s",
            "frames_per_s_with_decoding")
    timed = [e for e in entries if all(e.get(k) is not None for k in keys)]
    if not timed:
        return None
    return {"videos_timed": len(timed), "devices": sorted({e.get("device", "?") for e in timed}),
            **{f"median_{k}": statistics.median(e[k] for e in timed) for k in keys}}


# -----------------------------------------------------------------------------
# vbench suite: files on disk (atomic writes, per-rank journals, merged manifest)


def write_atomically(path, text):
    """Temp file in the same directory, fsync, rename: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def journal_path(out_dir, rank):
    return os.path.join(out_dir, f"manifest.rank{rank}.jsonl")


def read_journal(path):
    """Entries of one rank's journal. A last line without its newline was cut by a kill and is dropped."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]   # lines[-1] is '' or a torn line


def repair_journal(path):
    """Cut a torn last line so that the next append starts on a line of its own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_journal(path, entry):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def recorded_entries(out_dir):
    """{file name: entry} over every rank's journal, for videos that exist. The journal line is written
    before the video is renamed into place, so every finished video has one; a video made twice (a kill
    between the two writes, then a rerun) keeps its newest entry — the seed is the same by construction."""
    entries = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "manifest.rank*.jsonl"))):
        for entry in read_journal(path):
            previous = entries.get(entry["file"])
            if previous is None or entry["finished_unix"] >= previous["finished_unix"]:
                entries[entry["file"]] = entry
    videos_dir = os.path.join(out_dir, "videos")
    return {name: e for name, e in entries.items() if os.path.isfile(os.path.join(videos_dir, name))}


def merge_manifests(out_dir, names_in_order):
    """Write OUT/manifest.jsonl atomically: one entry per finished video of this suite, in suite order."""
    entries = recorded_entries(out_dir)
    merged = [entries[name] for name in names_in_order if name in entries]
    write_atomically(os.path.join(out_dir, "manifest.jsonl"), "".join(json.dumps(e) + "\n" for e in merged))
    return merged


# -----------------------------------------------------------------------------
# vbench suite: generation with sample.py's loaders and sampler


class _TimedStreamDecoder:
    def __init__(self, inner, owner):
        self.inner, self.owner = inner, owner

    def decode_next(self, latents):
        start = time.time()
        frames = self.inner.decode_next(latents)
        if frames.is_cuda:
            torch.cuda.synchronize(frames.device)
        seconds = time.time() - start
        if self.owner.first_decode_seconds is None:
            self.owner.first_decode_seconds = seconds
        self.owner.decode_seconds += seconds
        return frames


class DecodeTimer:
    """Wraps a codec (Wan VAE or toy) and times its streamed decoding per video: the first block (first-frame
    latency with decoding) and all blocks (throughput with decoding). sample.sample_one's own "decode" time
    also holds the mp4 encoding of the streamed frames, which is not decoding."""

    def __init__(self, codec):
        self.codec = codec
        self.first_decode_seconds, self.decode_seconds = None, 0.0

    def __getattr__(self, name):   # spatial_factor, decode, ... of the wrapped codec
        return getattr(self.__dict__["codec"], name)

    def stream_decoder(self):   # sample_one asks for one per video
        self.first_decode_seconds, self.decode_seconds = None, 0.0
        return _TimedStreamDecoder(self.codec.stream_decoder(), self)


def load_vbench_generator(args, device):
    """checkpoint -> model, sampling, text encoder, codec and latent shape, through sample.py's loader and
    sampler, so VBench videos are made by exactly the code path of `python sample.py` (Wan scale with --wan_dir)."""
    import encoders
    model, info = sample.load_for_inference(args.ckpt, use_ema=args.use_ema, wan_dir=args.wan_dir,
                                            frames_per_block=args.frames_per_block)
    how = sample.choose_sampling(info, args.steps, args.sample_steps, args.first_frame_steps, args.cfg, args.shift)
    height, width, num_frames, _, _ = sample.video_size(model, info, args.num_frames, args.height, args.width)
    toy = info["text_encoder"] == "toy"
    codec_device = torch.device("cpu") if toy else device
    text = encoders.load_text_encoder(info["text_encoder"], device)
    codec = DecodeTimer(encoders.load_codec(info["codec"], codec_device))
    factor = codec.spatial_factor
    if height % (2 * factor) or width % (2 * factor):
        raise VBenchError(f"--height/--width must be multiples of {2 * factor}, got {height}x{width}")
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    signature = {"checkpoint": os.path.abspath(info["path"]), "use_ema": bool(args.use_ema),
                 "sampling": how.describe(), "base_seed": args.seed, "latent_frames": num_frames, "height": height,
                 "width": width}
    return dict(model=model, info=info, how=how, text=text, codec=codec, codec_device=codec_device, toy=toy,
                shape=(num_frames, model.cfg.in_dim, height // factor, width // factor), signature=signature,
                device=device)


def check_resume(out_dir, names, texts_by_name, signature):
    """Videos already in OUT must come from this checkpoint, sampling, seed and text: a folder that mixes
    models or seeds would be evaluated as one model without anyone noticing."""
    for name, entry in recorded_entries(out_dir).items():
        if name not in names:
            continue
        for key, value in signature.items():
            if entry.get(key) != value:
                raise VBenchError(f"{os.path.join(out_dir, 'videos', name)} was made with {key} = {entry.get(key)!r}, "
                                  f"this run has {value!r}; resume with the same settings or use another --out")
        if entry.get("generated_from") != texts_by_name[name]:
            raise VBenchError(f"{name} was generated from {entry.get('generated_from')!r}, this run would use "
                              f"{texts_by_name[name]!r} (--extended_prompts changed?); use another --out")


def generate_shard(generator, jobs, prompts, texts, out_dir, rank, world, quiet=False):
    """Make this rank's missing videos. Each: stream-decoded into a temporary mp4, its journal line
    appended and fsynced, then renamed into place. Returns the number of videos made."""
    videos_dir = os.path.join(out_dir, "videos")
    journal = journal_path(out_dir, rank)
    repair_journal(journal)
    todo = [(j, p, s) for j, (p, s) in jobs
            if not os.path.isfile(os.path.join(videos_dir, video_filename(prompts[p], s)))]
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{prefix}{len(jobs)} videos in this shard, {len(jobs) - len(todo)} already done, {len(todo)} to make",
          flush=True)
    codec = generator["codec"]
    for count, (job_index, prompt_index, sample_index) in enumerate(todo, 1):
        name = video_filename(prompts[prompt_index], sample_index)
        seed = video_seed(generator["signature"]["base_seed"], job_index)
        writer = sample.VideoWriter(os.path.join(videos_dir, name), VBENCH_FPS, 1)
        try:
            video, timings = sample.sample_one(generator["model"], generator["how"], generator["text"], codec,
                                               generator["codec_device"], texts[prompt_index], seed,
                                               generator["shape"], None, writer, quiet=True)
            frames = video.shape[0]
            entry = {"file": name, "prompt": prompts[prompt_index], "generated_from": texts[prompt_index],
                     "prompt_line": prompt_index + 1, "sample_index": sample_index, "seed": seed, "job": job_index,
                     "rank": rank, "frames": frames, "fps": VBENCH_FPS,
                     "first_frame_latency_s": timings["first_block"],
                     "first_frame_latency_with_decoding_s": timings["first_block"] + codec.first_decode_seconds,
                     "frames_per_s": frames / timings["generate"],
                     "frames_per_s_with_decoding": frames / (timings["generate"] + codec.decode_seconds),
                     "device": str(generator["device"]), "finished_unix": time.time(), **generator["signature"]}
            append_journal(journal, entry)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if not quiet:
            print(f"{prefix}{count}/{len(todo)} {name[:70]} seed {seed}: first frame "
                  f"{entry['first_frame_latency_s'] * 1000:.0f} ms "
                  f"({entry['first_frame_latency_with_decoding_s'] * 1000:.0f} with decoding), "
                  f"{entry['frames_per_s']:.1f} frames/s ({entry['frames_per_s_with_decoding']:.1f})", flush=True)
    return len(todo)


# -----------------------------------------------------------------------------
# vbench suite: running VBench in its own environment


def check_vbench_environment(command, dimensions):
    """Everything the evaluation needs, checked before generation: the command exists, VBENCH_CACHE_DIR is
    set and holds every weight file of the requested dimensions (else VBench would wget them)."""
    try:
        parts = shlex.split(command)
    except ValueError as e:
        raise VBenchError(f"--vbench_cmd {command!r}: {e}") from None
    if not parts:
        raise VBenchError("--vbench_cmd is empty")
    if shutil.which(parts[0]) is None:
        raise VBenchError(f"--vbench_cmd: {parts[0]!r} is not an executable (give the path of the VBench venv's "
                          f"`vbench` or `python`)")
    cache_dir = os.environ.get("VBENCH_CACHE_DIR")
    if not cache_dir or not os.path.isdir(cache_dir):
        raise VBenchError(f"VBENCH_CACHE_DIR={cache_dir!r} is not a directory: point it at the VBench weights "
                          f"(docs/evaluation.md lists them); nothing is downloaded")
    missing = missing_weight_files(cache_dir, dimensions)
    if missing:
        raise VBenchError(f"VBENCH_CACHE_DIR={cache_dir} lacks {len(missing)} weight file(s) for "
                          f"{', '.join(dimensions) if len(dimensions) < 4 else f'{len(dimensions)} dimensions'}: "
                          f"{', '.join(missing)}")
    return parts, cache_dir


def dimension_result(directory, dimension):
    """(score, file, mtime) of the newest VBench result file in directory that holds this dimension."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*_eval_results.json")):
        try:
            with open(path) as f:
                scores = parse_vbench_results(json.load(f), path)
        except (OSError, ValueError):
            continue
        if dimension in scores:
            found.append((os.path.getmtime(path), scores[dimension], path))
    if not found:
        return None
    mtime, score, path = max(found)
    return score, path, mtime


def run_vbench(command_parts, cache_dir, videos_dir, results_dir, dimensions):
    """One VBench call per dimension (the `vbench evaluate` CLI takes one; a failed dimension does not cost
    the others) -> {dimension: raw score}. Output and log of each in results_dir/<dimension>/."""
    newest_video = max(os.path.getmtime(p) for p in glob.glob(os.path.join(glob.escape(videos_dir), "*.mp4")))
    env = {**os.environ, "VBENCH_CACHE_DIR": os.path.abspath(cache_dir), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    raw = {}
    for dimension in dimensions:
        directory = os.path.abspath(os.path.join(results_dir, dimension))
        previous = dimension_result(directory, dimension)
        if previous is not None and previous[2] >= newest_video:
            raw[dimension] = previous[0]
            print(f"  {dimension:<24} {previous[0]:.4f}  (reused {previous[1]})")
            continue
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(directory), "*_eval_results.json")):
            os.remove(stale)   # older than a video: these videos were never scored
        log = os.path.join(directory, "vbench.log")
        command = command_parts + ["--videos_path", os.path.abspath(videos_dir), "--dimension", dimension,
                                   "--output_path", directory, "--load_ckpt_from_local", "True"]
        start = time.time()
        with open(log, "w") as f:
            f.write(shlex.join(command) + "\n")
            f.flush()
            returncode = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=directory).returncode
        result = dimension_result(directory, dimension)
        if returncode != 0 or result is None:   # the vbench CLI itself exits 0 even when its torchrun failed
            raise VBenchError(f"VBench {'failed' if returncode else 'wrote no result'} for {dimension} "
                              f"(exit code {returncode}); see {log}")
        raw[dimension] = result[0]
        print(f"  {dimension:<24} {result[0]:.4f}  ({time.time() - start:.0f} s)", flush=True)
    return raw


# -----------------------------------------------------------------------------
# vbench suite: the score table, scores.json, scores.csv


def score_rows(raw):
    """Rows (name, group, weight, score, normalised) as fractions; Total/Quality/Semantic first when all
    16 dimensions are there."""
    rows = []
    scores = aggregate(raw) if all(d in raw for d in VBENCH_DIMENSIONS) else None
    if scores is not None:
        rows += [("total", "", QUALITY_WEIGHT + SEMANTIC_WEIGHT, scores["total"], None),
                 ("quality", "quality", QUALITY_WEIGHT, scores["quality"], None),
                 ("semantic", "semantic", SEMANTIC_WEIGHT, scores["semantic"], None)]
    for dimension, (group, weight, _, _) in VBENCH_DIMENSIONS.items():
        if dimension in raw:
            rows.append((dimension, group, weight, raw[dimension], normalise(dimension, raw[dimension])))
    return rows, scores


def report_scores(raw, requested, out_dir, extra):
    """Print the table and write OUT/scores.json + OUT/scores.csv. All 16 requested: every one must have
    a result (aggregate refuses otherwise); a requested subset is reported without the totals."""
    check_fractions(raw)
    if len(requested) == len(VBENCH_DIMENSIONS):
        aggregate(raw)   # raises, naming the missing dimensions
    rows, scores = score_rows(raw)
    print(f"{'VBench':<26}{'group':<10}{'weight':>6}{'score %':>10}{'normalised %':>14}")
    for name, group, weight, score, normalised in rows:
        print(f"{name:<26}{group:<10}{weight:>6g}{100 * score:>10.2f}"
              f"{'' if normalised is None else f'{100 * normalised:14.2f}'}")
    if scores is None:
        print(f"no Total/Quality/Semantic: they need all 16 dimensions "
              f"(missing: {', '.join(d for d in VBENCH_DIMENSIONS if d not in raw)})")
    os.makedirs(out_dir, exist_ok=True)
    summary = {**({k: scores[k] for k in ("total", "quality", "semantic")} if scores else {}),
               "dimensions": {name: {"group": group, "weight": weight, "raw": score, "normalised": normalised}
                              for name, group, weight, score, normalised in rows if normalised is not None},
               "units": "fractions in [0, 1] as VBench writes them; tables and scores.csv show percent",
               **extra}
    write_atomically(os.path.join(out_dir, "scores.json"), json.dumps(summary, indent=2) + "\n")
    csv = "name,group,weight,score_percent,normalised_percent\n" + "".join(
        f"{name},{group},{weight:g},{100 * score:.4f},{'' if normalised is None else f'{100 * normalised:.4f}'}\n"
        for name, group, weight, score, normalised in rows)
    write_atomically(os.path.join(out_dir, "scores.csv"), csv)
    print(f"wrote {os.path.join(out_dir, 'scores.json')} and scores.csv")
    return summary


def print_timing(timing):
    if timing is None:
        print("no timings recorded for these videos")
        return
    print(f"timing (median of {timing['videos_timed']} videos on {', '.join(timing['devices'])}): first frame "
          f"{timing['median_first_frame_latency_s']:.3f} s without decoding, "
          f"{timing['median_first_frame_latency_with_decoding_s']:.3f} s with; throughput "
          f"{timing['median_frames_per_s']:.2f} frames/s without decoding, "
          f"{timing['median_frames_per_s_with_decoding']:.2f} with")


# -----------------------------------------------------------------------------
# vbench suite: main


def check_videos_exist(videos_dir, names):
    missing = [n for n in names if not os.path.isfile(os.path.join(videos_dir, n))]
    if missing:
        raise VBenchError(f"{len(missing)} of {len(names)} videos are missing in {videos_dir} (first: {missing[0]!r}); "
                          f"generate them with --ckpt first")


def ranks(args):
    """(rank, world, launched_by_torchrun). Ranks need no communication while generating (each takes every
    world-th video); torchrun's ranks meet once at the end through a gloo barrier with a long timeout, since
    shards that resume with different amounts of work may finish hours apart."""
    if args.rank is not None or args.world_size is not None:
        if args.rank is None or args.world_size is None or not 0 <= args.rank < args.world_size:
            raise VBenchError(f"--rank {args.rank} / --world_size {args.world_size}: give both, 0 <= rank < world_size")
        return args.rank, args.world_size, False
    if "RANK" not in os.environ:
        return 0, 1, False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1 and not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=7))
    return rank, world, world > 1


def vbench_suite(args):
    """Returns the scores summary (or None when this process only generated)."""
    samples = args.samples
    out_dir = args.out
    requested = check_dimensions(args.dimensions or list(VBENCH_DIMENSIONS))

    # ---- aggregate given result files only
    if args.results:
        raw = {}
        for path in args.results:
            try:
                with open(path) as f:
                    scores = parse_vbench_results(json.load(f), path)
            except (OSError, json.JSONDecodeError) as e:
                raise VBenchError(f"cannot read --results {path!r}: {e}") from None
            clash = [d for d in scores if d in raw and raw[d] != scores[d]]
            if clash:
                raise VBenchError(f"{path}: {', '.join(clash)} already given with another value by an earlier file")
            raw.update(scores)
        return report_scores({d: raw[d] for d in requested if d in raw}, requested, out_dir,
                             {"results_files": [os.path.abspath(p) for p in args.results]})

    # ---- prompts and file names: every name is checked before any work is done
    if not args.prompts:
        raise VBenchError("--suite vbench needs --prompts FILE (e.g. VBench's prompts/all_dimension.txt) or --results")
    if not args.ckpt and not args.vbench_cmd:
        raise VBenchError("nothing to do: give --ckpt to generate videos and/or --vbench_cmd to evaluate them")
    prompts = read_prompt_file(args.prompts)
    texts = prompts
    if args.extended_prompts:
        texts = read_prompt_file(args.extended_prompts, "--extended_prompts")
        if len(texts) != len(prompts):
            raise VBenchError(f"--extended_prompts has {len(texts)} lines, --prompts {len(prompts)}: they must be "
                              f"aligned line by line")
    jobs = suite_jobs(prompts, samples)
    names = [video_filename(prompts[p], s) for p, s in jobs]
    texts_by_name = {name: texts[p] for name, (p, _) in zip(names, jobs)}
    if samples != SAMPLES_PER_PROMPT:
        print(f"note: --samples {samples}; VBench's standard mode expects {SAMPLES_PER_PROMPT} per prompt")

    # ---- the VBench environment, checked up front (not after hours of generation)
    rank, world, launched = ranks(args)
    if args.vbench_cmd:
        if world > 1 and not launched:
            raise VBenchError("--vbench_cmd with --rank/--world_size: evaluate in one separate call once every "
                              "shard is done (without --ckpt)")
        command_parts, cache_dir = check_vbench_environment(args.vbench_cmd, requested)
        if not args.ckpt:
            check_videos_exist(os.path.join(out_dir, "videos"), names)

    # ---- generation (this rank's shard; finished videos are skipped)
    videos_dir = os.path.join(out_dir, "videos")
    if args.ckpt:
        problem = common.mp4_writer_problem()  # before any video is generated, so none is made and then lost
        if problem:
            raise VBenchError(problem)
        device_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_name == "cuda" else \
            torch.device(device_name)
        try:
            generator = load_vbench_generator(args, device)
        except (sample.SampleError, FileNotFoundError) as e:
            raise VBenchError(str(e).splitlines()[0]) from None
        if generator["toy"]:
            sample.check_toy_prompts([texts[p] for p, _ in jobs])
        check_resume(out_dir, set(names), texts_by_name, generator["signature"])
        os.makedirs(videos_dir, exist_ok=True)
        job_index = {job: j for j, job in enumerate(jobs)}   # the seed follows the suite order, not the rank
        shard = [(job_index[job], job) for job in shard_assignment(prompts, samples, rank, world)]
        print(f"{generator['info']['path']}: {generator['signature']['sampling']}, "
              f"{generator['shape'][0]} latent frames, {device}; {len(jobs)} videos "
              f"({len(set(prompts))} prompts x {samples}) -> {videos_dir}", flush=True)
        generate_shard(generator, shard, prompts, texts, out_dir, rank, world, quiet=args.quiet)
    if launched:   # every rank's videos are on disk after this
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None

    # ---- manifest (seeds) and timing, merged over all ranks and runs
    entries = merge_manifests(out_dir, names) if os.path.isdir(videos_dir) else []
    finished = sum(os.path.isfile(os.path.join(videos_dir, n)) for n in names)
    print(f"{finished}/{len(names)} videos in {videos_dir}, {len(entries)} with a recorded seed "
          f"({os.path.join(out_dir, 'manifest.jsonl')})")
    timing = timing_summary(entries)
    if entries:
        print_timing(timing)
    if timing is not None:
        write_atomically(os.path.join(out_dir, "timing.json"), json.dumps(timing, indent=2) + "\n")
    if not args.vbench_cmd:
        return None

    # ---- VBench, one dimension at a time, then the aggregate
    check_videos_exist(videos_dir, names)
    print(f"VBench on {videos_dir} ({len(requested)} dimensions, {args.vbench_cmd})", flush=True)
    raw = run_vbench(command_parts, cache_dir, videos_dir, os.path.join(out_dir, "vbench_results"), requested)
    return report_scores(raw, requested, out_dir, {"videos": len(names), "timing": timing,
                                                   "checkpoint": entries[0].get("checkpoint") if entries else None})


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["vbench", "toy"], default="vbench",
                        help="vbench (the only suite here; 'toy' moved to toy_eval.py)")
    parser.add_argument("--ckpt", help="checkpoint or run directory (its latest), a Wan folder, or an official .pt "
                        "with --wan_dir, as in sample.py")
    sample.add_sampling_arguments(parser)
    parser.add_argument("--samples", type=int, default=SAMPLES_PER_PROMPT, help="videos per prompt (VBench's "
                        f"standard mode expects {SAMPLES_PER_PROMPT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", help="one prompt per line (VBench: prompts/all_dimension.txt)")
    parser.add_argument("--extended_prompts", help="generate from these lines instead (aligned with --prompts); "
                        "videos keep the --prompts names")
    parser.add_argument("--out", default="vbench_out", help="OUT: videos/, manifest.jsonl, vbench_results/, scores.*")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rank", type=int, help="this shard when shards run as separate jobs (default: torchrun's)")
    parser.add_argument("--world_size", type=int, help="number of shards when they run as separate jobs")
    parser.add_argument("--vbench_cmd", help="VBench command of its own environment, e.g. "
                        "'/opt/vbench-venv/bin/vbench evaluate --ngpus 8'; weights from $VBENCH_CACHE_DIR")
    parser.add_argument("--dimensions", nargs="+", help="evaluate these dimensions only (default: all 16)")
    parser.add_argument("--results", nargs="+", help="aggregate these VBench *_eval_results.json files and stop")
    parser.add_argument("--quiet", action="store_true", help="no line per video")
    args = parser.parse_args(argv)
    if args.suite == "toy":
        parser.error("ToyBench moved to toy_eval.py: python toy_eval.py score --ckpt CKPT "
                     "(Table 2 in miniature: python toy_eval.py ablation)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return vbench_suite(args)
    except (VBenchError, sample.SampleError) as e:
        raise SystemExit(f"vbench_eval.py: error: {e}") from None


if __name__ == "__main__":
    main()
