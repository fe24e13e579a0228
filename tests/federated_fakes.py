"""Stand-in sites for tests/test_federated_run.py: ClientApps that answer a round at
once, with known parameters, so a real Flower federation tests the server alone.
(A module of its own: Ray's workers import it by name, through PYTHONPATH.)"""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

SITES = ("site_a", "site_b", "site_c")  # node i is SITES[i]; site_c's update is corrupt


def make_fake_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        index = int(context.node_config["partition-id"])
        site = SITES[index]
        named = {k: v.numpy() + np.float32(index + 1) for k, v in msg.content["arrays"].items()}
        if site == "site_c":  # a broken site: non-finite values
            first = sorted(named)[0]
            named[first] = np.full_like(named[first], np.nan)
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in named.items()}),
            "metrics": MetricRecord({"num-examples": float(index + 1), "loss": 0.0,
                                     "train-seconds": 0.0, "steps": 1.0}),
            "site": ConfigRecord({"name": site}),
        }), reply_to=msg)

    return app
