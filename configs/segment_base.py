"""Defaults shared by the segmentation configs (task "segmentation"); not a config file
itself. Fields the pretraining defaults (configs/pretrain_base.py) document are not
repeated; what is new:
- `model` (name "segmenter", fields in mimjax/models/segmenter.py): `backbone` "vit"
  (the mimjax ViT encoder + a dense `decoder`, "progressive" or "unetr") or "unet" (the
  paper's 2-D U-Net); heads `separate_norm` and `prior_concat` (the paper's SN and PC);
  `fine_to_coarse` follows `data.fine_to_coarse`;
- `init`: a pretraining workdir (or an imported HF / timm checkpoint) whose encoder
  initialises the ViT backbone; None = scratch;
- `objectives.subclass_segmentation` (mimjax/objectives/subclass_segmentation.py):
  coarse and fine terms, pseudo-labels, the HierarchicalMix term and their schedules;
- `data` (input_pipeline/segmentation.py): the source, which patients keep their fine
  masks (`fine_label_patients`), labelled rows per batch, HierarchicalMix, augmentation;
- `segmentation`: class names (metrics, figures) and channel names;
- `eval_every`, `eval_batch_size`, `eval_use_ema`: per-volume val evals (Dice, HD95 in mm);
  the best val mean fine Dice is kept in WORKDIR/best/ and scored on "test" at the end.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.pretrain_base import (
    pretrain_defaults,
    use_fast_test_loop,
    use_tiny_encoder,
    use_vit_b16,
)
from input_pipeline.segmentation import default_segmentation_data_config


def segmentation_defaults(*, fine_class_names, coarse_class_names, channel_names=None):
    c = pretrain_defaults()
    c.task = "segmentation"
    c.init = placeholder(str)
    c.init_step = placeholder(int)
    c.init_use_ema = False

    c.data = default_segmentation_data_config()
    c.data.dir = "data"
    c.data.num_workers = 1

    # The demo's encoder size (configs/demo.py: width 192, 4 blocks, patch 8).
    m = c.model
    del m["scales"], m["decoder"]  # pretraining only
    m.name = "segmenter"
    m.backbone = "vit"
    m.variant = "Ti/8"
    m.width, m.depth, m.num_heads = 192, 4, 3
    m.image_size = c.data.get_ref("image_size")
    m.channels = c.data.get_ref("channels")
    m.drop_path_rate = 0.1
    m.decoder = "progressive"  # or "unetr" (taps of intermediate blocks)
    m.taps = placeholder(tuple)
    m.decoder_widths = placeholder(tuple)
    m.norm = "batch"
    m.separate_norm = False
    m.prior_concat = False
    m.fine_to_coarse = c.data.get_ref("fine_to_coarse")
    m.unet_base_channels = 16
    m.unet_dropout = 0.3

    c.objectives = ml_collections.ConfigDict()
    c.objectives.subclass_segmentation = ml_collections.ConfigDict(dict(
        weight=1.0, coarse_weight=1.0, fine_weight=1.0, mix_weight=1.0,
        pseudo_labels=True, hierarchical_mix=c.data.get_ref("hierarchical_mix"),
        fine_to_coarse=c.data.get_ref("fine_to_coarse"), ramp_length=1000,
        threshold_decay=0.999, threshold_every=10, threshold_floor=0.4, mix_gradient=True))

    c.segmentation = ml_collections.ConfigDict(dict(
        fine_class_names=list(fine_class_names), coarse_class_names=list(coarse_class_names),
        channel_names=placeholder(list) if channel_names is None else list(channel_names)))

    c.global_batch_size = 16
    c.total_steps = 600
    c.warmup_steps = 50
    c.optimizer.base_lr = 1e-3 * 256 / 16  # lr 1e-3 (AdamW)
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.05
    c.optimizer.layer_decay = 0.75  # pretrained encoder blocks learn slower than the decoder
    c.optimizer.grad_clip_norm = 1.0

    c.log_every = 20
    c.eval_every = 200
    c.eval_batch_size = 32
    c.eval_use_ema = False
    c.checkpoint_every = 200
    c.figure_every = 200  # unused: overlays come with each eval
    return c


def apply_size(c, arg, *, images_per_patient: int) -> None:
    """`tiny` (the test suite: seconds), or a prepared root (paper scale: ViT-B/16 at
    224 px, batch 24 with 12 labelled rows, 30k steps)."""
    if arg == "tiny":
        use_tiny_encoder(c.model)
        c.data.image_size = 32
        c.data.phantom_num_images = 10 * images_per_patient  # 10 patients
        c.data.phantom_size = 64
        c.data.fine_label_patients = 2
        c.data.labeled_per_batch = 2
        use_fast_test_loop(c, batch=8, steps=6, every=3)
    elif arg:
        c.data.source = "prepared"
        c.data.dir = arg
        c.data.image_size = 224
        c.data.num_workers = 8
        use_vit_b16(c.model)
        c.optimizer.layer_decay = 0.65
        c.global_batch_size = 24
        c.data.labeled_per_batch = 12
        c.optimizer.base_lr = 1e-3 * 256 / 24
        c.total_steps, c.warmup_steps = 30000, 1000
        c.eval_every = c.checkpoint_every = 1000
        c.log_every = 50
