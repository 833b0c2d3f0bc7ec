"""common.py: strict config loading, atomic checkpoints, EMA arithmetic, metrics log."""
import os
from dataclasses import dataclass

import pytest
import torch

import common


@dataclass
class DemoConfig:
    lr: float = 2e-6
    steps: int = 100
    name: str = "run"
    causal: bool = True
    step_list: list = (1000, 500)
    init_from: str | None = None


def test_config_defaults_yaml_then_cli(tmp_path):
    path = tmp_path / "delta.yaml"
    path.write_text("lr: 1e-4\nsteps: 5\nstep_list: [1000]\n")  # yaml reads 1e-4 as a string: parsed as float
    cfg = common.load_config(DemoConfig, ["--config", str(path), "--steps=7", "--causal=false", "--init_from=a/b"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 7 and cfg.causal is False and cfg.step_list == [1000] and cfg.init_from == "a/b"
    assert common.load_config(DemoConfig, []).name == "run"


@pytest.mark.parametrize("argv, message", [
    (["--stepz=3"], "unknown config key 'stepz'"),
    (["--steps=3.5"], "expects int"),
    (["--causal=yes"], "expects bool"),
    (["--lr=fast"], "expects float"),
    (["steps=3"], "cannot parse argument"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
])
def test_config_errors_are_one_clear_line(argv, message):
    with pytest.raises(common.ConfigError, match=message) as err:
        common.load_config(DemoConfig, argv)
    assert "\n" not in str(err.value)


def test_config_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 1.0\n")
    with pytest.raises(common.ConfigError, match=r"unknown config key 'learning_rate' in .*bad.yaml"):
        common.load_config(DemoConfig, ["--config", str(path)])


@pytest.mark.parametrize("script", ["stage1_teacher_forcing", "stage2_causal_cd", "stage3_asym_dmd"])
def test_help_lists_every_config_key_with_its_meaning(script):
    """--help / -h: the purpose, every Config key with type, default and meaning (from the dataclass), the yaml
    files that set it, an example command; exit code 0, nothing else run."""
    import importlib
    import subprocess
    import sys
    from dataclasses import fields
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_cls = importlib.import_module(script).Config
    meanings = common.config_comments(config_cls)
    assert all(meanings.values()), f"Config fields without a comment: {[k for k, v in meanings.items() if not v]}"
    for flag in ("--help", "-h"):
        result = subprocess.run([sys.executable, f"{script}.py", "--config", "configs/toy/tf.yaml", flag], cwd=repo,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
        out = result.stdout
        assert out.startswith(f"{script}.py: Stage ") and "example:" in out and f"python {script}.py --config" in out
        for f in fields(config_cls):
            assert f"  --{f.name} (" in out and f"= {f.default!r}): {meanings[f.name]}" in out, f.name
    # the yaml files listed are the script's own: out_dir is set in every one, each stage's toy file under its own
    own = dict(stage1_teacher_forcing="configs/toy/tf.yaml", stage2_causal_cd="configs/toy/cd.yaml",
               stage3_asym_dmd="configs/toy/dmd_2step.yaml")
    lines = out.splitlines()
    setters = lines[lines.index(next(line for line in lines if line.startswith("  --out_dir ("))) + 1]
    assert setters.startswith("      set in: ") and own[script] in setters, setters
    assert not any(other in setters for name, other in own.items() if name != script), setters


def test_checkpoint_roundtrip_and_latest_pointer(tmp_path):
    weights = {"model": {"w": torch.arange(6.0).view(2, 3)}, "ema": {"w": torch.ones(2, 3)}}
    state = {"step": 3, "rng": common.rng_state(), "optimizer": {"lr": torch.tensor(0.1)}}
    path = common.save_checkpoint(str(tmp_path), 3, weights, state, {"model_config": {"dim": 8}})
    assert common.latest_checkpoint(str(tmp_path)) == path
    loaded_weights, loaded_state, config = common.load_checkpoint_state(path)
    assert torch.equal(loaded_weights["model"]["w"], weights["model"]["w"])
    assert torch.equal(loaded_weights["ema"]["w"], weights["ema"]["w"])
    assert loaded_state["step"] == 3 and config["model_config"] == {"dim": 8} and config["step"] == 3


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    first = common.save_checkpoint(str(tmp_path), 1, {"model": {"w": torch.zeros(2)}}, {"step": 1}, {})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(common.os, "rename", crash)  # dies after the files are written, before the rename
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(str(tmp_path), 2, {"model": {"w": torch.ones(2)}}, {"step": 2}, {})
    monkeypatch.undo()
    assert common.latest_checkpoint(str(tmp_path)) == first
    weights, state, _ = common.load_checkpoint_state(first)
    assert state["step"] == 1 and torch.equal(weights["model"]["w"], torch.zeros(2))
    assert not os.path.exists(os.path.join(tmp_path, "step_0000002"))
    common.save_checkpoint(str(tmp_path), 3, {"model": {"w": torch.ones(2)}}, {"step": 3}, {})
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]  # the leftover is cleaned up


def test_ema_update_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = common.make_ema(model)
    assert not ema.weight.requires_grad
    with torch.no_grad():
        model.weight.fill_(3.0)
    common.ema_update(ema, model, decay=0.99)
    assert ema.weight.item() == pytest.approx(0.99 * 1.0 + 0.01 * 3.0)
    common.ema_update(ema, model, decay=0.99)
    assert ema.weight.item() == pytest.approx(0.99 * 1.02 + 0.01 * 3.0)
    assert model.weight.item() == 3.0  # the trained model is untouched


def test_metrics_log_truncates_on_resume(tmp_path):
    log = common.MetricsLog(str(tmp_path))
    for step in range(1, 6):
        log.log(step, loss=1.0 / step)
    resumed = common.MetricsLog(str(tmp_path), resume_step=3)
    assert [r["step"] for r in resumed.rows()] == [1, 2, 3]
    resumed.log(4, loss=0.3)
    assert [r["step"] for r in resumed.rows()] == [1, 2, 3, 4]


def test_export_weights_writes_a_loadable_fp16_checkpoint(tmp_path):
    import model as M
    cfg = M.WanConfig(in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=16, text_len=8,
                      num_heads=2, num_layers=1)
    net = M.CausalWanModel(cfg)
    ema = {k: v + 1.0 for k, v in net.state_dict().items()}
    from dataclasses import asdict
    common.save_checkpoint(str(tmp_path / "run"), 5, {"model": net.state_dict(), "ema": ema}, {"step": 5},
                           {"model_config": asdict(cfg)})
    out = common.export_weights(str(tmp_path / "run"), str(tmp_path / "shipped"), use_ema=True)
    fresh = M.CausalWanModel(M.config_from_checkpoint(out))
    assert M.load_weights(fresh, out) == "ours"
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ema[k].half().float()), k  # the EMA weights, rounded to fp16


def test_every_shipped_config_loads_with_its_script():
    """Each yaml under configs/ holds only keys (and types) its stage script knows; a typo fails here, not on a GPU."""
    import glob
    from pathlib import Path
    import stage1_teacher_forcing as S1
    import stage2_causal_cd as S2
    import stage3_asym_dmd as S3
    repo = Path(__file__).resolve().parents[1]
    files = sorted(glob.glob(str(repo / "configs" / "**" / "*.yaml"), recursive=True))
    assert len(files) >= 15, files
    import yaml
    for path in files:
        with open(path) as f:
            keys = set(yaml.safe_load(f))
        # the script is read off the keys, as common.how_to_make does
        script = S3 if keys & {"generator", "real_score"} else S2 if keys & {"teacher", "method"} else S1
        cfg = common.load_config(script.Config, ["--config", path])
        assert cfg.out_dir.startswith("runs/"), (path, cfg.out_dir)


def test_more_bad_inputs_are_one_clear_line(tmp_path):
    """Rows of the README's bad-input table that belong to no single stage."""
    import encoders
    import model as M
    with pytest.raises(ValueError, match="cpu_offload needs FSDP2: launch with torchrun"):
        common.shard_model(M.CausalWanModel(M.WanConfig.from_preset("toy")), common.Dist(), cpu_offload=True)
    empty = tmp_path / "not_wan"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        encoders.load_text_encoder(str(empty))
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        encoders.load_codec(str(empty))
    common.save_checkpoint(str(tmp_path / "run"), 1, {"model": {"w": torch.zeros(1)}}, {"step": 1}, {})
    with pytest.raises(SystemExit, match="already holds checkpoints; pass --resume=true"):
        common.resume_point(str(tmp_path / "run"), resume=False)
