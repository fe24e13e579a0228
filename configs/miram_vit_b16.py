"""MIRAM ViT-B/16 pretraining, the paper setup (Vo et al., arXiv 2503.07157).

Encoder ViT-B/16 at 112 px; two 8-block 512-d decoders reconstructing the masked
patches at 112 and 224 px (targets cropped from the real 224-px image); mask 0.75;
500 epochs with 40 warm-up; base lr 1.5e-4 (x batch / 256), AdamW (0.9, 0.95),
weight decay 0.05; batch 1024.

Command (DATA_DIR holds ArrayRecord shards written by input_pipeline.records, e.g.
CBIS-DDSM images; data.source "shards"):
    python main.py --config configs/miram_vit_b16.py:DATA_DIR --workdir WORKDIR
A tools/prepare_data.py output root pretrains on its train split with
`--config.data.source=prepared`; other sources: docs/data_sources.md.
Without an argument it runs on the embedded phantom (generated under ./data).

Expected wall time: ViT-B/16 at 112 px is ~4.4 GFLOP forward per image for the
encoder on 25% of the patches plus the decoders; at 45% MFU on 8 H100s a
10,000-image dataset takes roughly 1-2 h for 500 epochs.
Expected result: the
paper reports +3% AP / +1% AUC on CBIS-DDSM pathology and +4% AP / +2% AUC on
mass margins over MAE after fine-tuning; pretraining loss itself is not comparable
across datasets.
"""

from configs.pretrain_base import pretrain_defaults


def get_config(arg=None):
    c = pretrain_defaults()
    if arg:
        c.data.source = "shards"  # a folder (or glob) of shards, e.g. PREPARED_ROOT/train
        c.data.dir = arg
    c.model.variant = "B/16"
    c.model.image_size = 112
    c.model.scales = [112, 224]
    c.model.dtype = "bfloat16"
    c.objectives.masked_reconstruction.scale_weights = [1.0, 1.0]
    c.global_batch_size = 1024
    c.total_epochs = 500
    c.warmup_epochs = 40
    c.optimizer.base_lr = 1.5e-4
    c.data.num_workers = 8
    return c
