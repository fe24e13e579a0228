"""mimjax.run_config: the one --config parser (literals, lists, closest names), the
range checks, the run config saved in the workdir, and main.py's one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimjax import run_config
from mimjax.run_config import ConfigError

from helpers import REPO, run_main

DEMO = "configs/demo.py:tiny"


def test_overrides_take_literals_lists_and_strings():
    config = run_config.load(DEMO, [("model.scales", "[32,96]"), ("data.crop_scale", "(0.3, 1)"),
                                    ("optimizer.base_lr", "1e-3"), ("model.variant", "S/16"),
                                    ("seed", "3"),
                                    ("optimizer.grad_clip_norm", "1.5"), ("data.hflip", "false")])
    assert list(config.model.scales) == [32, 96] and config.data.crop_scale == (0.3, 1.0)
    assert config.optimizer.base_lr == 1e-3 and config.model.variant == "S/16"
    assert config.seed == 3 and config.optimizer.grad_clip_norm == 1.5
    assert config.data.hflip is False
    # Field references follow: the probe's data dir is the run's data dir.
    config = run_config.load(DEMO, [("data.dir", "/somewhere")])
    assert config.evals.linear_probe.data.dir == "/somewhere"
    with pytest.raises(AttributeError):  # loaded configs are locked: no field by mistake
        config.new_field = 1


def test_override_split_from_argv():
    overrides, rest = run_config.split_overrides(
        ["--workdir", "w", "--config.a.b=1", "--config.c", "x y", "--other"])
    assert overrides == [("a.b", "1"), ("c", "x y")] and rest == ["--workdir", "w", "--other"]
    with pytest.raises(ConfigError, match="needs a value"):
        run_config.split_overrides(["--config.a"])


@pytest.mark.parametrize("key, value, message", [
    ("model.patch_size", "7", "config.model has no field 'patch_size'; did you mean "
                              "config.model.image_size? Note: the patch size is part of "
                              "model.variant"),
    ("base_lr", "1", "the config has no field 'base_lr'; did you mean config.optimizer.base_lr?"),
    ("model.decoder.widht", "3", "did you mean config.model.decoder.width"),
    ("total_steps", "3.5", "config.total_steps takes an integer (now 8), not float 3.5"),
    ("total_steps", "true", "takes an integer"),
    ("model", "3", "config.model is a section"),
    ("model.width.x", "3", "config.model.width is a value (64), not a section"),
])
def test_unknown_fields_and_wrong_types_name_the_fix(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")
                       .replace(")", r"\)")):
        run_config.load(DEMO, [(key, value)])


@pytest.mark.parametrize("key, value, allowed", [
    ("optimizer.base_lr", "-1", "> 0"),
    ("optimizer.b2", "1.0", "in [0, 1)"),
    ("objectives.masked_reconstruction.mask_ratio", "1.0", "in [0, 1)"),
    ("global_batch_size", "0", "an integer >= 1"),
    ("data.crop_scale", "(0.8, 0.2)", "two fractions (lo, hi) with 0 < lo <= hi <= 1"),
    ("ema_decay", "1.0", "in [0, 1)"),
    ("model.channels", "0", "an integer >= 1"),
    ("data.num_workers", "-1", "an integer >= 0"),
    ("optimizer.weight_decay", "nan", "a number"),
])
def test_values_out_of_range_are_refused_with_the_range(key, value, allowed):
    config = run_config.load(DEMO, [(key, value)]) if value != "nan" else None
    if config is None:  # NaN is not a literal: set it directly
        config = run_config.load(DEMO)
        with config.unlocked():
            config.optimizer.weight_decay = float("nan")
        allowed = ">= 0"
    with pytest.raises(ConfigError, match=rf"config\.{key} = .* is out of range: must be "):
        run_config.check(config)
    with pytest.raises(ConfigError) as info:
        run_config.check(config)
    assert allowed in str(info.value)


def test_warmup_must_be_shorter_than_training():
    config = run_config.load(DEMO, [("warmup_steps", "8")])
    with pytest.raises(ConfigError, match="warmup_steps = 8 must be below"):
        run_config.check(config)


def test_every_shipped_config_passes_the_checks():
    for path in sorted((REPO / "configs").rglob("*.py")):
        text = path.read_text()
        if "def get_config" in text:
            config = run_config.load(str(path))
            run_config.check(config)


def test_run_config_round_trips_through_the_workdir(tmp_path):
    config = run_config.load(DEMO)
    path = run_config.save_run_config(config, str(tmp_path))
    assert json.loads(Path(path).read_text())["model"]["width"] == 64
    loaded = run_config.load_run_config(str(tmp_path / "checkpoints"))  # parent is found too
    assert loaded.model.to_dict() == config.model.to_dict()
    with pytest.raises(FileNotFoundError, match="save_run_config"):
        run_config.load_run_config(str(tmp_path / "elsewhere"))
    assert run_config.resolve_config(f"{REPO}/configs/demo.py:tiny").model.width == 64
    with pytest.raises(ConfigError, match="does not exist"):
        run_config.load("configs/no_such_config.py")
    with pytest.raises(ConfigError, match="no argument or 'tiny'"):
        run_config.load("configs/demo.py:huge")


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.base_lr=-1", "config.optimizer.base_lr = -1.0 is out of range"),
    ("--config.model.patch_size=7", "config.model has no field 'patch_size'"),
    ("--config.model.scales=[32,48]", "config.model cannot be built: scales"),
])
def test_main_prints_one_line_and_exits_2_before_training(tmp_path, override, message):
    proc = run_main(DEMO, tmp_path / "w", f"--config.data.dir={tmp_path / 'data'}", override,
                    check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing trained, nothing half-written
    assert not (tmp_path / "w" / "config.json").exists()


def test_main_help_is_fast_and_documents_the_overrides():
    proc = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert "--config" in proc.stdout and "--workdir" in proc.stdout
