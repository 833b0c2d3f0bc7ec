"""
Performance measurements. Numbers are printed as a table and written as JSON; nothing here is asserted.

  python bench.py stage2 --teacher runs/toy/tf --data_dir data/toy      # Stage-2 cost: causal CD vs causal ODE

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
    args = parser.parse_args()
    bench_stage2(args)
