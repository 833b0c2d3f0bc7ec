"""The toy-direction ladder tool (experiments/toy_direction_ladder.py): variants, the rung-1 world, resumable
training, the transport-gap judge and the table."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import toy_direction_ladder as L  # noqa: E402
import toyworld as TW  # noqa: E402


def test_variants_change_one_factor_and_combine_with_plus():
    base_cfg, base_train = L.resolve_variant("baseline")
    assert (base_cfg.rope_theta, base_cfg.num_heads, base_cfg.patch_size) == (10000.0, 2, (1, 2, 2))
    assert base_cfg.causal is False and base_train == L.TRAIN_DEFAULTS
    cfg, train = L.resolve_variant("theta100+heads4+highsigma4")
    assert (cfg.rope_theta, cfg.num_heads, cfg.dim) == (100.0, 4, base_cfg.dim)
    assert train["high_sigma_weight"] == 4.0 and train["lr"] == base_train["lr"]
    with pytest.raises(SystemExit, match="unknown variant 'theta7'"):
        L.resolve_variant("theta100+theta7")


def test_high_sigma_weight_applies_from_sigma_0_9():
    t = torch.tensor([[1000.0, 900.0, 899.9, 100.0]])
    assert L.loss_weights(t, 4.0).tolist() == [[4.0, 4.0, 1.0, 1.0]]
    assert L.loss_weights(t, 1.0).tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_rung1_world_prompts_differ_only_in_direction_and_clips_follow_them():
    clips, prompts = L.rung1_batch("test", 0, 12)
    again, _ = L.rung1_batch("test", 0, 12)
    assert torch.equal(clips, again)
    assert {p.replace(p.split()[4], "DIR") for p in prompts} == {"a magenta circle moves DIR quickly"}
    assert len({p.split()[4] for p in prompts}) > 1
    for clip, prompt in zip(clips, prompts):   # the renderer's ground truth scores full direction
        assert TW.score_video(clip, prompt)["direction"] == 1.0, prompt


def test_training_resumes_bit_exactly(tmp_path):
    torch.set_num_threads(1)

    def run(run_dir, steps):
        run_dir.mkdir(exist_ok=True)
        model, ema, opt, _, train, state = L.build("baseline", run_dir)
        text, codec, dist = TW.ToyTextEncoder(), TW.ToyCodec(), L.common.Dist()
        negative, grid = text.encode([text.negative_prompt]), L.M.timestep_grid(1000, train["timestep_shift"])
        train = dict(train, batch_size=2)
        for step in range(state["step"], steps):
            L.train_step(model, opt, ema, step, train, text, negative, codec, grid, dist)
        L.save_state(Path(run_dir) / "state.pt", dict(variant="baseline", model=model.state_dict(),
                                                      ema=ema.state_dict(), optimizer=opt.state_dict(),
                                                      step=steps, train_seconds=0.0))
        return model, ema

    straight, straight_ema = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, resumed_ema = run(tmp_path / "b", 2)
    for a, b in zip(list(straight.parameters()) + list(straight_ema.parameters()),
                    list(resumed.parameters()) + list(resumed_ema.parameters())):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="is variant 'baseline', not 'theta100'"):
        L.build("theta100", tmp_path / "a")


class Zero(torch.nn.Module):
    """v̂ = 0 whatever the prompt: its direction gap is exactly 0."""

    def forward(self, x, t, context, causal=False):
        return torch.zeros_like(x)


def test_transport_gap_of_a_prompt_blind_model_is_zero_and_the_exact_denoisers_is_not():
    rows = L.transport_gap(Zero(), clips=4, sigmas=(0.97,))
    row = rows[0.97]
    assert row["direction_model"] == 0.0
    # the exact denoiser gains from the direction word: the four directions' start positions do not overlap
    # (toyworld places a left-moving object on the right, ...), so knowing the word narrows the candidates 4x
    assert row["exact_open"] > 1.2 * row["exact"], row
    assert row["exact"] < row["exact_open"] < row["model"]


def test_table_lists_each_judged_row_with_its_speed_and_verdict():
    def judged(variant, steps, minutes, direction):
        return dict(kind="judge", variant=variant, steps=steps, idle_minutes=minutes, loss={"0.97": 0.1},
                    gap={"0.97": 0.01, "0.9": 0.02}, exact_gap={"0.97": 0.2, "0.9": 0.15}, direction=direction)
    rows = [dict(kind="speed", variant="theta100", sec_per_step=1.2),
            judged("theta100", 800, 16.0, 0.5), judged("theta100", 1450, 29.0, 0.5),
            judged("theta100", 1000, 20.0, 0.95), judged("theta100", 1600, 32.0, 0.95),
            judged("patch1", 10, None, 0.0), judged("heads4", 400, 10.0, 0.1),
            dict(kind="stopped", variant="heads4", steps=400, why="no early signal"),
            judged("perframe", 1500, None, 0.2), dict(kind="speed", variant="perframe", sec_per_step=1.2)]
    table = L.format_table(rows).splitlines()
    assert len(table) == 9 and table[7].endswith("| stopped: no early signal |")
    # judged before its speed row was taken: the minutes come from the speed row, 1500 x 1.2 s = 30 min
    assert table[8].startswith("| perframe | 1.20 | 1500 | 30 |") and table[8].endswith("| FAIL |")
    assert table[2] == "| theta100 | 1.20 | 800 | 16 | 0.1000 | +0.0100 / +0.0200 (+0.200 / +0.150) | 50.0 | running |"
    assert [line.rsplit("|", 2)[1].strip() for line in table[3:7]] == ["PASS", "FAIL", "over budget", "no speed row"]
    assert table[6].startswith("| patch1 | — | 10 | — |")


def test_sigma1_probe_losses_and_centres_are_those_of_the_mean_clips():
    """At σ = 1, x̂0 = x_t − v̂. A model predicting x̂0 = the mean clip over all four words scores exactly the
    probe's word-blind bound, and one predicting the per-channel constant scores the constant bound."""
    codec = TW.ToyCodec()
    means = torch.stack([codec.encode(TW.candidate_clips(L.rung1_object(d))).mean(0) for d in L.DIRECTIONS])
    overall = means.mean(0)                                                     # [F, C, H, W]

    class Predicts(torch.nn.Module):
        def __init__(self, x0_hat):
            super().__init__()
            self.x0_hat = x0_hat

        def forward(self, x, t, context, causal=False):
            assert torch.all(t == 1000.0)
            return x - self.x0_hat   # v̂ = x_t − x̂0 at σ = 1

    torch.set_num_threads(1)
    probe = L.sigma1_probe(Predicts(overall), clips=8)
    loss = probe["loss"]
    assert loss["model"] == pytest.approx(loss["exact_open"], rel=1e-5) and loss["model_flipped"] == loss["model"]
    assert loss["exact"] < loss["exact_open"] < loss["constant"]
    constant = L.sigma1_probe(Predicts(overall.mean((0, 2, 3), keepdim=True)), clips=8)["loss"]
    assert constant["model"] == pytest.approx(constant["constant"], rel=1e-5)
    # hand-computed: "left" starts with its 8 px circle's left edge at x in {22, 23, 24}, y in 0..24, and moves
    # 2 px/frame, so the mean clip's centre is (23 + 3.5, 12 + 3.5) in frame 0 and (23 − 22 + 3.5, 15.5) in frame 11
    left = probe["centroids"]["left"]
    assert left["exact"][0] == (26.5, 15.5) and left["exact"][-1] == (4.5, 15.5)
    assert probe["centroids"]["down"]["exact"][0] == (15.5, 4.5)
    assert all(c["model"][0] == (15.5, 15.5) for c in probe["centroids"].values())   # the word-blind mean
    text = L.format_sigma1("x", 0, probe)
    assert "| left | (26.5, 15.5) / (16.5, 15.5) / (4.5, 15.5) | (15.5, 15.5)" in text


def test_perframe_draws_one_sigma_per_frame_for_about_half_the_clips_and_leaves_the_others_unchanged():
    grid = L.M.timestep_grid(1000, 5.0)
    shape = (64, TW.TOY_FRAMES, TW.TOY_LATENT_CHANNELS, 2, 2)
    _, off_train = L.resolve_variant("baseline")
    _, on_train = L.resolve_variant("perframe")
    assert on_train["per_frame_noise"] == 0.5 and off_train["per_frame_noise"] == 0.0
    _, t_off, _ = L.draw_noise(3, shape, grid, off_train)
    noise, t_on, drop = L.draw_noise(3, shape, grid, on_train)
    assert noise.shape == shape and t_on.shape == shape[:2] and drop.shape == shape[:1]
    assert torch.all(t_off == t_off[:, :1])                   # one σ per clip
    per_frame = (t_on != t_on[:, :1]).any(1)                  # [B]: clips whose frames differ
    assert 16 <= int(per_frame.sum()) <= 48, int(per_frame.sum())   # Binomial(64, 0.5): 32 ± 4 sd
