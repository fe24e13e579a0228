"""mimjax <-> timm's VisionTransformer: a big_vision-layout .npz and a timm state dict.

Export (`save`) writes into OUT/:
- `model.npz`: the big_vision layout timm's `VisionTransformer.load_pretrained(path)`
  (`_load_weights`) reads: keys under `params/` (`embedding/kernel` HWIO,
  `pos_embedding` (1, N, D) with sin-cos tables materialised, `cls`,
  `Transformer/encoderblock_<i>/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`, `head`, `MAPHead_0`), per-head
  attention kernels (D, H, D/H) as Flax's MultiHeadDotProductAttention stores them;
- `model.safetensors`: the same model as a timm state dict (`patch_embed.proj`,
  `blocks.<i>.attn.qkv` = [q; k; v], ...), for `model.load_state_dict`; it carries the
  gap head's `fc_norm` that the npz path does not read and loads for any channel count
  without timm's input-conv adaptation;
- `timm_args.json`: the `timm.create_model` / `VisionTransformer` keyword arguments
  that reproduce mimjax's forward pass, `timm_args` below. In short:
  `no_embed_class=True` (the class token gets no position embedding, as in mimjax),
  `class_token` as configured, `global_pool` "token" (class token) or "avg" (no class
  token) for encoders, the head's pooling for classifiers ("token" / "avg" / "map"),
  `fc_norm=False` (mimjax keeps the encoder's final norm), `act_layer` "gelu_tanh" or
  "gelu", `qkv_bias=True`, `mlp_ratio` = mlp_dim / width, and a LayerNorm eps other
  than timm's 1e-6 through `norm_layer=functools.partial(torch.nn.LayerNorm, eps=...)`.
  A "gap" head (encoder norm, mean of the patch tokens, then `fc_norm`) needs one line
  after creating the model, because timm drops the final norm when it uses fc_norm:
  `model.fc_norm = torch.nn.LayerNorm(width, eps=eps)` before `load_state_dict`.
- `mimjax_export.json`: architecture and preprocessing (no data, no paths).

Import (`load`) reads a big_vision / original ViT `.npz` (per-layer or scan-stacked
`encoderblock`), or a timm state dict (.safetensors / .pth / .bin); the number of heads
comes from the npz kernels, or from timm_args.json beside the file / `num_heads`.
"""

from __future__ import annotations

import functools
import logging
import os

import ml_collections
import numpy as np

from mimjax.export import common
from mimjax.models import param_tree as tree

log = logging.getLogger(__name__)

NPZ, SAFETENSORS, ARGS = "model.npz", "model.safetensors", "timm_args.json"
_TIMM_DEFAULT_EPS = 1e-6

# (mimjax name under transformer/blocks/<i>/, timm name under blocks.<i>.)
_BLOCK_TIMM = (
    ("norm1/scale", "norm1.weight"),
    ("norm1/bias", "norm1.bias"),
    ("attn/out/bias", "attn.proj.bias"),
    ("norm2/scale", "norm2.weight"),
    ("norm2/bias", "norm2.bias"),
    ("mlp/fc1/bias", "mlp.fc1.bias"),
    ("mlp/fc2/bias", "mlp.fc2.bias"),
)
_BLOCK_TIMM_LINEAR = (
    ("attn/out/kernel", "attn.proj.weight"),
    ("mlp/fc1/kernel", "mlp.fc1.weight"),
    ("mlp/fc2/kernel", "mlp.fc2.weight"),
)


# --------------------------------------------------------------------------- arguments
def _head(source: common.Source) -> str | None:
    return source.model.get("head", "cls") if source.kind == "classifier" else None


def timm_args(source: common.Source) -> dict:
    """VisionTransformer keyword arguments (JSON-able) that match mimjax's forward pass;
    `layer_norm_eps` is listed apart (it goes in through `norm_layer`)."""
    cfg = source.vit
    t = cfg.transformer
    if int(t.width * (t.mlp_dim / t.width)) != t.mlp_dim:
        raise ValueError(
            f"model.mlp_dim={t.mlp_dim} is not width * mlp_ratio for a float ratio timm "
            "rounds back to it; timm's VisionTransformer cannot express this MLP size."
        )
    head = _head(source)
    pool = {None: "token" if cfg.class_token else "avg", "cls": "token", "gap": "avg"}
    args = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.channels,
        "embed_dim": t.width,
        "depth": t.depth,
        "num_heads": t.num_heads,
        "mlp_ratio": t.mlp_dim / t.width,
        "qkv_bias": True,
        "class_token": cfg.class_token,
        "no_embed_class": True,
        "global_pool": pool.get(head, "map"),
        "fc_norm": False,
        "act_layer": "gelu_tanh" if t.gelu_approximate else "gelu",
        "num_classes": int(source.flat["head/fc/bias"].shape[0]) if head else 0,
    }
    return args


def create_kwargs(args: dict, layer_norm_eps: float) -> dict:
    """`timm_args` plus the norm_layer a non-default eps needs (for timm.create_model)."""
    kwargs = dict(args)
    if layer_norm_eps != _TIMM_DEFAULT_EPS:
        import torch

        kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=layer_norm_eps)
    return kwargs


# --------------------------------------------------------------------------- export
def to_timm_state_dict(source: common.Source) -> dict[str, np.ndarray]:
    flat, cfg = source.flat, source.vit
    sd = {
        "patch_embed.proj.weight": common.patch_kernel_to_conv(
            flat["encoder/patch_embed/kernel"], cfg.patch_size, cfg.channels
        ),
        "patch_embed.proj.bias": flat["encoder/patch_embed/bias"],
        "pos_embed": source.encoder_posemb(),
        "norm.weight": flat["encoder/norm/scale"],
        "norm.bias": flat["encoder/norm/bias"],
    }
    if cfg.class_token:
        sd["cls_token"] = flat["encoder/cls_token"]
    for i in range(tree.depth(flat, "encoder/")):
        b = f"encoder/transformer/blocks/{i}/"
        for name, timm_name in _BLOCK_TIMM:
            sd[f"blocks.{i}.{timm_name}"] = flat[b + name]
        for name, timm_name in _BLOCK_TIMM_LINEAR:
            sd[f"blocks.{i}.{timm_name}"] = common.linear_to_torch(flat[b + name])
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [common.linear_to_torch(flat[f"{b}attn/{n}/kernel"]) for n in ("query", "key", "value")]
        )
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [flat[f"{b}attn/{n}/bias"] for n in ("query", "key", "value")]
        )
    head = _head(source)
    if head:
        sd["head.weight"] = common.linear_to_torch(flat["head/fc/kernel"])
        sd["head.bias"] = flat["head/fc/bias"]
    if head == "gap":
        sd["fc_norm.weight"] = flat["head/fc_norm/scale"]
        sd["fc_norm.bias"] = flat["head/fc_norm/bias"]
    if head == "map":
        sd.update(
            {
                "attn_pool.latent": flat["head/probe"],
                "attn_pool.q.weight": common.linear_to_torch(flat["head/query/kernel"]),
                "attn_pool.q.bias": flat["head/query/bias"],
                "attn_pool.kv.weight": np.concatenate(
                    [common.linear_to_torch(flat[f"head/{n}/kernel"]) for n in ("key", "value")]
                ),
                "attn_pool.kv.bias": np.concatenate(
                    [flat[f"head/{n}/bias"] for n in ("key", "value")]
                ),
                "attn_pool.proj.weight": common.linear_to_torch(flat["head/out/kernel"]),
                "attn_pool.proj.bias": flat["head/out/bias"],
                "attn_pool.norm.weight": flat["head/norm/scale"],
                "attn_pool.norm.bias": flat["head/norm/bias"],
                "attn_pool.mlp.fc1.weight": common.linear_to_torch(flat["head/mlp/fc1/kernel"]),
                "attn_pool.mlp.fc1.bias": flat["head/mlp/fc1/bias"],
                "attn_pool.mlp.fc2.weight": common.linear_to_torch(flat["head/mlp/fc2/kernel"]),
                "attn_pool.mlp.fc2.bias": flat["head/mlp/fc2/bias"],
            }
        )
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _heads_split(kernel: np.ndarray, num_heads: int) -> np.ndarray:
    """(D, D) q/k/v kernel -> (D, H, D/H), Flax MultiHeadDotProductAttention's layout."""
    return kernel.reshape(kernel.shape[0], num_heads, -1)


def _mha_to_big_vision(flat, src: str, dst: str, num_heads: int) -> dict[str, np.ndarray]:
    out = {}
    for n in ("query", "key", "value"):
        out[f"{dst}{n}/kernel"] = _heads_split(flat[f"{src}{n}/kernel"], num_heads)
        out[f"{dst}{n}/bias"] = flat[f"{src}{n}/bias"].reshape(num_heads, -1)
    kernel = flat[f"{src}out/kernel"]
    out[f"{dst}out/kernel"] = kernel.reshape(num_heads, -1, kernel.shape[-1])
    out[f"{dst}out/bias"] = flat[f"{src}out/bias"]
    return out


def _mlp_norm_to_big_vision(flat, src: str, dst: str, norms) -> dict[str, np.ndarray]:
    """LayerNorms named by `norms` ({mimjax: big_vision}) and mlp fc1/fc2 -> Dense_0/1."""
    out = {}
    for name, bv in norms.items():
        out[f"{dst}{bv}/scale"] = flat[f"{src}{name}/scale"]
        out[f"{dst}{bv}/bias"] = flat[f"{src}{name}/bias"]
    for r, fc in enumerate(("fc1", "fc2")):
        out[f"{dst}MlpBlock_0/Dense_{r}/kernel"] = flat[f"{src}mlp/{fc}/kernel"]
        out[f"{dst}MlpBlock_0/Dense_{r}/bias"] = flat[f"{src}mlp/{fc}/bias"]
    return out


def to_big_vision(source: common.Source) -> dict[str, np.ndarray]:
    flat, cfg = source.flat, source.vit
    heads = cfg.transformer.num_heads
    p = "params/"
    out = {
        p + "embedding/kernel": flat["encoder/patch_embed/kernel"].reshape(
            cfg.patch_size, cfg.patch_size, cfg.channels, -1
        ),
        p + "embedding/bias": flat["encoder/patch_embed/bias"],
        p + "pos_embedding": source.encoder_posemb(),
        p + "Transformer/encoder_norm/scale": flat["encoder/norm/scale"],
        p + "Transformer/encoder_norm/bias": flat["encoder/norm/bias"],
    }
    if cfg.class_token:
        out[p + "cls"] = flat["encoder/cls_token"]
    for i in range(tree.depth(flat, "encoder/")):
        src, dst = f"encoder/transformer/blocks/{i}/", f"{p}Transformer/encoderblock_{i}/"
        out.update(
            _mha_to_big_vision(flat, src + "attn/", dst + "MultiHeadDotProductAttention_0/", heads)
        )
        out.update(
            _mlp_norm_to_big_vision(
                flat, src, dst, {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}
            )
        )
    head = _head(source)
    if head:
        out[p + "head/kernel"] = flat["head/fc/kernel"]
        out[p + "head/bias"] = flat["head/fc/bias"]
    if head == "gap":  # not read by timm's npz loader: see the module docstring
        out[p + "fc_norm/scale"] = flat["head/fc_norm/scale"]
        out[p + "fc_norm/bias"] = flat["head/fc_norm/bias"]
    if head == "map":
        m = p + "MAPHead_0/"
        out[m + "probe"] = flat["head/probe"]
        out.update(_mha_to_big_vision(flat, "head/", m + "MultiHeadDotProductAttention_0/", heads))
        out.update(_mlp_norm_to_big_vision(flat, "head/", m, {"norm": "LayerNorm_0"}))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def save(source: common.Source, out_dir: str) -> dict:
    """Writes model.npz, model.safetensors, timm_args.json and mimjax_export.json."""
    from safetensors.numpy import save_file

    args = timm_args(source)
    eps = source.vit.transformer.layer_norm_eps
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, NPZ), **to_big_vision(source))
    save_file(to_timm_state_dict(source), os.path.join(out_dir, SAFETENSORS))
    notes = {
        "layer_norm_eps": eps,
        "timm_args": args,
        "norm_layer": (
            None
            if eps == _TIMM_DEFAULT_EPS
            else f"functools.partial(torch.nn.LayerNorm, eps={eps})"
        ),
        "npz": "model.load_pretrained(path) (timm's big_vision loader)",
        "safetensors": "model.load_state_dict(safetensors.torch.load_file(path))",
    }
    if _head(source) == "gap":
        notes["gap_head"] = (
            f"after creating the model: model.fc_norm = torch.nn.LayerNorm({args['embed_dim']}, "
            f"eps={eps}); load model.safetensors (the npz path does not read fc_norm)"
        )
    common.write_json(os.path.join(out_dir, ARGS), notes)
    record = common.export_record(source, "timm", timm_args=args)
    common.write_json(os.path.join(out_dir, common.EXPORT_RECORD), record)
    return record


# --------------------------------------------------------------------------- import
def _mha_from_big_vision(w, src: str, dst: str) -> dict[str, np.ndarray]:
    out = {}
    for n in ("query", "key", "value"):
        kernel = w[f"{src}{n}/kernel"]
        out[f"{dst}{n}/kernel"] = kernel.reshape(kernel.shape[0], -1)
        out[f"{dst}{n}/bias"] = w[f"{src}{n}/bias"].reshape(-1)
    kernel = w[f"{src}out/kernel"]
    out[f"{dst}out/kernel"] = kernel.reshape(-1, kernel.shape[-1])
    out[f"{dst}out/bias"] = w[f"{src}out/bias"]
    return out


def _npz_prefix(w) -> tuple[str, bool]:
    """(key prefix, big_vision naming?) of a ViT .npz, as timm's loader detects them."""
    for prefix in ("params/", "params/img/", "opt/target/", ""):
        if f"{prefix}embedding/kernel" in w:
            big_vision = (
                prefix.startswith("params/")
                or f"{prefix}pos_embedding" in w
                or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
            )
            return prefix, big_vision
    raise ValueError("Not a ViT .npz: no 'embedding/kernel' entry (big_vision or original ViT).")


def _fold_class_token(flat, cls: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Stores the class token; a position table with a class-token row (timm's
    no_embed_class=False, the original ViT's table) has that row folded into the token,
    since mimjax adds no position embedding to it. Returns the patch-grid table."""
    if int(np.sqrt(table.shape[1])) ** 2 != table.shape[1]:
        cls, table = cls + table[:, :1], table[:, 1:]
    flat["encoder/cls_token"] = cls
    return table


def _encoder_config(flat, table, patch, channels, num_heads, layer_norm_eps, gelu_approximate):
    """The imported encoder's model config: the sizes are read off the converted `flat`
    and the (1, grid * grid, width) position table."""
    grid = round(np.sqrt(table.shape[1]))
    posemb = common.import_posemb(flat, "encoder/pos_embedding", table, grid)
    return common.model_config(
        width=table.shape[-1],
        depth=tree.depth(flat, "encoder/"),
        num_heads=num_heads,
        mlp_dim=flat["encoder/transformer/blocks/0/mlp/fc1/bias"].shape[0],
        patch_size=patch,
        image_size=grid * patch,
        channels=channels,
        posemb=posemb,
        class_token="encoder/cls_token" in flat,
        layer_norm_eps=layer_norm_eps,
        gelu_approximate=gelu_approximate,
    )


def load_big_vision(w, *, layer_norm_eps: float, gelu_approximate: bool, scan: bool = False):
    """A big_vision / original ViT npz mapping -> (flat mimjax params, mimjax config, kind)."""
    w = {k: np.asarray(w[k]) for k in w}
    p, big_vision = _npz_prefix(w)
    mha, mlp, ln2 = (
        ("_0", "MlpBlock_0", "LayerNorm_1") if big_vision else ("_1", "MlpBlock_3", "LayerNorm_2")
    )
    kernel = w[p + "embedding/kernel"]
    patch, _, channels, width = kernel.shape
    stacked = f"{p}Transformer/encoderblock/LayerNorm_0/scale" in w
    if stacked:
        depth = w[f"{p}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len({k.split("/")[1 + p.count("/")] for k in w if "/encoderblock_" in k})

    def block(i: int, name: str) -> np.ndarray:
        if stacked:
            return w[f"{p}Transformer/encoderblock/{name}"][i]
        return w[f"{p}Transformer/encoderblock_{i}/{name}"]

    flat = {
        "encoder/patch_embed/kernel": kernel.reshape(-1, width),
        "encoder/patch_embed/bias": w[p + "embedding/bias"],
        "encoder/norm/scale": w[p + "Transformer/encoder_norm/scale"],
        "encoder/norm/bias": w[p + "Transformer/encoder_norm/bias"],
    }
    table = (
        w[p + "pos_embedding"] if big_vision else w[p + "Transformer/posembed_input/pos_embedding"]
    )
    table = table.reshape(1, -1, width)
    class_token = p + "cls" in w
    if class_token:
        table = _fold_class_token(flat, w[p + "cls"].reshape(1, 1, width), table)
    num_heads = None
    for i in range(depth):
        dst = f"encoder/transformer/blocks/{i}/"
        mha_src = {
            f"{n}/{part}": block(i, f"MultiHeadDotProductAttention{mha}/{n}/{part}")
            for n in ("query", "key", "value", "out")
            for part in ("kernel", "bias")
        }
        num_heads = mha_src["query/kernel"].shape[1]
        flat.update(_mha_from_big_vision(mha_src, "", dst + "attn/"))
        for name, bv in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
            flat[f"{dst}{name}/scale"] = block(i, f"{bv}/scale")
            flat[f"{dst}{name}/bias"] = block(i, f"{bv}/bias")
        for r, fc in enumerate(("fc1", "fc2")):
            flat[f"{dst}mlp/{fc}/kernel"] = block(i, f"{mlp}/Dense_{r}/kernel")
            flat[f"{dst}mlp/{fc}/bias"] = block(i, f"{mlp}/Dense_{r}/bias")
    model_cfg = _encoder_config(
        flat, table, patch, channels, num_heads, layer_norm_eps, gelu_approximate
    )
    head = None
    if p + "MAPHead_0/probe" in w:
        head = "map"
        m = p + "MAPHead_0/"
        flat["head/probe"] = w[m + "probe"]
        flat.update(_mha_from_big_vision(w, m + "MultiHeadDotProductAttention_0/", "head/"))
        flat["head/norm/scale"], flat["head/norm/bias"] = (
            w[m + "LayerNorm_0/scale"],
            w[m + "LayerNorm_0/bias"],
        )
        for r, fc in enumerate(("fc1", "fc2")):
            flat[f"head/mlp/{fc}/kernel"] = w[f"{m}MlpBlock_0/Dense_{r}/kernel"]
            flat[f"head/mlp/{fc}/bias"] = w[f"{m}MlpBlock_0/Dense_{r}/bias"]
    elif p + "fc_norm/scale" in w:
        head = "gap"
        flat["head/fc_norm/scale"], flat["head/fc_norm/bias"] = (
            w[p + "fc_norm/scale"],
            w[p + "fc_norm/bias"],
        )
    elif p + "head/kernel" in w and class_token:
        head = "cls"
    if head:
        flat["head/fc/kernel"], flat["head/fc/bias"] = w[p + "head/kernel"], w[p + "head/bias"]
    elif p + "head/kernel" in w:
        log.warning("The npz head (pooling unknown without a class token) is not imported.")
    return _finish(flat, model_cfg, head, scan)


def load_timm_state_dict(
    sd,
    *,
    num_heads: int,
    layer_norm_eps: float,
    gelu_approximate: bool,
    global_pool: str | None = None,
    scan: bool = False,
):
    """A timm VisionTransformer state dict -> (flat mimjax params, mimjax config, kind)."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    if "norm.weight" not in sd:
        raise ValueError(
            "The timm model has no final norm (fc_norm=True drops it); mimjax encoders end "
            "with one, so only models created with fc_norm=False import."
        )
    conv = sd["patch_embed.proj.weight"]
    width, channels, patch, _ = conv.shape
    flat = {
        "encoder/patch_embed/kernel": common.patch_kernel_from_conv(conv),
        "encoder/patch_embed/bias": sd["patch_embed.proj.bias"],
        "encoder/norm/scale": sd["norm.weight"],
        "encoder/norm/bias": sd["norm.bias"],
    }
    table = sd["pos_embed"]
    class_token = "cls_token" in sd
    if class_token:
        table = _fold_class_token(flat, sd["cls_token"], table)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        dst = f"encoder/transformer/blocks/{i}/"
        for name, timm_name in _BLOCK_TIMM:
            flat[dst + name] = sd[f"blocks.{i}.{timm_name}"]
        for name, timm_name in _BLOCK_TIMM_LINEAR:
            flat[dst + name] = common.linear_from_torch(sd[f"blocks.{i}.{timm_name}"])
        q, k, v = np.split(sd[f"blocks.{i}.attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd.get(f"blocks.{i}.attn.qkv.bias", np.zeros(3 * width)), 3)
        for n, weight, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            flat[f"{dst}attn/{n}/kernel"] = common.linear_from_torch(weight)
            flat[f"{dst}attn/{n}/bias"] = bias
    model_cfg = _encoder_config(
        flat, table, patch, channels, num_heads, layer_norm_eps, gelu_approximate
    )
    head = None
    if "head.weight" in sd:
        pool = global_pool or (
            "map" if "attn_pool.latent" in sd else "avg" if "fc_norm.weight" in sd else "token"
        )
        head = {"token": "cls", "avg": "gap", "map": "map"}.get(pool)
        if head == "cls" and not class_token:
            head = None
        if head == "gap" and "fc_norm.weight" not in sd:
            head = None
    if head == "map":
        a = "attn_pool."
        k, v = np.split(sd[a + "kv.weight"], 2)
        kb, vb = np.split(sd[a + "kv.bias"], 2)
        flat.update(
            {
                "head/probe": sd[a + "latent"],
                "head/query/kernel": common.linear_from_torch(sd[a + "q.weight"]),
                "head/query/bias": sd[a + "q.bias"],
                "head/key/kernel": common.linear_from_torch(k),
                "head/key/bias": kb,
                "head/value/kernel": common.linear_from_torch(v),
                "head/value/bias": vb,
                "head/out/kernel": common.linear_from_torch(sd[a + "proj.weight"]),
                "head/out/bias": sd[a + "proj.bias"],
                "head/norm/scale": sd[a + "norm.weight"],
                "head/norm/bias": sd[a + "norm.bias"],
                "head/mlp/fc1/kernel": common.linear_from_torch(sd[a + "mlp.fc1.weight"]),
                "head/mlp/fc1/bias": sd[a + "mlp.fc1.bias"],
                "head/mlp/fc2/kernel": common.linear_from_torch(sd[a + "mlp.fc2.weight"]),
                "head/mlp/fc2/bias": sd[a + "mlp.fc2.bias"],
            }
        )
    if head == "gap":
        flat["head/fc_norm/scale"], flat["head/fc_norm/bias"] = (
            sd["fc_norm.weight"],
            sd["fc_norm.bias"],
        )
    if head:
        flat["head/fc/kernel"] = common.linear_from_torch(sd["head.weight"])
        flat["head/fc/bias"] = sd["head.bias"]
    elif "head.weight" in sd:
        log.warning(
            "The timm head's pooling has no mimjax counterpart; only the encoder is imported."
        )
    return _finish(flat, model_cfg, head, scan)


def _finish(flat, model_cfg, head: str | None, scan: bool):
    config = ml_collections.ConfigDict({"model": model_cfg})
    kind = "encoder"
    if head:
        kind = "classifier"
        model_cfg.name, model_cfg.head = "vit_classifier", head
        model_cfg.num_classes = int(flat["head/fc/bias"].shape[0])
    model_cfg.scan = scan
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    return (tree.stack(flat) if scan else flat), config, kind


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def load(
    path: str,
    *,
    num_heads: int | None = None,
    layer_norm_eps: float | None = None,
    gelu: str | None = None,
    scan: bool = False,
):
    """A timm / big_vision checkpoint -> (flat mimjax params, mimjax config, kind).

    path: an export directory (model.npz and/or model.safetensors + timm_args.json), a
    .npz, or a state dict (.safetensors / .pth / .bin). Settings the weights do not
    carry come from timm_args.json beside the file when present, else the arguments:
    num_heads (state dicts only), layer_norm_eps (default 1e-6), gelu "tanh" / "exact"
    (default: "tanh" for npz files, the JAX convention; "exact" for timm state dicts,
    timm's nn.GELU).
    """
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        names = [n for n in (NPZ, SAFETENSORS) if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"{path} holds neither {NPZ} nor {SAFETENSORS}.")
        path = os.path.join(path, names[0])
    notes = {}
    args_path = os.path.join(directory, ARGS)
    if os.path.isfile(args_path):
        import json

        with open(args_path) as f:
            notes = json.load(f)
    saved = notes.get("timm_args", {})
    eps = (
        layer_norm_eps
        if layer_norm_eps is not None
        else notes.get("layer_norm_eps", _TIMM_DEFAULT_EPS)
    )
    is_npz = path.endswith(".npz")
    if gelu is None:
        act = saved.get("act_layer")
        gelu = {"gelu_tanh": "tanh", "gelu": "exact"}.get(act, "tanh" if is_npz else "exact")
    if gelu not in ("tanh", "exact"):
        raise ValueError(f"gelu must be 'tanh' or 'exact', got {gelu!r}.")
    if is_npz:
        with np.load(path) as w:
            return load_big_vision(
                w, layer_norm_eps=eps, gelu_approximate=gelu == "tanh", scan=scan
            )
    heads = num_heads or saved.get("num_heads")
    if not heads:
        raise ValueError(
            f"{path}: a timm state dict does not record the number of attention heads; "
            "pass --num-heads (or keep timm_args.json beside the file)."
        )
    return load_timm_state_dict(
        _read_state_dict(path),
        num_heads=int(heads),
        layer_norm_eps=eps,
        gelu_approximate=gelu == "tanh",
        global_pool=saved.get("global_pool"),
        scan=scan,
    )
