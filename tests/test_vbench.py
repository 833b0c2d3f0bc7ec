"""vbench_eval.py --suite vbench: the aggregation reproduces published VBench tables and refuses missing
dimensions; file names are VBench's full-prompt names; shards cover the suite exactly once; generation
resumes (only missing videos are made, with the same seeds) on a tiny random model on CPU; the weight-file
check names what is missing; and the whole generate -> run VBench -> parse -> aggregate path runs against a
fake VBench command."""
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from helpers import tiny_frame_wise_checkpoint
import vbench_eval
from vbench_eval import VBENCH_DIMENSIONS, VBenchError

# -----------------------------------------------------------------------------
# published VBench rows: per-dimension scores (percent, in VBENCH_DIMENSIONS order) -> (Total, Quality, Semantic)

ORDER = list(VBENCH_DIMENSIONS)   # subject, background, flickering, motion, dynamic, aesthetic, imaging, object,
                                  # multiple, human action, color, spatial, scene, appearance, temporal style, overall
PUBLISHED = {
    # Table 1: AccVideo README, "VBench Results" (github.com/aejion/AccVideo, README.md at 6469eb6; arXiv 2503.19462).
    "AccVideo-HunyuanT2V": ((83.26, 84.58, 77.96),
                            [94.46, 97.45, 99.18, 98.79, 75.00, 62.08, 65.64, 92.99, 67.33, 95.60, 94.11, 75.70,
                             54.72, 19.87, 23.71, 27.21]),
    "AccVideo-WanXT2V": ((85.95, 86.62, 83.25),
                         [95.02, 97.75, 99.54, 97.95, 93.33, 64.21, 68.42, 98.38, 86.58, 97.40, 92.04, 75.68,
                          59.82, 23.88, 24.62, 27.34]),
    # Table 2: FlashVideo (arXiv 2502.05179) Table 1, VBench leaderboard rows of open models (read from its
    # transcription in github.com/deep-diver/ai-paper-reviewer). CogVideoX-5B's 81.61 / 82.75 / 77.04 are its
    # leaderboard totals.
    "CogVideoX-5B": ((81.61, 82.75, 77.04),
                     [96.23, 96.52, 98.66, 96.92, 70.97, 61.98, 62.90, 85.23, 62.11, 99.40, 82.81, 66.35, 53.20,
                      24.91, 25.38, 27.59]),
    "CogVideoX-2B": ((81.57, 82.51, 77.79),
                     [96.42, 96.53, 98.45, 97.76, 58.33, 61.47, 65.60, 87.81, 69.35, 97.00, 86.87, 54.64, 57.51,
                      24.93, 25.56, 28.01]),
    "Vchitect-2.0 (VEnhancer)": ((82.24, 83.54, 77.06),
                                 [96.83, 96.66, 98.57, 98.98, 63.89, 60.41, 65.35, 86.61, 68.84, 97.20, 87.04,
                                  57.55, 56.57, 23.73, 25.01, 27.57]),
    "Mochi-1": ((80.13, 82.64, 70.08),
                [96.99, 97.28, 99.40, 99.02, 61.85, 56.94, 60.64, 86.51, 50.47, 94.60, 79.73, 69.24, 36.99, 20.33,
                 23.65, 25.15]),
}


def raw_fractions(percents):
    return {d: p / 100 for d, p in zip(ORDER, percents)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_aggregation_reproduces_published_vbench_tables(name):
    (total, quality, semantic), percents = PUBLISHED[name]
    scores = vbench_eval.aggregate(raw_fractions(percents))
    # published per-dimension scores are rounded to 0.01 points, the totals come from unrounded raws: 0.02 slack
    assert abs(100 * scores["total"] - total) < 0.02, (name, 100 * scores["total"], total)
    assert abs(100 * scores["quality"] - quality) < 0.02, (name, 100 * scores["quality"], quality)
    assert abs(100 * scores["semantic"] - semantic) < 0.02, (name, 100 * scores["semantic"], semantic)


def test_normalisation_constants_and_weights():
    assert vbench_eval.normalise("scene", 0.8222) == pytest.approx(1.0)
    assert vbench_eval.normalise("appearance_style", 0.0009) == pytest.approx(0.0)
    assert vbench_eval.normalise("subject_consistency", 0.1) < 0   # not clamped, as VBench
    weights = {g: sum(w for gg, w, _, _ in VBENCH_DIMENSIONS.values() if gg == g) for g in ("quality", "semantic")}
    assert weights == {"quality": 6.5, "semantic": 9.0}
    perfect = {d: maximum for d, (_, _, _, maximum) in VBENCH_DIMENSIONS.items()}
    assert vbench_eval.aggregate(perfect)["total"] == pytest.approx(1.0)


def test_missing_or_percent_dimensions_are_refused_not_zero_filled():
    raw = raw_fractions(PUBLISHED["CogVideoX-5B"][1])
    del raw["color"], raw["dynamic_degree"]
    with pytest.raises(VBenchError, match="2 dimension.*dynamic_degree, color") as error:
        vbench_eval.aggregate(raw)
    assert "\n" not in str(error.value)
    with pytest.raises(VBenchError, match="fraction"):
        vbench_eval.aggregate({d: 100 * v for d, v in raw_fractions(PUBLISHED["Mochi-1"][1]).items()})
    with pytest.raises(VBenchError, match="unknown"):
        vbench_eval.aggregate({**raw_fractions(PUBLISHED["Mochi-1"][1]), "camera_motion": 0.5})


def test_results_files_are_parsed_and_a_missing_dimension_is_one_error_line(tmp_path):
    raw = raw_fractions(PUBLISHED["CogVideoX-5B"][1])
    first = {d: [v, [{"video_path": "x.mp4", "video_results": v}]] for d, v in list(raw.items())[:8]}
    second = {d: [v, []] for d, v in list(raw.items())[8:]}
    (tmp_path / "a_eval_results.json").write_text(json.dumps(first))
    (tmp_path / "b_eval_results.json").write_text(json.dumps(second))
    summary = vbench_eval.main(["--suite", "vbench", "--results", str(tmp_path / "a_eval_results.json"),
                                str(tmp_path / "b_eval_results.json"), "--out", str(tmp_path / "out")])
    assert 100 * summary["total"] == pytest.approx(81.61, abs=0.02)
    csv = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert csv[0].startswith("name,") and csv[1].startswith("total,") and len(csv) == 1 + 3 + 16
    with pytest.raises(SystemExit, match="1 dimension.*: color$"):
        del second["color"]
        (tmp_path / "b_eval_results.json").write_text(json.dumps(second))
        vbench_eval.main(["--suite", "vbench", "--results", str(tmp_path / "a_eval_results.json"),
                          str(tmp_path / "b_eval_results.json"), "--out", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()


# -----------------------------------------------------------------------------
# names and shards

LONG_VBENCH_PROMPT = ("A tranquil tableau of in the desolate beauty of the American Southwest, Chaco Canyon's ancient "
                      "ruins whispered tales of an enigmatic civilization that once thrived amidst the arid landscapes")


def test_video_names_keep_the_full_prompt():
    assert len(LONG_VBENCH_PROMPT) > 100   # Self/Causal Forcing's prompt[:100] would break VBench's matching
    assert vbench_eval.video_filename(LONG_VBENCH_PROMPT, 4) == LONG_VBENCH_PROMPT + "-4.mp4"
    accented = ("A tranquil tableau of at the edge of the Arabian Desert, the ancient city of Petra beckoned with its "
                "enigmatic rock-carved façades")   # another VBench prompt, with a non-ASCII character
    assert vbench_eval.video_filename(accented, 0) == accented + "-0.mp4"
    for bad, why in [("a/b", "'/'"), (" padded", "whitespace"), ("", "empty"), ("é" * 125, "bytes")]:
        with pytest.raises(VBenchError, match=why):
            vbench_eval.video_filename(bad, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_prompt_and_sample_is_assigned_exactly_once(world):
    prompts = [f"prompt {i}" for i in range(7)] + ["prompt 3"]   # a repeated line, as in all_dimension.txt
    shards = [vbench_eval.shard_assignment(prompts, 5, rank, world) for rank in range(world)]
    everything = [job for shard in shards for job in shard]
    assert len(everything) == len(set(everything)) == 7 * 5       # disjoint, and the repeat is made once
    assert {(prompts[p], s) for p, s in everything} == {(f"prompt {i}", s) for i in range(7) for s in range(5)}
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    seeds = [vbench_eval.video_seed(0, j) for j in range(len(vbench_eval.suite_jobs(prompts, 5)))]
    assert len(set(seeds) | {s + 1 for s in seeds}) == 2 * len(seeds)   # noise and re-noise streams never shared


# -----------------------------------------------------------------------------
# weight files


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def full_cache(root):
    cache, hub = root / "vbench_cache", root / "hub"
    for path in vbench_eval.required_weight_files(list(VBENCH_DIMENSIONS)):
        (cache / path).mkdir(parents=True, exist_ok=True) if path.endswith("/") else touch(cache / path)
    (hub / "models--bert-base-uncased" / "snapshots" / "0123abc").mkdir(parents=True)
    return cache, hub


def test_weight_check_names_the_missing_files(tmp_path):
    assert vbench_eval.required_weight_files(["temporal_flickering"]) == []
    cache, hub = full_cache(tmp_path)
    assert vbench_eval.missing_weight_files(str(cache), list(VBENCH_DIMENSIONS), str(hub)) == []
    os.remove(cache / "raft_model/models/raft-things.pth")
    os.rmdir(cache / "dino_model/facebookresearch_dino_main")
    missing = vbench_eval.missing_weight_files(str(cache), ["dynamic_degree", "subject_consistency", "color"],
                                               str(tmp_path / "empty_hub"))
    assert missing == ["dino_model/facebookresearch_dino_main/", "raft_model/models/raft-things.pth",
                       "huggingface hub: bert-base-uncased"]
    assert vbench_eval.missing_weight_files(str(cache), ["aesthetic_quality", "temporal_flickering"], str(hub)) == []
    with pytest.raises(VBenchError, match="unknown"):
        vbench_eval.required_weight_files(["dynamics"])


# -----------------------------------------------------------------------------
# end to end on a tiny random frame-wise model with the toy text encoder and pixel codec

PROMPTS = ["a red circle moves left quickly", "a blue square stays still"]
EXTENDED = ["a red circle moves left quickly and a green triangle stays still", "a blue square stays still"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny_frame_wise_checkpoint(tmp_path_factory.mktemp("vbench"), num_frames=3)


@pytest.fixture
def prompt_files(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "extended.txt").write_text("\n".join(EXTENDED) + "\n")
    return str(tmp_path / "prompts.txt"), str(tmp_path / "extended.txt")


def generate(ckpt, prompts, out, *extra):
    return vbench_eval.main(["--suite", "vbench", "--ckpt", ckpt, "--prompts", prompts, "--out", str(out),
                             "--samples", "2", "--steps", "1", "--device", "cpu", "--quiet", *extra])


def frames_of(path):
    import imageio.v2 as iio
    reader = iio.get_reader(str(path))
    fps = reader.get_meta_data()["fps"]
    frames = [frame for frame in reader]
    reader.close()
    return frames, fps


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generation_names_records_seeds_and_resumes(tiny_ckpt, prompt_files, tmp_path):
    prompts, extended = prompt_files
    out = tmp_path / "out"
    generate(tiny_ckpt, prompts, out, "--extended_prompts", extended)
    videos = out / "videos"
    names = [f"{p}-{i}.mp4" for p in PROMPTS for i in range(2)]
    assert sorted(os.listdir(videos)) == sorted(names)          # full short prompts; nothing else in the folder
    frames, fps = frames_of(videos / names[0])
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3) and fps == vbench_eval.VBENCH_FPS
    first = manifest(out)
    assert [e["file"] for e in first] == names
    assert [e["generated_from"] for e in first] == [EXTENDED[0]] * 2 + [EXTENDED[1]] * 2
    assert len({e["seed"] for e in first}) == 4
    assert all(e["first_frame_latency_s"] > 0 and e["frames_per_s_with_decoding"] <= e["frames_per_s"] for e in first)
    assert json.loads((out / "timing.json").read_text())["videos_timed"] == 4

    # resume: delete one video, tear the last journal line as a kill would; only that video is made again
    before = {n: os.path.getmtime(videos / n) for n in names}
    old_frames, _ = frames_of(videos / names[1])
    os.remove(videos / names[1])
    with open(out / "manifest.rank0.jsonl", "a") as f:
        f.write('{"file": "torn')
    generate(tiny_ckpt, prompts, out, "--extended_prompts", extended)
    assert sorted(os.listdir(videos)) == sorted(names)
    assert all(os.path.getmtime(videos / n) == before[n] for n in names if n != names[1])
    assert os.path.getmtime(videos / names[1]) > before[names[1]]
    new_frames, _ = frames_of(videos / names[1])
    assert all(np.array_equal(a, b) for a, b in zip(old_frames, new_frames))   # same seed, same video
    assert [(e["file"], e["seed"]) for e in manifest(out)] == [(e["file"], e["seed"]) for e in first]

    # another world size makes the same videos with the same seeds (shards run as separate jobs)
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        generate(tiny_ckpt, prompts, sharded, "--extended_prompts", extended, "--rank", str(rank), "--world_size", "2")
    assert [(e["file"], e["seed"]) for e in manifest(sharded)] == [(e["file"], e["seed"]) for e in first]
    assert {e["rank"] for e in manifest(sharded)} == {0, 1}
    a, _ = frames_of(sharded / "videos" / names[2])
    b, _ = frames_of(videos / names[2])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

    # resuming with another seed or without the extended prompts would mix two settings in one folder
    with pytest.raises(SystemExit, match="base_seed"):
        generate(tiny_ckpt, prompts, out, "--extended_prompts", extended, "--seed", "7")
    with pytest.raises(SystemExit, match="generated from"):
        generate(tiny_ckpt, prompts, out)


FAKE_VBENCH = textwrap.dedent("""
    # stands in for `vbench evaluate`: writes a result JSON in VBench's format from scores.json next to it
    import argparse, glob, json, os, sys
    parser = argparse.ArgumentParser()
    for flag in ("--videos_path", "--dimension", "--output_path", "--load_ckpt_from_local"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.path.isdir(os.environ["VBENCH_CACHE_DIR"])
    with open(os.path.join(here, "calls.txt"), "a") as f:
        f.write(args.dimension + "\\n")
    if args.dimension in os.environ.get("FAKE_VBENCH_FAIL", ""):
        sys.exit(0)   # like the real CLI: exit 0 without a result
    score = json.load(open(os.path.join(here, "scores.json")))[args.dimension]
    videos = sorted(glob.glob(os.path.join(args.videos_path, "*.mp4")))
    json.dump({args.dimension: [score, [{"video_path": v, "video_results": score} for v in videos]]},
              open(os.path.join(args.output_path, "results_2025-01-01-00:00:00_eval_results.json"), "w"))
""")


def test_vbench_command_run_parse_aggregate(tiny_ckpt, prompt_files, tmp_path, monkeypatch):
    prompts, _ = prompt_files
    fake = tmp_path / "fake_vbench"
    fake.mkdir()
    (fake / "evaluate.py").write_text(FAKE_VBENCH)
    (fake / "scores.json").write_text(json.dumps(raw_fractions(PUBLISHED["AccVideo-WanXT2V"][1])))
    command = f"{sys.executable} {fake / 'evaluate.py'}"
    cache, hub = full_cache(tmp_path)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    out = tmp_path / "out"

    # a missing weight file is found before anything is generated
    os.remove(cache / "amt_model/amt-s.pth")
    with pytest.raises(SystemExit, match=r"lacks 1 weight file.*: amt_model/amt-s\.pth$") as error:
        generate(tiny_ckpt, prompts, out, "--vbench_cmd", command)
    assert "\n" not in str(error.value) and not out.exists()
    touch(cache / "amt_model/amt-s.pth")

    # a dimension VBench produced no result for is named, with its log
    monkeypatch.setenv("FAKE_VBENCH_FAIL", "scene")
    with pytest.raises(SystemExit, match=r"wrote no result for scene .*vbench\.log"):
        generate(tiny_ckpt, prompts, out, "--vbench_cmd", command)
    monkeypatch.delenv("FAKE_VBENCH_FAIL")

    summary = generate(tiny_ckpt, prompts, out, "--vbench_cmd", command)   # resumes: videos and 15 dims reused
    calls = (fake / "calls.txt").read_text().split()
    assert calls.count("scene") == 2 and all(calls.count(d) == 1 for d in ORDER if d != "scene")
    total, quality, semantic = PUBLISHED["AccVideo-WanXT2V"][0]
    assert 100 * summary["total"] == pytest.approx(total, abs=0.02)
    assert 100 * summary["quality"] == pytest.approx(quality, abs=0.02)
    assert 100 * summary["semantic"] == pytest.approx(semantic, abs=0.02)
    written = json.loads((out / "scores.json").read_text())
    assert written["total"] == summary["total"] and written["videos"] == 4 and written["timing"]["videos_timed"] == 4
    result = json.loads(next((out / "vbench_results" / "color").glob("*_eval_results.json")).read_text())
    assert len(result["color"][1]) == 4   # VBench saw exactly the suite's videos


def test_no_mp4_writer_stops_before_generation_with_one_line(tiny_ckpt, prompt_files, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    monkeypatch.setattr(vbench_eval, "load_vbench_generator", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(SystemExit) as error:
        generate(tiny_ckpt, prompt_files[0], tmp_path / "out")
    assert "imageio-ffmpeg" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out" / "videos").exists()
