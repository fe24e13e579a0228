"""Demo: a universal model across five hospitals without sharing their data
(Radwan, Osman, Shehata, arXiv 2407.14719), on Flower, on a laptop CPU.

Command (one machine, Flower's Simulation Engine; `pip install -e ".[federated]"`):
    python main.py --config configs/federated_demo.py --workdir workdirs/federated

Five embedded sites, each with its own body part, task and "scanner"
(input_pipeline/scanner.py: intensity curve, noise, blur, resolution), strongly
non-IID as in the paper:
  mammo_film     mammography phantom (seed 11), 4-class pathology on lesion crops;
                 film-like: gamma 0.7, blur 1 px
  mammo_digital  mammography phantom (seed 12), the same task; noisy, half resolution
  chest_ap       chest X-ray phantom (seed 13), 13 multi-label findings; gamma 1.4,
                 contrast 0.9
  cardiac_mri    cardiac MRI phantom (seed 14), LV / RV / myocardium segmentation
                 from few fine masks; noise 0.04, blur 0.7 px
  hand_xray      hand radiograph phantom (seed 15), 37 landmarks; low contrast,
                 70% resolution
Every site trains the same tiny ViT encoder (width 64, 2 blocks, 4 heads, patch 8,
64 px) with its own head through its own `train.Run`, `federated.local_steps` steps
per round; only the encoder travels (named float32 arrays). The server aggregates
with `federated.strategy`:
  fedavg | fedprox (the proximal term in each site's optimizer) | fedadam (Flower's
  server-side Adam) | universal (FedAvg, then label-free multi-teacher distillation
  of the sites' encoders into the average on the server's unlabelled pool, the
  `server.distill` run) | soup (one round, uniform mean: a one-shot merge).
The server keeps a checkpoint per round (WORKDIR/server/rounds/, rounds.jsonl); a
killed run resumes at its last complete round (run the same command again).

Config args: none = the whole federation (for main.py); `server` = the server's
part only (no site data, no site paths: what a deployed ServerApp loads);
`site=NAME` = that site's run config (what a deployed SuperNode loads);
`sites=A+B+...` = a subset of the sites; `tiny` (and `tiny,server`,
`tiny,site=NAME`) = the test suite's seconds-long variant (2 sites, 32 px, 2 rounds
of 2 steps).

Writes WORKDIR/server/ (rounds/, rounds.jsonl, distill/ for "universal") and
WORKDIR/sites/NAME/ (each site's run: metrics.jsonl, checkpoints, its eval files).

Expected wall time on a 2-core CPU: about 3 minutes once the phantoms are rendered
(measured 3 min 5 s: Ray start ~10 s; round 1, building and compiling five sites' runs
and the server's distiller, 85 s; rounds 2-5 about 16 s each), plus about a minute
to render the phantoms the first time. Expected result: every round accepts the 5 sites
(rounds.jsonl); the site losses fall over the 5 rounds (cardiac_mri 1.14 -> 0.24,
hand_xray 0.33 -> 0.16, chest_ap 0.59 -> 0.55), the mammography sites' barely (1.35-1.41
-> 1.34-1.36: 100 steps of a tiny encoder on 4-class lesion crops).
The leave-one-site-out experiment
(configs/experiments/federated_loso.py) measures what the global encoder is worth.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import federated_server_demo
from configs.finetune_base import finetune_defaults
from configs.landmarks_hand import get_config as hand_config
from configs.pretrain_base import use_tiny_encoder
from configs.segment_acdc import get_config as cardiac_config
from input_pipeline.cxr_phantom import LABEL_NAMES as CXR_FINDINGS
from input_pipeline.phantom import PATHOLOGY_CLASSES

IMAGE_SIZE = 64
SITES = ("mammo_film", "mammo_digital", "chest_ap", "cardiac_mri", "hand_xray")


def _scanner(**values):
    base = dict(gamma=1.0, noise=0.0, blur_sigma=0.0, resolution=1.0, contrast=1.0, offset=0.0)
    base.update(values)
    return ml_collections.ConfigDict(base)


def _encoder(m, size):
    """The one encoder every site and the server share."""
    m.variant = "Ti/8"
    use_tiny_encoder(m)
    m.num_heads = 4
    m.image_size = size
    m.channels = 1
    m.posemb = "sincos2d"
    m.class_token = True
    m.drop_path_rate = 0.0


def _loop(c, fed, *, batch):
    """A site's budget is every round's local steps (the run is entered once per round)."""
    c.global_batch_size = batch
    c.total_steps = fed.get_ref("rounds") * fed.get_ref("local_steps")
    c.warmup_steps = 5
    c.log_every = 10
    c.checkpoint_every = 1000  # fit() saves at the end of every round anyway
    c.data.num_workers = 0
    c.peak_tflops_per_device = 0.1  # skip the start-up matmul measurement
    if "eval_every" in c:
        c.eval_every = 0  # evaluation is the experiment's (held-out probes), not the site's
    return c


def _mammo(fed, seed, scanner, size):
    c = finetune_defaults(label="pathology", class_names=PATHOLOGY_CLASSES, multilabel=False,
                          label_smoothing=0.1)
    _encoder(c.model, size)
    c.data.phantom_seed = seed
    c.data.phantom_num_images = 384
    c.data.scanner = scanner
    c.optimizer.base_lr = 1e-3 * 256 / 16
    c.optimizer.layer_decay = None
    return _loop(c, fed, batch=16)


def _chest(fed, seed, scanner, size):
    c = finetune_defaults(label="finding_labels", class_names=CXR_FINDINGS, multilabel=True,
                          label_smoothing=0.0)
    _encoder(c.model, size)
    c.data.source = "cxr_phantom"
    c.data.phantom_seed = seed
    c.data.phantom_num_images = 384
    c.data.phantom_size = 128
    c.data.roi_context = 0.0
    c.data.norm_mean, c.data.norm_std = 0.453, 0.240
    c.data.scanner = scanner
    c.optimizer.base_lr = 1e-3 * 256 / 16
    c.optimizer.layer_decay = None
    return _loop(c, fed, batch=16)


def _dense_site(c, seed, scanner, size, num_images):
    """A segmentation or landmark config on the shared encoder, at the sites' size."""
    _encoder(c.model, size)
    c.data.image_size = size
    c.data.phantom_seed = seed
    c.data.phantom_num_images = num_images
    c.data.scanner = scanner
    return c


def _cardiac(fed, seed, scanner, size):
    c = _dense_site(cardiac_config(), seed, scanner, size, 20 * 16)  # 20 patients x 16 slices
    return _loop(c, fed, batch=16)


def _hand(fed, seed, scanner, size):
    c = _dense_site(hand_config(), seed, scanner, size, 160)
    c.data.phantom_size = 128
    c.model.decoder_widths = (64, 48)  # patch 8, heatmaps at stride 2: two x2 stages
    return _loop(c, fed, batch=8)


def federated_defaults() -> ml_collections.ConfigDict:
    f = ml_collections.ConfigDict()
    f.strategy = "universal"  # fedavg | fedprox | fedadam | universal | soup
    f.rounds = 5
    f.local_steps = 20  # site steps per round (each site's total_steps = rounds x this)
    f.min_sites = len(SITES)  # a round waits for this many sites
    f.round_timeout = 3600.0  # seconds a round waits for replies
    f.shared = ("encoder",)  # the parameter parts that travel
    f.proximal_mu = 0.01  # fedprox: the proximal term's weight (sites' optimizer.proximal_mu)
    # fedadam (Reddi et al., ICLR 2021, as Flower implements it): server lr, moments, tau
    f.fedadam = ml_collections.ConfigDict(dict(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3))
    # Differential privacy by Flower's server-side fixed clipping (kind "server_fixed"):
    # each site's update clipped to clipping_norm, Gaussian noise on the sum.
    f.dp = ml_collections.ConfigDict(dict(kind="none", noise_multiplier=0.0, clipping_norm=1.0))
    f.ray_num_cpus = placeholder(int)  # the simulation's CPUs (None = all)
    return f


def server_defaults(fed, site_names, size, pool_images) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.sites = tuple(site_names)  # names only: the server holds no site data or path
    s.seed = 0
    s.init = placeholder(str)  # a pretrained mimjax workdir for the global encoder; None = random
    distill = federated_server_demo.get_config()
    _encoder(distill.model, size)
    distill.model.num_teachers = len(site_names)
    for phantom in distill.data.pool:
        distill.data.pool[phantom].num_images = pool_images
    distill.global_batch_size = 16
    distill.total_steps = fed.get_ref("rounds") * fed.get_ref("local_steps")
    distill.warmup_steps = 5
    distill.log_every = 10
    distill.checkpoint_every = 1000
    s.distill = distill
    s.distill_steps = fed.get_ref("local_steps")  # distillation steps per round
    s.model = distill.model  # the global encoder's shape (and its initialisation)
    return s


def get_config(arg=None):
    args = [a for a in (arg or "").split(",") if a]
    tiny = "tiny" in args
    size = 32 if tiny else IMAGE_SIZE
    c = ml_collections.ConfigDict()
    c.driver = "federated"
    c.seed = 0
    c.federated = federated_defaults()
    builders = {
        "mammo_film": (_mammo, 11, _scanner(gamma=0.7, blur_sigma=1.0)),
        "mammo_digital": (_mammo, 12, _scanner(noise=0.03, resolution=0.5)),
        "chest_ap": (_chest, 13, _scanner(gamma=1.4, contrast=0.9)),
        "cardiac_mri": (_cardiac, 14, _scanner(noise=0.04, blur_sigma=0.7)),
        "hand_xray": (_hand, 15, _scanner(contrast=0.8, offset=0.1, resolution=0.7)),
    }
    names = ("mammo_film", "chest_ap") if tiny else SITES
    for a in args:
        if a.startswith("sites="):  # a subset, e.g. sites=mammo_film+chest_ap
            names = tuple(a.removeprefix("sites=").split("+"))
            unknown = sorted(set(names) - set(SITES))
            if unknown:
                raise ValueError(f"configs/federated_demo.py: no sites {unknown}; the sites "
                                 f"are {list(SITES)}.")
    c.sites = ml_collections.ConfigDict(
        {name: builders[name][0](c.federated, builders[name][1], builders[name][2], size)
         for name in names})
    c.federated.min_sites = len(names)
    c.server = server_defaults(c.federated, names, size, pool_images=16 if tiny else 128)
    if tiny:
        c.federated.rounds, c.federated.local_steps = 2, 2
        c.federated.ray_num_cpus = 1
        for site in c.sites.values():
            site.data.phantom_num_images = 48 if site.task != "segmentation" else 6 * 16
            site.global_batch_size = 8  # the test suite simulates 8 devices
            site.warmup_steps = 1
            site.log_every = 1
        c.server.distill.global_batch_size = 8
        c.server.distill.warmup_steps = 1
        c.server.distill.log_every = 1
    for a in args:
        if a == "server":
            return ml_collections.ConfigDict(
                {"driver": "federated_server", "federated": c.federated, "server": c.server})
        if a.startswith("site="):
            name = a.removeprefix("site=")
            if name not in c.sites:
                raise ValueError(f"configs/federated_demo.py: no site {name!r}; the sites are "
                                 f"{list(c.sites)}.")
            return c.sites[name]
        if a != "tiny" and not a.startswith("sites="):
            raise ValueError(f"configs/federated_demo.py takes '', 'server', 'site=NAME', "
                             f"'sites=A+B+...' and 'tiny' (comma-separated), got {arg!r}.")
    return c
