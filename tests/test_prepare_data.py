"""prepare_data: tiny mp4s (+ a corrupt and a too-short file) -> shards; toy shards; resume; atomicity."""

import json

import numpy as np
import pytest
import torch

import common
import encoders
import prepare_data as pd
import toyworld as tw

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])


def write_mp4(path, frames, height=40, width=48, seed=0):
    import imageio.v2 as imageio
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    with imageio.get_writer(str(path), fps=8, codec="libx264", macro_block_size=1, quality=9) as w:
        for t in range(frames):
            w.append_data(np.roll(base, t, axis=1))


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_mp4(d / f"ok{i}.mp4", frames=12, seed=i)
    write_mp4(d / "short.mp4", frames=3)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    rows = [("ok0.mp4", "first clip"), ("corrupt.mp4", "broken"), ("ok1.mp4", "second, with a comma"),
            ("short.mp4", "too short"), ("ok2.mp4", "third"), ("missing.mp4", "not there")]
    with open(d / "captions.csv", "w") as f:
        f.write("video,caption\n" + "".join(f'{v},"{c}"\n' for v, c in rows))
    (d / "captions.jsonl").write_text("".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows))
    return d


def test_read_video_resizes_and_crops(video_dir):
    v = pd.read_video(video_dir / "ok0.mp4", num_frames=9, height=32, width=32)
    assert v.shape == (9, 3, 32, 32) and v.min() >= -1 and v.max() <= 1
    with pytest.raises(ValueError, match="too short"):
        pd.read_video(video_dir / "short.mp4", num_frames=9, height=32, width=32)
    # cover-resize then centre crop: 40x48 -> 32x38 -> crop 3 columns each side; a centred stripe stays centred
    frame = torch.zeros(1, 40, 48, 3, dtype=torch.uint8)
    frame[:, :, 22:26] = 255
    out = pd.resize_center_crop(frame, 32, 32)[0, 0, 0]                       # one row of channel 0
    assert torch.allclose(out, out.flip(0), atol=1e-5) and out[15:17].min() > 0.9 and out[:8].max() == -1


def test_prepare_videos_with_tiny_wan_vae(video_dir, tmp_path, tiny_vae_codec, capsys):
    entries = pd.read_captions(video_dir / "captions.csv")
    assert entries == pd.read_captions(video_dir / "captions.jsonl") and entries[2]["caption"] == "second, with a comma"
    out = tmp_path / "shards"
    summary = pd.prepare_videos(entries, video_dir, out, tiny_vae_codec, height=32, width=32, num_frames=9,
                                shard_size=4, batch_size=2)
    assert summary["written"] == 3 and summary["shards_written"] == 2
    assert sorted(s["video"] for s in summary["skipped"]) == ["corrupt.mp4", "missing.mp4", "short.mp4"]
    assert "too short" in next(s["reason"] for s in summary["skipped"] if s["video"] == "short.mp4")
    shards = pd.list_shards(out)
    assert [p.name for p in shards] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    latents, prompts = pd.load_shard(shards[0])
    assert latents.shape == (2, 3, 16, 4, 4) and latents.dtype == torch.float32
    assert prompts == ["first clip", "second, with a comma"]
    # the stored latents are the codec's encoding of the resized clip (fp16 storage)
    ref = tiny_vae_codec.encode(pd.read_video(video_dir / "ok0.mp4", 9, 32, 32)[None])
    torch.testing.assert_close(latents[:1], ref, rtol=2e-3, atol=2e-3)
    pd.print_summary(summary, out)
    assert "3 skipped" in capsys.readouterr().out

    # re-running reuses finished shards and reports the same counts
    again = pd.prepare_videos(entries, video_dir, out, tiny_vae_codec, height=32, width=32, num_frames=9,
                              shard_size=4, batch_size=2)
    assert again["shards_reused"] == 2 and again["shards_written"] == 0 and again["written"] == 3
    assert len(again["skipped"]) == 3
    with pytest.raises(AssertionError, match="written with"):   # never mix settings in one directory
        pd.prepare_videos(entries, video_dir, out, tiny_vae_codec, height=64, width=64, num_frames=9, shard_size=4)


@pytest.fixture(scope="module")
def tiny_vae_codec():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return encoders.WanVAE(AutoencoderKLWan(**TINY_VAE))


def test_prepare_toy_shards_resume_and_atomicity(tmp_path):
    out = tmp_path / "toy"
    summary = pd.prepare_toy(10, out, seed=5, shard_size=4)
    assert summary["written"] == 10 and summary["shards_written"] == 3
    shards = pd.list_shards(out)
    assert len(shards) == 3
    latents, prompts = pd.load_shard(shards[1])
    assert latents.shape == (4, tw.TOY_FRAMES, tw.TOY_LATENT_CHANNELS, tw.TOY_LATENT_SIZE, tw.TOY_LATENT_SIZE)
    videos, ref_prompts, _ = tw.sample_training_videos(4, seed=5, start=4)
    assert prompts == ref_prompts and torch.equal(tw.ToyCodec().decode(latents), videos)
    record = json.loads(shards[1].with_suffix(".json").read_text())
    assert record["index"] == [4, 5, 6, 7] and tw.make_prompt(record["objects"][0]) == prompts[0]

    # an interrupted shard (tensor file present, JSON marker missing) is not listed and gets rewritten
    shards[2].with_suffix(".json").unlink()
    shards[2].write_bytes(b"garbage")
    assert len(pd.list_shards(out)) == 2
    resumed = pd.prepare_toy(10, out, seed=5, shard_size=4)
    assert resumed["shards_reused"] == 2 and resumed["shards_written"] == 1
    assert pd.load_shard(pd.list_shards(out)[2])[0].shape[0] == 2
    assert not list(out.glob("*.tmp"))


def test_prepare_videos_with_poses_stores_the_latent_frames_cameras(video_dir, tmp_path, tiny_vae_codec):
    # one camera per video frame: translation x = frame index, so the stored rows say which frames were taken
    def pose_file(name, frames):
        world_to_camera = [[[1, 0, 0, float(f)], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]] for f in range(frames)]
        K = [[48.0, 0.0, 24.0], [0.0, 40.0, 20.0], [0.0, 0.0, 1.0]]  # focal = size, principal point at the centre
        path = tmp_path / name
        path.write_text(json.dumps(dict(world_to_camera=world_to_camera, intrinsics=K, width=48, height=40)))
        return path.name
    rows = [("ok0.mp4", "first", pose_file("ok0.json", 12)), ("ok1.mp4", "second", pose_file("ok1.json", 5))]
    for video, _, _ in rows:  # the pose files live beside the videos
        (tmp_path / video).write_bytes((video_dir / video).read_bytes())
    (tmp_path / "captions.csv").write_text("video,caption,poses\n" + "".join(f"{v},{c},{p}\n" for v, c, p in rows))
    entries = pd.read_captions(tmp_path / "captions.csv")
    summary = pd.prepare_videos(entries, tmp_path, tmp_path / "shards", tiny_vae_codec, height=32, width=32,
                                num_frames=9, shard_size=4)
    assert summary["written"] == 1 and "poses cover 5 frames < 9" in summary["skipped"][0]["reason"]
    data = common.LatentShards(tmp_path / "shards")
    assert data.has_cameras()
    world_to_camera, intrinsics = data.cameras(0)
    assert world_to_camera[:, 0, 3].tolist() == [0.0, 4.0, 8.0]  # latent k <- video frame 4k
    # 40x48 -> cover-resize to 32x38 -> crop 3 columns each side: fx 48·38/48 = 38 px of a 32-px-wide frame,
    # fy 40·32/40 = 32 px of 32, principal point 24·38/48 − 3 = 16 and 20·32/40 = 16: the centre
    expected = torch.tensor([[38 / 32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(intrinsics, expected.expand(3, 3, 3), atol=1e-6)
    (tmp_path / "mixed.csv").write_text("video,caption,poses\nok0.mp4,a,ok0.json\nok2.mp4,b,\n")
    with pytest.raises(AssertionError, match="give every video its poses or none"):
        pd.read_captions(tmp_path / "mixed.csv")


@pytest.mark.parametrize("argv, message", [
    (["--toy", "-3"], "--toy must be a number of clips"),
    ([], "real data needs --videos, --captions and --wan_dir"),
    (["--toy", "4", "--shard_size", "0"], "--shard_size must be at least 1"),
    (["--videos", "v", "--captions", "c.csv", "--wan_dir", "w", "--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["prepare_data.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit:
        pd.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
