"""sample.py end to end on a tiny random toy-shaped checkpoint: mp4 frame count, streaming = non-streaming, I2V
keeps its first frame, and every bad input gives one clear error and leaves no file behind."""
import os

import numpy as np
import pytest
import torch

import common
import model as M
import sample
import toyworld
from helpers import tiny_frame_wise_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny_frame_wise_checkpoint(tmp_path_factory.mktemp("sample"), num_frames=6)


def run(ckpt, out, *extra):
    return sample.main(["--ckpt", ckpt, "--out", str(out), "--quiet", *extra])


def mp4_frames(path):
    import imageio.v2 as iio
    reader = iio.get_reader(path)
    frames = [frame for frame in reader]
    reader.close()
    return frames


def test_cli_writes_a_readable_mp4_and_png_with_the_right_frame_count(tiny_ckpt, tmp_path):
    prompts = ["a red circle moves left quickly", "a blue square stays still"]
    videos = run(tiny_ckpt, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1], "--steps", "1", "--scale", "2",
                 "--score")
    assert list(videos) == prompts
    for prompt in prompts:
        name = f"{sample.slug(prompt)}-0"
        frames = mp4_frames(str(tmp_path / f"{name}.mp4"))
        assert len(frames) == 6 and frames[0].shape == (64, 64, 3)  # 6 latent frames = 6 toy frames, x2 upscaled
        assert (tmp_path / f"{name}.png").is_file()
        assert videos[prompt].shape == (6, 3, 32, 32)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{sample.slug(p)}-0.{e}" for p in prompts for e in ("mp4", "png"))


@pytest.mark.parametrize("missing", ["package", "executable"])
def test_no_mp4_writer_stops_before_sampling_with_one_line(tiny_ckpt, tmp_path, monkeypatch, missing):
    """Without imageio-ffmpeg imageio picks another writer that fails on the first frame, after the sampling:
    sample.py must stop before it loads or samples anything, naming what to install."""
    import sys
    if missing == "package":
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    else:
        import imageio_ffmpeg

        def no_exe():
            raise RuntimeError("No ffmpeg exe could be found.\nInstall ffmpeg on your system.")
        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_exe)
    monkeypatch.setattr(sample, "load_for_inference", lambda *a, **k: pytest.fail("loaded before the mp4 check"))
    with pytest.raises(sample.SampleError, match="pip install (--force-reinstall )?imageio-ffmpeg") as err:
        run(tiny_ckpt, tmp_path / "out", "--prompt", "a red circle moves left quickly")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_streaming_equals_non_streaming(tiny_ckpt, tmp_path):
    prompt = "a green triangle bounces slowly"
    plain = run(tiny_ckpt, tmp_path / "plain", "--prompt", prompt, "--num_frames", "4")[prompt]
    streamed = run(tiny_ckpt, tmp_path / "stream", "--prompt", prompt, "--num_frames", "4", "--stream")[prompt]
    assert torch.equal(plain, streamed) and plain.shape[0] == 4
    a = mp4_frames(str(tmp_path / "plain" / f"{sample.slug(prompt)}-0.mp4"))
    b = mp4_frames(str(tmp_path / "stream" / f"{sample.slug(prompt)}-0.mp4"))
    assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_image_to_video_keeps_the_given_first_frame(tiny_ckpt, tmp_path):
    import imageio.v3 as iio
    first = toyworld.render("a yellow square stays still", seed=3)[0]  # [3, 32, 32], exactly ±1
    image_path = str(tmp_path / "first.png")
    iio.imwrite(image_path, common.to_uint8_frames(first[None])[0])
    prompt = "a yellow square moves right slowly"
    video = run(tiny_ckpt, tmp_path / "out", "--prompt", prompt, "--image", image_path, "--num_frames", "3",
                "--stream")[prompt]
    assert video.shape[0] == 4  # the image frame + 3 generated frames
    assert torch.equal(video[0], first)  # the pixel codec round trip is exact
    assert not torch.equal(video[1], first)


@pytest.mark.parametrize("case", ["missing_ckpt", "not_a_checkpoint", "empty_prompt", "no_prompt", "too_many_frames",
                                  "bad_image", "wrong_size_image", "bad_toy_word", "too_long_prompt", "chunk_misfit", "out_not_writable"])
def test_bad_input_is_one_clear_error_and_no_file(tiny_ckpt, tmp_path, case):
    out = tmp_path / "out"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    import imageio.v3 as iio
    iio.imwrite(str(tmp_path / "big.png"), np.zeros((48, 64, 3), np.uint8))
    prompt = ["--prompt", "a red circle moves left quickly"]
    args, message = {
        "missing_ckpt": (["--ckpt", str(tmp_path / "nope"), *prompt], "not found"),
        "not_a_checkpoint": (["--ckpt", str(junk), *prompt], "config.json"),
        "empty_prompt": (["--ckpt", tiny_ckpt, "--prompt", "  "], "empty"),
        "no_prompt": (["--ckpt", tiny_ckpt], "no prompt"),
        # past the trained length the cache rolls (tests/test_rolling_cache.py); a window past RoPE is an error
        "too_many_frames": (["--ckpt", tiny_ckpt, *prompt, "--num_frames", "5000", "--window", "2000"], "RoPE range"),
        "bad_image": (["--ckpt", tiny_ckpt, *prompt, "--image", str(tmp_path / "broken.png")], "cannot read --image"),
        "wrong_size_image": (["--ckpt", tiny_ckpt, *prompt, "--image", str(tmp_path / "big.png")],
                             r"is 64x48 but the video is 32x32; resize or crop it"),
        "bad_toy_word": (["--ckpt", tiny_ckpt, "--prompt", "a purple circle moves left"], "not in the toy vocabulary"),
        "too_long_prompt": (["--ckpt", tiny_ckpt, "--prompt", " and ".join(["a red circle stays still"] * 4)],
                            "text_len 16"),
        "chunk_misfit": (["--ckpt", tiny_ckpt, *prompt, "--frames_per_block", "3", "--num_frames", "4"],
                         "whole number of 3-frame blocks"),
        "out_not_writable": (["--ckpt", tiny_ckpt, *prompt], "cannot write to --out"),
    }[case]
    if case == "out_not_writable":  # a file where the output directory's parent should be
        (tmp_path / "blocker").write_text("")
        out = tmp_path / "blocker" / "out"
    with pytest.raises(sample.SampleError, match=message) as error:
        sample.main([*args, "--out", str(out), "--quiet"])
    assert "\n" not in str(error.value)
    assert not out.exists() or not os.listdir(out)


def test_command_line_prints_one_error_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "sample.py"), "--ckpt", str(tmp_path / "nope"), "--prompt", "x",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=repo, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("sample.py: error: checkpoint")
    assert not (tmp_path / "out").exists()


def test_multi_step_sampling_is_euler_with_cfg_on_the_shifted_grid(tiny_ckpt, tmp_path):
    """--sample_steps (Stage-1 AR diffusion models): `sample_steps`-step Euler on the shift-5 grid with CFG
    u + w(c − u) against the negative prompt — exactly model.generate's Euler sampler, decoded by the codec."""
    prompt = "a red circle moves left quickly"
    video = run(tiny_ckpt, tmp_path / "multi", "--prompt", prompt, "--num_frames", "3", "--sample_steps", "3",
                "--cfg", "2.5", "--eager")[prompt]
    model = M.CausalWanModel(M.config_from_checkpoint(tiny_ckpt)).eval()
    M.load_weights(model, tiny_ckpt)
    text, codec = toyworld.ToyTextEncoder(), toyworld.ToyCodec()
    noise = torch.randn((1, 3, toyworld.TOY_LATENT_CHANNELS, toyworld.TOY_LATENT_SIZE, toyworld.TOY_LATENT_SIZE),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = M.generate(model, noise, text.encode([prompt]), steps=M.timestep_grid(3, 5.0).tolist(),
                             sampler="euler", uncond_context=text.encode([text.negative_prompt]), guidance_scale=2.5)
    assert torch.equal(video, codec.decode(latents)[0])  # the same calls in the same process: bit for bit
    few_step = run(tiny_ckpt, tmp_path / "few", "--prompt", prompt, "--num_frames", "3", "--eager")[prompt]
    assert not torch.equal(video, few_step)


@pytest.mark.skipif(not M.compiler_available() and os.environ.get("CI") != "true",
                    reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
def test_default_sampling_runs_the_fast_path_and_equals_eager(tiny_ckpt, tmp_path, capsys):
    """sample.py's default forward is model.fast_path (compiled blocks on a CPU with a compiler); in fp32 it
    equals --eager within 1e-5 relative (the compiled pieces reorder fp32 sums; tests/test_fast_path.py)."""
    prompt = "a red circle moves left quickly"
    fast = run(tiny_ckpt, tmp_path / "fast", "--prompt", prompt, "--num_frames", "4")[prompt]
    assert "fast path: compiled blocks" in capsys.readouterr().out
    eager = run(tiny_ckpt, tmp_path / "eager", "--prompt", prompt, "--num_frames", "4", "--eager")[prompt]
    assert "eager forward" in capsys.readouterr().out
    assert ((fast - eager).abs().max() / eager.abs().max()).item() <= 1e-5


def test_official_pt_loads_its_ema_weights_with_the_architecture_from_wan_dir(tmp_path):
    """An official Causal-Forcing .pt carries weights only: sample.py takes the architecture from --wan_dir's
    Wan config.json, the generator_ema weights with --use_ema (the raw generator without), and the text
    encoder / VAE from the Wan folder; without --wan_dir it says so in one line."""
    import json
    from helpers import tiny_random_model
    ema, raw = tiny_random_model(5), tiny_random_model(6)
    path = tmp_path / "causal_forcing.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in ema.state_dict().items()},
                "generator": {"model." + k: v for k, v in raw.state_dict().items()}}, path)
    wan_dir = tmp_path / "wan"
    wan_dir.mkdir()
    c = ema.cfg
    (wan_dir / "config.json").write_text(json.dumps(dict(
        dim=c.dim, ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, num_heads=c.num_heads, num_layers=c.num_layers,
        in_dim=c.in_dim, out_dim=c.out_dim, text_dim=c.text_dim, text_len=c.text_len)))
    for use_ema, expected in ((True, ema), (False, raw)):
        model, info = sample.load_for_inference(str(path), use_ema=use_ema, wan_dir=str(wan_dir))
        assert info["stage"] == "official" and info["text_encoder"] == info["codec"] == str(wan_dir)
        assert model.cfg.causal and model.cfg.num_layers == 1  # few-step sampling: autoregressive
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items()), use_ema
    with pytest.raises(sample.SampleError, match="pass --wan_dir") as error:
        sample.load_for_inference(str(path), use_ema=True)
    assert "\n" not in str(error.value)
