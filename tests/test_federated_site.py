"""A site's side of federated rounds (mimjax.drivers.federated.site): the global
encoder enters its own run, its head, optimizer and data position stay between
rounds and across a restart, a round is never trained twice, a FedProx site anchors
at what the server sent; and the server's universal step does not depend on the
order of the sites' replies."""

import ml_collections
import numpy as np
import pytest

from mimjax import run_config
from mimjax.drivers.federated import parameters, server
from mimjax.drivers.federated.site import REPLY_METRICS, Site
from mimjax.models import param_tree

TINY = "configs/federated_demo.py:tiny"


def site_config(name="mammo_film", mu=0.0):
    cfg = ml_collections.ConfigDict(run_config.load(f"{TINY},site={name}").to_dict())
    cfg.optimizer.proximal_mu = mu
    return cfg


def shifted(named, by):
    return {k: v + np.float32(by) for k, v in named.items()}


@pytest.fixture(scope="module")
def global_start():
    config = run_config.load(TINY)
    return server.initial_arrays(config.server, config.federated.shared)


def test_a_sites_head_and_position_stay_between_rounds_and_across_a_restart(tmp_path,
                                                                          global_start):
    workdir = str(tmp_path / "site")
    site = Site("mammo_film", site_config(), workdir)
    reply = site.train_round(global_start, server_round=1, local_steps=2)
    assert set(reply.metrics) == set(REPLY_METRICS)
    assert reply.metrics["num-examples"] == 2 * 8 and reply.metrics["steps"] == 2
    assert set(reply.arrays) == set(global_start)  # the encoder only travels
    assert all(v.dtype == np.float32 for v in reply.arrays.values())
    head = param_tree.flatten(site.run.params()["head"])
    site.close()

    # A restarted site (the deployment engine starts a process per message) resumes.
    site = Site("mammo_film", site_config(), workdir)
    assert site.run.step == 2
    for k, v in param_tree.flatten(site.run.params()["head"]).items():
        np.testing.assert_array_equal(v, head[k])
    new_global = shifted(global_start, 0.5)
    site.run.set_params(parameters.from_wire(new_global))
    encoder = parameters.to_wire(site.run.params())
    for k in new_global:
        np.testing.assert_array_equal(encoder[k], new_global[k])  # the server's encoder ...
    for k, v in param_tree.flatten(site.run.params()["head"]).items():
        np.testing.assert_array_equal(v, head[k])  # ... beside the site's own head

    # Round 1 again (a message delivered twice): nothing is trained.
    again = site.train_round(new_global, server_round=1, local_steps=2)
    assert again.metrics["steps"] == 0 and site.run.step == 2
    reply2 = site.train_round(new_global, server_round=2, local_steps=2)
    assert site.run.step == 4 and reply2.metrics["steps"] == 2
    assert np.isfinite(reply2.metrics["loss"])
    site.close()


def test_a_global_update_of_the_wrong_shape_is_refused_by_the_site(tmp_path, global_start):
    site = Site("chest_ap", site_config("chest_ap"), str(tmp_path / "site"))
    bad = dict(global_start)
    name = sorted(bad)[0]
    bad[name] = np.zeros((1,) + bad[name].shape, np.float32)
    with pytest.raises(parameters.UpdateRejected, match="from the server"):
        site.train_round(bad, server_round=1, local_steps=2)
    site.close()


def test_a_fedprox_site_anchors_at_the_servers_parameters(tmp_path, global_start):
    import jax

    from mimjax import optim

    site = Site("mammo_film", site_config(mu=0.5), str(tmp_path / "site"))
    start = shifted(global_start, 0.25)
    site.train_round(start, server_round=1, local_steps=2)
    anchor = optim.get_anchor(site.run.state.opt_state)
    assert anchor is not None, "no proximal term in the site's optimizer"
    flat = parameters.to_wire(jax.device_get(anchor))
    for k in start:
        np.testing.assert_allclose(flat[k], start[k], rtol=0, atol=0)
    site.close()


def test_the_universal_step_does_not_depend_on_the_order_of_sites(tmp_path, global_start):
    config = run_config.load(TINY)
    names = list(config.server.sites)
    sites = {n: shifted(global_start, 0.1 * (i + 1)) for i, n in enumerate(names)}
    averaged = parameters.weighted_mean([(v, 1.0) for v in sites.values()])
    outs = []
    for order, folder in ((names, "a"), (names[::-1], "b")):
        step = server.UniversalDistillation(config.server.distill, str(tmp_path / folder),
                                            order, steps_per_round=2)
        outs.append(step(1, averaged, {n: sites[n] for n in order}))
        teachers = param_tree.flatten(step.run.params()["teachers"])
        step.close()
        # teacher k is the k-th site by name, whatever order they came in
        for k, n in enumerate(sorted(names)):
            ref = {name.split("/", 1)[1]: v for name, v in sites[n].items()}
            for rest, v in ref.items():
                np.testing.assert_array_equal(teachers[f"{k}/{rest}"], v)
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    assert any(not np.array_equal(outs[0][k], averaged[k]) for k in averaged)  # it trained
