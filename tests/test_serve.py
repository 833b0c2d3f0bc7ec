"""serve.py end to end: a real server process on a free loopback port, driven over its WebSocket (aiohttp client)
and in headless Chromium (Playwright + Debian's chromium). Streams, prompt switching, bad prompts, busy / separate
streams, a closed tab, Ctrl-C, malformed messages. Timing targets are measured by bench.py, never asserted here,
and no test depends on how fast frames arrive: what a test reads while frames flow, it reads after "paused" (no
frame follows it) or in message order on the one socket."""
import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading

import pytest
import torch

import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = struct.Struct("<IfHHBBH")  # serve.py's frame header
OLD_PROMPT, NEW_PROMPT = "a red circle bounces slowly", "a green square stays still"
BAD_PROMPT = "a purple dragon flies"


# ---- helpers ----


class Server:
    """serve.py in a child process (one thread, like every test), on a free port chosen by the OS."""

    def __init__(self, *args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port", "0", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("open http://"):
                self.url = line.split()[1]
                break
        else:
            raise AssertionError(f"serve.py did not start:\n{''.join(self.lines)}\n{self.proc.stderr.read()[-3000:]}")
        assert self.url.startswith("http://127.0.0.1:"), f"the default bind must be loopback, got {self.url}"
        self.ws_url = self.url.replace("http://", "ws://") + "ws"
        self.out, self.err = [], []  # read all along, so a chatty server never blocks on a full pipe
        self.readers = [threading.Thread(target=lines.extend, args=(pipe,), daemon=True)
                        for lines, pipe in ((self.out, self.proc.stdout), (self.err, self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    def stop(self, timeout=30):
        """Ctrl-C; returns (exit code, rest of stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve.py did not exit within {timeout} s of SIGINT:\n{''.join(self.err)[-3000:]}")
        for reader in self.readers:
            reader.join()
        return self.proc.returncode, "".join(self.out), "".join(self.err)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def stats(session, server):
    async with session.get(server.url + "stats") as response:
        return await response.json()


async def idle(session, server):
    """Wait until the previous test's connection is gone (a closing stream still counts against --max_streams);
    run()'s time limit ends a wait that never does."""
    while (await stats(session, server))["connections"] != 0:
        await asyncio.sleep(0.05)


async def receive(ws, frames, messages):
    """Read until `frames` binary frames arrived -> list of (header tuple, payload); text messages go to `messages`."""
    import aiohttp
    out = []
    while len(out) < frames:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            out.append((HEADER.unpack_from(msg.data), msg.data[HEADER.size:]))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            messages.append(json.loads(msg.data))
        else:
            raise AssertionError(f"socket ended while waiting for frames: {msg.type} {messages}")
    return out


async def receive_until(ws, kind, messages):
    """Read until a text message of type `kind` arrives -> the binary frames read on the way, as receive();
    every text message goes to `messages`."""
    import aiohttp
    out, seen = [], len(messages)
    while not any(m["type"] == kind for m in messages[seen:]):
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            out.append((HEADER.unpack_from(msg.data), msg.data[HEADER.size:]))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            messages.append(json.loads(msg.data))
        else:
            raise AssertionError(f"socket ended while waiting for a {kind!r} message: {msg.type} {messages}")
    return out


def to_video(frames):
    """[(header, raw RGB bytes)] -> [T, 3, H, W] in [-1, 1] (ToyBench's input)."""
    (_, _, W, H, fmt, _, _), _ = frames[0]
    assert fmt == 0, "toy frames travel as raw RGB"
    pixels = torch.stack([torch.frombuffer(bytearray(p), dtype=torch.uint8).view(H, W, 3) for _, p in frames])
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


async def wait_idle(server):
    import aiohttp
    async with aiohttp.ClientSession() as session:
        await idle(session, server)


# ---- protocol tests (no browser) ----


def test_stream_prompt_switch_bad_prompt_busy_and_closed_tab(server):
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await idle(session, server)
            async with session.ws_connect(server.ws_url) as ws:
                hello = await ws.receive_json()
                assert hello["type"] == "hello"
                assert (hello["width"], hello["height"]) == (toyworld.TOY_SIZE, toyworld.TOY_SIZE)  # from the checkpoint
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                messages = []
                first = await receive(ws, 30, messages)
                assert [h[0] for h, _ in first] == list(range(30)), "frames must arrive in order, each once"
                assert all(len(p) == toyworld.TOY_SIZE ** 2 * 3 for _, p in first)
                assert toyworld.score_video(to_video(first[1:]), OLD_PROMPT)["colour"] >= 0.75

                # a second client while this stream runs: a clear busy message, then the socket closes
                async with session.ws_connect(server.ws_url) as other:
                    busy = await other.receive_json()
                    assert busy["type"] == "busy" and "--max_streams" in busy["message"]
                    assert (await other.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

                # a prompt the toy text encoder cannot take: an error naming the words, and the stream goes on
                await ws.send_json(dict(type="prompt", prompt=BAD_PROMPT))
                more = await receive_until(ws, "error", messages)
                more += await receive(ws, 10, messages)
                errors = [m for m in messages if m["type"] == "error"]
                assert len(errors) == 1 and "purple" in errors[0]["message"] and "vocabulary" in errors[0]["message"]
                assert [h[0] for h, _ in more] == list(range(30, 30 + len(more))) and all(h[6] == 0 for h, _ in more)

                # a good prompt switch: acknowledged with the frame it starts at (before that frame), frames follow it
                await ws.send_json(dict(type="prompt", prompt=NEW_PROMPT, mode="cross_attn"))
                before = await receive_until(ws, "prompt_applied", messages)
                applied = [m for m in messages if m["type"] == "prompt_applied"]
                assert len(applied) == 1 and applied[0]["prompt"] == NEW_PROMPT and applied[0]["epoch"] == 1
                switched = await receive(ws, 20, messages)
                assert [h[0] for h, _ in before + switched] == list(range(30 + len(more), switched[-1][0][0] + 1))
                assert all(h[6] == 0 for h, _ in before) and all(h[6] == 1 for h, _ in switched)
                assert switched[0][0][0] == applied[0]["frame"]
                video = to_video(switched[4:16])  # bench.py prompt-switch: the new colour shows within 3 frames
                assert toyworld.score_video(video, NEW_PROMPT)["colour"] >= 0.75
                assert toyworld.score_video(video, OLD_PROMPT)["colour"] <= 0.25
                running = await stats(session, server)
                assert running["active_streams"] == 1 and running["busy_refusals"] >= 1
            # the tab is gone: generation stops and the stream is freed (run()'s time limit ends a wait that never does)
            while (now := await stats(session, server))["connections"] != 0:
                await asyncio.sleep(0.05)
            assert now["active_streams"] == 0
            await asyncio.sleep(0.5)
            later = await stats(session, server)
            assert later["frames_sent"] == now["frames_sent"], "frames are still generated for a closed tab"
            # and the next client gets a fresh stream from frame 0
            async with session.ws_connect(server.ws_url) as ws:
                assert (await ws.receive_json())["type"] == "hello"
                await ws.send_json(dict(type="start", prompt=NEW_PROMPT))
                fresh = await receive(ws, 3, [])
                assert [h[0] for h, _ in fresh] == [0, 1, 2]

    run(scenario())


def test_streamed_frames_are_the_rollout_frames(server):
    """The page gets exactly what model.Rollout + the codec make for the same seed: an in-process Stream with one
    thread, like the server process (same arithmetic, so bit-identical uint8 frames)."""
    import aiohttp

    import serve

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await idle(session, server)
            async with session.ws_connect(server.ws_url) as ws:
                await ws.receive_json()
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT, seed=3))
                return await receive(ws, 8, [])

    frames = run(scenario())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = serve.Engine(serve.ServeConfig(ckpt=os.path.join(ROOT, "checkpoints/toy/dmd_2step")))
        stream = engine.new_stream(engine.encode(OLD_PROMPT), seed=3)
        expected = [stream.step()[1][0] for _ in range(8)]
        engine.close()
    finally:
        torch.set_num_threads(threads)
    for (header, payload), frame in zip(frames, expected):
        assert payload == frame.tobytes(), f"frame {header[0]} differs from the in-process rollout"


def test_pause_resume_reset(server):
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await idle(session, server)
            async with session.ws_connect(server.ws_url) as ws:
                assert (await ws.receive_json())["type"] == "hello"
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                messages = []
                await receive(ws, 5, messages)
                await ws.send_json(dict(type="pause"))
                await receive_until(ws, "paused", messages)  # the frame in flight comes before "paused"
                paused_at = (await stats(session, server))["frames_sent"]
                await asyncio.sleep(0.5)
                assert (await stats(session, server))["frames_sent"] == paused_at, "a frame came after 'paused'"
                await ws.send_str("nonsense")  # not JSON: an error message, and the stream stays usable
                await ws.send_json(dict(type="resume"))
                resumed = await receive(ws, 3, messages)
                assert any(m["type"] == "error" and "nonsense" in m["message"] for m in messages)
                assert resumed[0][0][0] >= 5
                await ws.send_json(dict(type="reset"))
                await receive_until(ws, "reset", messages)
                assert (await stats(session, server))["active_streams"] == 0
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                again = await receive(ws, 2, messages)
                assert [h[0] for h, _ in again] == [0, 1]

    run(scenario())


# a malformed message -> (the server to send it to, a piece of the error message that comes back)
MALFORMED = [
    (dict(type="start", prompt=12345), "server", "'prompt' of a 'start' message must be a string"),
    (dict(type="start", prompt=["a"]), "server", "'prompt' of a 'start' message must be a string"),
    (dict(type="start", seed="1"), "server", "'seed' of a 'start' message must be an integer"),
    (dict(type="start", seed=-1), "server", "must be a non-negative integer"),
    (dict(type="start", prompt=NEW_PROMPT, mode=7), "server", "'mode' of a 'start' message must be one of"),
    (dict(type="prompt", prompt=12345), "server", "'prompt' of a 'prompt' message must be a string"),
    (dict(type="prompt", prompt=NEW_PROMPT, mode=7), "server", "'mode' of a 'prompt' message must be one of"),
    (dict(type="prompt", prompt=NEW_PROMPT, mode="fast"), "server", "'recache', 'cross_attn'"),
    (dict(type="control", pan=[1e9, "a"]), "server", "'pan' moves the camera of a world-model"),
    (dict(type="control", pan=[1e9, "a"]), "camera_server", "pan must be two whole numbers"),
    (dict(type="control", zoom=2), "camera_server", "unknown control 'zoom'"),
    (b"\x00\x01binary", "server", "binary message of 8 bytes"),
    ("nonsense", "server", "expected JSON with a 'type'"),
    ("[1, 2]", "server", "expected JSON with a 'type'"),
    (dict(type="fly"), "server", "unknown message type 'fly'"),
]


@pytest.mark.parametrize("message, which, expected", MALFORMED,
                         ids=[f"{i}-{str(m)[:40]}" for i, (m, _, _) in enumerate(MALFORMED)])
def test_a_malformed_message_gets_an_error_and_leaves_the_stream_as_it_was(message, which, expected, request):
    import aiohttp
    s = request.getfixturevalue(which)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await idle(session, s)
            async with session.ws_connect(s.ws_url) as ws:
                assert (await ws.receive_json())["type"] == "hello"
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                messages = []
                frames = await receive(ws, 2, messages)
                if isinstance(message, dict):
                    await ws.send_json(message)
                elif isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
                await ws.send_json(dict(type="pause"))  # its answer comes before "paused"
                frames += await receive_until(ws, "paused", messages)
                paused = await stats(session, s)
                await ws.send_json(dict(type="resume"))
                frames += await receive(ws, 2, messages)
        errors = [m["message"] for m in messages if m["type"] == "error"]
        assert len(errors) == 1 and expected in errors[0], (message, errors)
        assert "\n" not in errors[0] and len(errors[0]) < 300, errors[0]  # one line
        # the stream is as it was: the same prompt and epoch, every frame in order, the camera where it was
        assert paused["streams"][0]["prompt"] == OLD_PROMPT and paused["streams"][0]["epoch"] == 0
        assert [h[0] for h, _ in frames] == list(range(len(frames))) and all(h[6] == 0 for h, _ in frames)
        assert all(m["corner"] == [0, 0] for m in messages if m["type"] == "camera")

    run(scenario())
    code = s.proc.poll()
    assert code is None, f"serve.py exited ({code}): {''.join(s.err)[-3000:]}"
    assert "Traceback" not in "".join(s.err), "".join(s.err)[-3000:]


def test_two_clients_get_their_own_streams():
    import aiohttp
    s = Server("--max_streams", "2")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(s.ws_url) as a, session.ws_connect(s.ws_url) as b:
                await a.receive_json(), await b.receive_json()
                await a.send_json(dict(type="start", prompt=OLD_PROMPT))
                await b.send_json(dict(type="start", prompt=NEW_PROMPT, seed=1))
                frames_a, frames_b = await asyncio.gather(receive(a, 16, []), receive(b, 16, []))
                assert (await stats(session, s))["active_streams"] == 2
        # each stream is whole (its own frame counter) and is its own prompt (never the other client's frames)
        assert [h[0] for h, _ in frames_a] == list(range(16)) == [h[0] for h, _ in frames_b]
        assert toyworld.score_video(to_video(frames_a[1:]), OLD_PROMPT)["colour"] >= 0.75
        assert toyworld.score_video(to_video(frames_b[1:]), NEW_PROMPT)["colour"] >= 0.75
        assert toyworld.score_video(to_video(frames_a[1:]), NEW_PROMPT)["colour"] <= 0.25

    try:
        run(scenario())
    finally:
        s.stop()


def test_ctrl_c_while_streaming_exits_cleanly():
    import aiohttp
    s = Server()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(s.ws_url) as ws:
                await ws.receive_json()
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                await receive(ws, 5, [])
                s.proc.send_signal(signal.SIGINT)
                while True:  # the server closes the socket on its way out
                    msg = await ws.receive()
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return msg

    closing = run(scenario())
    code, out, err = s.stop()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped" in out and closing.type in (__import__("aiohttp").WSMsgType.CLOSE,
                                                 __import__("aiohttp").WSMsgType.CLOSED)


def test_bad_arguments_are_one_line_errors():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", "no/such/checkpoint"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "not found" in result.stderr and "Traceback" not in result.stderr


# ---- the real browser ----


def browser_or_skip():
    """Headless Chromium through Playwright, or a skip with the reason; in CI (CI=true) a missing browser fails."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -r requirements.txt)"
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and path is None:
        reason = "no Chromium browser found (Debian: apt-get install chromium; or set CHROMIUM=/path/to/chrome)"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    return path


def test_browser_stream_fps_prompt_switch_and_bad_prompt(server, tmp_path):
    browser_path = browser_or_skip()
    from playwright.sync_api import sync_playwright
    run(wait_idle(server))  # before Playwright: its sync API runs an event loop of its own in this thread
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=dict(width=900, height=760))
            page.goto(server.url)
            page.wait_for_function("window.demo && window.demo.state === 'ready'", timeout=30_000)
            page.fill("#prompt", OLD_PROMPT)
            page.click("#start")
            page.wait_for_function("window.demo.frames >= 100", timeout=60_000)
            shown = page.evaluate("({fps: demo.fps, first: demo.firstFrameMs, indices: demo.recent.map(f => f.index)})")
            fps_text = float(page.inner_text("#fps"))
            assert shown["fps"] > 0 and fps_text > 0 and shown["first"] > 0, shown  # the page measures its own rate
            assert shown["indices"] == list(range(shown["indices"][0], shown["indices"][0] + len(shown["indices"])))

            # a bad prompt: a clear message in the page, and frames keep coming
            page.fill("#prompt", BAD_PROMPT)
            page.click("#start")
            page.wait_for_function("document.getElementById('message').className === 'error'", timeout=30_000)
            assert "purple" in page.inner_text("#message")
            count = page.evaluate("demo.frames")
            page.wait_for_function(f"window.demo.frames >= {count + 10}", timeout=30_000)

            # switch the prompt: frames after the switch follow it (ToyBench colour metric on what the page drew)
            page.fill("#prompt", NEW_PROMPT)
            page.click("#start")
            page.wait_for_function("window.demo.recent.filter(f => f.epoch >= 1).length >= 20", timeout=30_000)
            frames = page.evaluate("demo.recent.filter(f => f.epoch >= 1).slice(0, 20)")
            page.screenshot(path=str(tmp_path / "serve.png"))
        finally:
            browser.close()
    H, W = frames[0]["height"], frames[0]["width"]
    rgba = torch.tensor([f["rgba"] for f in frames], dtype=torch.uint8).view(len(frames), H, W, 4)
    video = rgba[..., :3].permute(0, 3, 1, 2).float() / 127.5 - 1  # [T, 3, H, W]
    after = video[4:16]  # bench.py prompt-switch: the new colour shows within 3 frames
    assert toyworld.score_video(after, NEW_PROMPT)["colour"] >= 0.75
    assert toyworld.score_video(after, OLD_PROMPT)["colour"] <= 0.25
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    if os.environ.get("SERVE_SCREENSHOT"):  # `make screenshot` refreshes docs/serve.png from this test
        shutil.copy(tmp_path / "serve.png", os.environ["SERVE_SCREENSHOT"])


# ---- world-model mode (a camera-conditioned checkpoint: arrow keys / WASD pan the camera) ----


@pytest.fixture(scope="module")
def camera_server():
    # the shipped world model (make world-model, exported), so the pixels can be checked against the camera too
    s = Server("--ckpt", os.path.join(ROOT, "checkpoints/toy/camera_dmd_2step"), "--max_fps", "60")
    yield s
    s.stop()


# The shipped student's pan error in toy_eval camera is 0.33 px/frame on 12-frame clips; a model that ignores
# the camera scores the commanded pan itself: 2 or 2.24 px/frame on the moving transitions checked here.
PAN_ERROR_BOUND = 1.0


def camera_corners(messages):
    return {m["frame"]: tuple(m["corner"]) for m in messages if m["type"] == "camera"}


def streamed_pan_error(video, indices, corners):
    """The view's motion in the streamed pixels against the cameras the server reported: video [T, 3, H, W] of
    consecutive frames `indices` -> mean px/frame error of toyworld.estimate_pans (the pan estimator of toy_eval
    camera) over the transitions where the camera moved."""
    assert list(indices) == list(range(indices[0], indices[0] + len(indices))), f"frames not consecutive: {indices}"
    commanded = torch.tensor([(corners[f][0] - corners[f - 1][0], corners[f][1] - corners[f - 1][1])
                              for f in indices[1:]], dtype=torch.float32)  # [T-1, 2]
    moving = commanded.abs().sum(1) > 0
    assert moving.sum() >= 4, f"only {int(moving.sum())} transitions with a moving camera"
    return (toyworld.estimate_pans(video) - commanded)[moving].norm(dim=1).mean().item()


def test_camera_mode_moves_every_frame_by_the_commanded_pan(camera_server):
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await idle(session, camera_server)
            async with session.ws_connect(camera_server.ws_url) as ws:
                hello = await ws.receive_json()
                assert hello["camera"] is True and hello["max_pan"] == toyworld.CAMERA_MAX_PAN
                assert "world-model mode" in hello["model"]
                await ws.send_json(dict(type="start", prompt=OLD_PROMPT))
                messages = []
                still = await receive(ws, 3, messages)
                await ws.send_json(dict(type="pause"))  # no frame follows "paused": the pan starts at a known frame
                still += await receive_until(ws, "paused", messages)
                await ws.send_json(dict(type="control", pan=[2, -1]))
                await ws.send_json(dict(type="resume"))
                frames = await receive(ws, 12, messages)
                await ws.send_json(dict(type="control", pan=[3, 0]))  # beyond what the model was trained on
                await ws.send_json(dict(type="control", pan="left"))
                await ws.send_json(dict(type="pause"))  # the answers to both come before "paused"
                frames += await receive_until(ws, "paused", messages)
                paused = await stats(session, camera_server)
        last = still[-1][0][0]  # the last frame before the pan
        assert [h[0] for h, _ in still + frames] == list(range(len(still) + len(frames)))
        corners = camera_corners(messages)
        assert corners[0] == (0, 0) and sorted(corners) == list(range(len(corners)))
        moves = [(corners[f][0] - corners[f - 1][0], corners[f][1] - corners[f - 1][1]) for f in range(1, len(corners))]
        # the pan applies from the first frame made after it and stays until changed (moves[f - 1] leads to frame f)
        assert moves == [(0, 0)] * last + [(2, -1)] * (len(moves) - last), moves
        assert all(h[0] in corners for h, _ in still + frames)  # every frame has its camera, sent before it
        panning = [(h, p) for h, p in frames if h[0] > last + 1]  # every frame of these moved by (2, -1)
        error = streamed_pan_error(to_video(panning), [h[0] for h, _ in panning], corners)
        print(f"streamed pan error {error:.3f} px/frame over {len(panning) - 1} transitions")
        assert error <= PAN_ERROR_BOUND, f"the view does not follow the camera: {error:.2f} px/frame"
        errors = [m["message"] for m in messages if m["type"] == "error"]
        assert len(errors) == 2 and all("pan must be two whole numbers" in e for e in errors)
        # paused: the stream's camera is the one of the last frame sent
        assert tuple(paused["streams"][0]["camera"]) == corners[max(corners)] == corners[frames[-1][0][0]]

    run(scenario())


def test_browser_arrow_keys_and_wasd_pan_the_camera(camera_server):
    browser_path = browser_or_skip()
    from playwright.sync_api import sync_playwright
    run(wait_idle(camera_server))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(camera_server.url)
            page.wait_for_function("window.demo && window.demo.state === 'ready' && window.demo.maxPan", timeout=30_000)
            page.click("#start")
            page.wait_for_function("window.demo.frames >= 3", timeout=30_000)
            page.locator("body").click(position=dict(x=5, y=5))  # focus leaves the prompt box
            page.keyboard.down("ArrowRight")
            page.wait_for_function("window.demo.camera && window.demo.camera[0] >= 10", timeout=30_000)
            page.keyboard.up("ArrowRight")
            page.keyboard.down("w")
            page.wait_for_function("window.demo.camera[1] <= -10", timeout=30_000)
            page.keyboard.up("w")
            page.wait_for_function("String(window.demo.pan) === '0,0'", timeout=30_000)
            page.click("#pause")  # no frame follows "paused", and both lists are read at once
            page.wait_for_function("window.demo.state === 'paused'", timeout=30_000)
            messages, recent = page.evaluate("[demo.messages, demo.recent]")
            shown = page.inner_text("#camera")
        finally:
            browser.close()
    corners = camera_corners(messages)
    assert [r["index"] for r in recent] == sorted(corners)[-len(recent):], "a drawn frame without its camera"
    # the pixels the page drew pan as the keys said: estimated from the canvas, against the cameras
    pixels = torch.stack([torch.tensor(r["rgba"], dtype=torch.uint8).view(r["height"], r["width"], 4)[..., :3]
                          for r in recent])  # [T, H, W, 3]
    video = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    indices = [r["index"] for r in recent]
    error = streamed_pan_error(video, indices, corners)
    print(f"pan error of the drawn frames {error:.3f} px/frame over {len(indices) - 1} transitions")
    assert error <= PAN_ERROR_BOUND, f"the drawn view does not follow the keys: {error:.2f} px/frame"
    moves = {(corners[f][0] - corners[f - 1][0], corners[f][1] - corners[f - 1][1]) for f in range(1, max(corners) + 1)}
    assert moves <= {(0, 0), (2, 0), (0, -2)} and {(2, 0), (0, -2)} <= moves  # right, then up (W), at 2 px/frame
    assert shown.replace(" ", "") != "-"
    errors = [m for m in messages if m["type"] == "error"]
    assert not errors, errors


def test_bench_page_repeats_start_a_fresh_server_and_page_each_time(tmp_path):
    """bench.py page --repeats: every run's page figures and their spread in the JSON (no timing is asserted)."""
    browser_path = browser_or_skip()
    out = tmp_path / "page.json"
    result = subprocess.run([sys.executable, "bench.py", "page", "--frames", "3", "--repeats", "2", "--threads", "1",
                             "--browser", browser_path, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2 and all(r["frames"] >= 3 and r["firstFrameMs"] > 0 for r in report["runs"])
    first = sorted(r["firstFrameMs"] for r in report["runs"])
    assert (report["first_frame_ms"]["min"], report["first_frame_ms"]["max"]) == (first[0], first[-1])
    assert "page, 2 runs:" in result.stdout and "first frames within 100 ms" in result.stdout
    bad = subprocess.run([sys.executable, "bench.py", "page", "--repeats", "0", "--browser", browser_path],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--repeats must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
