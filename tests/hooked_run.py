"""Run a stage script in this process with one test hook installed, so a fault-injection test can wait for an
event (a file appears) instead of a clock, and the fault lands at a known point on any machine, however slow.

  python tests/hooked_run.py HOOK EVENT_FILE SCRIPT --key=value ...     (also as torchrun's script)

HOOK is one of
  none                      run unchanged
  pause_in_write:STEP       inside the checkpoint write of STEP, after its first weight file is in the temporary
                            directory: create EVENT_FILE, then wait forever (the test SIGKILLs: a torn write)
  pause_in_step:CALL        at the CALL-th gradient clipping (after backward, before the optimizer step, 1-based):
                            create EVENT_FILE, then wait forever (the test SIGKILLs: a step half done)
  sigterm_at_check:CALL     at the CALL-th per-step stop check: create EVENT_FILE, wait until the SIGTERM handler
                            has seen the test's signal, then continue (the run must save and stop there)
Only rank 0 creates EVENT_FILE and pauses in the weight-file hook; every rank pauses in the others.
"""
import os
import runpy
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal_event(path):
    if os.environ.get("RANK", "0") == "0":
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)


def wait_forever():
    while True:
        time.sleep(1)


def install(hook, event_file):
    import common
    kind, _, value = hook.partition(":")
    if kind == "none":
        return
    n = int(value)
    if kind == "pause_in_write":
        import safetensors.torch
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, path, *args, **kwargs):
            real_save_file(tensors, path, *args, **kwargs)
            if f".tmp_step_{n:07d}_" in path:
                signal_event(event_file)
                wait_forever()
        safetensors.torch.save_file = save_file
    elif kind == "pause_in_step":
        real_clip, calls = common.clip_grad_norm, [0]

        def clip_grad_norm(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                signal_event(event_file)
                wait_forever()
            return real_clip(*args, **kwargs)
        common.clip_grad_norm = clip_grad_norm
    elif kind == "sigterm_at_check":
        real_requested, calls = common.StopSignal.requested, [0]

        def requested(self, dist_ctx):
            calls[0] += 1
            if calls[0] == n:
                signal_event(event_file)
                while not self.flag:  # the handler runs between these sleeps once the signal arrives
                    time.sleep(0.01)
            return real_requested(self, dist_ctx)
        common.StopSignal.requested = requested
    else:
        raise SystemExit(f"unknown hook {hook!r}")


if __name__ == "__main__":
    hook, event_file, script, *args = sys.argv[1:]
    sys.path.insert(0, REPO)
    install(hook, event_file)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
