"""mimjax <-> Hugging Face transformers ViT / ViTMAE (`save_pretrained` directories).

Export (`save`): the directory `transformers` loads offline with
- `ViTMAEForPreTraining.from_pretrained(OUT)`: an MAE, or MIRAM's base-scale decoder
  (the decoders of the other scales have no HF counterpart and are left out);
- `ViTForImageClassification.from_pretrained(OUT)`: a classifier with head "cls";
- `ViTModel.from_pretrained(OUT, add_pooling_layer=False)`: the encoder of any of these
  (HF strips the `vit.` prefix; mimjax has no pooler, so none is exported).
The state dict is built in the current transformers naming, loaded strictly into the
HF model (every name and shape checked) and written by `save_pretrained`
(config.json + model.safetensors).

What makes the numerics match (transformers 5.23 source, models/vit and vit_mae):
- `hidden_act` "gelu_pytorch_tanh" for mimjax's tanh-approximate GELU, "gelu" for exact;
  `layer_norm_eps` from the config (HF's default is 1e-12, mimjax's 1e-6);
- separate q/k/v projections (HF `q_proj`/`k_proj`/`v_proj`, `o_proj`), as mimjax;
- position embeddings (1, 1 + N, D): HF adds row 0 to the class token, mimjax gives the
  class token no position embedding, so row 0 is exported as zeros. ViTMAE's encoder
  and decoder tables are fixed sin-cos buffers HF builds itself for a fresh model, but
  `from_pretrained` keeps the stored values (checked by the parity tests); mimjax's
  sin-cos layout equals HF's ([sin, cos] of the column coordinate, then of the row),
  and the exported values are mimjax's own either way;
- ViTMAE's `noise` argument gives the same mask as `mimjax.models.mae.random_masking`
  on the same noise; `mask_ratio` and `norm_pix_loss` (unbiased variance in both)
  come from the run's masked_reconstruction objective.

What HF cannot express raises ValueError naming the setting: no class token
(HF ViTs always prepend one), a classifier head other than "cls"
(ViTForImageClassification classifies the class token). Import (`load`) accepts any
HF ViT / ViTMAE directory; the class token's position embedding is folded into the
token (exact), and a table equal to the sin-cos one imports as `posemb="sincos2d"`;
an HF ViTModel's pooler (dense + tanh, no mimjax counterpart) is not imported.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from mimjax.export import common
from mimjax.models import param_tree as tree

log = logging.getLogger(__name__)

_GELU_FROM_HF = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True}

# (mimjax name under transformer/blocks/<i>/, HF name under layers.<i>., is a Linear kernel)
_BLOCK = (
    ("norm1/scale", "layernorm_before.weight", False),
    ("norm1/bias", "layernorm_before.bias", False),
    ("attn/query/kernel", "attention.q_proj.weight", True),
    ("attn/query/bias", "attention.q_proj.bias", False),
    ("attn/key/kernel", "attention.k_proj.weight", True),
    ("attn/key/bias", "attention.k_proj.bias", False),
    ("attn/value/kernel", "attention.v_proj.weight", True),
    ("attn/value/bias", "attention.v_proj.bias", False),
    ("attn/out/kernel", "attention.o_proj.weight", True),
    ("attn/out/bias", "attention.o_proj.bias", False),
    ("norm2/scale", "layernorm_after.weight", False),
    ("norm2/bias", "layernorm_after.bias", False),
    ("mlp/fc1/kernel", "mlp.fc1.weight", True),
    ("mlp/fc1/bias", "mlp.fc1.bias", False),
    ("mlp/fc2/kernel", "mlp.fc2.weight", True),
    ("mlp/fc2/bias", "mlp.fc2.bias", False),
)


def _zero_row(table: np.ndarray) -> np.ndarray:
    """(1, N, D) -> (1, 1 + N, D) with a zero class-token row."""
    return np.concatenate([np.zeros_like(table[:, :1]), table], axis=1).astype(np.float32)


def _blocks_to_hf(flat, src: str, dst: str, depth: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(depth):
        for name, hf_name, is_kernel in _BLOCK:
            value = flat[f"{src}transformer/blocks/{i}/{name}"]
            out[f"{dst}{i}.{hf_name}"] = common.linear_to_torch(value) if is_kernel else value
    return out


def _blocks_from_hf(sd, src: str, dst: str, depth: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(depth):
        for name, hf_name, is_kernel in _BLOCK:
            key = f"{src}{i}.{hf_name}"
            if key not in sd and hf_name.endswith("_proj.bias"):  # qkv_bias=False
                width = sd[key.replace(".bias", ".weight")].shape[0]
                value = np.zeros((width,), np.float32)
            else:
                value = sd[key]
            out[f"{dst}transformer/blocks/{i}/{name}"] = (
                common.linear_from_torch(value) if is_kernel else value
            )
    return out


# --------------------------------------------------------------------------- export
def target_class(source: common.Source, encoder_only: bool = False) -> str:
    """The HF class an export of `source` loads into; raises for what HF cannot express."""
    cfg = source.vit
    if not cfg.class_token:
        raise ValueError(
            "model.class_token=False: HF ViTModel / ViTMAE / ViTForImageClassification always "
            "prepend a class token, so this encoder has no HF equivalent. Export it with "
            "--format timm (timm's VisionTransformer takes class_token=False)."
        )
    if encoder_only or source.kind == "encoder":
        return "ViTModel"
    if source.kind == "mae":
        return "ViTMAEForPreTraining"
    head = source.model.get("head", "cls")
    if head != "cls":
        raise ValueError(
            f"model.head={head!r}: HF ViTForImageClassification classifies the class token "
            "only (head 'cls'). Export the encoder alone with --encoder-only (ViTModel) or "
            "the whole classifier with --format timm (global_pool 'avg' / 'map')."
        )
    return "ViTForImageClassification"


def hf_config_kwargs(source: common.Source, hf_class: str) -> dict:
    """Keyword arguments of ViTConfig / ViTMAEConfig that reproduce mimjax's numerics."""
    cfg = source.vit
    t = cfg.transformer
    kwargs = {
        "hidden_size": t.width,
        "num_hidden_layers": t.depth,
        "num_attention_heads": t.num_heads,
        "intermediate_size": t.mlp_dim,
        "hidden_act": "gelu_pytorch_tanh" if t.gelu_approximate else "gelu",
        "layer_norm_eps": t.layer_norm_eps,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if hf_class == "ViTMAEForPreTraining":
        dec = source.model.decoder
        width = int(dec.width)
        kwargs.update(
            decoder_hidden_size=width,
            decoder_num_hidden_layers=tree.depth(source.flat, "decoders/0/"),
            decoder_num_attention_heads=int(dec.num_heads),
            decoder_intermediate_size=int(dec.get("mlp_dim", None) or 4 * width),
            **source.objective(),
        )
    if hf_class == "ViTForImageClassification":
        num_classes = int(source.flat["head/fc/bias"].shape[0])
        names = source.class_names() or [f"LABEL_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            names = [f"LABEL_{i}" for i in range(num_classes)]
        kwargs.update(
            num_labels=num_classes,
            id2label={i: n for i, n in enumerate(names)},
            label2id={n: i for i, n in enumerate(names)},
            problem_type=(
                "multi_label_classification"
                if source.multilabel()
                else "single_label_classification"
            ),
        )
    return kwargs


def to_hf_state_dict(source: common.Source, hf_class: str) -> dict[str, np.ndarray]:
    """The HF model's state dict (current transformers names) as float32 numpy arrays."""
    flat, cfg = source.flat, source.vit
    prefix = "" if hf_class == "ViTModel" else "vit."
    sd = {
        f"{prefix}embeddings.cls_token": flat["encoder/cls_token"],
        f"{prefix}embeddings.position_embeddings": _zero_row(source.encoder_posemb()),
        f"{prefix}embeddings.patch_embeddings.projection.weight": common.patch_kernel_to_conv(
            flat["encoder/patch_embed/kernel"], cfg.patch_size, cfg.channels
        ),
        f"{prefix}embeddings.patch_embeddings.projection.bias": flat["encoder/patch_embed/bias"],
        f"{prefix}layernorm.weight": flat["encoder/norm/scale"],
        f"{prefix}layernorm.bias": flat["encoder/norm/bias"],
    }
    sd.update(_blocks_to_hf(flat, "encoder/", f"{prefix}layers.", tree.depth(flat, "encoder/")))
    if hf_class == "ViTMAEForPreTraining":
        d = "decoders/0/"
        sd.update(
            {
                "decoder.decoder_embed.weight": common.linear_to_torch(flat[d + "embed/kernel"]),
                "decoder.decoder_embed.bias": flat[d + "embed/bias"],
                "decoder.mask_token": flat[d + "mask_token"],
                "decoder.decoder_pos_embed": _zero_row(source.decoder_posemb(0)),
                "decoder.decoder_norm.weight": flat[d + "norm/scale"],
                "decoder.decoder_norm.bias": flat[d + "norm/bias"],
                "decoder.decoder_pred.weight": common.linear_to_torch(flat[d + "pred/kernel"]),
                "decoder.decoder_pred.bias": flat[d + "pred/bias"],
            }
        )
        sd.update(_blocks_to_hf(flat, d, "decoder.decoder_layers.", tree.depth(flat, d)))
    if hf_class == "ViTForImageClassification":
        sd["classifier.weight"] = common.linear_to_torch(flat["head/fc/kernel"])
        sd["classifier.bias"] = flat["head/fc/bias"]
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def build_model(hf_class: str, kwargs: dict, state_dict: dict[str, np.ndarray]):
    """The HF torch model with `state_dict` loaded strictly (every name and shape checked)."""
    import torch
    import transformers

    config_class = (
        transformers.ViTMAEConfig if hf_class.startswith("ViTMAE") else transformers.ViTConfig
    )
    config = config_class(**kwargs)
    model_class = getattr(transformers, hf_class)
    extra = {"add_pooling_layer": False} if hf_class == "ViTModel" else {}
    model = model_class(config, **extra)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"The {hf_class} state dict does not match transformers "
            f"{transformers.__version__}: missing {result.missing_keys[:8]}, unexpected "
            f"{result.unexpected_keys[:8]}. This transformers version names its ViT "
            "parameters differently from the one mimjax was tested with (5.23)."
        )
    return model.eval()


def save(source: common.Source, out_dir: str, *, encoder_only: bool = False) -> dict:
    """Writes OUT/config.json + OUT/model.safetensors (+ OUT/mimjax_export.json); returns
    the export record."""
    hf_class = target_class(source, encoder_only)
    if source.kind == "mae" and hf_class != "ViTModel":
        scales = list(source.model.scales)
        if len(scales) > 1:
            log.warning(
                "MIRAM checkpoint: exporting the base-scale decoder (%d px); the decoders "
                "for %s px have no ViTMAE counterpart and are left out.",
                scales[0],
                scales[1:],
            )
        if source.model.get("posemb", "sincos2d") == "learn":
            log.warning(
                "model.posemb='learn': ViTMAE holds position embeddings as frozen tensors "
                "(requires_grad=False); the learned values are exported and load as they are."
            )
    kwargs = hf_config_kwargs(source, hf_class)
    model = build_model(hf_class, kwargs, to_hf_state_dict(source, hf_class))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    record = common.export_record(source, "hf", hf_class=hf_class)
    common.write_json(os.path.join(out_dir, common.EXPORT_RECORD), record)
    return record


# --------------------------------------------------------------------------- import
def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"HF config {name}={value}: mimjax supports square sizes only.")
        value = value[0]
    return int(value)


def load_hf_model(path: str):
    """(HF model, its class name) for an HF ViT / ViTMAE directory, loaded offline."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "vit_mae":
        name = "ViTMAEForPreTraining"
    elif config.model_type == "vit":
        archs = config.architectures or []
        name = "ViTForImageClassification" if "ViTForImageClassification" in archs else "ViTModel"
    else:
        raise ValueError(
            f"{path}: model_type {config.model_type!r} is not an HF ViT ('vit') or ViTMAE "
            "('vit_mae'); only those import."
        )
    extra = {"add_pooling_layer": False} if name == "ViTModel" else {}
    model = getattr(transformers, name).from_pretrained(path, local_files_only=True, **extra)
    return model.eval(), name


def load(path: str, *, scan: bool = False):
    """An HF ViT / ViTMAE directory -> (flat mimjax params, mimjax config, kind)."""
    model, name = load_hf_model(path)
    hc = model.config
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    act = hc.hidden_act
    if act not in _GELU_FROM_HF:
        raise ValueError(
            f"HF hidden_act={act!r}: mimjax's MLP uses GELU, exact ('gelu') or "
            f"tanh-approximate ({sorted(k for k, v in _GELU_FROM_HF.items() if v)})."
        )
    image_size = _square(hc.image_size, "image_size")
    patch_size = _square(hc.patch_size, "patch_size")
    grid = image_size // patch_size
    prefix = "" if name == "ViTModel" else "vit."
    table = sd[f"{prefix}embeddings.position_embeddings"]
    flat = {
        # HF adds row 0 of the table to the class token; mimjax has that sum as the token.
        "encoder/cls_token": sd[f"{prefix}embeddings.cls_token"] + table[:, :1],
        "encoder/patch_embed/kernel": common.patch_kernel_from_conv(
            sd[f"{prefix}embeddings.patch_embeddings.projection.weight"]
        ),
        "encoder/patch_embed/bias": sd[f"{prefix}embeddings.patch_embeddings.projection.bias"],
        "encoder/norm/scale": sd[f"{prefix}layernorm.weight"],
        "encoder/norm/bias": sd[f"{prefix}layernorm.bias"],
    }
    posemb = common.import_posemb(flat, "encoder/pos_embedding", table[:, 1:], grid)
    flat.update(_blocks_from_hf(sd, f"{prefix}layers.", "encoder/", hc.num_hidden_layers))
    model_cfg = common.model_config(
        width=hc.hidden_size,
        depth=hc.num_hidden_layers,
        num_heads=hc.num_attention_heads,
        mlp_dim=hc.intermediate_size,
        patch_size=patch_size,
        image_size=image_size,
        channels=hc.num_channels,
        posemb=posemb,
        class_token=True,
        layer_norm_eps=hc.layer_norm_eps,
        gelu_approximate=_GELU_FROM_HF[act],
    )
    config = ml_collections.ConfigDict({"model": model_cfg})
    kind = "encoder"
    if name == "ViTMAEForPreTraining":
        kind = "mae"
        flat.update(_decoder_from_hf(sd, hc, grid, model_cfg))
        config.objectives = ml_collections.ConfigDict(
            {
                "masked_reconstruction": {
                    "weight": 1.0,
                    "mask_ratio": float(hc.mask_ratio),
                    "norm_pix_loss": bool(hc.norm_pix_loss),
                    "scale_weights": [1.0],
                }
            }
        )
    elif name == "ViTForImageClassification":
        kind = "classifier"
        flat["head/fc/kernel"] = common.linear_from_torch(sd["classifier.weight"])
        flat["head/fc/bias"] = sd["classifier.bias"]
        model_cfg.name, model_cfg.head = "vit_classifier", "cls"
        model_cfg.num_classes = int(sd["classifier.bias"].shape[0])
        labels = [hc.id2label[i] for i in range(model_cfg.num_classes)]
        multilabel = hc.problem_type == "multi_label_classification"
        config.finetune = ml_collections.ConfigDict({"class_names": labels})
        config.objectives = ml_collections.ConfigDict(
            {"classification": {"weight": 1.0, "multilabel": multilabel}}
        )
    model_cfg.scan = scan
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    return (tree.stack(flat) if scan else flat), config, kind


def _decoder_from_hf(sd, hc, grid: int, model_cfg) -> dict[str, np.ndarray]:
    table = sd["decoder.decoder_pos_embed"]
    if np.any(table[:, 0] != 0):
        raise ValueError(
            "The ViTMAE decoder's position embedding has a non-zero class-token row; "
            "mimjax's decoder adds none to the class token, so it cannot be imported exactly."
        )
    d = "decoders/0/"
    flat = {
        d + "embed/kernel": common.linear_from_torch(sd["decoder.decoder_embed.weight"]),
        d + "embed/bias": sd["decoder.decoder_embed.bias"],
        d + "mask_token": sd["decoder.mask_token"],
        d + "norm/scale": sd["decoder.decoder_norm.weight"],
        d + "norm/bias": sd["decoder.decoder_norm.bias"],
        d + "pred/kernel": common.linear_from_torch(sd["decoder.decoder_pred.weight"]),
        d + "pred/bias": sd["decoder.decoder_pred.bias"],
    }
    posemb = common.import_posemb(flat, d + "pos_embedding", table[:, 1:], grid)
    flat.update(_blocks_from_hf(sd, "decoder.decoder_layers.", d, hc.decoder_num_hidden_layers))
    model_cfg.name = "mae"
    model_cfg.scales = [model_cfg.image_size]
    model_cfg.decoder = ml_collections.ConfigDict(
        {
            "width": hc.decoder_hidden_size,
            "depth": hc.decoder_num_hidden_layers,
            "num_heads": hc.decoder_num_attention_heads,
            "mlp_dim": hc.decoder_intermediate_size,
            "posemb": posemb,
        }
    )
    return flat
