"""Experiment: subclass segmentation from hierarchical labels (Dai, Lei, Zhang, MICCAI
2023) on the cardiac phantom: how close do a few fine masks plus superclass masks get
to full subclass supervision, and what do the paper's parts add?

Command (demo scale, embedded cardiac phantom, 2-core CPU):
    python main.py --config configs/experiments/subclass_seg.py --workdir workdirs/subclass_seg

What it runs (mimjax.drivers.segmentation_arms; every run resumes, so re-running
completes a killed experiment):
1. an MAE pretraining of the segmentation models' ViT encoder on unlabelled slices of a
   cardiac phantom of its own (seed 1: none of its patients is segmented or tested);
2. six segmentation arms with the same budget (steps, batch, data, seed), the first five
   initialised from that encoder:
   - `full`: fine masks for every train patient (the upper bound);
   - `few`: fine masks for 4 of the 42 train patients (~10%) and nothing else;
   - `few_coarse`: those 4 plus the superclass (heart) masks of every patient, plain head;
   - `few_coarse_pc_sn`: plus Prior Concatenation and Separate Normalization;
   - `few_coarse_pc_sn_mix`: plus pseudo-labels and HierarchicalMix (the paper's method);
   - `mix_scratch`: the paper's method from a random encoder;
3. each arm's best val checkpoint (mean fine Dice) scored on the test volumes (12
   patients x ED/ES = 24 volumes, 3-D Dice and HD95 in mm);
4. WORKDIR/results.csv and results.md: per arm the test Dice per subclass and its mean,
   the mean HD95 and the superclass Dice; differences.csv: `few_coarse_pc_sn_mix` minus
   each other arm, with paired bootstrap 95% intervals over the test volumes.
The paper's direction: the method (arm 5) close to full supervision (arm 1) and
clearly above a few fine masks alone (arm 2).

Expected wall time on a 2-core CPU: about 30 minutes alone (measured 29 min 53 s: the
MAE 1.7 minutes; the four arms without pseudo-labels 3.3-4.1 minutes each; the two with
pseudo-labels and HierarchicalMix, which run three forward passes per step, 6.7 minutes
each).
Expected result (measured; the README's subclass segmentation table): mean fine Dice
0.919 with every fine mask, 0.890-0.895 for the other five arms; the method is clearly
below full supervision (-0.027 [-0.037, -0.018]) and not above a few fine masks alone
(+0.002 [-0.017, +0.024]): the paper's direction does not appear at this scale.

Paper scale: `configs/experiments/subclass_seg.py:/data/acdc` (the output root of
`tools/prepare_data.py --builder acdc`) trains the ViT-B/16 arms of
configs/segment_acdc.py's paper-scale setting on ACDC's 70 / 10 / 20 patient split
(pretraining: a MAE on the same root's train slices).
`:tiny` is a seconds-long variant used by the test suite.
"""

import ml_collections

from configs import demo, segment_acdc
from configs.pretrain_base import use_vit_b16

# The MAE normalises as the arms do (configs/segment_acdc.py), so the pretrained encoder
# reads the inputs it was trained on.
NORM_MEAN, NORM_STD = segment_acdc.PHANTOM_NORM
METHOD = "few_coarse_pc_sn_mix"


def _pretraining(arg, data_dir) -> ml_collections.ConfigDict:
    """MAE (one scale) on unlabelled phantom slices, the segmentation encoder's size."""
    c = demo.get_config("tiny" if arg == "tiny" else None)
    del c["evals"]  # the demo's probe reads the mammography phantom
    c.data.source = "cardiac_phantom"
    c.data.dir = data_dir
    c.data.pydicom_cr = False
    c.data.phantom_seed = 1  # patients of its own
    c.data.norm_mean, c.data.norm_std = NORM_MEAN, NORM_STD
    c.model.scales = [c.model.image_size]
    c.objectives.masked_reconstruction.scale_weights = [1.0]
    if arg == "tiny":
        c.data.phantom_num_images, c.data.phantom_size = 160, 64
    elif arg:
        c.data.source = "prepared"
        c.data.dir = arg
        c.data.phantom_seed = 0
        use_vit_b16(c.model)
        c.model.image_size = 224
        c.model.scales = [224]
        c.model.decoder = ml_collections.ConfigDict(
            dict(width=512, depth=8, num_heads=16, mlp_dim=None, posemb="sincos2d"))
        c.global_batch_size = 256
        c.total_steps, c.warmup_steps = 20000, 1000
        c.figure_every = c.checkpoint_every = 2000
    else:
        c.data.phantom_num_images, c.data.phantom_size = 640, 192
        c.total_steps, c.warmup_steps = 600, 50
        c.optimizer.base_lr = 1e-3 * 256 / c.global_batch_size  # lr 1e-3
        c.figure_every = c.checkpoint_every = 600
    return c


def _arm(arg, data_dir, **changes) -> ml_collections.ConfigDict:
    c = segment_acdc.get_config(arg if arg else None)
    c.data.dir = data_dir if not arg or arg == "tiny" else arg
    if not arg:
        c.data.phantom_num_images = 960  # 60 patients: 42 / 6 / 12
        c.data.fine_label_patients = 4
        c.total_steps, c.warmup_steps = 600, 50
        c.eval_every = c.checkpoint_every = 300
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        node = c
        for part in section.split(".") if section else ():
            node = node[part]
        node[field] = value
    return c


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.driver = "segmentation_arms"
    c.seed = 0
    c.data_dir = "data"  # the phantoms' directory, for every run
    data_dir = c.get_ref("data_dir")
    plain = {"objectives.subclass_segmentation.pseudo_labels": False,
             "data.hierarchical_mix": False}
    pc_sn = {"model.prior_concat": True, "model.separate_norm": True}
    c.pretrain = ml_collections.ConfigDict({"mae": _pretraining(arg, data_dir)})
    c.arms = ml_collections.ConfigDict({
        "full": _arm(arg, data_dir, **{"data.fine_label_patients": None}, **plain),
        "few": _arm(arg, data_dir, **{"data.use_coarse_only": False,
                                      "data.labeled_per_batch": None}, **plain),
        "few_coarse": _arm(arg, data_dir, **plain),
        "few_coarse_pc_sn": _arm(arg, data_dir, **pc_sn, **plain),
        METHOD: _arm(arg, data_dir, **pc_sn),
        "mix_scratch": _arm(arg, data_dir, **pc_sn),
    })
    # Table order (a ConfigDict lists its keys sorted).
    c.arm_order = ["full", "few", "few_coarse", "few_coarse_pc_sn", METHOD, "mix_scratch"]
    c.arm_init = ml_collections.ConfigDict({
        "full": "mae", "few": "mae", "few_coarse": "mae", "few_coarse_pc_sn": "mae",
        METHOD: "mae", "mix_scratch": None})
    c.compare = [(METHOD, other) for other in c.arm_order if other != METHOD]
    c.metrics = ["dice/RV", "dice/myocardium", "dice/LV", "dice/mean", "hd95/mean"]
    c.coarse_metrics = ["dice/mean"]
    c.bootstrap_resamples = 1000
    return c
