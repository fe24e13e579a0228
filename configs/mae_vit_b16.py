"""MAE ViT-B/16 pretraining: the one-scale case of MIRAM, same recipe.

Encoder ViT-B/16 at 112 px, one 8-block 512-d decoder reconstructing at 112 px,
mask 0.75, 500 epochs (40 warm-up), base lr 1.5e-4 (x batch / 256), AdamW (0.9,
0.95), weight decay 0.05, batch 1024 — the baseline MIRAM is compared against.

Command:
    python main.py --config configs/mae_vit_b16.py:DATA_DIR --workdir WORKDIR
Without an argument it runs on the embedded phantom (generated under ./data).

Expected wall time: a little less than configs/miram_vit_b16.py (no 224-px decoder).
Expected result: the baseline of the MIRAM paper's CBIS-DDSM tables after
fine-tuning (see configs/miram_vit_b16.py).
"""

from configs.miram_vit_b16 import get_config as miram_config


def get_config(arg=None):
    c = miram_config(arg)
    c.model.scales = [112]
    c.objectives.masked_reconstruction.scale_weights = [1.0]
    return c
