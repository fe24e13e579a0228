"""The landmark transfer study (configs/experiments/landmark_transfer.py, driver
"landmark_arms"): two pretrainings with one recipe, nine arms that differ only in their
encoder and their labelled images, one budget, nested label subsets, one table with
paired bootstrap intervals over the same test images."""

import json

import pytest

from input_pipeline import landmarks
from mimjax import run_config
from mimjax.drivers import arms as arm_driver

from helpers import run_main

CONFIG = "configs/experiments/landmark_transfer.py"
ENCODERS = ("scratch", "in_domain", "natural")


def test_the_arms_differ_only_in_encoder_and_labels():
    c = run_config.load(CONFIG)
    arm_driver.check_arms(c)
    assert list(c.arm_order) == [f"{e}_{n}" for n in ("100", "25", "10") for e in ENCODERS]
    runs = {name: c.arms[name].to_dict() for name in c.arm_order}
    reference = dict(runs["scratch_100"], data=dict(runs["scratch_100"]["data"]))
    for name, run in runs.items():
        fraction = run["data"].pop("label_fraction")
        assert fraction == {"100": None, "25": 0.25, "10": 0.10}[name.rsplit("_", 1)[1]]
        reference["data"].pop("label_fraction", None)
        assert run == reference, name  # one budget, one recipe, one data set
        encoder = name.rsplit("_", 1)[0]
        assert c.arm_init[name] == (None if encoder == "scratch" else encoder)
    pre = {name: c.pretrain[name] for name in ("in_domain", "natural")}
    assert pre["in_domain"].data.source == "hand_phantom"
    assert pre["in_domain"].data.phantom_seed != c.arms.scratch_100.data.phantom_seed
    assert pre["natural"].data.source == "natural_photos"
    for field in ("total_steps", "global_batch_size", "optimizer", "objectives"):  # one recipe
        assert pre["in_domain"][field] == pre["natural"][field], field
    for field in ("variant", "width", "depth", "num_heads", "image_size"):
        assert pre["in_domain"].model[field] == c.arms.scratch_100.model[field]
    # The label subsets are nested: the 10% inside the 25%.
    n = 240
    ten = landmarks.labelled_records(n, c.arms.scratch_10.data)
    quarter = landmarks.labelled_records(n, c.arms.in_domain_25.data)
    assert len(ten) == 24 and len(quarter) == 60 and set(ten) <= set(quarter)


@pytest.mark.slow
def test_the_tiny_study_tabulates_paired_differences(tmp_path, data_dir):
    workdir = tmp_path / "study"
    run_main(f"{CONFIG}:tiny", workdir, f"--config.data_dir={data_dir}", timeout=900)
    rows = (workdir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,init,labels,test_images,mre (mm),mre_std,sdr/2")
    assert [r.split(",")[0] for r in rows[1:]] == [f"{e}_100" for e in ENCODERS]
    differences = (workdir / "differences.csv").read_text().splitlines()
    assert len(differences) == 1 + 3 * 5  # three pairs x five metrics
    images = {name: json.loads((workdir / "arms" / name / "test_metrics.json").read_text())
              ["images"] for name in ("scratch_100", "natural_100")}
    assert [r["image"] for r in images["scratch_100"]] == [r["image"] for r in images[
        "natural_100"]]
    assert [r.split(",")[1] for r in rows[1:]] == ["scratch", "in_domain", "natural"]
    assert (workdir / "pretrain" / "natural" / "checkpoints").is_dir()
