"""The subclass-segmentation experiment end to end at tiny scale (main.py, driver
"segmentation_arms"): the MAE pretraining, six arms with one budget, one table with
paired bootstrap differences over the test volumes; a re-run reuses finished runs."""

import csv
import json

import pytest

from mimjax import run_config
from mimjax.drivers import arms as arm_driver

from helpers import run_main

ARMS = ["full", "few", "few_coarse", "few_coarse_pc_sn", "few_coarse_pc_sn_mix", "mix_scratch"]
CONFIG = "configs/experiments/subclass_seg.py"


def test_the_arms_differ_only_in_what_they_test():
    c = run_config.load(CONFIG)
    arm_driver.check_arms(c)
    assert list(c.arm_order) == ARMS
    arms = {name: c.arms[name] for name in ARMS}
    for key in ("total_steps", "global_batch_size", "seed"):  # one budget
        assert len({arm[key] for arm in arms.values()}) == 1, key
    assert arms["full"].data.fine_label_patients is None
    assert arms["few"].data.use_coarse_only is False
    assert {arms[n].data.fine_label_patients for n in ARMS[1:]} == {4}
    plain = ARMS[:4]
    assert not any(arms[n].data.hierarchical_mix for n in plain)
    assert not any(arms[n].objectives.subclass_segmentation.pseudo_labels for n in plain)
    assert all(arms[n].model.separate_norm and arms[n].model.prior_concat for n in ARMS[3:])
    assert not any(arms[n].model.separate_norm for n in ARMS[:3])
    assert arms["mix_scratch"].to_dict() == arms["few_coarse_pc_sn_mix"].to_dict()
    assert c.arm_init.mix_scratch is None and c.arm_init.few == "mae"
    # The MAE pretrains the arms' encoder on patients of its own, normalised alike.
    mae = c.pretrain.mae
    assert mae.data.phantom_seed != arms["full"].data.phantom_seed
    assert (mae.data.norm_mean, mae.data.norm_std) == (arms["full"].data.norm_mean,
                                                       arms["full"].data.norm_std)
    assert mae.model.image_size == arms["full"].model.image_size


@pytest.mark.slow
def test_experiment_trains_every_arm_and_tabulates(tmp_path):
    workdir, data_dir = tmp_path / "exp", tmp_path / "data"
    command = (CONFIG + ":tiny", workdir, f"--config.data_dir={data_dir}")
    run_main(*command, timeout=900)
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ARMS
    for row in rows:
        for key in ("fine dice/mean", "fine dice/LV", "coarse dice/mean"):
            assert 0.0 <= float(row[key]) <= 1.0, (row, key)
        tested = json.loads((workdir / "arms" / row["arm"] / "test_metrics.json").read_text())
        assert float(row["fine dice/mean"]) == pytest.approx(tested["metrics"]["fine/dice/mean"])
    with open(workdir / "differences.csv") as f:
        differences = list(csv.DictReader(f))
    assert {(d["arm"], d["minus"]) for d in differences} == {
        ("few_coarse_pc_sn_mix", other) for other in ARMS if other != "few_coarse_pc_sn_mix"}
    for d in differences:
        assert float(d["ci95_low"]) <= float(d["difference"]) <= float(d["ci95_high"])
    log = run_main(*command, timeout=900).stderr  # finished: nothing is trained again
    assert log.count("nothing to do") == len(ARMS) + 1
