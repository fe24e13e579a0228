"""Demo: MIRAM (two scales) on the embedded mammography phantom, on a laptop CPU.

Command:
    python main.py --config configs/demo.py --workdir workdirs/demo

What it does: generates the procedural phantom once under ./data (512 images at
448 px, uint16, ArrayRecord) and ingests the two CR radiographs of the
pydicom-data package (a chest PA and a leg, lossless JPEG 2000 DICOM) there with
the engine of tools/prepare_data.py, then pretrains a small ViT (width 192, 4 blocks,
patch 8) on 64-px crops whose masked patches are reconstructed by two decoders, at
64 px and at 128 px (the 128-px targets are cropped from the real 448-px image).

Writes WORKDIR/metrics.jsonl, TensorBoard events, checkpoints (steps 100 and 200)
and figures/recon_100.png, recon_200.png. At steps 100 and 200 a linear probe of the
encoder (ridge on GAP features of lesion-centred crops of the phantom, 4-class
pathology, fit on its train split) is scored on the val split ("probe/pathology/..."
in metrics.jsonl).

Expected wall time on a 2-core CPU: about 2 minutes in all (phantom ~25 s, compile
~15 s, 200 steps of batch 32 at ~75 img/s, two probes ~2 s each; measured 2 min 0 s
from a fresh clone).
Expected result: the total loss (sum of the two scales' norm_pix MSE) falls from ~3.0
over the first 20 steps to ~1.45 at step 200, the 64-px term (~0.71) below the 128-px
term (~0.74); probe macro AUC ~0.7 at step 200 (the README's experiment table shows
what pretraining adds over a random encoder at this scale).

`configs/demo.py:tiny` is a seconds-long variant used by the test suite.
"""

from configs.pretrain_base import pretrain_defaults
from input_pipeline.finetune import default_finetune_data_config
from input_pipeline.phantom import PATHOLOGY_CLASSES
from mimjax.evaluators.probe_hooks import default_probe_config


def _pathology_probe(c):
    """Linear probe of the encoder on lesion-centred crops of the same phantom
    (4-class pathology, train split -> val split) at each figure step."""
    data = default_finetune_data_config()
    for key in ("dir", "phantom_num_images", "phantom_size", "phantom_seed"):
        data[key] = c.data.get_ref(key)  # follows --config.data.* overrides
    data.roi_context = 3.0
    task = {"label_key": "label_pathology", "multilabel": False,
            "class_names": list(PATHOLOGY_CLASSES)}
    probe = default_probe_config(data, {"pathology": task})
    probe.every = c.get_ref("figure_every")
    return probe


def get_config(arg=None):
    c = pretrain_defaults()
    c.model.variant = "Ti/8"
    c.model.width = 192
    c.model.depth = 4
    c.model.num_heads = 3
    c.model.image_size = 64
    c.model.scales = [64, 128]
    c.model.decoder.width = 96
    c.model.decoder.depth = 2
    c.model.decoder.num_heads = 4
    c.objectives.masked_reconstruction.scale_weights = [1.0, 1.0]

    c.data.dir = "data"
    c.data.phantom_num_images = 512
    c.data.phantom_size = 448
    c.data.pydicom_cr = True  # + the two real CR radiographs of pydicom-data
    c.data.num_workers = 1

    c.global_batch_size = 32
    c.total_steps = 200
    c.warmup_steps = 20
    c.optimizer.base_lr = 1.5e-4 * 8  # small batch, short run: higher base lr (lr = 1.5e-4)
    c.log_every = 20
    c.figure_every = 100
    c.checkpoint_every = 100

    c.evals = {"linear_probe": _pathology_probe(c)}
    if arg == "tiny":
        c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 64, 2, 4, 128
        c.model.image_size, c.model.scales = 32, [32, 64]
        c.model.decoder.width, c.model.decoder.depth, c.model.decoder.num_heads = 32, 1, 2
        c.data.phantom_num_images, c.data.phantom_size = 48, 128
        c.data.num_workers = 0
        c.global_batch_size = 8
        c.total_steps, c.warmup_steps = 8, 2
        c.log_every, c.figure_every, c.checkpoint_every = 1, 4, 2
        c.peak_tflops_per_device = 0.1  # skip the start-up matmul measurement
        c.evals.linear_probe.batch_size = 8
    elif arg:
        raise ValueError(f"configs/demo.py takes no argument or 'tiny', got {arg!r}.")
    return c
