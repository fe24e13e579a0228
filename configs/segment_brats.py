"""Subclass segmentation of brain tumours (BraTS 2021's labels: necrotic core, oedema,
enhancing tumour; the superclass whole tumour) from four MRI sequences, on the embedded
brain-tumour phantom or prepared BraTS 2021.

Commands:
    python main.py --config configs/segment_brats.py --workdir workdirs/seg_brats
    python main.py --config configs/segment_brats.py:/data/brats --workdir w   # paper scale

What it does (demo scale): renders the brain phantom once under ./data (FLAIR, T1,
T1ce, T2 as four channels; 8 axial slices per patient, 192 px), keeps the fine masks of
a few train patients and the whole-tumour masks of the rest, and trains the ViT (4
input channels, 128 px) with the progressive decoder on the subclass-segmentation
objective; per-volume val evals and a test eval of the best checkpoint as
configs/segment_acdc.py.

Paper scale (tools/prepare_data.py --builder brats2021 --input BraTS2021 --output
/data/brats --size 240): ViT-B/16 at 224 px, 4 channels, non-zero z-score
normalisation, left-right flips.

Expected wall time on a 2-core CPU (demo scale): about 7 minutes.
Expected result (demo scale): test mean fine Dice above the superclass-only baseline;
enhancing rim and necrotic core are the hardest classes (thin and small).
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
