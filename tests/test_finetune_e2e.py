"""Fine-tuning through the one trainer (main.py, task "classification"): from scratch
and from a tiny demo pretraining; val evals, the best checkpoint, test metrics and
figures; the encoder loaded from the pretraining checkpoint; resume."""

import json

import jax
import numpy as np
import pytest

from helpers import metric_records as _records
from helpers import run_main

PATHOLOGY = "configs/finetune_cbis_pathology.py:tiny"


def _run(config, workdir, data_dir, *overrides):
    return run_main(config, workdir, f"--config.data.dir={data_dir}", *overrides)


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("pretrain")
    _run("configs/demo.py:tiny", workdir, data_dir)
    return workdir


def test_finetune_from_scratch_writes_val_metrics_best_and_test(tmp_path, data_dir):
    proc = _run(PATHOLOGY, tmp_path, data_dir)
    records = _records(tmp_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/auc_macro" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and "accuracy" in r for r in train)
    assert [r["step"] for r in val] == [4, 8]  # eval_every 4 and the last step
    assert all(0.0 <= r["val/auc_macro"] <= 1.0 and "val/accuracy" in r for r in val)
    best = sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit())
    assert len(best) == 1 and int(best[0]) in (4, 8)
    test = json.loads((tmp_path / "test_metrics.json").read_text())
    assert {
        "accuracy",
        "auc_macro",
        "ap_macro",
        "auc_micro",
        "confusion_matrix",
        "num_examples",
        "checkpoint_step",
    } <= set(test)
    assert test["checkpoint_step"] == int(best[0])
    assert np.asarray(test["confusion_matrix"]).shape == (4, 4)
    assert np.sum(test["confusion_matrix"]) == test["num_examples"] > 0
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"confusion_test.png", "confusion_val_4.png", "confusion_val_8.png"} <= figures
    assert not any(name.startswith("recon_") for name in figures)
    assert "Pretrained encoder" not in proc.stderr  # scratch: random init


def test_init_puts_the_checkpoint_encoder_into_the_fresh_state(pretrain_workdir):
    from configs import finetune_cbis_pathology
    from mimjax import optim, pretrained, sharding, train
    from mimjax.models.spec import ModelSpec

    config = finetune_cbis_pathology.get_config("tiny")
    config.init = str(pretrain_workdir)
    mesh = sharding.make_mesh(config.mesh)  # 8 simulated devices
    schedule = optim.make_schedule(
        config.optimizer, global_batch_size=8, total_steps=8, warmup_steps=2
    )
    tx = optim.make_optimizer(config.optimizer, schedule)
    spec = ModelSpec.from_config(config.model)
    fresh, abstract, shardings = train.create_train_state(config, mesh, spec, tx)
    fresh_head = jax.device_get(fresh.params["head"])
    state = train.init_from_pretrained(config, fresh, abstract, shardings)

    checkpoint, _ = pretrained.load_pretrained_params(pretrain_workdir)
    loaded = jax.device_get(state.params)
    flat = lambda tree: {
        sharding.path_to_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    flat_ckpt, flat_loaded = flat(checkpoint["encoder"]), flat(loaded["encoder"])
    assert set(flat_loaded) == set(flat_ckpt) and len(flat_loaded) == 37
    for path, value in flat_loaded.items():
        np.testing.assert_array_equal(value, flat_ckpt[path], err_msg=path)
    # The head is not in the checkpoint: it keeps its initialisation.
    jax.tree.map(np.testing.assert_array_equal, loaded["head"], fresh_head)
    # Placed with the state's shardings, ready for the donated step.
    for leaf, target in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim)


def test_task_must_fit_the_model():
    from configs import demo, finetune_cbis_pathology
    from mimjax import tasks

    config = finetune_cbis_pathology.get_config("tiny")
    assert tasks.for_config(config).name == "classification"
    config.task = "pretrain"
    with pytest.raises(ValueError, match="does not fit model.name"):
        tasks.for_config(config)
    config.task = "no_such_task"
    with pytest.raises(ValueError, match="config.task must be one of"):
        tasks.for_config(config)
    assert tasks.for_config(demo.get_config("tiny")).name == "pretrain"


@pytest.mark.slow
def test_finetune_from_pretraining_logs_the_transfer_and_resumes(
    tmp_path, data_dir, pretrain_workdir
):
    init = f"--config.init={pretrain_workdir}"
    first = _run(PATHOLOGY, tmp_path, data_dir, init)
    assert "Pretrained encoder: loaded 37 parameters" in first.stderr
    assert "missing (kept as initialised) 4: head/" in first.stderr
    test = json.loads((tmp_path / "test_metrics.json").read_text())
    # Re-running the finished workdir: its checkpoint wins over init; nothing to do.
    again = _run(PATHOLOGY, tmp_path, data_dir, init)
    assert "config.init" in again.stderr and "is not used" in again.stderr
    assert "nothing to do" in again.stderr
    assert "Pretrained encoder" not in again.stderr
    assert json.loads((tmp_path / "test_metrics.json").read_text()) == test
    # Training on past the end resumes from step 8 and keeps selecting on val.
    longer = _run(
        PATHOLOGY, tmp_path, data_dir, init, "--config.total_steps=12", "--config.warmup_steps=2"
    )
    assert "Restored step 8" in longer.stderr
    steps = [r["step"] for r in _records(tmp_path) if "val/auc_macro" in r]
    assert steps == [4, 8, 12]


@pytest.mark.slow
def test_margin_finetune_is_multilabel(tmp_path, data_dir):
    _run("configs/finetune_cbis_margin.py:tiny", tmp_path, data_dir)
    test = json.loads((tmp_path / "test_metrics.json").read_text())
    assert {"hamming_accuracy", "multilabel_confusion_matrix", "auc_macro"} <= set(test)
    assert np.asarray(test["multilabel_confusion_matrix"]).shape == (5, 2, 2)
    assert (tmp_path / "figures" / "confusion_test.png").exists()
