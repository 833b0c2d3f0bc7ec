"""GPU (pytest -m gpu; skipped with the reason where CUDA is absent): the three toy stages under torchrun on CUDA
with FSDP2 and bf16 mixed precision, two steps each, from the same tiny checkpoints the CPU run tests use."""
import math

import pytest
import torch
from helpers import read_metrics, run_script
from test_stage1 import SCRIPT as STAGE1, run_args, tiny_init, toy_data  # noqa: F401 (fixtures)
from test_stage2 import stage2_args, toy_teacher  # noqa: F401
from test_stage3 import SCRIPT as STAGE3, dmd_models, stage3_args  # noqa: F401
from test_stage2 import SCRIPT as STAGE2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ON_CUDA = dict(device="cuda", mixed_precision="true", max_steps=2, save_every=2)


def assert_trained(out_dir, losses):
    rows = [r for r in read_metrics(out_dir) if r["step"] > 0]  # Stage 2 logs its (zero) ODE cost at step 0
    assert [r["step"] for r in rows] == [1, 2], rows
    for row in rows:
        for name in losses:
            assert math.isfinite(row[name]) and row[name] > 0, (name, row)


def test_gpu_torchrun_fsdp2_bf16_stage1(toy_data, tiny_init, tmp_path):
    out = str(tmp_path / "stage1")
    run_script(STAGE1, run_args(toy_data, out, tiny_init, batch_size=2, **ON_CUDA), nproc=1)
    assert_trained(out, ["loss"])


def test_gpu_torchrun_fsdp2_bf16_stage2(toy_teacher, tmp_path):
    data, teacher = toy_teacher
    out = str(tmp_path / "stage2")
    run_script(STAGE2, stage2_args(data, teacher, out, **ON_CUDA), nproc=1)
    assert_trained(out, ["loss"])


def test_gpu_torchrun_fsdp2_bf16_stage3(dmd_models, tmp_path):
    out = str(tmp_path / "stage3")
    run_script(STAGE3, stage3_args(dmd_models, out, **{**ON_CUDA, "mixed_precision": "true"}), nproc=1)
    assert_trained(out, ["generator_loss", "critic_loss"])
