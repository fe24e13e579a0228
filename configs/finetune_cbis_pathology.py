"""Fine-tuning: CBIS-DDSM lesion pathology, 4 classes (softmax cross-entropy).

Classes: benign_mass, malignant_mass, benign_calcification, malignant_calcification
(record meta "pathology", 0..3). The encoder is the demo's (configs/demo.py: ViT
width 192, 4 blocks, 3 heads, patch 8, 64 px, 1 channel, sin-cos positions, class
token) with a GAP head (`--config.model.head=cls|gap|map`).

Commands (demo scale, on the demo's phantom in ./data):
    python main.py --config configs/demo.py --workdir workdirs/demo
    python main.py --config configs/finetune_cbis_pathology.py --workdir workdirs/path_init \
        --config.init=workdirs/demo                    # from the demo pretraining
    python main.py --config configs/finetune_cbis_pathology.py --workdir workdirs/path_scratch
                                                       # random init (scratch)
Paper scale (ViT-B/16 at 224 px on a tools/prepare_data.py CBIS-DDSM output root with
train/ val/ test/; init from a configs/miram_vit_b16.py pretraining):
    python main.py --config configs/finetune_cbis_pathology.py:/data/cbis_prepared \
        --workdir workdirs/cbis_pathology --config.init=workdirs/miram_b16

Expected wall time on a 2-core CPU (demo scale): about 1.5 minutes with the demo's
phantom already in ./data, 2.5 minutes when it is generated first (compile ~10 s, 300
steps of batch 32 at ~100 img/s, an eval on the 51 val images at steps 100/200/300,
~1 s each).
The phantom's whole mammograms are cut to lesion-centred crops first
(`data.roi_context=3`, as CBIS-DDSM's cropped lesions): at 64 px a whole mammogram
shows its lesion as a few pixels and nothing learns (loss stays at ln 4). Writes
WORKDIR/metrics.jsonl (loss, accuracy, and val/accuracy, val/auc_macro, ... at each
eval), WORKDIR/best/ (the parameters with the best val macro ROC-AUC),
WORKDIR/test_metrics.json (that checkpoint on the test split) and
figures/confusion_val_STEP.png, confusion_test.png.
Expected result from scratch (512-image phantom): test macro AUC 0.81, accuracy 0.49 (val
macro AUC 0.73 -> 0.84 over the three evals); with 1,024 images (the experiment in
configs/experiments/miram_vs_mae.py) 0.84, and 0.85-0.86 from a MIRAM or MAE init.
`:tiny` is a seconds-long variant used by the test suite.
"""

from configs.finetune_base import apply_size, finetune_defaults
from input_pipeline.phantom import PATHOLOGY_CLASSES


def get_config(arg=None):
    c = finetune_defaults(
        label="pathology", class_names=PATHOLOGY_CLASSES, multilabel=False, label_smoothing=0.1
    )
    c.objectives.classification.class_weights = None
    return apply_size(c, arg)
