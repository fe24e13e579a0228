"""Chest X-ray landmark detection (6 landmarks: each lung's apex, costophrenic and
cardiophrenic angles), on the embedded chest X-ray phantom or prepared Shenzhen chest
X-rays with Zhu et al.'s landmark files.

Commands:
    python main.py --config configs/landmarks_chest.py --workdir workdirs/lm_chest
    python main.py --config configs/landmarks_chest.py --workdir w --config.init=workdirs/mae_cxr
    python main.py --config configs/landmarks_chest.py:/data/chest --workdir w   # paper scale

What it does (demo scale): renders the chest X-ray phantom once under ./data (400
radiographs at 256 px; the phantom places lungs and heart per patient and stores the six
points), split 240 / 40 / 120, and trains the landmark model of configs/landmarks_hand.py
(ViT width 192, 4 blocks, patch 16, 128 px, heatmaps read at stride 2, Gaussian targets
with a soft-argmax term). Errors are reported as the chest protocol does: in pixels of
the image resized to 512 x 512 (`data.spacing="chest"`; the Shenzhen files carry no
spacing), the unit "px@512x512" in metrics.jsonl and test_metrics.json.

Paper scale (tools/prepare_data.py --builder chest_landmarks --input CHEST --output
/data/chest --size 512; the builder's splits are the reference protocol's 195 / 34 /
rest): ViT-B/16 at 512 px, sigma 3 px, BCE heatmaps read by a quadratic fit.

Expected wall time on a 2-core CPU (demo scale): about 4 minutes (400 steps of 8 at
~0.47 s, four val evals; measured for the hand config, whose model and budget are the
same). Expected result: not measured yet for the chest phantom; the hand phantom's
figures are in the README's landmark section.
`:tiny` is a seconds-long variant used by the test suite.
"""

from configs.landmarks_base import landmark_defaults, use_prepared, use_tiny

# The chest X-ray phantom's intensity mean and std in [0, 1] units, measured with
# input_pipeline.pipeline.measure_intensity_stats (64 images at 256 px).
CXR_PHANTOM_NORM = (0.44, 0.25)


def get_config(arg=None):
    c = landmark_defaults()
    c.data.source = "cxr_phantom"
    c.data.num_landmarks = 6
    c.data.spacing = "chest"
    c.data.norm_mean, c.data.norm_std = CXR_PHANTOM_NORM
    if arg == "tiny":
        use_tiny(c)
    elif arg:
        use_prepared(c, arg, num_landmarks=6, spacing="chest")
    return c
