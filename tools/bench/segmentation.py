"""Times the real segmentation train step (`train.jitted_train_step`: the config's
segmenter and its subclass-segmentation objective, forward, loss, backward with
batch-norm statistics, AdamW, non-finite guard), jitted and sharded as the trainer
does, on a synthetic batch in the segmentation pipeline's format (image, label_fine,
label_coarse, has_fine, mixed_image, mixed_label, mix_alpha, index; the pipeline's
first `data.labeled_per_batch` rows carry fine masks) already on the devices. Reports
the steady-state step time (median and mean over timed windows), images/s, XLA's FLOP
count, TFLOP/s and MFU, memory per device, as `pretrain` does (table, and JSON on the
last line of stdout and in `--json OUT`). Alone, the config runs as given; `--variant`
swaps the ViT size (e.g. B/16; explicit --config.model.width/depth/num_heads/mlp_dim
overrides still win).

`--compare monai` also times MONAI's `UNETR` (PyTorch, eager, train mode, 2-D, fp32,
NCHW as MONAI runs it) in its own spawned process, in windows alternating with
mimjax's, torch on as many intra-op threads as the cores JAX uses: the machinery of
`pretrain --compare hf` (hf_vitmae.py; see timing.time_interleaved). For like to like,
the mimjax config is first aligned to what UNETR can express, and the output lists
every field that changed:
- the ViT backbone with the "unetr" dense decoder, a port of MONAI's blocks; patch 16
  and 12 blocks (UNETR fixes both); skips from blocks 4, 7 and 10 and the normed
  output of block 12, the blocks UNETR reads; hidden size = the ViT width, and
  UNETR's heads and MLP size from the config;
- decoder widths (8f, 4f, 2f, f) = UNETR's feature_size f (mimjax's default is f = 16,
  UNETR's too); any other widths are refused;
- what UNETR's ViT has: learned position embeddings, no class token, exact GELU,
  LayerNorm eps 1e-5, q/k/v biases (`qkv_bias=True` on the MONAI side), no drop path;
- the config's norm on both sides ("batch": BatchNorm2d; "instance": affine
  InstanceNorm2d, as mimjax's per-channel GroupNorm);
- one forward of the loss work: the mimjax objective with pseudo-labels and
  HierarchicalMix off, i.e. 0.5 (CE + Dice) on the coarse logits of every row plus on
  the fine logits of the has_fine rows; UNETR gets out_channels = num_coarse +
  num_fine, split into the two logit maps, and the same two terms (CE; the official
  Dice: softmax, per class including background, 1 - (2 sum(p t) + 1e-5) /
  (sum(p p) + sum(t t) + 1e-5)), the fine terms masked to the has_fine rows exactly
  as mimjax's;
- AdamW with the config's betas, eps, weight decay (matrices only, as mimjax), lr,
  layer-wise lr decay and gradient clipping; float32 compute on both sides.
What stays different: mimjax's subclass head (norm, ReLU, 3x3 conv, ReLU, then 1x1
coarse and fine classifiers) against UNETR's single 1x1 output conv: 9f^2 + 3f more
parameters and one more 3x3 conv at full resolution on the mimjax side (counted in its
model FLOPs); UNETR's attention is eager (it does not pass use_flash_attention on).
Both parameter counts are printed; MONAI's counts the parameters its step trains,
i.e. not the cross-attention LayerNorm each MONAI TransformerBlock holds and UNETR
never calls.

Defaults with --compare monai, for what the command line leaves unset: ViT-S/16 at
128 px, batch 8. There the UNETR decoder and head are about a third of the model
FLOPs, so the comparison weighs the decoder's convolutions, transposed convolutions
and batch norms and not only the transformer (`pretrain --compare hf` measures that),
and a step takes about a second a side on 2 CPU cores: 3 windows of 5 steps, warm-up
and compilation in about two minutes. UNETR's own default size is `--variant B/16`
(~3x the FLOPs, transformer-dominated at 128 px).

FLOPs. `model_gflops_per_step` counts the matmul and convolution FLOPs each model
needs (patch embedding, the transformer on all tokens, every decoder convolution and
transposed convolution, the head; times 3 for forward + backward; with pseudo-labels
or HierarchicalMix on, their extra forwards), the UNETR decoder only (None for other
decoders); the MONAI row also has torch's own count of one step (FlopCounterMode), a
check on the formula. MFU of both sides: model FLOPs / step time / the same peak (a
JAX f32 matmul measured between rounds, or --peak-tflops); torch's own matmul peak is
reported beside it.
"""

from __future__ import annotations

import functools
import os

from tools import cli
from tools.bench import timing, train_step
from tools.bench.hf_vitmae import HFPretrainProcess, TorchTrainStep
from tools.bench.pretrain import transformer_fwd_flops

# Every process of a multi-host run builds and times the sharded step; the first reports.
RUNS_ON_EVERY_HOST = True

# What MONAI's UNETR fixes: patch 16, 12 blocks, skips from hidden_states_out[3], [6],
# [9] (blocks 4, 7, 10, 1-based) and the final normed output.
UNETR_PATCH, UNETR_DEPTH, UNETR_TAPS = 16, 12, (4, 7, 10, 12)
# --compare monai's defaults for what the command line leaves unset (module docstring).
COMPARE_DEFAULTS = {"variant": "S/16", "image_size": 128, "batch": 8}


# ----------------------------------------------------------------------------- flags
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segmentation", help="time the segmentation train step (synthetic batch)",
        description="Time the real segmentation train step on a synthetic batch; "
                    "optionally against MONAI's UNETR. Config overrides: "
                    "--config.KEY=VALUE (any number).")
    train_step.add_config_arguments(
        p, config_help="a segmentation config, e.g. configs/segment_acdc.py",
        batch_help="global batch size (default: config.global_batch_size; 8 with --compare)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the config's; 128 with --compare)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="ViT size and patch, e.g. S/16 or B/16: sets model.variant and "
                        "drops the config's width, depth, num_heads and mlp_dim (default: "
                        "the config's encoder; S/16 with --compare)")
    train_step.add_window_arguments(p, windows_help="timed windows; median and mean over them")
    p.add_argument("--compare", choices=["monai"], default=None,
                   help="also time MONAI's UNETR (PyTorch, CPU) at aligned sizes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the CPU cores JAX uses)")
    train_step.add_output_arguments(
        p, xla_option_help="XLA debug option for compiling the mimjax step only "
                           "(repeatable; process-wide flags go in XLA_FLAGS)")


# ----------------------------------------------------------------------------- config
def build_config(spec: str, overrides, image_size: int | None, batch: int | None,
                 variant: str | None, compare: str | None):
    """The benchmarked config: file + overrides, --variant, --image-size, --batch, then
    (with --compare monai) the UNETR alignment. Returns (config, the alignment's changes).
    The MONAI process builds it again from the same arguments."""

    if compare == "monai":  # unless the command line sets them, flags or overrides
        given = {key for key, _ in overrides}
        if variant is None and "model.variant" not in given:
            variant = COMPARE_DEFAULTS["variant"]
        if image_size is None and not given & {"data.image_size", "model.image_size"}:
            image_size = COMPARE_DEFAULTS["image_size"]
        if batch is None and "global_batch_size" not in given:
            batch = COMPARE_DEFAULTS["batch"]
    config = train_step.load_task_config(
        spec, overrides, task="segmentation", example="configs/segment_acdc.py", batch=batch,
        variant=variant, image_size=image_size)
    changes = align_to_unetr(config) if compare == "monai" else []
    return config, changes


def _config_for_monai(*args):
    """What the MONAI process builds (picklable as a functools.partial of it)."""
    return build_config(*args)[0]


def align_to_unetr(config) -> list[str]:
    """Sets the fields UNETR fixes or lacks (module docstring); returns what changed as
    'field: old -> new' lines. A setting UNETR cannot express is refused."""
    from mimjax.models import dense_decoder, vit

    model = config.model
    if model.get("backbone", "vit") != "vit":
        raise cli.UsageError(f"--compare monai compares the ViT backbone with MONAI's UNETR; "
                             f"model.backbone is {model.backbone!r}.")
    if model.get("norm", "batch") not in ("batch", "instance"):
        raise cli.UsageError(f"--compare monai: MONAI's UNETR takes batch or instance norm, "
                             f"model.norm is {model.norm!r}.")
    widths = model.get("decoder_widths", None)
    if widths is not None:
        f = widths[-1]
        if tuple(widths) != (8 * f, 4 * f, 2 * f, f):
            raise cli.UsageError(
                f"--compare monai: MONAI's UNETR has decoder widths (8f, 4f, 2f, f) for its "
                f"feature_size f; model.decoder_widths is {list(widths)}. Use e.g. "
                f"{[8 * f, 4 * f, 2 * f, f]} or None (f = 16).")
    enc = vit.vit_config_from(model)
    wanted = {
        "variant": model.variant.split("/")[0] + f"/{UNETR_PATCH}",
        "width": enc.transformer.width, "num_heads": enc.transformer.num_heads,
        "mlp_dim": enc.transformer.mlp_dim, "depth": UNETR_DEPTH,
        "decoder": "unetr", "taps": UNETR_TAPS, "posemb": "learn", "class_token": False,
        "gelu_approximate": False, "layer_norm_eps": 1e-5, "drop_path_rate": 0.0,
        "dtype": "float32", "separate_norm": False, "prior_concat": False,
    }
    implied = {"width": enc.transformer.width, "depth": enc.transformer.depth,
               "num_heads": enc.transformer.num_heads, "mlp_dim": enc.transformer.mlp_dim}
    changes = []
    for field, value in wanted.items():
        old = model.get(field, None)
        if (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
            # None -> the size the variant implied anyway is no change to report.
            if not (old is None and implied.get(field, None) == value):
                changes.append(f"model.{field}: {old!r} -> {value!r}")
            model[field] = value
    objective = config.objectives.subclass_segmentation
    for field in ("pseudo_labels", "hierarchical_mix"):
        if objective.get(field, True):
            changes.append(f"objectives.subclass_segmentation.{field}: True -> False")
            objective[field] = False
    dense_decoder.decoder_settings(model, vit.vit_config_from(model))  # checks what was set
    return changes


def unetr_kwargs(config) -> dict:
    """monai.networks.nets.UNETR's arguments for an aligned mimjax config."""
    from mimjax.models import dense_decoder, segmenter, vit

    enc = vit.vit_config_from(config.model)
    t = enc.transformer
    widths = dense_decoder.decoder_settings(config.model, enc)["widths"]
    num_fine, num_coarse = segmenter.class_counts(config.model)
    norm = config.model.get("norm", "batch")
    return dict(in_channels=enc.channels, out_channels=num_coarse + num_fine,
                img_size=enc.image_size, feature_size=widths[-1], hidden_size=t.width,
                mlp_dim=t.mlp_dim, num_heads=t.num_heads, proj_type="conv",
                norm_name="batch" if norm == "batch" else ("instance", {"affine": True}),
                conv_block=True, res_block=True, dropout_rate=0.0, spatial_dims=2,
                qkv_bias=True)


# ----------------------------------------------------------------------------- flops
def _conv(pixels: int, k: int, cin: int, cout: int) -> float:
    return 2.0 * pixels * k * k * cin * cout


def _up_conv(in_pixels: int, cin: int, cout: int) -> float:
    """2x2 stride-2 transposed conv: each input pixel writes a 2x2 block."""
    return 2.0 * in_pixels * 4 * cin * cout


def _res_block(pixels: int, cin: int, cout: int) -> float:
    flops = _conv(pixels, 3, cin, cout) + _conv(pixels, 3, cout, cout)
    return flops + (_conv(pixels, 1, cin, cout) if cin != cout else 0.0)


def unetr_forward_flops(config, head: str) -> dict[str, float] | None:
    """Forward matmul and convolution FLOPs per image of the ViT + UNETR decoder
    (mimjax.models.dense_decoder.UnetrDecoder's structure, MONAI's for patch 16), with
    mimjax's subclass head (`head` "mimjax") or UNETR's 1x1 output conv ("monai");
    None for other decoders."""
    from mimjax.models import dense_decoder, segmenter, vit

    model = config.model
    if model.get("backbone", "vit") != "vit" or model.get("decoder", "") != "unetr":
        return None
    enc = vit.vit_config_from(model)
    t = enc.transformer
    widths = dense_decoder.decoder_settings(model, enc)["widths"]
    n, grid = len(widths), enc.grid_size
    tokens = enc.num_patches + int(enc.class_token)
    encoder = 2.0 * enc.num_patches * enc.patch_size**2 * enc.channels * t.width
    encoder += transformer_fwd_flops(tokens, t.width, t.depth, t.mlp_dim)
    pixels = lambda side: side * side
    decoder = _res_block(pixels(enc.image_size), enc.channels, widths[-1])  # image skip
    for k in range(n - 1):  # projected skips: tap k reaches widths[n - 2 - k]
        c, side = widths[n - 2 - k], grid
        decoder += _up_conv(pixels(side), t.width, c)
        for _ in range(n - 2 - k):
            side *= 2
            decoder += _up_conv(pixels(side), c, c) + _res_block(pixels(2 * side), c, c)
    side = grid
    for cin, cout in zip((t.width,) + tuple(widths[:-1]), widths):
        decoder += _up_conv(pixels(side), cin, cout)
        side *= 2
        decoder += _res_block(pixels(side), 2 * cout, cout)
    num_fine, num_coarse = segmenter.class_counts(model)
    f, full = widths[-1], pixels(enc.image_size)
    if head == "monai":
        head_flops = _conv(full, 1, f, num_coarse + num_fine)
    else:
        branches = 2 if model.get("separate_norm", False) else 1
        fine_in = f + (num_coarse if model.get("prior_concat", False) else 0)
        head_flops = branches * _conv(full, 3, f, f) + _conv(full, 1, f, num_coarse)
        head_flops += _conv(full, 1, fine_in, num_fine)
    return {"encoder": encoder, "decoder": decoder, "head": head_flops,
            "forward": encoder + decoder + head_flops}


def forward_passes(config) -> float:
    """Forward-pass equivalents per step (forward + backward = 3): the main pass, the
    pseudo-label view's forward (no gradient) and the HierarchicalMix forward."""
    objective = config.objectives.subclass_segmentation
    passes = 3.0
    if objective.get("pseudo_labels", True):
        passes += 1.0
    if objective.get("hierarchical_mix", False):
        passes += 3.0 if objective.get("mix_gradient", True) else 1.0
    return passes


# ----------------------------------------------------------------------------- the batch
def synthetic_batch(config, batch_size: int, rng, first_row: int = 0) -> dict:
    """Rows first_row.. of a batch in input_pipeline.segmentation's training format:
    standard-normal images, uniformly random fine labels with their coarse labels
    (fine_to_coarse), fine masks on the global batch's first data.labeled_per_batch
    rows, the other rows HierarchicalMix-ed (alpha from {0.5, 0.6, ..., 1.0})."""
    import numpy as np

    size = int(config.model.image_size)
    channels = int(config.model.get("channels", 1))
    fine_to_coarse = np.asarray(tuple(config.data.fine_to_coarse), np.int32)
    labeled = int(config.data.get("labeled_per_batch", batch_size))
    rows = np.arange(first_row, first_row + batch_size)
    has_fine = rows < labeled
    fine = rng.integers(0, len(fine_to_coarse), (batch_size, size, size), dtype=np.int32)
    coarse = fine_to_coarse[fine]
    fine[~has_fine] = 0
    mixed_label = rng.integers(0, len(fine_to_coarse), fine.shape, dtype=np.int32)
    mixed_label[has_fine] = 0
    alpha = rng.choice(np.linspace(0.5, 1.0, 6), batch_size).astype(np.float32)
    alpha[has_fine] = 0.0
    image = rng.standard_normal((batch_size, size, size, channels), np.float32)
    mixed = np.where(has_fine[:, None, None, None], image,
                     rng.standard_normal(image.shape, np.float32))
    return {"image": image, "label_fine": fine, "label_coarse": coarse, "has_fine": has_fine,
            "mixed_image": mixed, "mixed_label": mixed_label, "mix_alpha": alpha,
            "index": rows.astype(np.int32)}


class MimjaxSegmentationStep(train_step.MimjaxTrainStep):
    """The segmentation train step on a fixed synthetic batch."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        first = self.jax.process_index() * local_batch
        return synthetic_batch(config, local_batch, rng, first_row=first)


# ----------------------------------------------------------------------------- MONAI
def dice_loss_torch(probs, onehot, mask, smooth: float):
    """objectives.subclass_segmentation.dice_loss in torch, NCHW: per class over
    batch and pixels, averaged over classes."""
    dims = (0, 2, 3)
    intersect = (probs * onehot * mask).sum(dims)
    target_sum = (onehot * onehot * mask).sum(dims)
    pred_sum = (probs * probs * mask).sum(dims)
    return (1.0 - (2.0 * intersect + smooth) / (pred_sum + target_sum + smooth)).mean()


class MonaiUnetrStep(TorchTrainStep):
    """monai.networks.nets.UNETR at an aligned mimjax config's sizes, the same loss
    terms, AdamW as mimjax configures it (module docstring), on the same batch."""
    name = "monai"

    def __init__(self, config, threads: int, log):
        import numpy as np
        import torch
        from monai.networks.nets import UNETR

        from mimjax import optim

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        kwargs = unetr_kwargs(config)
        self.model = UNETR(**kwargs).train()
        self.num_coarse = kwargs["out_channels"] - len(tuple(config.data.fine_to_coarse))
        objective = config.objectives.subclass_segmentation
        self.weights = (float(objective.get("weight", 1.0)),
                        float(objective.get("coarse_weight", 1.0)),
                        float(objective.get("fine_weight", 1.0)))
        self.smooth = float(objective.get("dice_smooth", 1e-5))
        opt_cfg = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self._param_groups(opt_cfg, optim.peak_learning_rate(opt_cfg, config.global_batch_size),
                               depth=len(self.model.vit.blocks)),
            betas=(opt_cfg.get("b1", 0.9), opt_cfg.get("b2", 0.95)), eps=opt_cfg.get("eps", 1e-8))
        self.clip = config.optimizer.get("grad_clip_norm", None)
        batch = synthetic_batch(config, int(config.global_batch_size), np.random.default_rng(0))
        # NCHW, MONAI's layout; the fine terms see the has_fine rows through a 0/1 mask.
        self.image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
        self.label_coarse = torch.from_numpy(batch["label_coarse"]).long()
        self.label_fine = torch.from_numpy(batch["label_fine"]).long()
        self.fine_rows = torch.from_numpy(batch["has_fine"]).float()[:, None, None]
        self.threads = torch.get_num_threads()
        self.loss = float("nan")
        self.counted_flops = self._count_flops()
        # Those the step trains: each TransformerBlock also holds a LayerNorm for cross
        # attention (norm_cross_attn) that UNETR never calls, so it gets no gradient.
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.grad is not None)
        self.num_params_total = sum(p.numel() for p in self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        log(f"[monai] UNETR {self.num_params / 1e6:.2f}M parameters, feature_size "
            f"{kwargs['feature_size']}, norm {kwargs['norm_name']}, {self.threads} torch threads")

    def _param_groups(self, opt_cfg, lr: float, depth: int) -> list[dict]:
        """mimjax's decay mask (matrices, not the position embedding) and layer-wise lr
        scales (optim.layer_ids: patch embedding 0, block i i + 1, the rest depth + 1),
        which scale the whole update, weight decay included, as torch's per-group lr."""
        layer_decay = float(opt_cfg.get("layer_decay", None) or 1.0)
        weight_decay = opt_cfg.get("weight_decay", 0.05)
        groups: dict[tuple[int, bool], list] = {}
        for name, p in self.model.named_parameters():
            if name.startswith("vit.patch_embedding."):
                layer = 0
            elif name.startswith("vit.blocks."):
                layer = int(name.split(".")[2]) + 1
            else:
                layer = depth + 1
            decay = p.ndim >= 2 and "position_embeddings" not in name
            groups.setdefault((layer, decay), []).append(p)
        return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "lr": lr * layer_decay ** (depth + 1 - layer)}
                for (layer, decay), params in sorted(groups.items())]

    def loss_value(self):
        torch = self.torch
        functional = torch.nn.functional
        logits = self.model(self.image)
        coarse, fine = logits[:, :self.num_coarse], logits[:, self.num_coarse:]
        coarse_onehot = functional.one_hot(self.label_coarse, coarse.shape[1])
        fine_onehot = functional.one_hot(self.label_fine, fine.shape[1])
        coarse_onehot = coarse_onehot.permute(0, 3, 1, 2).float()
        fine_onehot = fine_onehot.permute(0, 3, 1, 2).float()
        loss_coarse = 0.5 * (functional.cross_entropy(coarse, self.label_coarse)
                             + dice_loss_torch(coarse.softmax(1), coarse_onehot, 1.0,
                                               self.smooth))
        rows = self.fine_rows
        fine_ce = functional.cross_entropy(fine, self.label_fine, reduction="none")
        fine_ce = (fine_ce * rows).sum() / (rows.sum() * fine.shape[2] * fine.shape[3]).clamp(
            min=1.0)
        loss_fine = 0.5 * (fine_ce + dice_loss_torch(fine.softmax(1), fine_onehot,
                                                     rows[:, None], self.smooth))
        weight, coarse_weight, fine_weight = self.weights
        return weight * (coarse_weight * loss_coarse + fine_weight * loss_fine)

    def _count_flops(self) -> float:
        """torch's FLOP count (matmuls, convolutions) of one forward + backward; leaves
        the gradients for the caller to read and clear."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.loss_value().backward()
        return float(counter.get_total_flops())

    def step(self):
        loss = self.loss_value()
        loss.backward()
        if self.clip:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def info(self) -> dict:
        import monai

        return {"threads": self.threads, "num_params": self.num_params,
                "num_params_total": self.num_params_total,
                "counted_flops": self.counted_flops,
                "versions": {"torch": self.torch.__version__, "monai": monai.__version__}}


def _serve(conn, make_config, threads: int) -> None:
    """Body of the MONAI process: hf_vitmae's request loop ("run", n), ("peak",),
    ("stop",), replies ("ok", payload) or ("error", traceback), with MonaiUnetrStep."""
    import traceback

    try:
        step = MonaiUnetrStep(make_config(), threads, timing.log)
        conn.send(("ok", step.info()))
        while True:
            request = conn.recv()
            if request[0] == "stop":
                break
            if request[0] == "run":
                seconds, cpu = step.timed_run(request[1])
                conn.send(("ok", (seconds, cpu, step.loss)))
            elif request[0] == "peak":
                conn.send(("ok", step.matmul_peak()))
            else:
                raise ValueError(f"unknown request {request!r}")
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class MonaiUnetrProcess(HFPretrainProcess):
    """MonaiUnetrStep in its own spawned process, driven over a pipe: the HF process's
    timed_run, matmul_peak and close, another step behind them."""
    name = "monai"

    def __init__(self, make_config, threads: int, log):  # another child process than HF's
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, daemon=True,
                                    args=(child, make_config, threads))
        self._process.start()
        child.close()
        log("[monai] started a separate process for MONAI's UNETR")
        info = self._receive()
        self.threads, self.num_params = info["threads"], info["num_params"]
        self.num_params_total = info["num_params_total"]
        self.counted_flops, self.versions = info["counted_flops"], info["versions"]
        self.loss = float("nan")

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise SystemExit(f"The MONAI process exited (code {self._process.exitcode}) "
                             "without a reply; see its messages above.") from None
        if status != "ok":
            raise SystemExit(f"The MONAI process failed:\n{payload}")
        return payload


# ----------------------------------------------------------------------------- run
def run(args, overrides, log) -> dict:
    processes: list[MonaiUnetrProcess] = []
    try:
        return _run(args, overrides, log, processes)
    finally:
        for process in processes:
            process.close()


def _run(args, overrides, log, processes: list) -> dict:
    train_step.check_windows(args)
    if args.compare == "monai":
        try:
            import monai  # noqa: F401 -- fail before anything is built
        except ImportError:
            raise cli.UsageError("--compare monai needs MONAI (pip install monai).") from None
    build_args = (args.config, list(overrides), args.image_size, args.batch, args.variant,
                  args.compare)
    config, changes = build_config(*build_args)
    for change in changes:
        log(f"[align] {change}")
    compiler_options = train_step.parse_xla_options(args.xla_option)
    batch = int(config.global_batch_size)
    devices, platform_name, device = timing.describe_devices()
    log(f"{len(devices)} x {device}; batch {batch}; image {config.model.image_size} px; "
        f"{config.model.get('dtype', 'float32')}")

    mimjax_step = MimjaxSegmentationStep(config, log, compiler_options)
    runners: list[timing.Timed] = [mimjax_step]
    monai_step = None
    if args.compare == "monai":
        monai_step = MonaiUnetrProcess(functools.partial(_config_for_monai, *build_args),
                                       args.threads or timing.cores(), log)
        processes.append(monai_step)
        runners.append(monai_step)

    peak = timing.PeakMeter(args.peak_tflops, config, "float32", log)
    torch_measured = []

    def measure_peak():
        peak.measure()
        if monai_step is not None and not peak.tflops:  # reference: torch's GEMM here
            torch_measured.append(monai_step.matmul_peak())
            log(f"[peak] torch matmul {torch_measured[-1] / 1e12:.3f} TFLOP/s")

    measure_peak()
    load_before = os.getloadavg()
    per_step = timing.time_interleaved(runners, warmup=args.warmup, steps=args.steps,
                                       windows=args.windows, log=log, after_round=measure_peak)
    load_after = os.getloadavg()

    resolved = peak.resolve(platform_name)
    mimjax = timing.summarize(per_step["mimjax"], batch, timing.cores())
    step_time = mimjax["step_time_s"]
    counts = unetr_forward_flops(config, "mimjax")
    model_flops = batch * forward_passes(config) * counts["forward"] if counts else None
    objective = config.objectives.subclass_segmentation
    result = {
        **train_step.report_head("segmentation", args, overrides, config, mimjax_step.mesh),
        "variant": config.model.variant, "backbone": config.model.get("backbone", "vit"),
        "decoder": config.model.get("decoder", None), "norm": config.model.get("norm", "batch"),
        "pseudo_labels": bool(objective.get("pseudo_labels", True)),
        "hierarchical_mix": bool(objective.get("hierarchical_mix", False)),
        "aligned_for_monai": changes,
        "params_m": mimjax_step.num_params / 1e6,
        "init_s": mimjax_step.init_s, "lower_s": mimjax_step.lower_s,
        "compile_s": mimjax_step.compile_s,
        "warmup_steps": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        **mimjax,
        "loss": mimjax_step.last_loss(),
        **timing.xla_throughput(mimjax_step.compiled, step_time, resolved["per_device"]),
        "model_gflops_per_step": model_flops / 1e9 if counts else None,
        "model_gflops_per_image_fwd": ({k: v / 1e9 for k, v in counts.items()}
                                       if counts else None),
        "model_tflops_per_s": model_flops / step_time / 1e12 if counts else None,
        **peak.fields(resolved),
        "model_mfu": model_flops / step_time / resolved["total"] if counts else None,
        "memory": {**timing.compiled_memory(mimjax_step.compiled), **timing.device_memory()},
        **train_step.report_tail([load_before[0], load_after[0]], compiler_options),
    }
    if monai_step is not None:
        result.update(_monai_fields(result, per_step["monai"], monai_step, config,
                                    resolved["total"], torch_measured))
    return result


def _monai_fields(result: dict, times, monai_step, config, peak_total: float,
                  torch_measured: list[float]) -> dict:
    """The report's "monai" row and "speedup_vs_monai"; adds torch's versions to `result`."""
    batch = result["batch"]
    row = timing.summarize(times, batch, timing.cores())
    counts = unetr_forward_flops(config, "monai")
    flops = 3 * batch * counts["forward"]
    kwargs = unetr_kwargs(config)
    row.update({
        "model": "monai.networks.nets.UNETR",
        "settings": {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                     for k, v in kwargs.items()},
        "dtype": "float32", "layout": "NCHW", "threads": monai_step.threads,
        "params_m": monai_step.num_params / 1e6,
        "params_total_m": monai_step.num_params_total / 1e6,  # with the unused norms
        "loss": monai_step.loss,
        "model_gflops_per_step": flops / 1e9,
        "model_gflops_per_image_fwd": {k: v / 1e9 for k, v in counts.items()},
        "torch_counted_gflops_per_step": monai_step.counted_flops / 1e9,
        "model_tflops_per_s": flops / row["step_time_s"] / 1e12,
        "model_mfu": flops / row["step_time_s"] / peak_total,
        "torch_matmul_tflops": max(torch_measured) / 1e12 if torch_measured else None,
    })
    f = kwargs["feature_size"]
    row["params_note"] = (
        f"mimjax has {round(result['params_m'] * 1e6) - monai_step.num_params} parameters more "
        f"(9f^2 + 3f = {9 * f * f + 3 * f} for f = {f}: its head's norm and 3x3 conv against "
        f"UNETR's 1x1 output conv); MONAI's count leaves out the "
        f"{monai_step.num_params_total - monai_step.num_params} of the cross-attention "
        "LayerNorms UNETR holds but never calls")
    result["versions"].update(monai_step.versions)
    return {"monai": row, "speedup_vs_monai": result["img_per_s"] / row["img_per_s"]}


# ----------------------------------------------------------------------------- table
def format_table(r: dict) -> str:
    other = r.get("monai")
    rows = [("", "mimjax", "MONAI UNETR") if other else ("", "mimjax")]

    def show(v, fmt):
        return "n/a" if v is None else (v if isinstance(v, str) else fmt.format(v))

    def row(label, mine, theirs=None, fmt="{:.2f}"):
        cells = (show(mine, fmt), show(theirs, fmt)) if other else (show(mine, fmt),)
        rows.append((label, *cells))

    def percent(v):
        return None if v is None else f"{100 * v:.1f}%"

    o = other or {}
    row("images / s", r["img_per_s"], o.get("img_per_s"))
    row("step time median (s)", r["step_time_s"], o.get("step_time_s"), "{:.4f}")
    row("step time mean (s)", r["step_time_mean_s"], o.get("step_time_mean_s"), "{:.4f}")
    row("step time min..max (s)", f"{r['step_time_min_s']:.4f}..{r['step_time_max_s']:.4f}",
        f"{o['step_time_min_s']:.4f}..{o['step_time_max_s']:.4f}" if other else None)
    row("parameters (M)", r["params_m"], o.get("params_m"), "{:.3f}")
    row("model GFLOP / step", r["model_gflops_per_step"], o.get("model_gflops_per_step"),
        "{:.1f}")
    row("XLA / torch-counted GFLOP / step", r["xla_gflops_per_step"],
        o.get("torch_counted_gflops_per_step"), "{:.1f}")
    row("achieved TFLOP/s (model)", r["model_tflops_per_s"], o.get("model_tflops_per_s"),
        "{:.3f}")
    row("MFU (model FLOPs)", percent(r["model_mfu"]), percent(o.get("model_mfu")))
    row("MFU (XLA FLOPs)", percent(r["mfu"]), None)
    row("CPU utilisation", percent(r["cpu_utilization"]), percent(o.get("cpu_utilization")))
    row("memory, compiled (MiB/dev)", timing.mib(r["memory"]["compiled_peak_bytes"]), None)
    row("compile (s)", r["compile_s"], None, "{:.1f}")
    row("final loss", r["loss"], o.get("loss"), "{:.4f}")
    lines = [f"segmentation | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} | {r['image_size']} px | ViT {r['variant']} + {r['decoder']} "
              f"decoder, {r['norm']} norm | pseudo-labels {r['pseudo_labels']}, "
              f"HierarchicalMix {r['hierarchical_mix']}")]
    lines += timing.format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']}); host load "
                 f"{r['host_load_avg'][0]:.2f} -> {r['host_load_avg'][1]:.2f}")
    if other:
        torch_peak = (f"; torch's own 2048^3 matmul: {other['torch_matmul_tflops']:.3f} TFLOP/s"
                      if other["torch_matmul_tflops"] else "")
        lines.append(f"speedup vs MONAI UNETR: {r['speedup_vs_monai']:.2f}x (MONAI: "
                     f"{other['layout']}, {other['dtype']}, {other['threads']} torch "
                     f"threads{torch_peak})")
        lines.append(f"parameters: {other['params_note']}")
        if r["aligned_for_monai"]:
            lines.append("aligned to UNETR: " + "; ".join(r["aligned_for_monai"]))
    return "\n".join(lines)
