"""Defaults shared by the fine-tuning configs (classification); not a config file itself.

The encoder is the demo's (configs/demo.py), so `--config.init=workdirs/demo` loads a
demo pretraining into it; the paper-scale run overrides the model, data and schedule.
Fields the pretraining defaults (configs/pretrain_base.py) document are not repeated;
what is new:
- `task`: "classification" (the trainer's fine-tuning path; pretraining is "pretrain");
- `init`: a pretraining workdir (or its checkpoints/ directory) whose encoder
  initialises the model when the run starts fresh; None = random init (scratch).
  `init_step` picks a checkpoint step (None = latest), `init_use_ema` its EMA params;
- `finetune.class_names`: one name per logit (metrics and figures);
- `eval_every`, `eval_batch_size`, `eval_use_ema`: validation passes; the best by
  val macro ROC-AUC is kept in WORKDIR/best/ and evaluated on "test" at the end.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.pretrain_base import (
    pretrain_defaults,
    use_fast_test_loop,
    use_tiny_encoder,
    use_vit_b16,
)
from input_pipeline.finetune import default_finetune_data_config


def finetune_defaults(
    *, label: str, class_names, multilabel: bool, label_smoothing: float
) -> ml_collections.ConfigDict:
    c = pretrain_defaults()
    c.task = "classification"
    c.init = placeholder(str)
    c.init_step = placeholder(int)
    c.init_use_ema = False

    # The demo's encoder (configs/demo.py), all patches visible, plus a head.
    m = c.model
    m.name = "vit_classifier"
    m.variant = "Ti/8"
    m.width, m.depth, m.num_heads = 192, 4, 3
    m.image_size = 64
    del m["scales"], m["decoder"]  # pretraining only
    m.head = "gap"  # "cls" | "gap" | "map"
    m.num_classes = len(class_names)
    m.drop_path_rate = 0.1
    m.head_init_std = 2e-5

    c.objectives = ml_collections.ConfigDict()
    c.objectives.classification = ml_collections.ConfigDict(
        {
            "weight": 1.0,
            "label_key": f"label_{label}",
            "multilabel": multilabel,
            "class_weights": placeholder(list),
            "label_smoothing": label_smoothing,
        }
    )
    c.finetune = ml_collections.ConfigDict({"class_names": list(class_names)})

    # The demo's phantom (same directory, so it is generated once for both).
    c.data = default_finetune_data_config()
    c.data.dir = "data"
    c.data.phantom_num_images = 512
    c.data.phantom_size = 448
    c.data.num_workers = 1
    # The phantom holds whole mammograms: fine-tune on lesion-centred crops (side 6
    # lesion radii), as CBIS-DDSM's cropped lesion images, with mild crop jitter.
    c.data.roi_context = 3.0
    c.data.crop_scale = (0.7, 1.0)

    c.global_batch_size = 32
    c.total_steps = 300
    c.warmup_steps = 30
    # MAE fine-tuning recipe: AdamW (0.9, 0.999), wd 0.05, layer decay, cosine.
    c.optimizer.base_lr = 1e-3
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.05
    c.optimizer.layer_decay = 0.75
    c.optimizer.head_lr_mult = 1.0
    c.ema_decay = 0.0  # > 0 keeps an EMA; eval_use_ema evaluates it

    c.log_every = 20
    c.eval_every = 100
    c.eval_batch_size = 64
    c.eval_use_ema = False
    c.checkpoint_every = 100
    c.figure_every = 100  # unused: the classifier writes confusion matrices at each eval
    return c


def apply_size(c, arg) -> ml_collections.ConfigDict:
    """`tiny` (tests: demo:tiny's encoder, seconds) or a prepared CBIS-DDSM directory."""
    if arg == "tiny":
        use_tiny_encoder(c.model)
        c.model.image_size = 32
        c.data.phantom_num_images, c.data.phantom_size = 48, 128
        use_fast_test_loop(c, batch=8, steps=8, every=4)
    elif arg:
        # Paper scale: a tools/prepare_data.py output root with train/ val/ test/.
        c.data.source = "prepared"
        c.data.dir = arg
        c.data.roi_context = 0.0  # the cbis_ddsm builder's records already are lesion crops
        c.data.num_workers = 8
        use_vit_b16(c.model)
        c.model.image_size = 224
        c.optimizer.layer_decay = 0.65
        c.global_batch_size = 256
        c.total_steps, c.warmup_steps = None, None
        c.total_epochs, c.warmup_epochs = 50, 5
        c.eval_every = 500
        c.eval_batch_size = 256
        c.checkpoint_every = 500
        c.log_every = 50
    return c
