"""Experiment: is in-domain pretraining worth it for landmark detection in X-ray? (Di
Via, Santacesaria, Odone, Pastore, "Is in-domain data beneficial in transfer learning
for landmarks detection in X-ray images?", ISBI 2024, arXiv 2403.01470.)

Command (demo scale, the embedded hand radiograph phantom, 2-core CPU):
    python main.py --config configs/experiments/landmark_transfer.py \\
        --workdir workdirs/landmark_transfer

What it runs (mimjax.drivers.landmark_arms; every run resumes, so re-running completes
a killed experiment):
1. two MAE pretrainings of the landmark model's ViT encoder, with the same recipe and
   budget:
   - `in_domain`: hand radiographs of a phantom of their own (seed 1: none of them is
     fine-tuned on or tested);
   - `natural`: random crops of the natural photographs scikit-image ships
     (input_pipeline/natural_photos.py; no download), standing in for ImageNet;
2. nine landmark arms with the same fine-tuning budget (steps, batch, augmentation,
   seed), the encoder from scratch, from `in_domain` or from `natural`, each with every
   train image labelled, 25% and 10% of them (`data.label_fraction`; the same images
   for every encoder, and the 10% inside the 25%);
3. each arm's best val checkpoint (lowest MRE) scored on the same test radiographs: MRE
   and SDR in mm from the spacing the phantom stores;
4. WORKDIR/results.csv and results.md: per arm MRE +- std, SDR at 2, 2.5, 3, 4 mm;
   differences.csv: in-domain minus natural, in-domain minus scratch and natural minus
   scratch at each label level, with paired bootstrap 95% intervals over test images.
The paper's finding: in-domain pretraining on a small dataset brings marginal or no
gain over ImageNet pretraining.

Paper scale: `configs/experiments/landmark_transfer.py:hand=/data/hand` (likewise
`ceph=/data/ceph`, `chest=/data/chest`: tools/prepare_data.py roots of the
hand_landmarks, isbi2015_ceph and chest_landmarks builders) runs the arms of that
dataset's config (configs/landmarks_{hand,ceph,chest}.py, ViT-B/16 at 512 px) and
pretrains `in_domain` on the root's train images; for the natural-image arm import an
ImageNet ViT or MAE you have downloaded (tools/import_pytorch.py, e.g.
facebook/vit-mae-base -> /ckpt/mae_in1k) and pass
`--config.arm_init.natural_100=/ckpt/mae_in1k` (likewise natural_25, natural_10), or
keep the natural-photo pretraining.

Expected wall time on a 2-core CPU: about 37 minutes alone (measured 36 min 29 s: the
two MAE pretrainings 2.0 and 1.8 minutes, the phantoms included; the nine arms 3.3-3.8
minutes each).
Expected result (measured; the README's landmark transfer table): test MRE 4.3-5.3 mm
for every arm; in-domain pretraining beats the natural-photo one at every label level
(-0.37 to -0.65 mm, intervals excluding zero) but not training from scratch (-0.08 to
+0.19 mm); the natural-photo encoder is worse than scratch (+0.44 to +0.79 mm); every
arm is still improving at its last step, and the label fraction barely matters at this
budget.
`:tiny` (the three encoders at one label level, about two minutes) is used by the test suite.
"""

import ml_collections

from configs import demo, landmarks_ceph, landmarks_chest, landmarks_hand
from configs.pretrain_base import use_vit_b16

ENCODERS = ("scratch", "in_domain", "natural")
LABELS = {"100": None, "25": 0.25, "10": 0.10}
# The natural-photo crops' intensity mean and std in [0, 1] units (measured with
# input_pipeline.pipeline.measure_intensity_stats, 256 of the 1,000 crops at 256 px).
NATURAL_NORM = (0.39, 0.22)
# The demo-scale pretraining budget, sized with the arms' (configs/landmarks_hand.py:
# 400 steps of 8, ~0.47 s each) to the 45-minute limit on 2 cores (an MAE step of 32
# crops takes ~0.2 s).
PRETRAIN_STEPS = 600


DATASETS = {"hand": landmarks_hand, "ceph": landmarks_ceph, "chest": landmarks_chest}


def _dataset(arg):
    """(landmark config module, prepared root or None): `hand=ROOT`, `ceph=ROOT`,
    `chest=ROOT`, a bare ROOT (hand), or None / "tiny" (the hand phantom)."""
    if not arg or arg == "tiny":
        return landmarks_hand, None
    name, sep, root = arg.partition("=")
    if not sep:
        return landmarks_hand, arg
    if name not in DATASETS:
        raise ValueError(f"configs/experiments/landmark_transfer.py takes NAME=ROOT with NAME "
                         f"one of {sorted(DATASETS)}, got {arg!r}.")
    return DATASETS[name], root


def _arm_config(arg):
    module, root = _dataset(arg)
    return module.get_config("tiny" if arg == "tiny" else root)


def _pretraining(arg, data_dir, source: str) -> ml_collections.ConfigDict:
    """MAE (one scale) with the landmark encoder's size and input normalisation."""
    c = demo.get_config("tiny" if arg == "tiny" else None)
    del c["evals"]  # the demo's probe reads the mammography phantom
    c.data.dir = data_dir
    c.data.pydicom_cr = False
    c.data.source = source
    arm = _arm_config(arg)
    for field in ("variant", "width", "depth", "num_heads", "image_size"):
        c.model[field] = arm.model[field]
    c.model.scales = [c.model.image_size]
    c.objectives.masked_reconstruction.scale_weights = [1.0]
    if source == "hand_phantom":
        c.data.phantom_seed = 1  # radiographs of its own
        c.data.phantom_size = arm.data.phantom_size
        c.data.norm_mean, c.data.norm_std = landmarks_hand.HAND_PHANTOM_NORM
    else:
        c.data.phantom_size = 2 * c.model.image_size
        c.data.norm_mean, c.data.norm_std = NATURAL_NORM
    if arg == "tiny":
        c.data.phantom_num_images, c.data.phantom_size = 24, 64
        c.model.mlp_dim = arm.model.mlp_dim
    elif arg:  # in-domain: the prepared root's train images (their labels unused)
        c.data.source = "prepared" if source == "hand_phantom" else source
        if source == "hand_phantom":
            c.data.dir = _dataset(arg)[1]
            c.data.norm_mean, c.data.norm_std = arm.data.norm_mean, arm.data.norm_std
        use_vit_b16(c.model)
        c.model.image_size, c.model.scales = 512, [512]
        c.model.decoder = ml_collections.ConfigDict(
            dict(width=512, depth=8, num_heads=16, mlp_dim=None, posemb="sincos2d"))
        c.global_batch_size = 64
        c.total_steps, c.warmup_steps = 20000, 1000
        c.figure_every = c.checkpoint_every = 2000
    else:
        c.data.phantom_num_images = 1000
        c.total_steps, c.warmup_steps = PRETRAIN_STEPS, 50
        c.optimizer.base_lr = 1e-3 * 256 / c.global_batch_size  # lr 1e-3
        c.figure_every = c.checkpoint_every = PRETRAIN_STEPS // 2
    return c


def _arm(arg, data_dir, label_fraction) -> ml_collections.ConfigDict:
    c = _arm_config(arg)
    if not arg or arg == "tiny":
        c.data.dir = data_dir
    c.data.label_fraction = label_fraction
    return c


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.driver = "landmark_arms"
    c.seed = 0
    c.data_dir = "data"  # the phantoms' directory, for every run
    data_dir = c.get_ref("data_dir")
    c.pretrain = ml_collections.ConfigDict({
        "in_domain": _pretraining(arg, data_dir, "hand_phantom"),
        "natural": _pretraining(arg, data_dir, "natural_photos")})
    arms, inits, order = {}, {}, []
    # :tiny (the test suite) runs the three encoders at one label level.
    levels = {"100": None} if arg == "tiny" else LABELS
    for labels, fraction in levels.items():
        for encoder in ENCODERS:
            name = f"{encoder}_{labels}"
            arms[name] = _arm(arg, data_dir, fraction)
            inits[name] = None if encoder == "scratch" else encoder
            order.append(name)
    c.arms = ml_collections.ConfigDict(arms)
    c.arm_order = order  # a ConfigDict lists its keys sorted
    c.arm_init = ml_collections.ConfigDict(inits)
    c.compare = [pair for labels in levels for pair in (
        (f"in_domain_{labels}", f"natural_{labels}"), (f"in_domain_{labels}", f"scratch_{labels}"),
        (f"natural_{labels}", f"scratch_{labels}"))]
    c.metrics = ["mre", "sdr/2", "sdr/2.5", "sdr/3", "sdr/4"]
    c.bootstrap_resamples = 1000
    return c
