"""sample.py end to end on a tiny random toy-shaped checkpoint: mp4 frame count, streaming = non-streaming, I2V
keeps its first frame, and every bad input gives one clear error and leaves no file behind."""
import os

import numpy as np
import pytest
import torch

import common
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
