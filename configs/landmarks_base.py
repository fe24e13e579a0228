"""Defaults shared by the landmark configs (task "landmarks"); not a config file itself.
Fields the pretraining defaults (configs/pretrain_base.py) document are not repeated;
what is new:
- `model` (name "heatmap", fields in mimjax/models/heatmap.py): `num_landmarks` heatmap
  channels; `backbone` "vit" (the mimjax ViT encoder + a dense `decoder`, the
  segmentation task's, read at `heatmap_stride`) or "unet"; `head_bias`;
- `init`: a pretraining workdir (or an imported HF / timm checkpoint) whose encoder
  initialises the ViT backbone; None = scratch;
- `objectives.landmark_heatmap` (mimjax/objectives/landmark_heatmap.py): Gaussian
  targets of `sigma` model-input pixels, `loss` "bce" | "mse", and a DSNT soft-argmax
  coordinate term (`coordinate_weight`; 1 here: with per-pixel BCE alone the 37 maps
  of the hand stayed at their mean positions for the first hundreds of steps);
- `data` (input_pipeline/landmarks.py): the source, the landmark count, millimetres
  (`spacing`), few-label subsets (`label_fraction`, `num_labelled`), augmentation;
- `landmarks`: sub-pixel decoding (`decode`: "quadratic" | "soft_window" | "argmax"),
  SDR `thresholds` (mm), `figure_images`;
- `eval_every`, `eval_batch_size`: val MRE evals; the lowest val MRE is kept in
  WORKDIR/best/ and scored on "test" at the end (WORKDIR/test_metrics.json).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.pretrain_base import pretrain_defaults, use_fast_test_loop, use_tiny_encoder
from input_pipeline.landmarks import default_landmark_data_config


def landmark_defaults():
    c = pretrain_defaults()
    c.task = "landmarks"
    c.init = placeholder(str)
    c.init_step = placeholder(int)
    c.init_use_ema = False

    c.data = default_landmark_data_config()
    c.data.dir = "data"
    c.data.num_workers = 1

    # The demo's encoder size (configs/demo.py: width 192, 4 blocks), patch 16.
    m = c.model
    del m["scales"], m["decoder"]  # pretraining only
    m.name = "heatmap"
    m.backbone = "vit"
    m.variant = "Ti/16"
    m.width, m.depth, m.num_heads = 192, 4, 3
    m.image_size = c.data.get_ref("image_size")
    m.channels = c.data.get_ref("channels")
    m.num_landmarks = c.data.get_ref("num_landmarks")
    m.drop_path_rate = 0.1
    m.decoder = "progressive"  # "unetr" with heatmap_stride=1
    m.taps = placeholder(tuple)
    # Heatmaps read at S / 2 from 48 channels, upsampled to S (mimjax/models/heatmap.py):
    # 37 maps from a 16-channel full-resolution map learnt nothing in 300 steps.
    m.heatmap_stride = 2
    m.decoder_widths = (128, 64, 48)
    m.norm = "batch"
    m.head_bias = -4.0
    m.unet_base_channels = 16
    m.unet_dropout = 0.0

    c.objectives = ml_collections.ConfigDict()
    c.objectives.landmark_heatmap = ml_collections.ConfigDict(dict(
        weight=1.0, loss="bce", sigma=3.0, pixel_reduction="mean", coordinate_weight=1.0,
        softargmax_beta=1.0))

    # The read-out the coordinate term trains (DSNT's expectation); "quadratic" (the
    # argmax of the sigmoid heatmap refined by a quadratic fit) for heatmap-only training.
    c.landmarks = ml_collections.ConfigDict(dict(
        decode="softargmax", thresholds=(2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0), figure_images=4))

    c.global_batch_size = 8
    c.total_steps = 400
    c.warmup_steps = 40
    c.optimizer.base_lr = 1e-3 * 256 / 8  # lr 1e-3 (AdamW)
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.05
    c.optimizer.layer_decay = 0.75  # pretrained encoder blocks learn slower than the decoder
    c.optimizer.grad_clip_norm = 1.0

    c.log_every = 20
    c.eval_every = 100
    c.eval_batch_size = 8
    c.eval_use_ema = False
    c.checkpoint_every = 100
    c.figure_every = 100  # unused: figures come with each eval
    return c


def use_tiny(c) -> None:
    """The test suite's variant: seconds."""
    use_tiny_encoder(c.model)
    c.data.image_size = 32
    c.data.phantom_num_images = 24
    c.data.phantom_size = 64
    c.data.phantom_split = (0.5, 0.25, 0.25)
    c.objectives.landmark_heatmap.sigma = 1.5
    c.model.decoder_widths = (32, 16, 16)
    use_fast_test_loop(c, batch=4, steps=6, every=3)


def use_prepared(c, root: str, *, num_landmarks: int, spacing: str) -> None:
    """Paper scale on a tools/prepare_data.py root (its train / val / test splits are
    the reference protocol's): ViT-B/16 at 512 px, sigma 3 px and BCE heatmaps (GU2Net's
    setting at ~512 px), batch 8, 20k steps, bf16."""
    from configs.pretrain_base import use_vit_b16

    c.data.source = "prepared"
    c.data.dir = root
    c.data.image_size = 512
    c.data.num_landmarks = num_landmarks
    c.data.spacing = spacing
    c.data.num_workers = 8
    use_vit_b16(c.model)
    c.objectives.landmark_heatmap.sigma = 3.0
    # The reference protocol's recipe: per-pixel BCE on Gaussian heatmaps, read by the
    # argmax (refined here by a quadratic fit); long runs need no coordinate term.
    c.objectives.landmark_heatmap.coordinate_weight = 0.0
    c.landmarks.decode = "quadratic"
    c.model.decoder_widths = (256, 128, 64)
    c.optimizer.layer_decay = 0.65
    c.global_batch_size = c.eval_batch_size = 8
    c.optimizer.base_lr = 1e-3 * 256 / 8 / 4  # lr 2.5e-4
    c.total_steps, c.warmup_steps = 20000, 1000
    c.eval_every = c.checkpoint_every = 1000
    c.log_every = 50
