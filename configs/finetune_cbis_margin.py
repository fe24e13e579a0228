"""Fine-tuning: CBIS-DDSM mass margins, 5 labels (multi-label, sigmoid BCE).

Labels (record meta "margins", a 5-multi-hot): circumscribed, obscured, ill_defined,
microlobulated, spiculated. Same encoder, head and recipe as
configs/finetune_cbis_pathology.py (no label smoothing); see that file for details.

Commands:
    python main.py --config configs/finetune_cbis_margin.py --workdir workdirs/margin_init \
        --config.init=workdirs/demo                    # from the demo pretraining
    python main.py --config configs/finetune_cbis_margin.py:/data/cbis_prepared \
        --workdir workdirs/cbis_margin --config.init=workdirs/miram_b16   # paper scale

Expected wall time on a 2-core CPU (demo scale): about 1.5 minutes, as the pathology
config.
Expected result (1,024-image phantom, lesion crops, configs/experiments/miram_vs_mae.py):
test macro AUC ~0.6 from scratch or a demo-scale pretraining: at 64 px the margin
shapes are barely resolved and only masses carry margin labels.
Metrics are multi-label (exact-match and hamming accuracy, per-label AP/AUC, macro
AUC for model selection); a margin absent from a split (calcifications have none)
is reported as NaN and left out of the macro mean. figures/confusion_*.png show one
2x2 panel per label.
"""

from configs.finetune_base import apply_size, finetune_defaults
from input_pipeline.phantom import MARGIN_TYPES


def get_config(arg=None):
    c = finetune_defaults(
        label="margins", class_names=MARGIN_TYPES, multilabel=True, label_smoothing=0.0
    )
    return apply_size(c, arg)
