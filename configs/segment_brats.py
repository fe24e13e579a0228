"""Subclass segmentation of brain tumours (BraTS 2021's labels: necrotic core, oedema,
enhancing tumour; the superclass whole tumour) from four MRI sequences, on the embedded
brain-tumour phantom or prepared BraTS 2021.

Commands:
    python main.py --config configs/segment_brats.py --workdir workdirs/seg_brats
    python main.py --config configs/segment_brats.py:/data/brats --workdir w   # paper scale

What it does (demo scale): renders the brain phantom once under ./data (FLAIR, T1,
T1ce, T2 as four channels; 8 axial slices per patient, 192 px), keeps the fine masks of
a few train patients and the whole-tumour masks of the rest, and trains the ViT (4
input channels, 64 px) with the progressive decoder on the subclass-segmentation
objective; per-volume val evals and a test eval of the best checkpoint as
configs/segment_acdc.py.

Paper scale (tools/prepare_data.py --builder brats2021 --input BraTS2021 --output
/data/brats --size 240): ViT-B/16 at 224 px, 4 channels, non-zero z-score
normalisation, left-right flips.

Expected wall time on a 2-core CPU (demo scale): about 6.5 minutes (measured 6 min 27 s
alone: 600 steps of 16 at ~28 images/s, three val evals).
Expected result (demo scale, measured): test (16 volumes) mean fine Dice 0.924
(necrotic core 0.945, oedema 0.963, enhancing rim 0.864), mean HD95 3.1 mm, whole
tumour Dice 0.981. The thin enhancing rim is the hardest class; the necrotic core
scores high partly because tumours without one score Dice 1 when none is predicted.
`:tiny` is a seconds-long variant used by the test suite.
"""

from configs.segment_base import apply_size, segmentation_defaults

BRATS_FINE = ("background", "necrotic_core", "oedema", "enhancing")
BRATS_COARSE = ("background", "whole_tumour")
BRATS_CHANNELS = ("FLAIR", "T1", "T1ce", "T2")


def get_config(arg=None):
    c = segmentation_defaults(fine_class_names=BRATS_FINE, coarse_class_names=BRATS_COARSE,
                              channel_names=BRATS_CHANNELS)
    c.data.source = "brain_phantom"
    c.data.image_size = 64  # 3.75 mm pixels: a CPU demo; paper scale uses 224
    c.data.channels = 4
    c.data.fine_to_coarse = (0, 1, 1, 1)
    c.data.intensity_norm = "zscore_nonzero"  # skull-stripped: background is exactly 0
    c.data.hflip = True  # brains are roughly left-right symmetric
    c.data.fine_label_patients = 3
    c.data.labeled_per_batch = 4
    apply_size(c, arg, images_per_patient=8)  # 8 axial slices
    if arg and arg != "tiny":  # a tools/prepare_data.py --builder brats2021 root
        c.data.fine_label_patients = 0.1
    return c
