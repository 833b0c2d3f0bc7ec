"""
Evaluation on the toy world, on CPU: ToyBench (toyworld.py) of any checkpoint of this repo, and the paper's
Table 2 in miniature, and the camera world of the action-conditioned world model. Each command has its own --help:

  score     ToyBench of one checkpoint on the 23 held-out prompts x --samples (default 2, as docs/results.md).
            The checkpoint says what it is and is sampled that way (sample.py): a few-step student with its
            1/2/4-step rollout (first frame 4 steps, the ASD trick), the Stage-1 AR diffusion model and the
            bidirectional toy base with 40 Euler steps and CFG 3.

    python toy_eval.py score --ckpt checkpoints/toy/dmd_2step                 # shipped student, 2 steps
    python toy_eval.py score --ckpt runs/toy/cd --use_ema --steps 4           # a Stage-2 student at 4 steps
    python toy_eval.py score --ckpt runs/toy/tf --use_ema                     # AR diffusion, 40 steps, CFG 3
    python toy_eval.py score --ckpt checkpoints/toy/base                      # the bidirectional base

  ablation  Table 2 (paper §4.2): which Stage-2 initialisation makes the best Stage-3 student? The same toy
            Stage-3 config (configs/toy/dmd_{n}step.yaml) runs from the Stage-1 model itself, the causal-ODE
            student and the causal-CD student (finished runs are reused, stopped ones continued), and every EMA
            generator is scored like `score`, with the Stage-2 cost (teacher forwards, seconds, bytes stored).

    python toy_eval.py ablation --steps 1 2 4 --json runs/toy/ablation.json  # make ablation

  oracle    The oracle gap of a bidirectional model (the toy base): on fixed one-object moving training clips,
            its flow-matching loss at each σ with the true prompt and with the direction word flipped, beside
            the loss of the exact (Bayes) denoiser, which knows the renderer (toyworld.exact_x0), with the true
            prompt and with the direction left open. The exact loss is the lowest any model can reach on these
            draws; "gap" is the model's loss over it, and "direction" is what the direction word is worth to
            the model (flipped − true) and to the exact denoiser (open − true).

    python toy_eval.py oracle --ckpt checkpoints/toy/base --sigmas 0.97,0.95,0.9,0.8,0.6

  camera    A camera-conditioned model (paper §3.3; docs/world_model.md) on the camera world: every held-out
            prompt under a still camera (ToyBench of the objects), a smooth random pan (action following: the
            pan seen in the pixels against the commanded one, px/frame) and a there-and-back pan (revisit
            consistency: does the static scene of frame 0 reappear in the last frame), beside the ground truth.

    python toy_eval.py camera --ckpt runs/toy/camera_base --use_ema

Held-out prompts are (colour, shape, motion) combinations that never occur in training (toyworld.HELDOUT), so
the semantic score measures composition, not memory. Every prompt is sampled --samples times from fixed seeds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import common
import sample

# -----------------------------------------------------------------------------
# ToyBench of one model


def load_model(path, use_ema):
    """A toy checkpoint -> (model, path of the checkpoint read), through sample.py's loader (the toy world
    supplies the text encoder and codec, and the architecture of an official-format .pt)."""
    model, info = sample.load_for_inference(path, use_ema=use_ema, wan_dir="toy")
    return model, info["path"]


@torch.no_grad()
def sample_toy(model, prompts, *, seed=0, steps=None, sample_steps=40, guidance_scale=3.0, shift=5.0, how=None,
               batch_size=32, cameras=None):
    """Videos [N, T, 3, H, W] for prompts [N] (noise of prompt i from seed + i), in batches, through
    sample.sample_latents. how: a sample.Sampling; without it, steps = a nominal few-step list (first frame
    4 steps), else `sample_steps`-step Euler with CFG. cameras: (world_to_camera [N, T, 4, 4], intrinsics
    [N, T, 3, 3]) for a camera-conditioned model."""
    import toyworld
    if how is None:
        how = (sample.Sampling("few_step", steps=tuple(steps), shift=shift) if steps is not None else
               sample.Sampling("multi_step", sample_steps=sample_steps, cfg=guidance_scale, shift=shift))
    text, codec = toyworld.ToyTextEncoder(), toyworld.ToyCodec()
    shape = (toyworld.TOY_FRAMES, toyworld.TOY_LATENT_CHANNELS, toyworld.TOY_LATENT_SIZE, toyworld.TOY_LATENT_SIZE)
    videos = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i))
                             for i in range(len(batch))])  # [b, F, C, H, W]
        uncond = text.encode([text.negative_prompt] * len(batch)) if how.mode == "multi_step" else None
        batch_cameras = None if cameras is None else tuple(c[first:first + batch_size] for c in cameras)
        latents = sample.sample_latents(model, how, noise, text.encode(batch), uncond,
                                        generator=torch.Generator().manual_seed(seed + first), cameras=batch_cameras)
        videos.append(codec.decode(latents))
    return torch.cat(videos)


def heldout_prompts(samples):
    import toyworld
    return [p for p in toyworld.heldout_prompts() for _ in range(samples)]


def score_checkpoint(args):
    import toyworld
    model, info = sample.load_for_inference(args.ckpt, use_ema=args.use_ema, wan_dir="toy")
    how = sample.choose_sampling(info, args.steps, args.sample_steps, cfg=args.cfg)
    prompts = heldout_prompts(args.samples)
    start = time.time()
    videos = sample_toy(model, prompts, seed=args.seed, how=how)
    seconds = time.time() - start
    scores = toyworld.score(videos, prompts)
    toyworld.print_table({args.name or f"{info['path']} ({how.describe()})": scores})
    print(f"{len(prompts)} videos ({len(set(prompts))} held-out prompts x {args.samples}) in {seconds:.1f} s")
    if args.png:
        common.save_png_grid(videos[::args.samples][:8], args.png, scale=2)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": info["path"], "sampling": how.describe(), "seconds": seconds,
                       **{k: v for k, v in scores.items() if k != "per_video"}}, f, indent=2)
        print(f"wrote {args.json}")
    return scores


# the shipped toy models, teacher first: what `make demo` compares (name, checkpoint, steps per frame)
SHIPPED = (("teacher: bidirectional base", "checkpoints/toy/base", None),
           ("Stage 3 student, 1 step", "checkpoints/toy/dmd_1step", 1),
           ("Stage 3 student, 2 steps", "checkpoints/toy/dmd_2step", 2),
           ("Stage 3 student, 4 steps", "checkpoints/toy/dmd_4step", 4))


def compare_shipped(args):
    """The teacher against the 1/2/4-step students on the same held-out prompts and noise: ToyBench, seconds,
    and a strip with one row per model for each of the first prompts."""
    import toyworld
    prompts = heldout_prompts(args.samples)[:args.prompts * args.samples]
    rows, strips, seconds = {}, [], {}
    for name, ckpt, steps in SHIPPED:
        model, info = sample.load_for_inference(ckpt, use_ema=False, wan_dir="toy")
        how = sample.choose_sampling(info, steps, None, cfg=args.cfg)
        start = time.time()
        videos = sample_toy(model, prompts, seed=args.seed, how=how)
        label = f"{name} ({how.describe()})"
        seconds[label] = time.time() - start
        rows[label] = toyworld.score(videos, prompts)
        strips.append(videos[::args.samples][:4])
    toyworld.print_table(rows)
    for label, s in seconds.items():
        print(f"{label}: {len(prompts)} videos in {s:.1f} s")
    print(f"{len(set(prompts))} held-out prompts x {args.samples}, the same noise for every model")
    if args.png:
        grid = torch.stack([strip[i] for i in range(len(strips[0])) for strip in strips])  # prompt-major
        common.save_png_grid(grid, args.png, scale=2)
        print(f"wrote {args.png}: for each of the first {len(strips[0])} prompts, one row per model "
              f"({', '.join(name for name, _, _ in SHIPPED)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({label: {"seconds": seconds[label], **{k: v for k, v in r.items() if k != "per_video"}}
                       for label, r in rows.items()}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


# -----------------------------------------------------------------------------
# the camera world: action following, objects, revisit consistency (paper §3.3)


def camera_rows(videos, items):
    """Scores of camera-world clips (in the order of toyworld.camera_eval_set) -> one row: pan error (px per
    frame, over the "pan" and "revisit" clips), revisit consistency, and ToyBench semantic of the "still" clips
    (its quality metrics count the landmarks as stray pixels, so they are left out)."""
    import toyworld
    kinds = {kind: [i for i, item in enumerate(items) if item["kind"] == kind] for kind in ("still", "pan", "revisit")}
    moving = kinds["pan"] + kinds["revisit"]
    row = dict(pan_error=sum(toyworld.pan_error(videos[i], items[i]["pans"]) for i in moving) / len(moving))
    still_colours = lambda prompt: [o["colour"] for o in toyworld.parse_prompt(prompt) if o["motion"] == "still"]
    row["revisit"] = sum(toyworld.revisit_consistency(videos[i], still_colours(items[i]["prompt"]))
                         for i in kinds["revisit"]) / len(kinds["revisit"])
    still = toyworld.score(videos[kinds["still"]], [items[i]["prompt"] for i in kinds["still"]])
    row.update({k: still[k] for k in ("semantic", "colour", "shape", "direction", "speed")})
    return row


def format_camera_table(rows):
    heads = ("pan err px", "revisit", "semantic", "colour", "shape", "direction", "speed")
    width = max(len("name"), *(len(n) for n in rows))
    lines = [f"{'name':<{width}} " + " ".join(f"{h:>10}" for h in heads)]
    for name, r in rows.items():
        cells = [f"{r['pan_error']:10.2f}"] + [f"{100 * r[k]:10.1f}" for k in
                                               ("revisit", "semantic", "colour", "shape", "direction", "speed")]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def camera_checkpoint(args):
    """The camera-world evaluation of one camera-conditioned checkpoint, beside the ground truth."""
    import toyworld
    model, info = sample.load_for_inference(args.ckpt, use_ema=args.use_ema, wan_dir="toy")
    if model.cfg.camera_dims == 0:
        raise sample.SampleError(f"{info['path']} takes no cameras (camera_dims = 0); train one on camera-world "
                                 f"data (docs/world_model.md)")
    how = sample.choose_sampling(info, args.steps, args.sample_steps, cfg=args.cfg)
    items = toyworld.camera_eval_set(args.samples)
    truth = [toyworld.render_camera_clip(item["prompt"], item["seed"], pans=item["pans"]) for item in items]
    cameras = (torch.stack([c["world_to_camera"] for c in truth]), torch.stack([c["intrinsics"] for c in truth]))
    start = time.time()
    videos = sample_toy(model, [item["prompt"] for item in items], seed=args.seed, how=how, cameras=cameras)
    seconds = time.time() - start
    truth_videos = torch.stack([c["video"] for c in truth])  # [N, T, 3, H, W]
    rows = {"ground truth": camera_rows(truth_videos, items),
            # the floor a model must beat: its first frame frozen, so the view never moves
            "ground truth, camera ignored": camera_rows(truth_videos[:, :1].expand_as(truth_videos), items),
            args.name or f"{info['path']} ({how.describe()})": camera_rows(videos, items)}
    print(format_camera_table(rows))
    print(f"{len(items)} videos (23 held-out prompts x {args.samples} x still/pan/revisit cameras) in {seconds:.1f} s")
    if args.png:  # steered rollouts: each commanded camera path as the ground truth shows it, then as generated
        pick = [i for i, item in enumerate(items) if item["kind"] != "still"][:4]
        pairs = [video for i in pick for video in (truth[i]["video"], videos[i].cpu())]
        common.save_png_grid(torch.stack(pairs), args.png, scale=2)
        print(f"wrote {args.png}: rows = ground truth, generated, for the first {len(pick)} pan/revisit paths")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": info["path"], "sampling": how.describe(), "seconds": seconds, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return rows


# -----------------------------------------------------------------------------
# the oracle gap: a bidirectional model against the exact denoiser


def flip_direction(prompt):
    swap = {"left": "right", "right": "left", "up": "down", "down": "up"}
    return " ".join(swap.get(word, word) for word in prompt.split())


@torch.no_grad()
def oracle_gap(model, text, x0, prompts, candidates, sigmas, seed=0, batch_size=16):
    """Per σ: the model's flow-matching loss with the true and the direction-flipped prompt, and the exact
    denoiser's with the true prompt and with the direction open. candidates(i, open_direction) -> [N, D]: every
    clip prompt i renders to (all four directions if open_direction); called once per clip and dropped after,
    since all of them together do not fit in memory. All on the same clips x0 [B, F, C, H, W] and noise.
    v-space loss of a clean-clip estimate x̂0: mean((x̂0 − x0)²)/σ², since v̂ − v = (x0 − x̂0)/σ."""
    import model as M
    import toyworld
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    context, flipped = text.encode(prompts), text.encode([flip_direction(p) for p in prompts])
    t = {sigma: torch.full(x0.shape[:2], sigma * 1000.0) for sigma in sigmas}     # [B, F] each
    x_t = {sigma: M.add_noise(x0, noise, t[sigma]) for sigma in sigmas}
    rows = {sigma: {} for sigma in sigmas}
    for sigma in sigmas:
        for name, ctx in (("model", context), ("model_flipped", flipped)):
            v = torch.cat([model(x_t[sigma][i:i + batch_size], t[sigma][i:i + batch_size], ctx[i:i + batch_size],
                                 causal=False) for i in range(0, len(x0), batch_size)])
            rows[sigma][name] = (v.float() - (noise - x0)).pow(2).mean().item()
    squared = {(sigma, name): 0.0 for sigma in sigmas for name in ("exact", "exact_open")}
    for i in range(len(x0)):
        for name, open_direction in (("exact", False), ("exact_open", True)):
            cands = candidates(i, open_direction)
            for sigma in sigmas:
                x0_hat = toyworld.exact_x0(x_t[sigma][i].flatten(), sigma, cands)
                squared[sigma, name] += (x0_hat - x0[i].flatten()).pow(2).sum().item()
    for sigma, row in rows.items():
        for name in ("exact", "exact_open"):
            row[name] = squared[sigma, name] / x0.numel() / sigma ** 2
        row["gap"] = row["model"] / row["exact"] if row["exact"] > 0 else float("inf")   # σ low: exact finds x0
        row["direction_model"] = row["model_flipped"] - row["model"]
        row["direction_exact"] = row["exact_open"] - row["exact"]
    return rows


def format_oracle_table(rows):
    heads = ("σ", "model", "dir flipped", "exact", "exact, dir open", "gap", "dir: model", "dir: exact")
    keys = ("model", "model_flipped", "exact", "exact_open")
    lines = [" ".join(f"{h:>15}" for h in heads)]
    for sigma, r in rows.items():
        cells = [f"{sigma:>15}"] + [f"{r[k]:15.4f}" for k in keys] + [f"{r['gap']:14.1f}x"] + \
                [f"{r['direction_model']:15.4f}", f"{r['direction_exact']:15.4f}"]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def moving_clips(rng, n):
    """n one-object clips with a linear motion, from the training distribution -> (objects, videos [n, T, 3, H, W])."""
    import toyworld
    objects, clips = [], []
    while len(objects) < n:
        obj = toyworld.sample_objects(rng, p_two=0)[0]
        if obj["motion"] in ("left", "right", "up", "down"):
            objects.append(obj)
            clips.append(toyworld.draw([obj], toyworld.place([obj], rng)))
    return objects, torch.stack(clips)


def oracle_checkpoint(args):
    import random

    import toyworld
    model, info = sample.load_for_inference(args.ckpt, use_ema=args.use_ema, wan_dir="toy")
    if model.cfg.causal:
        raise sample.SampleError(f"{info['path']} is a causal model; the oracle gap is defined for a bidirectional "
                                 f"one (e.g. checkpoints/toy/base)")
    codec = toyworld.ToyCodec()
    objects, clips = moving_clips(random.Random(f"toy-oracle-{args.seed}"), args.clips)
    x0 = codec.encode(clips)   # [B, F, C, H, W]

    def candidates(i, open_direction):   # [N, D] latents of every clip the prompt allows
        motions = ("left", "right", "up", "down") if open_direction else (objects[i]["motion"],)
        return codec.encode(torch.cat([toyworld.candidate_clips(dict(objects[i], motion=m)) for m in motions])).flatten(1)
    start = time.time()
    rows = oracle_gap(model, toyworld.ToyTextEncoder(), x0, [toyworld.make_prompt([o]) for o in objects],
                      candidates, [float(s) for s in args.sigmas.split(",")], seed=args.seed)
    print(f"{info['path']}: {args.clips} one-object moving training clips, {time.time() - start:.0f} s")
    print(format_oracle_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": info["path"], "clips": args.clips, "seed": args.seed,
                       "rows": {str(s): r for s, r in rows.items()}}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


# -----------------------------------------------------------------------------
# Table 2 in miniature

ABLATION_INITS = (  # (row name, Stage-2 run, its config or None, Stage-3 out_dir suffix)
    ("Stage-1 AR diffusion (no Stage 2)", "runs/toy/tf", None, "_from_tf"),
    ("causal ODE (Stage 2 baseline)", "runs/toy/ode", "configs/toy/ode.yaml", "_from_ode"),
    ("causal CD (Stage 2, ours)", "runs/toy/cd", "configs/toy/cd.yaml", ""),
)


def stage2_cost(run_dir):
    """Teacher forwards, seconds and bytes stored by a Stage-2 run, from its metrics.jsonl: the ODE data cost
    (trajectory generation, logged once as ode/*) plus the training steps' teacher forwards and seconds (CD
    calls its teacher every step; ODE regression does not). A Stage-1 model used directly costs nothing."""
    cost = dict(teacher_forwards=0.0, seconds=0.0, bytes_stored=0.0)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(os.path.join(common.resolve_checkpoint(run_dir), "config.json")) as f:
        if json.load(f).get("stage") == "stage1" or not os.path.isfile(path):
            return cost
    training_forwards, previous_step = 0.0, 0
    with open(path) as f:
        for row in map(json.loads, f):
            cost["teacher_forwards"] += row.get("ode/teacher_forwards", 0.0)
            cost["seconds"] += row.get("ode/seconds", 0.0)
            cost["bytes_stored"] += row.get("ode/bytes_written", 0.0)
            if "sec_per_step" in row:  # mean over the steps since the previous row
                cost["seconds"] += row["sec_per_step"] * (row["step"] - previous_step)
                previous_step = row["step"]
            training_forwards = row.get("teacher_forwards", training_forwards)  # cumulative over the run
    cost["teacher_forwards"] += training_forwards
    return cost


def run_stage(script, config, overrides):
    """A stage script as a subprocess (its own progress bars and errors), continued if stopped."""
    command = [sys.executable, script, "--config", config, *overrides, "--resume=true"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def ablation(args):
    import toyworld
    rows, results = {}, []
    prompts = heldout_prompts(args.samples)
    for steps in args.steps:
        for name, stage2_run, stage2_config, suffix in ABLATION_INITS:
            if not os.path.isdir(stage2_run):
                if stage2_config is None:
                    raise sample.SampleError(f"{stage2_run} not found: run Stage 1 first (make toy, or "
                                             f"python stage1_teacher_forcing.py --config configs/toy/tf.yaml)")
                run_stage("stage2_causal_cd.py", stage2_config, [])
            out_dir = f"runs/toy/dmd_{steps}step{suffix}"
            # the EMA student where the run keeps one (TF, CD); the ODE regression keeps none
            has_ema = os.path.isfile(os.path.join(common.resolve_checkpoint(stage2_run), "ema.safetensors"))
            run_stage("stage3_asym_dmd.py", f"configs/toy/dmd_{steps}step.yaml",
                      [f"--generator={stage2_run}", f"--generator_use_ema={str(has_ema).lower()}",
                       f"--out_dir={out_dir}"])
            model, path = load_model(out_dir, use_ema=True)
            scores = toyworld.score(sample_toy(model, prompts, seed=args.seed, steps=sample.FEW_STEP_LISTS[steps]),
                                    prompts)
            rows[f"{steps}-step, init: {name}"] = scores
            results.append(dict(steps=steps, init=name, stage2_run=stage2_run, stage3_checkpoint=path,
                                stage2_cost=stage2_cost(stage2_run),
                                total_standard_error=toyworld.bootstrap_standard_error(scores["per_video"]),
                                **{k: v for k, v in scores.items() if k != "per_video"}))
    print()
    toyworld.print_table(rows)
    print("\n| steps | Stage-3 init | Total ± bootstrap SE | Quality | Semantic | dynamic | drift | Stage-2 teacher forwards | "
          "Stage-2 seconds | bytes stored |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["stage2_cost"]
        print(f"| {r['steps']} | {r['init']} | {100 * r['total']:.1f} ± {100 * r['total_standard_error']:.1f} | "
              f"{100 * r['quality']:.1f} | {100 * r['semantic']:.1f} | {100 * r['dynamic_degree']:.1f} | "
              f"{100 * r['drift']:.1f} | {c['teacher_forwards']:,.0f} | {c['seconds']:,.0f} | "
              f"{c['bytes_stored'] / 2**20:,.1f} MiB |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return results


# -----------------------------------------------------------------------------
# command line


def add_checkpoint_arguments(p):
    """The checkpoint to score and how to sample it (by default as the checkpoint says: sample.choose_sampling)."""
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--steps", type=int, choices=sorted(sample.FEW_STEP_LISTS),
                   help="few-step rollout, steps per frame (students: default 2)")
    p.add_argument("--sample_steps", type=int, help="multi-step Euler with CFG (Stage 1 and the base: default 40)")
    p.add_argument("--cfg", type=float, default=sample.Sampling.cfg, help="CFG weight of multi-step sampling")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="ToyBench of one checkpoint on the held-out prompts",
                       description="ToyBench of one checkpoint on the 23 held-out prompts; the checkpoint decides "
                       "how it is sampled unless --steps / --sample_steps say otherwise.")
    add_checkpoint_arguments(p)
    p.add_argument("--samples", type=int, default=2, help="videos per held-out prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="row name in the table")
    p.add_argument("--png", help="write a strip of one video per prompt (first 8)")
    p.add_argument("--json", help="write the scores to this file")
    p = sub.add_parser("compare", help="the shipped teacher against the shipped 1/2/4-step students (make demo)",
                       description="The shipped bidirectional base (the teacher, 40-step Euler with CFG) and the "
                       "shipped Stage-3 students at 1, 2 and 4 steps per frame, on the same held-out prompts and "
                       "noise: ToyBench per model, sampling seconds, and a PNG strip.")
    p.add_argument("--samples", type=int, default=1, help="videos per held-out prompt")
    p.add_argument("--prompts", type=int, default=23, help="the first N of the 23 held-out prompts")
    p.add_argument("--cfg", type=float, default=sample.Sampling.cfg, help="CFG weight of the teacher's sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", help="write the strip here")
    p.add_argument("--json", help="write the scores to this file")
    p = sub.add_parser("ablation", help="Table 2 in miniature: Stage 3 from each Stage-2 initialisation",
                       description="Stage 3 (configs/toy/dmd_{n}step.yaml) from the Stage-1 model, the causal-ODE "
                       "and the causal-CD students; runs are reused when finished, then every EMA generator is scored.")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], choices=sorted(sample.FEW_STEP_LISTS),
                   help="the few-step settings to run (default 1 2 4)")
    p.add_argument("--samples", type=int, default=2, help="videos per held-out prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows to this file")
    p = sub.add_parser("camera", help="the camera world: action following, revisit consistency, objects",
                       description="A camera-conditioned checkpoint on the held-out prompts under still, random and "
                       "there-and-back camera paths: pan error (px/frame), revisit consistency, ToyBench semantic.")
    add_checkpoint_arguments(p)
    p.add_argument("--samples", type=int, default=2, help="camera paths per held-out prompt and kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="row name in the table")
    p.add_argument("--png", help="write a strip of the first 4 camera paths: ground truth over generated")
    p.add_argument("--json", help="write the rows to this file")
    p = sub.add_parser("oracle", help="the oracle gap of a bidirectional model: its loss over the exact denoiser's",
                       description="Loss per σ of a bidirectional toy model with the true and the direction-flipped "
                       "prompt, beside the exact (Bayes) denoiser's with the true prompt and with the direction open.")
    p.add_argument("--ckpt", required=True, help="a bidirectional checkpoint, e.g. checkpoints/toy/base")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--sigmas", default="0.97,0.95,0.9,0.8,0.6", help="comma-separated noise levels in (0, 1]")
    p.add_argument("--clips", type=int, default=64, help="one-object moving clips to average over")
    p.add_argument("--seed", type=int, default=0, help="picks the clips and the noise")
    p.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    error = sub.choices[args.command].error  # one line under the subcommand's usage, exit code 2
    if getattr(args, "samples", 1) < 1:
        error(f"--samples must be at least 1 (videos per held-out prompt), got {args.samples}")
    if args.command == "compare" and not 1 <= args.prompts <= 23:
        error(f"--prompts must be in [1, 23] (the held-out prompts), got {args.prompts}")
    if args.command == "oracle":
        if args.clips < 1:
            error(f"--clips must be at least 1, got {args.clips}")
        try:
            sigmas = [float(s) for s in args.sigmas.split(",")]
        except ValueError:
            sigmas = []
        if not sigmas or not all(0 < s <= 1 for s in sigmas):
            error(f"--sigmas must be comma-separated noise levels in (0, 1], e.g. 0.9,0.6; got {args.sigmas!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return {"score": score_checkpoint, "compare": compare_shipped, "ablation": ablation, "oracle": oracle_checkpoint,
                "camera": camera_checkpoint}[args.command](args)
    except sample.SampleError as e:
        raise SystemExit(f"toy_eval.py: error: {e}") from None


if __name__ == "__main__":
    main()
