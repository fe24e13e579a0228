"""Federated training across sites on Flower: what travels between the server and
the sites (parameters.py), a site's rounds through its own `train.Run` (site.py),
the server's strategies, gate, universal step and round checkpoints (server.py),
the ServerApp / ClientApp (apps.py), the one-machine driver on Flower's Simulation
Engine (simulation.py) and the leave-one-site-out study (loso.py).

Offline by default: Flower's telemetry and update check are switched off before any
module of this package imports flwr (the environment may switch them back on).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
