"""Landmark detection through main.py (task "landmarks"): from scratch, from a
pretraining workdir (the encoder loaded, the decoder and head new) and on the U-Net;
val MRE evals, the best checkpoint by lowest val MRE, test MRE / SDR in mm per image,
figures; a finished run entered again does nothing; config mistakes are named."""

import json

import pytest

from helpers import metric_records, run_main

HAND = "configs/landmarks_hand.py:tiny"


def _run(workdir, data_dir, *overrides, **kwargs):
    return run_main(HAND, workdir, f"--config.data.dir={data_dir}", *overrides, **kwargs)


def _check_outputs(workdir):
    records = metric_records(workdir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"loss_heatmap", "argmax_error_px", "valid_landmarks"} <= set(train[-1])
    val = [r for r in records if "val/mre" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert val[-1]["val/num_landmarks"] == 37 and val[-1]["val/mre"] > 0
    assert 0.0 <= val[-1]["val/sdr/2"] <= val[-1]["val/sdr/4"] <= 1.0
    best = [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1
    best_step = int(best[0])
    assert best_step == min(val, key=lambda r: r["val/mre"])["step"]
    test = json.loads((workdir / "test_metrics.json").read_text())
    assert test["checkpoint_step"] == best_step
    metrics = test["metrics"]
    assert metrics["unit"] == "mm" and metrics["num_landmarks"] == 37
    assert metrics["num_images"] == len(test["images"]) > 0
    assert len({row["image"] for row in test["images"]}) == len(test["images"])
    mean_of_images = sum(row["mre"] for row in test["images"]) / len(test["images"])
    assert abs(mean_of_images - metrics["mre"]) < 1e-9
    figures = sorted(p.name for p in (workdir / "figures").iterdir())
    assert figures == ["landmarks_test.png", "landmarks_val_3.png", "landmarks_val_6.png"]
    return records


def test_landmarks_from_scratch_evaluate_in_mm_and_reenter(tmp_path, data_dir):
    workdir = tmp_path / "scratch"
    proc = _run(workdir, data_dir)
    records = _check_outputs(workdir)
    assert "Landmark training split" in proc.stderr and "Pretrained encoder" not in proc.stderr
    again = _run(workdir, data_dir)
    assert "nothing to do" in again.stderr
    assert len(metric_records(workdir)) == len(records)


@pytest.mark.slow
def test_landmarks_from_a_pretraining_load_the_encoder(tmp_path, data_dir):
    pretraining = tmp_path / "mae"
    run_main("configs/demo.py:tiny", pretraining, f"--config.data.dir={data_dir}",
             "--config.data.source=hand_phantom", "--config.data.phantom_num_images=24",
             "--config.data.phantom_size=64", "--config.model.variant=Ti/16",
             "--config.model.scales=[32,64]")
    workdir = tmp_path / "finetune"
    proc = _run(workdir, data_dir, f"--config.init={pretraining}",
                "--config.data.label_fraction=0.5")
    _check_outputs(workdir)
    assert "Pretrained encoder" in proc.stderr
    assert "6 of 12 train records labelled (50%)" in proc.stderr


@pytest.mark.slow
def test_landmarks_on_the_unet(tmp_path, data_dir):
    workdir = tmp_path / "unet"
    _run(workdir, data_dir, "--config.model.backbone=unet", "--config.optimizer.layer_decay=None")
    _check_outputs(workdir)


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.label_fraction=2.0"], "data.label_fraction must be in (0, 1]"),
    (["--config.model.backbone=unet", "--config.init=/nowhere"], "loads a pretrained ViT"),
    (["--config.landmarks.decode=mean"], "landmarks.decode must be one of"),
    (["--config.data.hflip=True"], "flip_pairs"),
    (["--config.data.num_landmarks=36"], "has 37 landmarks, the config 36"),
])
def test_config_mistakes_are_named(tmp_path, data_dir, overrides, message):
    proc = _run(tmp_path / "bad", data_dir, *overrides, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.slow
def test_landmarks_from_an_imported_hf_vit(tmp_path, data_dir):
    """An ImageNet-style HF ViT the user downloaded (here a random one of the same
    architecture), imported with tools/import_pytorch.py, initialises the encoder; its
    three input channels are summed into the phantom's one."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-12,
        num_labels=2)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(hf_config).save_pretrained(str(tmp_path / "hf"))
    from helpers import run_tool

    imported = tmp_path / "imported"
    proc = run_tool("import_pytorch", "--from", "hf", tmp_path / "hf", "--out", imported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    workdir = tmp_path / "from_hf"
    proc = _run(workdir, data_dir, f"--config.init={imported}", "--config.model.posemb=learn",
                "--config.model.gelu_approximate=False", "--config.model.layer_norm_eps=1e-12")
    _check_outputs(workdir)
    assert "Pretrained encoder: loaded" in proc.stderr
