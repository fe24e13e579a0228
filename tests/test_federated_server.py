"""The federated server's strategy (mimjax.drivers.federated.server) on sites' replies:
the gate refuses bad updates with a reason and aggregates the rest, FedAvg is the
weighted mean, the aggregate does not depend on the order of the replies, a soup
weighs every site the same, FedAdam's moments survive a checkpoint round trip.

Flower's Messages need a running federation, so replies here are stand-ins carrying
real Flower records (what the strategy reads: content, metadata.src_node_id,
has_error); tests/test_federated_run.py runs the same strategy inside Flower."""

import itertools
import types

import ml_collections
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mimjax.drivers.federated import parameters, server

SPEC = {"encoder/a/kernel": (3, 2), "encoder/b/bias": (4,)}
SITES = ("site_a", "site_b", "site_c")


def federated_cfg(strategy="fedavg", **overrides):
    c = ml_collections.ConfigDict(dict(
        strategy=strategy, rounds=3, local_steps=2, min_sites=2, round_timeout=60.0,
        shared=("encoder",), proximal_mu=0.01,
        fedadam=dict(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3),
        dp=dict(kind="none", noise_multiplier=0.0, clipping_norm=1.0)))
    c.update(overrides)
    return c


def arrays(seed, spec=SPEC, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(dtype) for k, s in spec.items()}


class FakeReply:
    """A reply Message as the strategy sees it."""

    def __init__(self, node, content):
        self.metadata = types.SimpleNamespace(src_node_id=node)
        self.content = content

    def has_error(self):
        return False


def reply(node, site, named, examples=10.0, metrics=None, extra=None):
    content = {"arrays": ArrayRecord({k: Array(v) for k, v in named.items()}),
               "metrics": MetricRecord(metrics or {"num-examples": examples, "loss": 1.0,
                                                   "train-seconds": 0.1, "steps": 2.0}),
               "site": ConfigRecord({"name": site})}
    content.update(extra or {})
    return FakeReply(node, RecordDict(content))


def strategy(cfg=None, **kw):
    s = server.make_strategy(cfg or federated_cfg(), site_names=SITES, expected=SPEC, **kw)
    s.inner.current_arrays = arrays(99)  # what configure_train would have sent (FedAdam)
    return s


def aggregate(s, replies, server_round=1):
    out, _ = s.aggregate_train(server_round, replies)
    return None if out is None else {k: v.numpy() for k, v in out.items()}


def test_fedavg_is_the_weighted_mean_of_the_accepted_updates():
    updates = [arrays(i) for i in range(3)]
    weights = [8.0, 16.0, 40.0]
    got = aggregate(strategy(), [reply(i, s, u, w) for i, (s, u, w)
                                 in enumerate(zip(SITES, updates, weights))])
    want = parameters.weighted_mean(zip(updates, weights))
    for k in SPEC:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "soup"])
def test_the_aggregate_does_not_depend_on_the_order_of_replies(name):
    updates = {s: arrays(i) for i, s in enumerate(SITES)}
    results = []
    for order in itertools.permutations(SITES):
        replies = [reply(i, s, updates[s], 10.0 + 7 * SITES.index(s))
                   for i, s in enumerate(order)]
        results.append(aggregate(strategy(federated_cfg(name)), replies))
    for other in results[1:]:
        for k in SPEC:
            np.testing.assert_array_equal(other[k], results[0][k])


def test_a_soup_weighs_every_site_the_same():
    updates = [arrays(i) for i in range(3)]
    got = aggregate(strategy(federated_cfg("soup", rounds=1)),
                    [reply(i, s, u, 10.0 ** i) for i, (s, u) in enumerate(zip(SITES, updates))])
    for k in SPEC:
        np.testing.assert_allclose(got[k], np.mean([u[k] for u in updates], axis=0), rtol=1e-6)


def _bad_replies(good):
    wrong_shape = dict(good, **{"encoder/a/kernel": np.zeros((2, 3), np.float32)})
    wrong_dtype = dict(good, **{"encoder/b/bias": np.zeros(4, np.float64)})
    nan = dict(good, **{"encoder/b/bias": np.array([0, np.nan, 0, np.inf], np.float32)})
    missing = {"encoder/a/kernel": good["encoder/a/kernel"]}
    unknown = dict(good, **{"head/kernel": np.zeros(2, np.float32)})
    return {
        "shape": (reply(11, "site_b", wrong_shape), "has shape (2, 3), expected (3, 2)"),
        "dtype": (reply(12, "site_b", wrong_dtype), "float64, expected float32"),
        "non-finite": (reply(13, "site_b", nan), "2 non-finite value(s)"),
        "missing": (reply(14, "site_b", missing), "missing 1 parameter(s)"),
        "unknown": (reply(15, "site_b", unknown), "the model does not have"),
        "site": (reply(16, "elsewhere", good), "names site 'elsewhere'"),
        "metric": (reply(17, "site_b", good, metrics={"num-examples": 1.0, "patient_id": 7.0}),
                   "only ['num-examples', 'loss', 'train-seconds', 'steps']"),
        "examples": (reply(18, "site_b", good, metrics={"num-examples": 0.0}),
                     "num-examples=0.0"),
        "record": (reply(19, "site_b", good, extra={"images": ArrayRecord(
            {"x": Array(np.zeros((2, 8, 8), np.float32))})}),
                   "has records ['arrays', 'images', 'metrics', 'site']"),
    }


@pytest.mark.parametrize("kind", ["shape", "dtype", "non-finite", "missing", "unknown", "site",
                                  "metric", "examples", "record"])
def test_a_bad_update_is_refused_with_its_reason_and_the_round_goes_on(kind, caplog):
    good_a, good_c = arrays(1), arrays(3)
    bad, reason = _bad_replies(arrays(2))[kind]
    s = strategy()
    got = aggregate(s, [reply(1, "site_a", good_a, 10.0), bad, reply(3, "site_c", good_c, 30.0)])
    want = parameters.weighted_mean([(good_a, 10.0), (good_c, 30.0)])
    for k in SPEC:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert s.last_round["accepted"] == ["site_a", "site_c"]
    (why,) = s.last_round["refused"].values()
    assert reason in why, why
    assert reason in caplog.text


def test_a_second_reply_from_one_site_is_refused():
    s = strategy()
    aggregate(s, [reply(1, "site_a", arrays(1)), reply(2, "site_a", arrays(2)),
                  reply(3, "site_b", arrays(3))])
    assert s.last_round["accepted"] == ["site_a", "site_b"]
    assert "a second reply from site 'site_a'" in list(s.last_round["refused"].values())[0]


def test_a_round_without_an_acceptable_update_keeps_the_global_parameters():
    s = strategy()
    bad, _ = _bad_replies(arrays(2))["non-finite"]
    assert aggregate(s, [bad]) is None
    assert s.last_round["accepted"] == []


def test_fedadam_state_survives_a_round_checkpoint(tmp_path):
    s = strategy(federated_cfg("fedadam"))
    aggregate(s, [reply(i, site, arrays(i)) for i, site in enumerate(SITES)])
    state = server.optimizer_state(s.inner)
    assert set(state) == {"m_t", "v_t"} and set(state["m_t"]) == set(SPEC)
    ckpt = server.RoundCheckpoints(str(tmp_path))
    ckpt.save(1, arrays(5), state, {"accepted": list(SITES)})
    ckpt.close()
    restored_arrays, restored_state, info = server.RoundCheckpoints(str(tmp_path)).restore(1)
    assert info["accepted"] == list(SITES)
    for k in SPEC:
        np.testing.assert_array_equal(restored_arrays[k], arrays(5)[k])
        np.testing.assert_array_equal(restored_state["m_t"][k], state["m_t"][k])
        np.testing.assert_array_equal(restored_state["v_t"][k], state["v_t"][k])
    fresh = strategy(federated_cfg("fedadam"))
    server.set_optimizer_state(fresh.inner, restored_state)
    np.testing.assert_array_equal(fresh.inner.v_t["encoder/b/bias"], state["v_t"]["encoder/b/bias"])
    # FedAvg keeps no moments: the checkpoint has no strategy item, and restores to {}.
    ckpt = server.RoundCheckpoints(str(tmp_path / "avg"))
    ckpt.save(1, arrays(5), server.optimizer_state(strategy().inner), {})
    assert ckpt.restore(1)[1] == {}


def test_rounds_are_counted_over_restarts():
    """A server resumed after round 4 runs Flower's round 1 as round 5: FedAdam's bias
    correction (which depends on the round) is that of round 5."""
    replies = [reply(i, site, arrays(i)) for i, site in enumerate(SITES)]
    resumed = aggregate(strategy(federated_cfg("fedadam"), round_offset=4), replies, 1)
    fifth = aggregate(strategy(federated_cfg("fedadam")), replies, 5)
    first = aggregate(strategy(federated_cfg("fedadam")), replies, 1)
    for k in SPEC:
        np.testing.assert_array_equal(resumed[k], fifth[k])
    assert any(not np.array_equal(resumed[k], first[k]) for k in SPEC)


@pytest.mark.parametrize("cfg, message", [
    (federated_cfg("fedsgd"), "config.federated.strategy must be one of"),
    (federated_cfg(dp=dict(kind="local", noise_multiplier=0.0, clipping_norm=1.0)),
     "config.federated.dp.kind must be one of"),
    (federated_cfg("universal", dp=dict(kind="server_fixed", noise_multiplier=1.0,
                                        clipping_norm=1.0)),
     "does not combine with strategy 'universal'"),
])
def test_bad_strategy_settings_are_one_line_config_errors(cfg, message):
    with pytest.raises(server.ConfigError, match=message):
        server.inner_strategy(cfg, 3)


def test_differential_privacy_wraps_flowers_server_side_clipping():
    inner = server.inner_strategy(federated_cfg(dp=dict(kind="server_fixed", noise_multiplier=0.5,
                                                        clipping_norm=2.0)), 3)
    assert type(inner).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert inner.clipping_norm == 2.0 and inner.noise_multiplier == 0.5
