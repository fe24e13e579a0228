"""Export to timm: the big_vision .npz, the timm state dict and the VisionTransformer
arguments. What is compared, for encoders with and without a class token (1 and 3
channels) and for the three classifier heads:
- always: the .npz read with the transforms timm's `_load_weights` applies gives
  exactly the tensors of model.safetensors, and a PyTorch forward pass over that state
  dict written out from timm's VisionTransformer (no_embed_class, fused qkv, pooling,
  fc_norm, attention pooling) gives mimjax's tokens, pooled features and logits;
- where timm imports (it needs torchvision, which has no CPU build here): timm itself,
  loading the .npz with `load_pretrained` and the state dict with `load_state_dict`.
"""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mimjax import inference
from mimjax.export import timm as timm_export
from mimjax.models import vit

from export_fixtures import Parity, exported_workdir, images, nchw, tiny_config

PARITY = Parity("timm parity")
_report = PARITY.report_fixture()

CASES = {
    "mae-cls-1ch": {"name": "mae"},
    "encoder-nocls-3ch-learned-exact-eps1e-5": {
        "name": "mae",
        "class_token": False,
        "channels": 3,
        "posemb": "learn",
        "gelu_approximate": False,
        "layer_norm_eps": 1e-5,
    },
    "classifier-cls": {"name": "vit_classifier", "head": "cls"},
    "classifier-gap-3ch": {"name": "vit_classifier", "head": "gap", "channels": 3},
    "classifier-map-nocls": {"name": "vit_classifier", "head": "map", "class_token": False},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    settings = dict(CASES[request.param])
    name = settings.pop("name")
    scales = (16, 32) if name == "mae" else (16,)
    config = tiny_config(name, scales=scales, **settings)
    root = tmp_path_factory.mktemp(request.param)
    exported_workdir(root, config, "timm")
    notes = json.loads(Path(root / "timm" / "timm_args.json").read_text())
    state = safetensors_torch.load_file(str(root / "timm" / "model.safetensors"))
    encoder = inference.Encoder.from_workdir(str(root / "run"))
    x = images(3, config.model.channels, seed=4)
    return request.param, config, root / "timm", notes, state, encoder(x), x


# --------------------------------------------------------------------------- npz as timm reads it
def _n2p(w, transpose=True):
    """timm's `_n2p`: a Flax array as a torch tensor, kernels transposed."""
    if transpose and w.ndim in (2, 3, 4):
        w = w.transpose({4: [3, 2, 0, 1], 3: [2, 0, 1], 2: [1, 0]}[w.ndim])
    return torch.from_numpy(np.ascontiguousarray(w))


def _mha(w, src, dst, names):
    out = {}
    qkv = [_n2p(w[f"{src}{n}/kernel"], False).flatten(1).T for n in names]
    out[dst + "weight"] = torch.cat(qkv)
    out[dst + "bias"] = torch.cat([_n2p(w[f"{src}{n}/bias"], False).reshape(-1) for n in names])
    return out


def npz_as_timm_loads(w) -> dict:
    """The tensors timm's `_load_weights` copies into a VisionTransformer (big_vision
    naming, per-layer blocks, matching shapes: no resampling)."""
    p = "params/"
    sd = {
        "patch_embed.proj.weight": _n2p(w[p + "embedding/kernel"]),
        "patch_embed.proj.bias": _n2p(w[p + "embedding/bias"]),
        "pos_embed": _n2p(w[p + "pos_embedding"], False),
        "norm.weight": _n2p(w[p + "Transformer/encoder_norm/scale"]),
        "norm.bias": _n2p(w[p + "Transformer/encoder_norm/bias"]),
    }
    if p + "cls" in w:
        sd["cls_token"] = _n2p(w[p + "cls"], False)
    if p + "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = _n2p(w[p + "head/kernel"]), _n2p(w[p + "head/bias"])
    blocks = sorted({k.split("/")[2] for k in w if "/encoderblock_" in k})
    for i in range(len(blocks)):
        b, t = f"{p}Transformer/encoderblock_{i}/", f"blocks.{i}."
        m = b + "MultiHeadDotProductAttention_0/"
        sd.update(_mha(w, m, t + "attn.qkv.", ("query", "key", "value")))
        sd[t + "attn.proj.weight"] = _n2p(w[m + "out/kernel"]).flatten(1)
        sd[t + "attn.proj.bias"] = _n2p(w[m + "out/bias"])
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            sd[f"{t}{norm}.weight"] = _n2p(w[f"{b}{ln}/scale"])
            sd[f"{t}{norm}.bias"] = _n2p(w[f"{b}{ln}/bias"])
        for r in range(2):
            sd[f"{t}mlp.fc{r + 1}.weight"] = _n2p(w[f"{b}MlpBlock_0/Dense_{r}/kernel"])
            sd[f"{t}mlp.fc{r + 1}.bias"] = _n2p(w[f"{b}MlpBlock_0/Dense_{r}/bias"])
    if p + "MAPHead_0/probe" in w:
        b, m = p + "MAPHead_0/", p + "MAPHead_0/MultiHeadDotProductAttention_0/"
        sd["attn_pool.latent"] = _n2p(w[b + "probe"], False)
        sd.update(_mha(w, m, "attn_pool.kv.", ("key", "value")))
        sd.update(_mha(w, m, "attn_pool.q.", ("query",)))
        sd["attn_pool.proj.weight"] = _n2p(w[m + "out/kernel"]).flatten(1)
        sd["attn_pool.proj.bias"] = _n2p(w[m + "out/bias"])
        sd["attn_pool.norm.weight"] = _n2p(w[b + "LayerNorm_0/scale"])
        sd["attn_pool.norm.bias"] = _n2p(w[b + "LayerNorm_0/bias"])
        for r in range(2):
            sd[f"attn_pool.mlp.fc{r + 1}.weight"] = _n2p(w[f"{b}MlpBlock_0/Dense_{r}/kernel"])
            sd[f"attn_pool.mlp.fc{r + 1}.bias"] = _n2p(w[f"{b}MlpBlock_0/Dense_{r}/bias"])
    return sd


# --------------------------------------------------------------------------- timm's forward
def timm_forward(t: dict, args: dict, eps: float, x):
    """VisionTransformer.forward_features / forward_head for these arguments, written out."""
    F = torch.nn.functional
    width, heads = args["embed_dim"], args["num_heads"]
    act = F.gelu if args["act_layer"] == "gelu" else (lambda z: F.gelu(z, approximate="tanh"))

    def ln(z, name):
        return F.layer_norm(z, (width,), t[name + ".weight"], t[name + ".bias"], eps)

    def lin(z, name):
        return F.linear(z, t[name + ".weight"], t[name + ".bias"])

    def attend(q, k, v):  # (B, Tq, D), (B, T, D) -> (B, Tq, D)
        split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[1], width)

    z = (
        F.conv2d(
            x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=args["patch_size"]
        )
        .flatten(2)
        .transpose(1, 2)
    )
    z = z + t["pos_embed"]  # no_embed_class=True: the class token gets none
    if args["class_token"]:
        z = torch.cat([t["cls_token"].expand(z.shape[0], -1, -1), z], dim=1)
    for i in range(args["depth"]):
        b = f"blocks.{i}."
        q, k, v = lin(ln(z, b + "norm1"), b + "attn.qkv").chunk(3, dim=-1)
        z = z + lin(attend(q, k, v), b + "attn.proj")
        z = z + lin(act(lin(ln(z, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    tokens = ln(z, "norm")
    pool = args["global_pool"]
    if pool == "token":
        pooled = tokens[:, 0]
    elif pool == "avg":
        pooled = tokens[:, int(args["class_token"]) :].mean(dim=1)
    else:  # "map": AttentionPoolLatent
        a = "attn_pool."
        latent = t[a + "latent"].expand(tokens.shape[0], -1, -1)
        k, v = lin(tokens, a + "kv").chunk(2, dim=-1)
        y = lin(attend(lin(latent, a + "q"), k, v), a + "proj")
        pooled = (y + lin(act(lin(ln(y, a + "norm"), a + "mlp.fc1")), a + "mlp.fc2"))[:, 0]
    if "fc_norm.weight" in t:
        pooled = ln(pooled, "fc_norm")
    logits = lin(pooled, "head") if args["num_classes"] else None
    return tokens, pooled, logits


def _compare(case, outputs, ours, where):
    tokens, pooled, logits = (None if o is None else o.detach().numpy() for o in outputs)
    PARITY.record(f"{case} tokens ({where})", np.abs(tokens - ours.tokens).max())
    PARITY.record(f"{case} pooled ({where})", np.abs(pooled - ours.pooled).max())
    assert (logits is None) == (ours.logits is None)
    if logits is not None:
        PARITY.record(f"{case} logits ({where})", np.abs(logits - ours.logits).max())


# --------------------------------------------------------------------------- tests
def test_npz_is_big_vision_layout_with_materialised_position_embeddings(exported):
    _case, config, out, notes, _state, _, _ = exported
    with np.load(out / "model.npz") as w:
        keys = set(w)
        assert all(k.startswith("params/") for k in keys)
        cfg = vit.vit_config_from(config.model)
        assert w["params/embedding/kernel"].shape == (4, 4, cfg.channels, 32)  # HWIO
        q = w["params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
        assert q.shape == (32, 4, 8)  # (D, heads, head_dim)
        table = w["params/pos_embedding"]
        assert table.shape == (1, 16, 32)
        if cfg.posemb == "sincos2d":
            np.testing.assert_array_equal(table[0], vit.sincos_posemb_2d(32, 4))
        assert ("params/cls" in keys) == cfg.class_token
    for path in out.iterdir():  # parameters and architecture only
        assert b"/secret/patient_data" not in path.read_bytes(), path.name
    assert sorted(p.name for p in out.iterdir()) == [
        "mimjax_export.json",
        "model.npz",
        "model.safetensors",
        "timm_args.json",
    ]
    args = notes["timm_args"]
    assert args["no_embed_class"] is True and args["fc_norm"] is False
    assert args["class_token"] == cfg.class_token
    assert args["act_layer"] == ("gelu_tanh" if cfg.transformer.gelu_approximate else "gelu")
    assert notes["layer_norm_eps"] == cfg.transformer.layer_norm_eps
    head = config.model.get("head", None) if config.model.name != "mae" else None
    expected_pool = {
        None: "token" if cfg.class_token else "avg",
        "cls": "token",
        "gap": "avg",
        "map": "map",
    }[head]
    assert args["global_pool"] == expected_pool


def test_npz_loads_to_the_state_dict_tensors(exported):
    _, _, out, _, state, _, _ = exported
    with np.load(out / "model.npz") as w:
        from_npz = npz_as_timm_loads({k: w[k] for k in w})
    gap_only = {"fc_norm.weight", "fc_norm.bias"}  # timm's npz loader does not read fc_norm
    assert set(from_npz) == set(state) - gap_only
    for name, tensor in from_npz.items():
        assert torch.equal(tensor, state[name]), name


def test_state_dict_forward_matches_mimjax(exported):
    case, _, _, notes, state, ours, x = exported
    outputs = timm_forward(state, notes["timm_args"], notes["layer_norm_eps"], nchw(x))
    _compare(case, outputs, ours, "state dict, timm's forward written out")


def test_timm_itself_loads_both_files_with_the_same_numerics(exported):
    timm = pytest.importorskip(
        "timm", reason="timm needs torchvision, which has no CPU build in this environment"
    )
    from timm.models.vision_transformer import VisionTransformer

    case, _, out, notes, state, ours, x = exported
    args, eps = notes["timm_args"], notes["layer_norm_eps"]
    kwargs = timm_export.create_kwargs(args, eps)

    def run(model):
        model.eval()
        with torch.no_grad():
            tokens = model.forward_features(nchw(x))
            pooled = model.forward_head(tokens, pre_logits=True)
            logits = model.forward_head(tokens) if args["num_classes"] else None
        return tokens, pooled, logits

    model = VisionTransformer(**kwargs)
    if "gap_head" in notes:  # the one line the gap head needs
        model.fc_norm = torch.nn.LayerNorm(args["embed_dim"], eps=eps)
    model.load_state_dict(state)
    _compare(case, run(model), ours, f"timm {timm.__version__} state dict")
    if "gap_head" not in notes:
        model = VisionTransformer(**kwargs)
        model.load_pretrained(str(out / "model.npz"))
        _compare(case, run(model), ours, f"timm {timm.__version__} npz")
