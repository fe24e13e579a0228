"""Defaults shared by the pretraining configs (MAE / MIRAM); not a config file itself.

Every field is documented here once; the config files override what differs.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from input_pipeline.pipeline import default_data_config


def pretrain_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Encoder: a ViT `variant` ("B/16"); width/depth/num_heads/mlp_dim override it.
    c.model = ml_collections.ConfigDict()
    c.model.name = "mae"
    c.model.variant = "B/16"
    c.model.width = placeholder(int)
    c.model.depth = placeholder(int)
    c.model.num_heads = placeholder(int)
    c.model.mlp_dim = placeholder(int)
    c.model.image_size = 112          # encoder (base) resolution
    c.model.scales = [112, 224]       # one decoder per target scale; scales[0] = image_size
    c.model.channels = 1
    c.model.posemb = "sincos2d"       # or "learn"
    c.model.class_token = True
    c.model.dtype = "float32"         # compute dtype; "bfloat16" on accelerators
    c.model.layer_norm_eps = 1e-6
    c.model.gelu_approximate = True
    c.model.scan = False              # scan over layers (faster compiles for deep models)
    c.model.remat = False             # recompute activations in the backward pass
    c.model.attention = "xla"         # "fused": jax.nn.dot_product_attention (cuDNN on GPU)
    c.model.decoder = ml_collections.ConfigDict(
        dict(width=512, depth=8, num_heads=16, mlp_dim=placeholder(int), posemb="sincos2d"))

    # Objectives: name -> {weight, kwargs}. MIRAM = per-scale MSE on masked patches.
    c.objectives = ml_collections.ConfigDict()
    c.objectives.masked_reconstruction = ml_collections.ConfigDict(
        dict(weight=1.0, mask_ratio=0.75, norm_pix_loss=True, scale_weights=[1.0, 1.0]))

    c.data = default_data_config()

    # Optimisation (MAE recipe): lr = base_lr * global_batch_size / 256.
    c.global_batch_size = 1024
    c.grad_accum_steps = 1
    c.total_steps = placeholder(int)              # or total_epochs (needs the dataset size)
    c.total_epochs = placeholder(float)
    c.warmup_steps = placeholder(int)
    c.warmup_epochs = placeholder(float)
    c.optimizer = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
        grad_clip_norm=placeholder(float),
        frozen=(),  # top-level parameter parts never updated (mimjax.optim.freeze)
        proximal_mu=0.0,  # > 0: FedProx / L2-SP pull (mu/2)||w - w_anchor||^2 (0 = off)
        proximal_parts=("encoder",)))  # top-level parts the proximal term covers
    c.ema_decay = 0.0                 # > 0 keeps an EMA of the parameters
    c.max_consecutive_nonfinite = 10  # stop after this many skipped (non-finite) steps

    # Parallelism: mesh axes data x fsdp x tensor; -1 = all remaining devices.
    # dcn_data: how many groups of processes (TPU slices, GPU nodes) the data axis
    # spans, pure data parallelism over the slower links between them; the other
    # axes stay within a group (mimjax.sharding.make_mesh).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    c.sharding_rules = None           # None = mimjax.sharding.DEFAULT_RULES
    # Persistent XLA compilation cache (on shared storage for a pod: one host's
    # compile serves the others and the next run); None = off.
    c.compilation_cache_dir = placeholder(str)

    # Logging, figures, checkpoints.
    c.log_every = 50
    c.figure_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.peak_tflops_per_device = placeholder(float)   # None = measure a matmul at start-up (for MFU)
    return c


def use_vit_b16(model) -> None:
    """Paper scale: ViT-B/16 (the variant's width, depth and heads), bf16 compute."""
    model.variant = "B/16"
    model.width = model.depth = model.num_heads = None
    model.dtype = "bfloat16"


def use_tiny_encoder(model) -> None:
    """The test suite's encoder: width 64, 2 blocks, 4 heads, MLP 128."""
    model.width, model.depth, model.num_heads, model.mlp_dim = 64, 2, 4, 128


def use_fast_test_loop(c, *, batch: int, steps: int, every: int) -> None:
    """Seconds-long loops for the test suite: tiny batches, logs every step, no
    data workers, no start-up matmul measurement."""
    c.data.num_workers = 0
    c.global_batch_size = c.eval_batch_size = batch
    c.total_steps, c.warmup_steps = steps, 2
    c.log_every, c.eval_every, c.checkpoint_every = 1, every, every
    c.peak_tflops_per_device = 0.1
