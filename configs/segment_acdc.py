"""Subclass segmentation of the heart (ACDC's labels: RV, myocardium, LV cavity; the
superclass heart), on the embedded cardiac cine-MRI phantom or prepared ACDC.

Commands:
    python main.py --config configs/segment_acdc.py --workdir workdirs/seg_acdc
    python main.py --config configs/segment_acdc.py --workdir workdirs/seg_acdc_mae \\
        --config.init=workdirs/mae_cardiac           # encoder from a pretraining
    python main.py --config configs/segment_acdc.py --workdir w --config.model.backbone=unet
    python main.py --config configs/segment_acdc.py:/data/acdc --workdir w   # paper scale

What it does (demo scale): renders the cardiac phantom once under ./data (40 patients x
8 short-axis slices x ED/ES, 192 px; split 28 / 4 / 8 patients), keeps the fine masks
of 3 train patients (`data.fine_label_patients`) and the superclass (heart) masks of
the rest, and trains the ViT (width 192, 4 blocks, patch 8, 64 px) with the
progressive dense decoder and a plain head on the subclass-segmentation objective
(coarse + fine terms, pseudo-labels, HierarchicalMix). Every `eval_every` steps the
val volumes are scored in 3-D (Dice, HD95 in mm per class, fine and coarse:
"val/fine/dice/mean", ... in metrics.jsonl; figures/segmentation_val_STEP.png); the
best val mean fine Dice is kept in WORKDIR/best/ and scored on the test volumes at the
end (WORKDIR/test_metrics.json, per volume too; figures/segmentation_test.png).
Separate Normalization and Prior Concatenation: --config.model.separate_norm=True
--config.model.prior_concat=True. Full supervision: --config.data.fine_label_patients=None.

Paper scale (tools/prepare_data.py --builder acdc --input ACDC --output /data/acdc
--size 256): ViT-B/16 at 224 px, the 100 training patients re-split 70 / 10 / 20 by
patient (`data.patient_split`), 7 patients with fine masks (10%).

Expected wall time on a 2-core CPU (demo scale): about 6 minutes (measured 6 min 3 s
alone: phantom ~10 s, compile ~30 s, 600 steps of 16 at ~28 images/s, three val evals).
Expected result (demo scale, measured): test (16 volumes) mean fine Dice 0.894 (RV
0.919, myocardium 0.829, LV 0.935), mean HD95 7.0 mm, heart Dice 0.940; the README's
subclass segmentation table compares the arms on a larger phantom.
`:tiny` is a seconds-long variant used by the test suite.
"""

from configs.segment_base import apply_size, segmentation_defaults

ACDC_FINE = ("background", "RV", "myocardium", "LV")
ACDC_COARSE = ("background", "heart")
# The cardiac phantom's intensity mean and std in [0, 1] units (256 images at 192 px):
# a fixed normalisation that an MAE pretraining on the phantom shares, so a pretrained
# encoder reads the inputs it was trained on.
PHANTOM_NORM = (0.195, 0.240)


def get_config(arg=None):
    c = segmentation_defaults(fine_class_names=ACDC_FINE, coarse_class_names=ACDC_COARSE)
    c.data.source = "cardiac_phantom"
    c.data.image_size = 64
    c.data.intensity_norm = "fixed"
    c.data.norm_mean, c.data.norm_std = PHANTOM_NORM
    c.data.fine_to_coarse = (0, 1, 1, 1)
    c.data.fine_label_patients = 3  # of 28 train patients (~10%)
    c.data.labeled_per_batch = 4  # of 16, as the official labeled_bs / batch
    apply_size(c, arg, images_per_patient=16)  # 8 slices x ED/ES
    if arg and arg != "tiny":  # a tools/prepare_data.py --builder acdc root
        c.data.intensity_norm = "zscore"  # per image: real scanners differ
        c.data.patient_split = (0.7, 0.1, 0.2)
        c.data.fine_label_patients = 7  # 10% of the 70 train patients
    return c
