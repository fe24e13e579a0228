"""Experiment: leave-one-site-out evaluation of the federated universal model
(Radwan, Osman, Shehata, arXiv 2407.14719), on the embedded five-site federation
(configs/federated_demo.py).

Command (`pip install -e ".[federated]"`):
    python main.py --config configs/experiments/federated_loso.py --workdir workdirs/loso

For each held-out site (the three with classification labels: mammo_film,
mammo_digital, chest_ap) the four other sites train, and one encoder per arm is
scored on the held-out site by a linear probe of its own labels (GAP features,
ridge, fit on its train split, scored on its test split):
  random      the common start (the server's initial encoder)
  mim_pooled  MAE on the pooled unlabelled images of the 4 training sites (a
              centralised reference that breaks privacy: the paper's MIM baseline)
  alone:S     site S alone on its own task, the whole budget
  soup        uniform mean of the 4 `alone` encoders (one-shot merge)
  fedavg, fedprox, universal   4-site federations through Flower's Simulation
              Engine, 5 rounds x 20 local steps (universal: FedAvg then label-free
              multi-teacher distillation on the server's unlabelled pool)
Paired bootstrap 95% intervals (1,000 resamples of the held-out test images) for the
differences in `pairs`. Tables: WORKDIR/results.md, summary.csv, differences.csv,
results.csv (mimjax.drivers.federated.loso).

`:medmnist=ROOT` runs it at paper scale on eight MedMNIST sites
(configs/federated_medmnist.py), holding out each in turn.

`--config.seeds=(0,1,2)` repeats it over 3 seeds (each seed: new initial encoder,
site data order and heads); the default is one seed, to stay within 45 minutes on a
2-core CPU. `:tiny` is the test suite's seconds-long variant.

Expected wall time on a 2-core CPU: about 18 minutes per seed (measured 16 min 53 s
for seed 0 once the phantoms were rendered; 9 federations of 82-115 s each), so about
55 minutes for 3 seeds (seeds 1 and 2 took 37 min).
Expected result (README, "Leave-one-site-out"; 3 seeds): at this scale no arm beats the
random start on any held-out site (mean probe AUC over the 3 held-out sites: random
0.630, FedAvg 0.611, FedProx 0.620, universal 0.604, pooled MIM 0.618, soup 0.618);
3 of 81 seed-level intervals exclude zero.
"""

import ml_collections

from configs import demo, federated_demo, federated_medmnist


def _mim(federation, tiny: bool) -> ml_collections.ConfigDict:
    """MAE with the sites' encoder, at the sites' image size, on the pooled images."""
    c = demo.get_config("tiny" if tiny else None)
    size = federation.server.model.image_size
    for key in ("variant", "width", "depth", "num_heads", "mlp_dim", "patch_size"):
        if key in federation.server.model and key in c.model:
            c.model[key] = federation.server.model[key]
    c.model.image_size = size
    c.model.scales = [size]
    c.objectives.masked_reconstruction.scale_weights = [1.0]
    c.data.source = "shards"
    c.data.pydicom_cr = False
    c.data.norm_mean, c.data.norm_std = 0.25, 0.25  # the pooled sites, about as the server pool
    c.data.num_workers = 0
    c.global_batch_size = federation.sites[sorted(federation.sites)[0]].global_batch_size
    c.warmup_steps = 10
    c.optimizer.base_lr = 1e-3 * 256 / c.global_batch_size
    c.evals = {}
    c.figure_every = c.checkpoint_every = 100000
    c.log_every = 20
    c.peak_tflops_per_device = 0.1
    return c


def get_config(arg=None):
    tiny = arg == "tiny"
    medmnist = arg.removeprefix("medmnist=") if arg and arg.startswith("medmnist=") else None
    c = ml_collections.ConfigDict()
    c.driver = "federated_loso"
    if medmnist:  # paper scale: 8 MedMNIST sites, each held out in turn
        c.federation = federated_medmnist.get_config(medmnist)
        c.held_out = federated_medmnist.SITES
    else:
        c.federation = federated_demo.get_config(
            "tiny,sites=mammo_film+mammo_digital+chest_ap" if tiny else None)
        c.held_out = ("mammo_film", "mammo_digital", "chest_ap")
    c.strategies = ("fedavg", "fedprox", "universal")
    c.mim_baseline = True
    c.mim = _mim(c.federation, tiny)
    c.seeds = (0,)
    c.compilation_cache_dir = "workdirs/xla_cache"  # the arms' runs share compiled steps
    c.pairs = (("universal", "fedavg"), ("universal", "mim_pooled"), ("fedavg", "mim_pooled"),
               ("fedprox", "fedavg"), ("universal", "soup"), ("fedavg", "soup"),
               ("fedavg", "random"), ("universal", "random"), ("mim_pooled", "random"))
    c.probe = ml_collections.ConfigDict(dict(
        batch_size=64, pool="gap", train_split="train", eval_split="test",
        bootstrap_resamples=1000))
    if tiny:
        c.held_out = ("chest_ap",)
        c.strategies = ("fedavg", "universal")
        c.probe.bootstrap_resamples = 50
        c.compilation_cache_dir = None
    return c
