"""Subclass segmentation through main.py (task "segmentation"): from scratch with the
ViT and from a pretraining workdir, the 4-channel brain phantom on the U-Net (batch
statistics in the train state); val evals per volume, the best checkpoint, test
metrics per volume and overlay figures; a finished run entered again does nothing."""

import json

import pytest

from helpers import metric_records, run_main

ACDC = "configs/segment_acdc.py:tiny"


def _run(config, workdir, data_dir, *overrides):
    return run_main(config, workdir, f"--config.data.dir={data_dir}", *overrides)


def _check_outputs(workdir, fine_names):
    records = metric_records(workdir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"loss_coarse", "loss_fine", "accuracy_fine"} <= set(train[-1])
    val = [r for r in records if "val/fine/dice/mean" in r]
    assert [r["step"] for r in val] == [3, 6]
    for name in fine_names:
        assert 0.0 <= val[-1][f"val/fine/dice/{name}"] <= 1.0
        assert val[-1][f"val/fine/hd95/{name}"] >= 0.0
    assert 0.0 <= val[-1]["val/coarse/dice/mean"] <= 1.0
    best = [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1 and int(best[0]) in (3, 6)
    test = json.loads((workdir / "test_metrics.json").read_text())
    assert test["checkpoint_step"] == int(best[0])
    assert test["metrics"]["fine/num_volumes"] == len(test["fine_volumes"]) > 0
    assert {row["volume"] for row in test["fine_volumes"]} <= {
        row["volume"] for row in test["coarse_volumes"]}
    figures = sorted(p.name for p in (workdir / "figures").iterdir())
    assert figures == ["segmentation_test.png", "segmentation_val_3.png",
                       "segmentation_val_6.png"]
    return records


def test_segmentation_from_scratch_evaluates_per_volume_and_resumes(tmp_path, data_dir):
    workdir = tmp_path / "scratch"
    proc = _run(ACDC, workdir, data_dir)
    records = _check_outputs(workdir, ("RV", "myocardium", "LV"))
    assert "fine_patients" in proc.stderr and "Pretrained encoder" not in proc.stderr
    again = _run(ACDC, workdir, data_dir)
    assert "nothing to do" in again.stderr
    assert len(metric_records(workdir)) == len(records)


@pytest.mark.slow
def test_segmentation_from_a_pretraining_loads_the_encoder(tmp_path, data_dir):
    pretraining = tmp_path / "mae"
    run_main("configs/demo.py:tiny", pretraining, f"--config.data.dir={data_dir}",
             "--config.data.source=cardiac_phantom", "--config.data.phantom_num_images=160",
             "--config.data.phantom_size=64")
    workdir = tmp_path / "finetune"
    proc = _run(ACDC, workdir, data_dir, f"--config.init={pretraining}")
    assert "Pretrained encoder: loaded 37 parameters" in proc.stderr
    assert "seg_decoder" in proc.stderr  # the decoder and head start fresh: named
    _check_outputs(workdir, ("RV", "myocardium", "LV"))


@pytest.mark.slow
def test_unet_on_the_four_channel_brain_phantom(tmp_path, data_dir):
    workdir = tmp_path / "unet"
    _run("configs/segment_brats.py:tiny", workdir, data_dir, "--config.model.backbone=unet",
         "--config.optimizer.layer_decay=None")
    _check_outputs(workdir, ("necrotic_core", "oedema", "enhancing"))
