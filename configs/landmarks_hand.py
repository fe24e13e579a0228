"""Hand X-ray landmark detection (37 landmarks), on the embedded hand radiograph
phantom or prepared hand data (Payer et al.'s annotations of the Digital Hand Atlas).

Commands:
    python main.py --config configs/landmarks_hand.py --workdir workdirs/lm_hand
    python main.py --config configs/landmarks_hand.py --workdir workdirs/lm_hand_mae \\
        --config.init=workdirs/mae_hand               # encoder from a pretraining
    python main.py --config configs/landmarks_hand.py --workdir w --config.init=vit_mae_base
        # an HF / timm checkpoint imported with tools/import_pytorch.py
    python main.py --config configs/landmarks_hand.py --workdir w --config.model.backbone=unet \\
        --config.optimizer.layer_decay=None
    python main.py --config configs/landmarks_hand.py:/data/hand --workdir w   # paper scale

What it does (demo scale): renders the hand phantom once under ./data (400 radiographs
at 256 px, 288 mm field of view, split 240 / 40 / 120), and trains the ViT (width 192,
4 blocks, patch 16, 128 px input) with the progressive dense decoder read at stride 2
(48 channels) and one heatmap channel per landmark: Gaussian targets of sigma 3 px with
per-pixel BCE plus the DSNT soft-argmax coordinate term, 400 steps of 8. Every
`eval_every` steps the val images are read out by the soft-argmax, mapped back to the
original pixels and scored in mm from the spacing the phantom stores ("val/mre",
"val/sdr/2", ... in metrics.jsonl; figures/landmarks_val_STEP.png with error lines);
the lowest val MRE is kept in WORKDIR/best/ and scored on the test images at the end
(WORKDIR/test_metrics.json, per image too; figures/landmarks_test.png).

Paper scale (tools/prepare_data.py --builder hand_landmarks --input HAND --output
/data/hand --size 512; the builder's splits are the reference protocol's 550 / 59 /
rest): ViT-B/16 at 512 px, sigma 3, millimetres by the hand protocol (landmarks 0 and
4 are 50 mm apart in every image, `data.spacing="hand_wrist"`). Measure the intensity
mean and std of your data (input_pipeline.pipeline.measure_intensity_stats) and set
data.norm_mean / norm_std to what the encoder was pretrained with.

Expected wall time on a 2-core CPU (demo scale): about 4 minutes (measured 3 min 48 s,
the phantom included, as the scratch_100 arm of configs/experiments/landmark_transfer.py,
which runs this config unchanged: ~17 images/s, four val evals).
Expected result (demo scale, measured): test (120 images) MRE 4.55 +- 2.78 mm, SDR 0.18
at 2 mm and 0.49 at 4 mm; the val MRE is still falling at step 400.
`:tiny` is a seconds-long variant used by the test suite.
"""

from configs.landmarks_base import landmark_defaults, use_prepared, use_tiny

# The hand phantom's intensity mean and std in [0, 1] units, measured with
# input_pipeline.pipeline.measure_intensity_stats (64 images at 256 px): a fixed
# normalisation that a pretraining on the phantom shares.
HAND_PHANTOM_NORM = (0.16, 0.19)


def get_config(arg=None):
    c = landmark_defaults()
    c.data.source = "hand_phantom"
    c.data.num_landmarks = 37
    c.data.norm_mean, c.data.norm_std = HAND_PHANTOM_NORM
    if arg == "tiny":
        use_tiny(c)
    elif arg:
        use_prepared(c, arg, num_landmarks=37, spacing="hand_wrist")
    return c
