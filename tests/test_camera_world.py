"""The camera world of toyworld.py (paper §3.3's action-conditioned world model on the toy world): exact,
deterministic clips whose per-frame cameras agree with the pixels, smooth pans, and the pan estimator."""
import random

import torch

import model as M
import toyworld as tw

PROMPT = "a red circle moves left quickly and a blue square stays still"


def test_clips_are_deterministic_and_open_on_their_first_object():
    a, b = tw.render_camera_clip(PROMPT, 7), tw.render_camera_clip(PROMPT, 7)
    assert torch.equal(a["video"], b["video"]) and a["pans"] == b["pans"]
    assert not torch.equal(a["video"], tw.render_camera_clip(PROMPT, 8)["video"])
    for seed in range(20):
        clip = tw.render_camera_clip(PROMPT, seed)
        x0, y0 = clip["starts"][0]
        cx, cy = clip["corners"][0]
        assert 0 <= x0 - cx <= tw.TOY_SIZE - tw.OBJECT_SIZE and 0 <= y0 - cy <= tw.TOY_SIZE - tw.OBJECT_SIZE
        red = (clip["video"][0, 0] > 0) & (clip["video"][0, 1] < 0)
        assert red.sum() == tw.TEMPLATES["circle"].sum()  # the whole red circle is in frame 0
        values = clip["video"].unique().tolist()
        assert set(values) <= {-1.0, 0.0, 1.0}  # pure colours and the landmark grey: exact in fp16


def test_pans_are_smooth_and_bounded():
    rng = random.Random(0)
    for _ in range(50):
        pans = tw.camera_pans(rng, 40)
        assert all(abs(dx) <= tw.CAMERA_MAX_PAN and abs(dy) <= tw.CAMERA_MAX_PAN for dx, dy in pans)
        for (ax, ay), (bx, by) in zip(pans, pans[1:]):
            assert abs(ax - bx) + abs(ay - by) <= 1  # one pixel per frame on one axis at most


def test_views_are_windows_of_the_wrapping_scene():
    clip = tw.render_camera_clip(PROMPT, 3, frames=30)
    objects = tw.parse_prompt(PROMPT)
    paths = [tw.camera_world_path(o, x, y, 30) for o, (x, y) in zip(objects, clip["starts"])]
    N, S = tw.CAMERA_WORLD_SIZE, tw.TOY_SIZE
    for t in (0, 11, 29):
        scene = tw.draw_scene(objects, [p[t] for p in paths], clip["landmarks"])
        tiled = scene.repeat(1, 3, 3)  # [3, 3N, 3N]: any window of the torus is a plain crop of this
        cx, cy = clip["corners"][t]
        x, y = cx % N, cy % N
        assert torch.equal(clip["video"][t], tiled[:, y:y + S, x:x + S] * 2 - 1)
    # the objects move as the prompt says, wrapping around: left quickly = 2 px per frame
    assert [(x - paths[0][0][0]) % N for x, _ in paths[0][:4]] == [0, N - 2, N - 4, N - 6]
    assert len(set(paths[1])) == 1  # stays still


def test_bounce_reflects_between_ceiling_and_floor_forever():
    obj = dict(colour="green", shape="square", motion="bounce", speed="quickly")
    ys = [y for _, y in tw.camera_world_path(obj, 0, 50, 200)]
    assert min(ys) == 0 and max(ys) == tw.CAMERA_MAX_POS
    assert all(abs(a - b) == 2 for a, b in zip(ys, ys[1:]))


def test_cameras_project_the_scene_onto_the_pixels_that_show_it():
    # every landmark's centre, as a world point on the plane z = 1, lands through P = K·T at the pixel where
    # the view shows it: the poses given to the model are the real cameras of the rendering
    clip = tw.render_camera_clip("a green square stays still", 5)
    P, _ = M.camera_projections(clip["world_to_camera"][None], clip["intrinsics"][None])
    N, S = tw.CAMERA_WORLD_SIZE, tw.TOY_SIZE
    checked = 0
    for t, (cx, cy) in enumerate(clip["corners"]):
        for lx, ly in clip["landmarks"]:
            # the copy of the landmark (on the torus) nearest the view's centre, in unwrapped scene pixels
            u = lx + tw.LANDMARK_SIZE / 2 + N * round((cx + S / 2 - lx) / N)
            v = ly + tw.LANDMARK_SIZE / 2 + N * round((cy + S / 2 - ly) / N)
            image = P[0, t] @ torch.tensor([u / S, v / S, 1.0, 1.0])
            px, py = (image[0] / image[2] + 0.5) * S, (image[1] / image[2] + 0.5) * S  # normalised -> pixels
            assert abs(px - (u - cx)) < 1e-4 and abs(py - (v - cy)) < 1e-4
            if 1 <= px <= S - 1 and 1 <= py <= S - 1:
                pixel = clip["video"][t, :, int(py), int(px)]
                if not pixel.eq(1).any():  # not covered by the (pure-coloured) object
                    assert pixel.eq(0).all(), f"frame {t}: no landmark at ({px}, {py})"
                    checked += 1
    assert checked >= 12 * 2


def test_pan_estimator_recovers_the_commanded_pans_and_catches_ignored_ones():
    for seed in range(12):
        objects = tw.sample_objects(random.Random(seed))
        clip = tw.render_camera_clip(objects, seed)
        assert tw.estimate_pans(clip["video"]).tolist() == [list(p) for p in clip["pans"]]
        assert tw.pan_error(clip["video"], clip["pans"]) == 0.0
    frozen = clip["video"][:1].repeat(12, 1, 1, 1)  # a clip that ignores the camera: off by the pan itself
    expected = sum((dx * dx + dy * dy) ** 0.5 for dx, dy in clip["pans"]) / 11
    assert abs(tw.pan_error(frozen, clip["pans"]) - expected) < 1e-6


def test_commanded_pans_drive_the_camera():
    pans = [(1, 0)] * 5 + [(0, -2)] * 6
    clip = tw.render_camera_clip(PROMPT, 0, pans=pans)
    assert clip["pans"] == pans
    (x0, y0), (x11, y11) = clip["corners"][0], clip["corners"][-1]
    assert (x11 - x0, y11 - y0) == (5, -12)
    # the camera moves right: the world point seen at the centre moves by +1/TOY_SIZE per frame
    assert torch.allclose(-clip["world_to_camera"][1, :3, 3] + clip["world_to_camera"][0, :3, 3],
                          torch.tensor([1 / tw.TOY_SIZE, 0.0, 0.0]))


def test_training_stream_has_poses_per_frame():
    videos, prompts, poses, intrinsics, meta = tw.sample_camera_training_videos(3, seed=0)
    assert videos.shape == (3, tw.TOY_FRAMES, 3, tw.TOY_SIZE, tw.TOY_SIZE)
    assert poses.shape == (3, tw.TOY_FRAMES, 4, 4) and intrinsics.shape == (3, tw.TOY_FRAMES, 3, 3)
    again = tw.sample_camera_training_videos(1, seed=0, start=2)
    assert torch.equal(again[0][0], videos[2]) and again[1][0] == prompts[2]
    assert not any(tw.is_heldout(o) for m in meta for o in m["objects"])


def test_pans_of_cameras_invert_camera_poses():
    clip = tw.render_camera_clip(PROMPT, 4)
    assert tw.pans_of_cameras(clip["world_to_camera"]).tolist() == [list(map(float, p)) for p in clip["pans"]]
