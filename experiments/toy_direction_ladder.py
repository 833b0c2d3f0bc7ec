"""
The toy-direction ladder, rung 1 (docs/toy_world.md, "The direction ladder"): can a small bidirectional base,
trained on 2 CPU cores for at most 30 minutes, follow a direction word at all?

World of rung 1: one magenta circle that moves left, right, up or down at 2 px/frame ("quickly"), placed by
toyworld.py's own renderer, so the four prompts differ only in the direction word. Each variant changes one
hyperparameter of the `toy` preset (names join with "+" to combine them: theta100+heads4).

  python experiments/toy_direction_ladder.py speed --variant theta100            # idle s/step -> the 30-min step budget
  python experiments/toy_direction_ladder.py rung1 --variant theta100 --max_steps 1600   # train (resumable), judge
  python experiments/toy_direction_ladder.py judge --variant theta100            # judge the latest weights again
  python experiments/toy_direction_ladder.py sigma1 --variant theta100           # what the word is worth at σ = 1
  python experiments/toy_direction_ladder.py stop --variant theta100 --why "no early signal"   # stopped early
  python experiments/toy_direction_ladder.py table                               # the ladder table (markdown)

Every row goes to experiments/toy_direction_ladder.jsonl. The judge has two parts:
  - direction: the ToyBench direction score of 40-step CFG samples from fresh seeds, 8 per direction;
  - the transport gap: flow-matching loss with the direction word flipped minus with the true prompt, all
    frames at σ (toy_eval.oracle_gap), next to the same gap of the exact (Bayes) denoiser, the most any model
    can get from the word.
Verdict: PASS when direction >= 90 within 30 idle 2-core minutes of training (idle minutes = steps x the
variant's `speed` row), FAIL when the 30 minutes are spent without it, "running" before that.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root
import common  # noqa: E402
import model as M  # noqa: E402
import stage1_teacher_forcing as stage1  # noqa: E402
import toy_eval  # noqa: E402
import toyworld as TW  # noqa: E402

DIRECTIONS = ("left", "right", "up", "down")
GATE_MINUTES = 30
GATE_DIRECTION = 0.90
LEDGER = Path(__file__).resolve().parent / "toy_direction_ladder.jsonl"

# one factor each, against the `toy` preset and configs/toy/base.yaml; "+" combines them
VARIANTS = {
    "baseline": {},
    "theta100": dict(model=dict(rope_theta=100.0)),        # RoPE base 100: all 10 spatial pairs turn over 8 tokens
    "patch1": dict(model=dict(patch_size=(1, 1, 1))),      # 16x16 tokens: 2 px/frame is one whole token per frame
    "heads4": dict(model=dict(num_heads=4)),               # head width 32
    "heads8": dict(model=dict(num_heads=8)),               # head width 16
    "width256": dict(model=dict(dim=256, ffn_dim=1024)),   # 2 heads of 128
    "highsigma4": dict(train=dict(high_sigma_weight=4.0)),  # 4x loss weight where σ >= 0.9 (direction is set there)
    # half the clips draw σ per frame, so a noisy frame sits next to cleaner ones and the word says where, relative
    # to them, the object is (a relation RoPE can express; the σ = 1 prior needs absolute positions, see sigma1)
    "perframe": dict(train=dict(per_frame_noise=0.5)),
}
TRAIN_DEFAULTS = dict(batch_size=16, lr=1e-3, betas=(0.9, 0.99), warmup_steps=200, grad_clip=1.0, ema_decay=0.999,
                      text_dropout=0.1, timestep_shift=5.0, high_sigma_weight=1.0, per_frame_noise=0.0)


def resolve_variant(name):
    """'theta100+heads4' -> (WanConfig, training settings)."""
    model_over, train = {}, dict(TRAIN_DEFAULTS)
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"error: unknown variant {part!r}; choose from {sorted(VARIANTS)}, joined with '+'")
        model_over.update(VARIANTS[part].get("model", {}))
        train.update(VARIANTS[part].get("train", {}))
    return M.WanConfig.from_preset("toy", causal=False, **model_over), train


# -----------------------------------------------------------------------------
# the rung-1 world


def rung1_object(direction):
    return dict(colour="magenta", shape="circle", motion=direction, speed="quickly")


def rung1_batch(tag, first, n):
    """n clips [n, T, 3, H, W] and prompts, clip i drawn from its own seed (tag, first + i): a direction, then
    toyworld's placement."""
    videos, prompts = [], []
    for i in range(first, first + n):
        rng = random.Random(f"ladder-{tag}-{i}")
        obj = rung1_object(rng.choice(DIRECTIONS))
        videos.append(TW.render([obj], seed=f"ladder-{tag}-{i}"))
        prompts.append(TW.make_prompt([obj]))
    return torch.stack(videos), prompts


# -----------------------------------------------------------------------------
# training (the Stage-1 bidirectional loss of stage1_teacher_forcing.py, with clips drawn on the fly)


def loss_weights(t, high_sigma_weight):
    """Per-frame loss weight: high_sigma_weight where σ = t/1000 >= 0.9 (where the direction is decided), else 1."""
    return torch.where(t >= 900.0, high_sigma_weight, 1.0)


def draw_noise(step, shape, grid, train):
    """Step `step`'s draws for a batch of latents `shape` [B, F, C, H, W], clip i from its own seed -> noise [B, F,
    C, H, W], t [B, F] (one σ per clip, or per frame with probability train["per_frame_noise"]), text dropped [B]."""
    noise, t, drop = [], [], []
    for i in range(shape[0]):
        g = torch.Generator().manual_seed(1_000_003 * step + i)
        t.append(stage1.sample_timesteps(g, shape[1], grid, causal=False, frames_per_block=1,
                                         per_frame_noise=train["per_frame_noise"])[0])
        noise.append(torch.randn(shape[1:], generator=g))
        drop.append(bool(torch.rand((), generator=g) < train["text_dropout"]))
    return torch.stack(noise), torch.stack(t), torch.tensor(drop)


def train_step(model, optimizer, ema, step, train, text, negative, codec, grid, dist_ctx):
    x0_pixels, prompts = rung1_batch("train", step * train["batch_size"], train["batch_size"])
    x0 = codec.encode(x0_pixels)                                                # [B, F, C, H, W]
    noise, t, drop = draw_noise(step, x0.shape, grid, train)                   # [B, F, C, H, W], [B, F], [B]
    weight = loss_weights(t, train["high_sigma_weight"])                       # [B, F]
    context = torch.where(drop[:, None, None], negative, text.encode(prompts))
    lr = train["lr"] * min(1.0, (step + 1) / train["warmup_steps"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    with common.autocast_context(dist_ctx):
        loss, _ = stage1.diffusion_loss(model, x0, noise, t, weight, context, teacher_forcing=False)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    common.ema_update(ema, model, min(train["ema_decay"], (1 + step) / (10 + step)))
    return loss.item()


def save_state(path, state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)   # a stop mid-write leaves the previous state intact


def build(variant, run_dir):
    model_cfg, train = resolve_variant(variant)
    torch.manual_seed(0)
    model = M.CausalWanModel(model_cfg).train()
    ema = common.make_ema(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], betas=train["betas"], weight_decay=0.0)
    state_path = Path(run_dir) / "state.pt"
    state = dict(step=0, train_seconds=0.0)
    if state_path.exists():
        saved = torch.load(state_path, weights_only=True)
        assert saved["variant"] == variant, f"{state_path} is variant {saved['variant']!r}, not {variant!r}"
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        state = dict(step=saved["step"], train_seconds=saved["train_seconds"])
    return model, ema, optimizer, model_cfg, train, state


# -----------------------------------------------------------------------------
# the judge


@torch.no_grad()
def transport_gap(net, clips=32, sigmas=(0.97, 0.9)):
    """toy_eval.oracle_gap on fresh rung-1 clips: per σ the model's loss, its flipped − true gap, and the exact
    denoiser's gap (direction open over the four − given)."""
    text, codec = TW.ToyTextEncoder(), TW.ToyCodec()
    pixels, prompts = rung1_batch("judge", 0, clips)
    objs = [TW.parse_prompt(p)[0] for p in prompts]

    def candidates(i, open_direction):   # [N, D]: every clip the prompt renders to (all directions if open)
        motions = DIRECTIONS if open_direction else (objs[i]["motion"],)
        return codec.encode(torch.cat([TW.candidate_clips(dict(objs[i], motion=m)) for m in motions])).flatten(1)

    return toy_eval.oracle_gap(net, text, codec.encode(pixels), prompts, candidates, list(sigmas), seed=1)


@torch.no_grad()
def judge(net, samples_per_direction=8, sigmas=(0.97, 0.9)):
    """-> (dict(direction, gap {σ: model flipped − true}, exact_gap, loss), one sample video per direction)."""
    rows = transport_gap(net, sigmas=sigmas)
    prompts = [TW.make_prompt([rung1_object(d)]) for d in DIRECTIONS for _ in range(samples_per_direction)]
    videos = toy_eval.sample_toy(net, prompts, seed=50_000, sample_steps=40, guidance_scale=3.0)
    direction = sum(TW.score_video(v, p)["direction"] for v, p in zip(videos, prompts)) / len(prompts)
    return dict(direction=direction, gap={str(s): rows[s]["direction_model"] for s in sigmas},
                exact_gap={str(s): rows[s]["direction_exact"] for s in sigmas},
                loss={str(s): rows[s]["model"] for s in sigmas}), videos[::samples_per_direction]


@torch.no_grad()
def sigma1_probe(net, clips=32):
    """What the word is worth at σ = 1, where x_t is pure noise and the best a model can predict is the mean
    clip of the prompt. -> dict(loss: {"exact", "exact_open", "constant", "model", "model_flipped"}: flow-matching
    losses on the same fresh clips and noise; centroids: {direction: {"exact" | "model": [(x, y) per frame]}}, the centre
    of magenta in the exact mean clip and in the model's x̂0 = x_t − v̂ from one pure-noise draw)."""
    text, codec = TW.ToyTextEncoder(), TW.ToyCodec()
    pixels, prompts = rung1_batch("sigma1", 0, clips)
    x0 = codec.encode(pixels)                                                   # [B, F, C, H, W]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full(x0.shape[:2], 1000.0)                                        # σ = 1: x_t = noise
    loss = {name: (net(noise, t, text.encode(p), causal=False).float() - (noise - x0)).pow(2).mean().item()
            for name, p in (("model", prompts), ("model_flipped", [toy_eval.flip_direction(q) for q in prompts]))}
    means = {d: codec.encode(TW.candidate_clips(rung1_object(d))).mean(0) for d in DIRECTIONS}   # [F, C, H, W]
    # every direction is equally likely, and each has the same number of start positions
    overall = torch.stack(list(means.values())).mean(0)
    words = [TW.parse_prompt(p)[0]["motion"] for p in prompts]
    loss["exact"] = torch.stack([(x0[i] - means[w]).pow(2).mean() for i, w in enumerate(words)]).mean().item()
    loss["exact_open"] = (x0 - overall).pow(2).mean().item()
    # the best prediction that is the same at every pixel and frame (per channel): all a network whose only
    # positions are relative (RoPE) can make of pure noise, but for effects at the clip's edges
    loss["constant"] = (x0 - overall.mean((0, 2, 3), keepdim=True)).pow(2).mean().item()

    def centre(latents):   # [F, C, H, W] -> [(x, y)] per frame: magenta presence (R + B)/2 in [0, 1] as weight
        pix = codec.decode(latents[None])[0]                                    # [F, 3, H, W] in [-1, 1]
        w = ((pix[:, 0] + pix[:, 2]) / 4 + 0.5).clamp(min=0)                    # [F, H, W]; an undershoot weighs 0
        grid = torch.arange(w.shape[-1], dtype=w.dtype)
        return [(round(float((w[f].sum(0) * grid).sum() / w[f].sum()), 1),
                 round(float((w[f].sum(1) * grid).sum() / w[f].sum()), 1)) for f in range(w.shape[0])]

    one_noise = noise[:1]
    centroids = {}
    for d in DIRECTIONS:
        v = net(one_noise, t[:1], text.encode([TW.make_prompt([rung1_object(d)])]), causal=False).float()
        centroids[d] = dict(exact=centre(means[d]), model=centre(one_noise[0] - v[0]))   # x̂0 = x_t − σ·v̂, σ = 1
    return dict(loss=loss, centroids=centroids)


def format_sigma1(variant, steps, probe):
    loss = probe["loss"]
    out = [f"{variant}, step {steps}, σ = 1 (x_t is pure noise):",
           f"  flow-matching loss  exact: {loss['exact']:.4f} with the word, {loss['exact_open']:.4f} without "
           f"(worth {loss['exact_open'] - loss['exact']:+.4f});  model: {loss['model']:.4f} with the true word, "
           f"{loss['model_flipped']:.4f} flipped (worth {loss['model_flipped'] - loss['model']:+.4f});  the best constant clip: {loss['constant']:.4f}",
           "", "| word | magenta centre (x, y), frames 0 / 5 / 11: exact mean clip | model's x̂0 |", "|---|---|---|"]
    pick = lambda c: " / ".join(f"({x:.1f}, {y:.1f})" for x, y in (c[0], c[len(c) // 2 - 1], c[-1]))
    for d, c in probe["centroids"].items():
        out.append(f"| {d} | {pick(c['exact'])} | {pick(c['model'])} |")
    return "\n".join(out)


def verdict_of(row):
    """PASS: direction >= 90 within the 30-minute budget. FAIL: not reached with the budget spent (>= 95% of
    it). running: budget left. Early signal (the transport gap at σ 0.97 >= 0.002, 10x the shipped base's) is
    shown beside it."""
    if row["idle_minutes"] is None:
        return "no speed row"
    if row["idle_minutes"] > GATE_MINUTES:
        return "over budget"
    if row["direction"] >= GATE_DIRECTION:
        return "PASS"
    return "FAIL" if row["idle_minutes"] >= 0.95 * GATE_MINUTES else "running"


def ledger_rows():
    if not LEDGER.exists():
        return []
    return [json.loads(line) for line in LEDGER.read_text().splitlines() if line.strip()]


def append_row(row):
    with open(LEDGER, "a") as f:
        f.write(json.dumps(row) + "\n")


def idle_sec_per_step(variant):
    rows = [r for r in ledger_rows() if r["kind"] == "speed" and r["variant"] == variant]
    return rows[-1]["sec_per_step"] if rows else None


def judge_and_record(variant, ema, state, run_dir, threads):
    result, shown = judge(ema)
    per_step = idle_sec_per_step(variant)
    idle_minutes = None if per_step is None else state["step"] * per_step / 60
    row = dict(kind="judge", variant=variant, steps=state["step"], idle_minutes=idle_minutes,
               wall_train_minutes=state["train_seconds"] / 60, threads=threads, **result,
               date=time.strftime("%Y-%m-%d"))
    verdict = row["verdict"] = verdict_of(row)
    append_row(row)
    common.save_png_grid(shown, str(Path(run_dir) / f"samples_{state['step']:06d}.png"), scale=2)
    print(f"{variant} step {state['step']}: direction {100 * result['direction']:.1f}, gap σ0.97 "
          f"{result['gap']['0.97']:+.4f} σ0.9 {result['gap']['0.9']:+.4f} (exact {result['exact_gap']['0.97']:+.4f} / "
          f"{result['exact_gap']['0.9']:+.4f}) -> {verdict}", flush=True)


# -----------------------------------------------------------------------------
# commands


def cmd_speed(args):
    """Idle seconds per training step with 2 threads (run on an otherwise idle machine)."""
    torch.set_num_threads(args.threads)
    model, ema, optimizer, model_cfg, train, _ = build(args.variant, Path("/nonexistent"))
    text, codec, dist_ctx = TW.ToyTextEncoder(), TW.ToyCodec(), common.Dist()
    negative = text.encode([text.negative_prompt])
    grid = M.timestep_grid(1000, train["timestep_shift"])
    for step in range(3):   # warm-up
        train_step(model, optimizer, ema, step, train, text, negative, codec, grid, dist_ctx)
    start = time.perf_counter()
    for step in range(3, 3 + args.steps):
        train_step(model, optimizer, ema, step, train, text, negative, codec, grid, dist_ctx)
    per_step = (time.perf_counter() - start) / args.steps
    append_row(dict(kind="speed", variant=args.variant, sec_per_step=per_step, threads=args.threads,
                    params=model.num_params(), cpu=cpu_name(), date=time.strftime("%Y-%m-%d")))
    print(f"{args.variant}: {per_step:.3f} s/step with {args.threads} threads, {model.num_params():,} parameters -> "
          f"{int(GATE_MINUTES * 60 / per_step)} steps in {GATE_MINUTES} min", flush=True)


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def cmd_rung1(args):
    from tqdm import tqdm
    torch.set_num_threads(args.threads)
    run_dir = Path(args.runs) / args.variant
    run_dir.mkdir(parents=True, exist_ok=True)
    model, ema, optimizer, model_cfg, train, state = build(args.variant, run_dir)
    print(f"{args.variant}: {model.num_params():,} parameters, {model_cfg}, {train}; from step {state['step']}", flush=True)
    text, codec, dist_ctx = TW.ToyTextEncoder(), TW.ToyCodec(), common.Dist()
    negative = text.encode([text.negative_prompt])                               # [1, L, E]
    grid = M.timestep_grid(1000, train["timestep_shift"])
    judged = {r["steps"] for r in ledger_rows() if r["kind"] == "judge" and r["variant"] == args.variant}
    progress = tqdm(range(state["step"], args.max_steps), initial=state["step"], total=args.max_steps,
                    desc=args.variant, dynamic_ncols=True, mininterval=10)
    with open(run_dir / "log.jsonl", "a") as log:
        for step in progress:
            start = time.perf_counter()
            loss = train_step(model, optimizer, ema, step, train, text, negative, codec, grid, dist_ctx)
            state["step"], state["train_seconds"] = step + 1, state["train_seconds"] + time.perf_counter() - start
            log.write(json.dumps(dict(step=step + 1, loss=loss)) + "\n")
            progress.set_postfix(loss=f"{loss:.4f}")
            last = state["step"] == args.max_steps
            if state["step"] % args.save_every == 0 or last:
                log.flush()
                save_state(run_dir / "state.pt", dict(variant=args.variant, model=model.state_dict(),
                                                      ema=ema.state_dict(), optimizer=optimizer.state_dict(), **state))
            if (state["step"] % args.judge_every == 0 or last) and state["step"] not in judged:
                judge_and_record(args.variant, ema, state, run_dir, args.threads)
                judged.add(state["step"])
    if state["step"] not in judged:   # resumed at the end: judge what is there
        judge_and_record(args.variant, ema, state, run_dir, args.threads)


def cmd_judge(args):
    torch.set_num_threads(args.threads)
    run_dir = Path(args.runs) / args.variant
    assert (run_dir / "state.pt").exists(), f"no run at {run_dir}: train it with rung1 --variant {args.variant}"
    _, ema, _, _, _, state = build(args.variant, run_dir)
    judge_and_record(args.variant, ema, state, run_dir, args.threads)


def cmd_sigma1(args):
    torch.set_num_threads(args.threads)
    run_dir = Path(args.runs) / args.variant
    assert (run_dir / "state.pt").exists(), f"no run at {run_dir}: train it with rung1 --variant {args.variant}"
    _, ema, _, _, _, state = build(args.variant, run_dir)
    print(format_sigma1(args.variant, state["step"], sigma1_probe(ema)))


def cmd_stop(args):
    """Record that a run was stopped before its budget, and why (the table shows it instead of "running")."""
    judged = [r for r in ledger_rows() if r["kind"] == "judge" and r["variant"] == args.variant]
    assert judged, f"no judged row of {args.variant!r} in {LEDGER}"
    append_row(dict(kind="stopped", variant=args.variant, steps=judged[-1]["steps"], why=args.why,
                    date=time.strftime("%Y-%m-%d")))
    print(f"{args.variant}: stopped at step {judged[-1]['steps']}: {args.why}")


def format_table(rows):
    speeds = {r["variant"]: r for r in rows if r["kind"] == "speed"}
    stopped = {(r["variant"], r["steps"]): r["why"] for r in rows if r["kind"] == "stopped"}
    out = ["| variant | s/step (2 cores, idle) | steps | idle minutes | loss σ 0.97 | gap σ 0.97 / 0.9 (exact) | "
           "direction | verdict |", "|---|---|---|---|---|---|---|---|"]
    judged = [r for r in rows if r["kind"] == "judge"]
    first_seen = {v: i for i, v in reversed(list(enumerate(r["variant"] for r in judged)))}
    for r in sorted(judged, key=lambda r: (first_seen[r["variant"]], r["steps"])):   # by variant, then steps
        speed = speeds.get(r["variant"])
        if speed:   # also for a row judged before its variant's speed row was taken
            r = dict(r, idle_minutes=r["steps"] * speed["sec_per_step"] / 60)
        verdict = verdict_of(r)
        if verdict == "running" and (r["variant"], r["steps"]) in stopped:
            verdict = f"stopped: {stopped[r['variant'], r['steps']]}"
        minutes = "—" if r["idle_minutes"] is None else f"{r['idle_minutes']:.0f}"
        out.append(f"| {r['variant']} | {speed['sec_per_step']:.2f} | {r['steps']} | {minutes} | "
                   f"{r['loss']['0.97']:.4f} | {r['gap']['0.97']:+.4f} / {r['gap']['0.9']:+.4f} "
                   f"({r['exact_gap']['0.97']:+.3f} / {r['exact_gap']['0.9']:+.3f}) | {100 * r['direction']:.1f} | "
                   f"{verdict} |" if speed else
                   f"| {r['variant']} | — | {r['steps']} | {minutes} | {r['loss']['0.97']:.4f} | "
                   f"{r['gap']['0.97']:+.4f} / {r['gap']['0.9']:+.4f} | {100 * r['direction']:.1f} | {verdict} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "rung1", "judge", "sigma1"):
        s = sub.add_parser(name)
        s.add_argument("--variant", required=True, help=f"one of {sorted(VARIANTS)}, or several joined with '+'")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--runs", default="runs/ladder", help="run folders (state.pt, log.jsonl, sample PNGs)")
    sub.choices["speed"].add_argument("--steps", type=int, default=10)
    sub.choices["rung1"].add_argument("--max_steps", type=int, required=True)
    sub.choices["rung1"].add_argument("--save_every", type=int, default=50)
    sub.choices["rung1"].add_argument("--judge_every", type=int, default=400)
    stop = sub.add_parser("stop", help="record that a run was stopped before its budget")
    stop.add_argument("--variant", required=True)
    stop.add_argument("--why", required=True)
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.cmd not in ("table", "stop"):
        resolve_variant(args.variant)   # an unknown name is a one-line error before any work
    return args


def main(argv=None):
    args = parse_args(argv)
    {"speed": cmd_speed, "rung1": cmd_rung1, "judge": cmd_judge, "sigma1": cmd_sigma1, "stop": cmd_stop,
     "table": lambda a: print(format_table(ledger_rows()))}[args.cmd](args)


if __name__ == "__main__":
    main()
