"""
Performance measurements. Numbers are printed as a table and written as JSON; nothing here is asserted.

  python bench.py stage2 --teacher runs/toy/tf --data_dir data/toy      # Stage-2 cost: causal CD vs causal ODE
  python bench.py stage3-memory --config configs/dmd_small.yaml        # Stage-3 memory estimate per GPU

stage2 — the paper's efficiency claim (§3.2, Fig. 3(b): ~11,600 vs ~2,900 GPU hours, 1,900 GiB vs 0) on
the same teacher and data. It times the pieces each method needs and combines them for a run that trains
S samples on D clips:
  causal CD   S × (one CD iteration per sample: 2 teacher forwards + student forward/backward + EMA forward)
  causal ODE  D × (48-step CFG trajectory: 96 teacher forwards, stored in fp16) + S × (one regression sample)
The paper trains 5K steps × batch 64 on 80K clips, S/D = 4; the table reports that ratio and the one measured.
"""

import argparse
import json
import os
import tempfile
import time

import torch

import common
import model as M
import stage2_causal_cd as S2


def bench_stage2(args):
    import encoders
    torch.manual_seed(0)
    teacher, model_cfg = S2.build_model(args.teacher, args.teacher_use_ema, "teacher")
    teacher.eval().requires_grad_(False)
    student, _ = S2.build_model(args.teacher, args.teacher_use_ema, "student")
    ema = common.make_ema(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    text = encoders.load_text_encoder(args.text_encoder)
    data = common.LatentShards(args.data_dir)
    B = args.batch_size
    x_gt = torch.stack([data.get(i)[0] for i in range(B)])  # [B, F, C, H, W]
    context = text.encode([data.prompts[i] for i in range(B)])
    uncond = text.encode([text.negative_prompt]).expand_as(context)
    grid = M.timestep_grid(48, 5.0)
    g = torch.Generator().manual_seed(0)

    def timed(fn, repeats):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    def cd_iteration():
        t, t_next = S2.sample_cd_interval(g, grid, x_gt.shape[1], model_cfg.frames_per_block)
        t, t_next = t.expand(B, -1).contiguous(), t_next.expand(B, -1).contiguous()
        loss, _ = S2.cd_loss(student, ema, teacher, x_gt, torch.randn(x_gt.shape, generator=g), t, t_next, context,
                             uncond, 3.0, torch.ones(B))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        common.ema_update(ema, student, 0.99)

    stored_t = torch.tensor(M.warp_timesteps([1000, 750, 500, 250]))
    keep = [int((grid - t).abs().argmin()) for t in stored_t]
    trajectory = {}

    def ode_trajectory():
        trajectory["states"] = S2.teacher_ode_trajectory(teacher, torch.randn(x_gt.shape, generator=g), x_gt, context,
                                                         uncond, 6.0, grid, keep)

    def ode_iteration():
        index = torch.randint(0, 4, (B,), generator=g)
        loss, _ = S2.ode_regression_loss(student, trajectory["states"], stored_t, index, x_gt, context)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    cd_seconds = timed(cd_iteration, args.repeats) / B
    trajectory_seconds = timed(ode_trajectory, 1) / B
    ode_seconds = timed(ode_iteration, args.repeats) / B
    with tempfile.TemporaryDirectory() as tmp:  # what the ODE data costs on disk, in the shard format
        from prepare_data import write_shard
        states = trajectory["states"].half()
        write_shard(tmp, 0, {"states": states, "latents": x_gt.half()}, dict(prompts=[""] * B, skipped=[]))
        bytes_per_clip = os.path.getsize(os.path.join(tmp, "shard_00000.safetensors")) / B

    rows = []
    for label, samples_per_clip in (("paper ratio S/D = 4", 4.0), (f"toy config S/D = {args.samples_per_clip:g}",
                                                                   args.samples_per_clip)):
        cd_total = samples_per_clip * cd_seconds
        ode_total = trajectory_seconds + samples_per_clip * ode_seconds
        rows.append(dict(setting=label, cd_seconds_per_clip=cd_total, ode_seconds_per_clip=ode_total,
                         ode_over_cd=ode_total / cd_total))
    result = dict(
        preset=f"dim {model_cfg.dim}, {model_cfg.num_layers} layers", latent_shape=list(x_gt.shape[1:]), batch=B,
        cd=dict(teacher_forwards_per_sample=2, seconds_per_sample=cd_seconds, bytes_stored_per_clip=0),
        ode=dict(teacher_forwards_per_clip=2 * 48, trajectory_seconds_per_clip=trajectory_seconds,
                 regression_seconds_per_sample=ode_seconds, bytes_stored_per_clip=bytes_per_clip),
        totals=rows)
    print(f"\nStage-2 cost on {args.data_dir} (teacher {args.teacher}, {result['preset']}, latents "
          f"{tuple(x_gt.shape[1:])}, batch {B}, {torch.get_num_threads()} threads)")
    print(f"{'':32s}{'causal CD':>14s}{'causal ODE':>14s}")
    print(f"{'teacher forwards':32s}{'2 / sample':>14s}{'96 / clip':>14s}")
    print(f"{'trajectory s / clip':32s}{'-':>14s}{trajectory_seconds:>14.3f}")
    print(f"{'training s / sample':32s}{cd_seconds:>14.3f}{ode_seconds:>14.3f}")
    print(f"{'bytes stored / clip':32s}{0:>14d}{bytes_per_clip:>14,.0f}")
    for row in rows:
        print(f"{'total s / clip, ' + row['setting']:32s}{row['cd_seconds_per_clip']:>14.3f}"
              f"{row['ode_seconds_per_clip']:>14.3f}   ODE/CD = {row['ode_over_cd']:.2f}x")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


# -----------------------------------------------------------------------------
# stage3-memory: an analytic estimate of Stage-3 memory per GPU (not a measurement)


def stage3_memory(cfg, world_size):
    """Bytes per rank for a Stage-3 config, split into what FSDP2 shards (and CPU offload moves to host RAM)
    and what stays on the GPU. Counts (fp32 master weights, bf16 compute, activation checkpointing):
      generator   weights 4P + grads 4P + AdamW 8P          critic (fake score)  the same, 16P
      EMA         4P                                        real score           4P (frozen, fp32 storage)
      KV cache    layers · 2 · B·F·S · dim · 2 (bf16)
      generator graph  (exit steps of all blocks, kept to backward) layers · B·F·S · dim · 4 (fp32 layer inputs)
      critic graph     the same for its forward over the whole clip
      one layer live   B·F·S · (12·dim + 2·ffn) · 2 for the critic / CFG real score (2B)
      gathered blocks  2 unsharded bf16 blocks of the largest model (FSDP2 prefetch)
    S = tokens per latent frame = (h/2)(w/2). Attention is assumed memory-efficient (flash / SDPA, no L×L)."""
    import stage3_asym_dmd as S3  # noqa: F401 (the config class documents the fields used here)
    with torch.device("meta"):
        models = {}
        for role, path in (("generator", cfg.generator), ("real", cfg.real_score), ("fake", cfg.fake_score)):
            model_cfg = None
            if os.path.exists(path):
                model_cfg = M.config_from_checkpoint(common.resolve_checkpoint(path) if os.path.isdir(path) else path)
            if model_cfg is None:  # not downloaded here: infer the preset from the name
                model_cfg = M.WanConfig.from_preset("wan2.1-t2v-14b" if "14B" in path else "wan2.1-t2v-1.3b")
            models[role] = (M.CausalWanModel(model_cfg).num_params(), model_cfg)
    P_gen, gen_cfg = models["generator"]
    P_real, real_cfg = models["real"]
    P_fake, fake_cfg = models["fake"]
    B, F_, S = cfg.batch_size, cfg.num_frames, (cfg.latent_height // 2) * (cfg.latent_width // 2)
    tokens = B * F_ * S
    sharded = {"generator weights+grads+AdamW": 16 * P_gen, "EMA generator": 4 * P_gen,
               "critic weights+grads+AdamW": 16 * P_fake, "real score weights": 4 * P_real}
    sharded = {k: v / world_size for k, v in sharded.items()}
    largest = max(models.values(), key=lambda m: m[0])
    block_params = largest[0] / largest[1].num_layers
    layer_live = lambda c, n: n * (12 * c.dim + 2 * c.ffn_dim) * 2  # noqa: E731
    resident = {
        "KV cache (bf16)": gen_cfg.num_layers * 2 * tokens * gen_cfg.dim * 2,
        "generator graph (checkpointed)": gen_cfg.num_layers * tokens * gen_cfg.dim * 4,
        "critic graph (checkpointed)": fake_cfg.num_layers * tokens * fake_cfg.dim * 4,
        "one live layer (real score, CFG)": layer_live(real_cfg, 2 * tokens),
        "gathered bf16 blocks (x2)": 2 * block_params * 2,
    }
    if not cfg.activation_checkpointing:  # every layer's activations stay alive instead of its input
        resident["generator graph (checkpointed)"] = gen_cfg.num_layers * layer_live(gen_cfg, tokens)
        resident["critic graph (checkpointed)"] = fake_cfg.num_layers * layer_live(fake_cfg, tokens)
    # the generator graph and the critic graph are never alive together: take the larger
    peak = (resident["KV cache (bf16)"] + resident["gathered bf16 blocks (x2)"] + resident["one live layer (real score, CFG)"]
            + max(resident["generator graph (checkpointed)"], resident["critic graph (checkpointed)"]))
    gpu = peak + (0 if cfg.cpu_offload else sum(sharded.values()))
    host = sum(sharded.values()) if cfg.cpu_offload else 0
    return dict(params=dict(generator=P_gen, real=P_real, fake=P_fake), sharded=sharded, resident=resident,
                gpu_bytes=gpu, host_bytes=host, world_size=world_size, tokens=tokens)


def bench_stage3_memory(args):
    import stage3_asym_dmd as S3
    cfg = common.load_config(S3.Config, ["--config", args.config])
    est = stage3_memory(cfg, args.world_size)
    GiB = 2 ** 30
    print(f"\nStage-3 memory estimate for {args.config} on {args.world_size} GPU(s) (analytic, not measured): "
          f"generator {est['params']['generator'] / 1e9:.2f}B, real {est['params']['real'] / 1e9:.2f}B, "
          f"fake {est['params']['fake'] / 1e9:.2f}B parameters; {est['tokens']:,} tokens per rollout")
    where = "host RAM (CPU offload)" if cfg.cpu_offload else "GPU"
    for name, value in est["sharded"].items():
        print(f"  {name:40s}{value / GiB:8.1f} GiB  sharded, {where}")
    for name, value in est["resident"].items():
        print(f"  {name:40s}{value / GiB:8.1f} GiB  GPU")
    print(f"  {'peak GPU per rank':40s}{est['gpu_bytes'] / GiB:8.1f} GiB")
    if cfg.cpu_offload:
        print(f"  {'host RAM per rank':40s}{est['host_bytes'] / GiB:8.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage2", help="causal CD vs causal ODE cost on the same teacher and data")
    p.add_argument("--teacher", default="runs/toy/tf")
    p.add_argument("--teacher_use_ema", action="store_true")
    p.add_argument("--data_dir", default="data/toy")
    p.add_argument("--text_encoder", default="toy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples_per_clip", type=float, default=300 * 16 / 256,
                   help="S/D of the run to cost (default: configs/toy/ode.yaml, 300 steps x 16 on 256 clips)")
    p.add_argument("--json", default="bench_stage2.json")
    p = sub.add_parser("stage3-memory", help="analytic memory estimate of a Stage-3 config")
    p.add_argument("--config", default="configs/dmd_small.yaml")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--json", default=None)
    args = parser.parse_args()
    {"stage2": bench_stage2, "stage3-memory": bench_stage3_memory}[args.command](args)
