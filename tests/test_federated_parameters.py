"""What travels between the federated server and the sites: named float32 arrays
of the shared part (the encoder), the round trip into a model, the server's gate
for a site's reply, and FedAvg's weighted mean."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimjax.drivers.federated import parameters
from mimjax.drivers.federated.parameters import UpdateRejected
from mimjax.models import build_model

from helpers import tiny_model_config


def _params(seed=0, dtype="float32"):
    model = build_model(tiny_model_config(dtype=dtype), rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_round_trip_shares_only_the_encoder_as_float32():
    params = _params()
    named = parameters.to_wire(params)
    assert named and all(name.startswith("encoder/") for name in named)
    assert all(v.dtype == np.float32 for v in named.values())
    assert not any(name.startswith("decoders/") for name in named)
    back = parameters.from_wire(named)
    assert set(back) == {"encoder"}
    np.testing.assert_array_equal(back["encoder"]["patch_embed"]["kernel"],
                                  params["encoder"]["patch_embed"]["kernel"])
    everything = parameters.to_wire(params, shared=())
    assert any(name.startswith("decoders/") for name in everything)
    with pytest.raises(ValueError, match="no parameters under"):
        parameters.to_wire(params, shared=("heatmap_head",))


def test_bfloat16_is_widened_exactly():
    value = jnp.asarray([1.5, -2.25, 3.0e-3], jnp.bfloat16)
    named = parameters.to_wire({"encoder": {"w": value}})
    assert named["encoder/w"].dtype == np.float32
    np.testing.assert_array_equal(named["encoder/w"], np.asarray(value, np.float32))
    with pytest.raises(ValueError, match="only floating-point"):
        parameters.to_wire({"encoder": {"count": np.arange(3)}})


def test_gate_refuses_wrong_names_shapes_dtypes_and_non_finite_values():
    named = parameters.to_wire(_params())
    expected = parameters.spec_of(named)
    parameters.check_update(named, expected, "site A")  # a good reply passes
    name = sorted(named)[0]
    cases = {
        "missing 1 parameter": {k: v for k, v in named.items() if k != name},
        "the model does not have": dict(named, **{"encoder/extra": np.zeros(2, np.float32)}),
        "expected float32": dict(named, **{name: named[name].astype(np.float64)}),
        "has shape": dict(named, **{name: np.zeros((1,), np.float32)}),
        "non-finite": dict(named, **{name: np.full_like(named[name], np.nan)}),
        "not an array": dict(named, **{name: [1.0]}),
    }
    for reason, update in cases.items():
        with pytest.raises(UpdateRejected, match=f"update from site B refused.*{reason}"):
            parameters.check_update(update, expected, "site B")


def test_weighted_mean_is_fedavg():
    a = {"encoder/w": np.array([1.0, 2.0], np.float32)}
    b = {"encoder/w": np.array([3.0, 6.0], np.float32)}
    mean = parameters.weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(mean["encoder/w"], [2.5, 5.0])
    assert mean["encoder/w"].dtype == np.float32
    with pytest.raises(ValueError, match="must be positive"):
        parameters.weighted_mean([(a, 0)])
