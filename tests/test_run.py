"""The run that can be entered more than once (mimjax.train.Run): fit(k) twice equals
fit(2k) bitwise, through the same jitted step, data iterator and checkpoints; given
parameters win for the call that gets them; the run resumes where fit left it."""

import jax
import numpy as np
import pytest

from mimjax import run_config, train
from mimjax.run_config import ConfigError


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    config = run_config.load("configs/demo.py:tiny", [
        ("data.dir", str(data_dir)), ("total_steps", "6"), ("warmup_steps", "2"),
        ("checkpoint_every", "100"), ("log_every", "2"), ("figure_every", "100")])
    with config.unlocked():
        del config["evals"]  # no linear probe: these tests are about the parameters
    return config


def _assert_bitwise_equal(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:
        np.testing.assert_array_equal(value, flat_b[path], err_msg=str(path))


@pytest.fixture(scope="module")
def one_fit(config, tmp_path_factory):
    with train.Run(config, str(tmp_path_factory.mktemp("one"))) as run:
        run.fit(6)
        assert run.step == 6
        return run.params()


def test_fit_twice_equals_one_fit_of_both(config, one_fit, tmp_path):
    with train.Run(config, str(tmp_path)) as run:
        first = run.fit(3)
        assert run.step == 3 and first["loss"] > 0
        run.fit(3, params=run.params())  # k more from the parameters it left
        assert run.step == 6
        _assert_bitwise_equal(run.params(), one_fit)
        # Past the schedule's end is refused, not silently trained at min lr.
        with pytest.raises(ConfigError, match="past config.total_steps"):
            run.fit(1)


def test_a_new_run_on_the_workdir_resumes_where_fit_left_it(config, one_fit, tmp_path):
    with train.Run(config, str(tmp_path)) as run:
        run.fit(2)
    with train.Run(config, str(tmp_path)) as run:  # the checkpoint saved at fit's end
        assert run.step == 2
        run.fit()  # to total_steps
        _assert_bitwise_equal(run.params(), one_fit)


def test_given_parameters_win_and_the_rest_of_the_state_stays(config, tmp_path):
    with train.Run(config, str(tmp_path)) as run:
        run.fit(1)
        before = run.params()
        encoder = jax.tree.map(lambda x: np.full_like(x, 0.5), before["encoder"])
        run.set_params({"encoder": encoder})
        after = run.params()
        _assert_bitwise_equal(after["encoder"], encoder)
        _assert_bitwise_equal(after["decoders"], before["decoders"])
        assert run.step == 1  # optimizer, step and data position are the site's own
        with pytest.raises(ValueError, match="does not have"):
            run.set_params({"encoder": {"no_such_layer": np.zeros(3, np.float32)}})
        bad = jax.tree.map(lambda x: np.zeros(x.shape + (1,), x.dtype), before["encoder"])
        with pytest.raises(ValueError, match="has shape"):
            run.set_params({"encoder": bad})
        nan = jax.tree.map(lambda x: np.full_like(x, np.nan), before["encoder"])
        with pytest.raises(ValueError, match="non-finite"):
            run.set_params({"encoder": nan})
