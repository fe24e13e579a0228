"""Demo: the federated server's label-free universal model (task "distill") on an
embedded, unlabelled phantom pool, on a laptop CPU.

Command:
    python main.py --config configs/federated_server_demo.py --workdir workdirs/server_demo

What it does: renders four phantoms (mammography, chest X-ray, cardiac MRI, hand
radiograph; 256 images each at 64 px, seed 1000, which no site's data uses) straight
into one unlabelled pool under ./data/unlabelled_pool_<hash>/ (only each image and
its acquisition / identity meta are written: input_pipeline.unlabelled), then trains
the universal distiller (mimjax.models.distiller): a tiny student ViT (width 64,
2 blocks, 4 heads, MLP 128, patch 8, 32-px crops; configs/demo.py:tiny's encoder)
matches the tokens of 3 frozen teacher encoders through one adaptor each (cosine +
smooth-L1 against per-channel standardised teacher tokens;
mimjax.objectives.feature_distillation). The teachers are never updated
(optimizer.frozen = ("teachers",)).

Run alone, the teachers are their random initialisation: the run checks the task
end to end. The federated server runs the same config through `mimjax.train.Run`
and, each round, sets `encoder` (the sites' average) and `teachers` (the sites'
encoders, ordered by site name) with `run.set_params(...)`, then trains
`run.fit(local_steps)`; total_steps is then the rounds x local steps budget.

Fields beyond configs/pretrain_base.py:
- `model.num_teachers` (one per site) and `model.adaptor_hidden` (None = 2 x width);
- `objectives.feature_distillation.beta`: the smooth-L1 threshold;
- `data.pool`: {phantom name: {num_images, seed, size}} (names of
  input_pipeline.rendered.PHANTOMS): the task renders these phantoms once into
  `data.dir/unlabelled_pool_<hash>/` (input_pipeline.unlabelled.ensure_phantom_pool)
  and reads that folder as shards; None = read `data.source` / `data.dir` as they
  are. Either way the task refuses a pool whose records carry a label.
  `configs/federated_server_demo.py:POOL_DIR` reads a pool written with
  input_pipeline.unlabelled.write_unlabelled_pool (data.pool None, data.dir POOL_DIR).

Writes WORKDIR/metrics.jsonl ("loss", "loss_teacher_0..2"), TensorBoard events and
checkpoints (steps 100, 200, 300).

Expected wall time on a 2-core CPU: under a minute (measured 49 s: start-up and
pool ~18 s, compile ~13 s, 300 steps of batch 32 at ~800 img/s ~13 s).
Expected result: the loss (mean over the 3 teachers of 1 - cosine + smooth L1)
averages ~1.3 over the first 20 steps and falls to ~0.20 at step 300, the three
teachers' terms within ~0.02 of each other (random teachers: an easy target).

`configs/federated_server_demo.py:tiny` is a seconds-long variant used by the test
suite (32 images of 2 phantoms, batch 8, 6 steps).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.pretrain_base import pretrain_defaults, use_tiny_encoder

# The embedded pool: the four 2-D phantoms, 256 images each at 64 px.
POOL_PHANTOMS = ("phantom", "cxr_phantom", "cardiac_phantom", "hand_phantom")
POOL_SEED = 1000  # images no site renders (the sites' phantoms use their own seeds)


def _pool(names, num_images, size):
    return ml_collections.ConfigDict(
        {name: dict(num_images=num_images, seed=POOL_SEED, size=size) for name in names})


def get_config(arg=None):
    c = pretrain_defaults()
    c.task = "distill"

    m = c.model
    del m["scales"], m["decoder"]  # pretraining only
    m.name = "universal_distiller"
    m.variant = "Ti/8"
    use_tiny_encoder(m)  # width 64, 2 blocks, 4 heads, MLP 128
    m.image_size = 32
    m.num_teachers = 3
    m.adaptor_hidden = placeholder(int)  # None = 2 x width

    c.objectives = ml_collections.ConfigDict()
    c.objectives.feature_distillation = ml_collections.ConfigDict(dict(weight=1.0, beta=1.0))

    c.data.source = "shards"
    c.data.dir = "data"
    c.data.pool = _pool(POOL_PHANTOMS, 256, 64)
    # Measured over the pool (pipeline.measure_intensity_stats over its 1,024 images: 0.254, 0.249).
    c.data.norm_mean, c.data.norm_std = 0.25, 0.25
    c.data.num_workers = 0  # 64-px records: the loader keeps up in this process

    c.global_batch_size = 32
    c.total_steps = 300
    c.warmup_steps = 20
    c.optimizer.base_lr = 1e-3 * 256 / 32  # lr 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.frozen = ("teachers",)  # the sites' encoders are never trained
    c.log_every = 20
    c.figure_every = 100  # unused: no figures
    c.checkpoint_every = 100

    if arg == "tiny":
        c.data.pool = _pool(("cxr_phantom", "hand_phantom"), 16, 64)
        c.global_batch_size = 8
        c.total_steps, c.warmup_steps = 6, 2
        c.log_every, c.checkpoint_every = 1, 3
        c.peak_tflops_per_device = 0.1  # skip the start-up matmul measurement
    elif arg:  # a folder of unlabelled shards (write_unlabelled_pool)
        c.data.pool = None
        c.data.dir = arg
    return c
