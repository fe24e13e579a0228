"""Cephalometric landmark detection (ISBI 2015 challenge, 19 landmarks) on prepared data;
there is no embedded cephalogram phantom, so this config needs the dataset.

Commands:
    python tools/prepare_data.py --builder isbi2015_ceph --input ISBI2015 --output /data/ceph \\
        --size 512
    python main.py --config configs/landmarks_ceph.py:/data/ceph --workdir workdirs/lm_ceph
    python main.py --config configs/landmarks_ceph.py:/data/ceph --workdir w \\
        --config.init=/ckpt/mae_in1k          # an ImageNet MAE imported with import_pytorch

What it does: the reference protocol's splits (images 1-130 train, 131-150 val, Test1
and Test2 pooled as the 250 test images; input_pipeline/builders/landmarks.py), the
ground truth the mean of the two doctors (the challenge scored against the senior
doctor alone, so compare with its tables with care), millimetres from the 0.1 mm pixels
of the original 1935 x 2400 images (the ingestion stores the spacing, the metrics map
every point back to the original pixels); ViT-B/16 at 512 px, Gaussian targets of sigma
3 px with per-pixel BCE (GU2Net's setting), read by the argmax refined with a quadratic
fit; val MRE picks the checkpoint; test MRE and SDR at 2, 2.5, 3, 4 mm.

Expected wall time: not measured here (it needs the dataset and an accelerator; about a
day of 20k steps on a 2-core CPU). Expected result: not measured here.
"""

from configs.landmarks_base import landmark_defaults, use_prepared

CEPH_NUM_LANDMARKS = 19


def get_config(arg=None):
    c = landmark_defaults()
    use_prepared(c, arg or "data/isbi2015_ceph", num_landmarks=CEPH_NUM_LANDMARKS,
                 spacing="record")
    return c
