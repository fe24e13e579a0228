"""MCR image-report pretraining on MIMIC-CXR-JPG, the paper-scale setup (masked
contrastive reconstruction, Wei, Jin, Zhou, arXiv 2312.15840).

Model: ViT-B/16 image encoder at 224 px (1 channel) with an MAE decoder (8 blocks,
width 512) for masked image modelling; a BERT-base-sized text encoder (width 768,
12 blocks, 12 heads, MLP 3072, 128 tokens) with an MLM head, on a 30,522-entry
BPE vocabulary trained on the train split's reports; 2-layer projection heads
(hidden 2048) into a 512-d shared space, mapping before aggregation. Objective: the
masked image (50% of patches) and the masked report (25% of tokens) are the only
inputs of InfoNCE + masked image modelling + masked language modelling (weights
1/1/1). Frontal views only; bf16 compute, f32 parameters and losses.
Optimisation: AdamW (0.9, 0.98), weight decay 0.05, gradient clipping at 1.0, lr
1.5e-4 x batch / 256 = 3e-4 at batch 512, cosine to 0 after 2 warm-up epochs, 50
epochs. The batch size, epochs, learning rate, text length and projection sizes
are this config's choices, not the paper's published values; change them with
--config.global_batch_size=... etc. (the lr follows the batch).

Commands (MIMIC-CXR-JPG + mimic-cxr-reports.zip from PhysioNet, credentialed; see
input_pipeline/builders/mimic_cxr.py for the layout):
    python tools/prepare_data.py --builder mimic_cxr --input MIMIC_CXR_JPG_ROOT \\
        --output PREPARED_DIR --size 256
    python main.py --config configs/mcr_mimic_cxr.py:PREPARED_DIR --workdir WORKDIR
    # the baselines on the same data and budget: CLIP-style (configs/mcr_demo.py's
    # clip_baseline), and two-stream (an unmasked pass for the contrastive loss)
    python main.py --config configs/mcr_mimic_cxr.py:PREPARED_DIR,clip --workdir WORKDIR_CLIP
    python main.py --config configs/mcr_mimic_cxr.py:PREPARED_DIR,two_stream --workdir WORKDIR_2S
Without an argument (or with an empty directory part, e.g. ":,clip") the config
points at data/mimic_cxr_prepared (it builds, but training needs the prepared shards
there). The first run indexes the pairs of each
split (PREPARED_DIR/pairs_index_{split}.json) and trains the tokenizer on the train
reports (PREPARED_DIR/tokenizer.json). norm_mean / norm_std below are placeholders:
measure them once and set them (--config.data.norm_mean=... --config.data.norm_std=...):
    python -c "from configs.mcr_mimic_cxr import get_config; from input_pipeline import \\
        pairs; print(pairs.measure_pair_intensity_stats(get_config('PREPARED_DIR').data, 4096))"

Expected wall time: XLA counts 162 GFLOP per pair for a training step (forward +
backward of the encoder on 98 visible patches, the decoder on 196, the text encoder
on 128 tokens, the MLM head on 32 slots, the optimizer; the CLIP-style baseline
173, the two-stream design 334), i.e. 83 TFLOP per step of 512 pairs. With ~215k
frontal train pairs (~420 steps per epoch, ~21k steps for 50 epochs) that is
~1.7e18 FLOP: ~1.2 h on one H100 at 40% MFU of its 989 TFLOP/s bf16 dense peak,
if the input pipeline delivers the ~2,400 pairs/s that takes (on 8 GPUs the
pipeline, not the FLOPs, sets the pace). Memory: XLA:CPU's analysis gives ~0.32 GB
of temporaries per pair (+ 2.7 GB of state), so batch 512 needs several GPUs
(64 pairs each) or, on one 80-GB GPU, --config.grad_accum_steps=4 (which takes the
contrastive negatives from each microbatch of 128 pairs, not from all 512: the
trainer warns; `contrastive.py` needs the global batch on the devices). Evals every
2,000 steps embed the val split (~1.8k frontal pairs) unmasked: seconds.
Expected result: retrieval metrics in metrics.jsonl ("retrieval/i2t_R@1" ... median
ranks) and WORKDIR/retrieval_metrics.json; the paper reports MCR above the
CLIP-style and two-stream (unmasked contrastive input) designs on MIMIC-CXR
image<->report retrieval, with less GPU memory and time per step than the
two-stream design (measure that here with
`python tools/benchmark.py mcr --config configs/mcr_mimic_cxr.py --batch 64`).
Identical report texts count as correct matches (retrieval.match_identical_reports;
MIMIC-CXR has many verbatim normal reports), and "i2t_findings_P@K" scores the
retrieved reports by their 14 CheXpert labels.
"""

import ml_collections

from configs.mcr_demo import clip_baseline
from configs.pretrain_base import pretrain_defaults
from input_pipeline.pairs import default_pairs_data_config

PLACEHOLDER_DIR = "data/mimic_cxr_prepared"
VARIANTS = ("clip", "two_stream")


def get_config(arg=None):
    """`arg`: "PREPARED_DIR[,clip|,two_stream]" (see the module docstring)."""
    data_dir, *variants = (arg or "").split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(variants) > 1:
        raise ValueError(
            "configs/mcr_mimic_cxr.py takes PREPARED_DIR optionally followed by "
            f"{' or '.join(',' + v for v in VARIANTS)}; got {arg!r}.")
    c = pretrain_defaults()
    c.task = "image_text"
    m = c.model
    m.name = "mcr"
    m.variant = "B/16"
    m.image_size = 224
    m.scales = [224]
    m.channels = 1
    m.dtype = "bfloat16"
    m.decoder = ml_collections.ConfigDict(
        {"width": 512, "depth": 8, "num_heads": 16, "mlp_dim": None, "posemb": "sincos2d"})
    m.text = ml_collections.ConfigDict(
        {"vocab_size": 30522, "max_length": 128, "width": 768, "depth": 12, "num_heads": 12,
         "mlp_dim": 3072, "mlm_head": True})
    m.projection_dim = 512
    m.projection_hidden_dim = 2048
    m.pooling = "map_then_mean"  # mapping before aggregation (MbA)
    m.logit_scale_init = 1 / 0.07
    m.logit_bias_init = -10.0

    c.objectives = ml_collections.ConfigDict()
    c.objectives.mcr = ml_collections.ConfigDict({
        "weight": 1.0, "image_mask_ratio": 0.5, "text_mask_ratio": 0.25, "itc_weight": 1.0,
        "mim_weight": 1.0, "mlm_weight": 1.0, "loss": "infonce", "max_logit_scale": 100.0,
        "norm_pix_loss": True, "text_mask_mode": "mask", "itc_inputs": "masked"})

    c.data = default_pairs_data_config()
    c.data.source = "prepared"
    c.data.dir = data_dir or PLACEHOLDER_DIR  # tools/prepare_data.py's output: train/ val/ test/
    c.data.view_groups = ("frontal",)
    c.data.report_key = "report"
    c.data.vocab_size = m.text.vocab_size
    c.data.max_text_length = m.text.max_length
    c.data.norm_mean, c.data.norm_std = 0.5, 0.25  # placeholders: measure (docstring)
    c.data.channels = m.channels
    c.data.num_workers = 8
    c.data.num_threads = 2

    c.global_batch_size = 512
    c.total_epochs = 50
    c.warmup_epochs = 2
    c.optimizer.base_lr = 1.5e-4  # x 512 / 256: lr 3e-4
    c.optimizer.b2 = 0.98
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
    c.log_every = 50
    c.eval_every = 2000  # ~5 epochs
    c.eval_batch_size = 512
    c.checkpoint_every = 2000
    c.figure_every = 2000  # unused: retrieval figures come with each eval
    c.retrieval = ml_collections.ConfigDict(
        {"match_identical_reports": True, "figure_queries": 4, "top_k": 3})

    if variants == ["clip"]:
        clip_baseline(c)
    elif variants == ["two_stream"]:
        c.objectives.mcr.itc_inputs = "unmasked"
    return c
