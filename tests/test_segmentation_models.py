"""Segmentation models ("segmenter"): ViT + dense decoder (progressive / UNETR) or the
paper's 2-D U-Net, with the coarse-to-fine heads (plain, Prior Concatenation,
Separate Normalization). Shapes, head wiring, scan == unrolled, batch-norm train /
eval behaviour through ModelSpec, parameter names, pretrained-encoder loading,
layer-wise lr decay, config errors, and parity with references: the reference
code's U-Net + UnetC2FOutput wiring written out in torch, MONAI's UNETR blocks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mimjax import optim, pretrained
from mimjax.models import build_model, conv_blocks, dense_decoder, param_tree
from mimjax.models.spec import ModelSpec
from mimjax.run_config import ConfigError

from helpers import tiny_model_config

SIZE = 32
HEADS = {"plain": {}, "pc": dict(prior_concat=True), "sn": dict(separate_norm=True),
         "sn_pc": dict(separate_norm=True, prior_concat=True)}
BACKBONES = {"vit_progressive": dict(backbone="vit", decoder="progressive"),
             "vit_unetr": dict(backbone="vit", decoder="unetr"),
             "unet": dict(backbone="unet")}
# The feature map's width: decoder_widths[-1], or the U-Net's base channels.
FEATURE_WIDTH = {"vit_progressive": 8, "vit_unetr": 8, "unet": 4}


def seg_config(**overrides) -> ml_collections.ConfigDict:
    """A tiny segmenter: ViT width 32, 3 blocks, patch 8 (3 decoder stages) at 32 px;
    the U-Net with 4 base channels. ACDC's classes: 4 fine, 2 coarse."""
    cfg = ml_collections.ConfigDict(dict(
        name="segmenter", backbone="vit", variant="Ti/8", width=32, depth=3, num_heads=2,
        mlp_dim=64, image_size=SIZE, channels=1, posemb="sincos2d", class_token=True,
        dtype="float32", scan=False, remat=False, drop_path_rate=0.0, decoder="progressive",
        taps=None, decoder_widths=(32, 16, 8), unet_base_channels=4, unet_dropout=0.3,
        norm="batch", separate_norm=False, prior_concat=False, fine_to_coarse=(0, 1, 1, 1)))
    cfg.update(overrides)
    return cfg


def images(batch=2, channels=1, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, SIZE, SIZE, channels))


def spec_and_variables(cfg, seed=0):
    spec = ModelSpec.from_config(cfg)
    params, model_state = spec.init_variables(cfg, jax.random.PRNGKey(seed))
    return spec, params, model_state


def perturbed(tree, seed, scale=0.1):
    """Every leaf plus small noise: non-trivial norm parameters and running statistics."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def random_running_stats(model_state, seed):
    """Running means ~ N(0, 0.2), variances in [0.5, 2], as jax arrays (a bound model
    updates numpy leaves in place, which would change the caller's copy)."""
    flat = param_tree.flatten(model_state)
    rng = np.random.default_rng(seed)
    out = {name: jnp.asarray(rng.normal(size=v.shape) * 0.2 if name.endswith("mean")
                             else rng.uniform(0.5, 2.0, size=v.shape), jnp.float32)
           for name, v in flat.items()}
    return param_tree.unflatten(out)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_output_shapes_for_every_backbone_decoder_and_head(backbone, head):
    model = build_model(seg_config(**BACKBONES[backbone], **HEADS[head]), rngs=nnx.Rngs(0))
    x = images()
    for rng in (None, jax.random.PRNGKey(1)):
        out = model(x, rng=rng)
        assert set(out) == {"coarse_logits", "fine_logits"}
        assert out["coarse_logits"].shape == (2, SIZE, SIZE, 2)
        assert out["fine_logits"].shape == (2, SIZE, SIZE, 4)
        assert all(v.dtype == jnp.float32 and bool(jnp.isfinite(v).all()) for v in out.values())
    # The decoder's feature map, for heads of other tasks (e.g. landmark heatmaps).
    assert model.features(x).shape == (2, SIZE, SIZE, FEATURE_WIDTH[backbone])


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_bf16_compute_keeps_f32_parameters_and_logits(backbone):
    model = build_model(seg_config(**BACKBONES[backbone], dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model.features(images()).dtype == jnp.bfloat16
    out = model(images(), rng=jax.random.PRNGKey(0))
    assert all(v.dtype == jnp.float32 for v in out.values())


@pytest.mark.parametrize("backbone", ["vit_progressive", "unet"])
def test_other_class_counts_and_four_channels(backbone):
    """BraTS: 4 MRI sequences in; several superclasses given by counts."""
    cfg = seg_config(**BACKBONES[backbone], channels=4, fine_to_coarse=None, num_fine=6,
                     num_coarse=3)
    out = build_model(cfg, rngs=nnx.Rngs(0))(images(channels=4))
    assert out["coarse_logits"].shape[-1] == 3 and out["fine_logits"].shape[-1] == 6
    cfg = seg_config(fine_to_coarse=(0, 1, 1, 2, 2))
    out = build_model(cfg, rngs=nnx.Rngs(0))(images())
    assert out["coarse_logits"].shape[-1] == 3 and out["fine_logits"].shape[-1] == 5


@pytest.mark.parametrize("norm", ["instance", "layer"])
@pytest.mark.parametrize("backbone", ["vit_unetr", "unet"])
def test_stateless_norms_keep_no_model_state(backbone, norm):
    cfg = seg_config(**BACKBONES[backbone], norm=norm, separate_norm=True)
    spec, params, model_state = spec_and_variables(cfg)
    assert not spec.has_model_state and model_state == {}
    out = spec.bind(params)(images(), rng=jax.random.PRNGKey(0))
    assert out["fine_logits"].shape == (2, SIZE, SIZE, 4)


# --------------------------------------------------------------------------- heads
@pytest.mark.parametrize("backbone", ["vit_progressive", "unet"])
@pytest.mark.parametrize("prior_concat", [False, True])
def test_separate_norm_shares_the_background_logit(backbone, prior_concat):
    model = build_model(seg_config(**BACKBONES[backbone], separate_norm=True,
                                   prior_concat=prior_concat), rngs=nnx.Rngs(0))
    for rng in (None, jax.random.PRNGKey(3)):
        out = model(images(), rng=rng)
        np.testing.assert_array_equal(out["coarse_logits"][..., 0], out["fine_logits"][..., 0])
    head, width = model.seg_head, FEATURE_WIDTH[backbone]
    # Two separately normalised branches: foreground and background.
    assert head.foreground.norm is not head.background.norm
    assert head.foreground_logit.kernel.shape == (1, 1, width, 1)
    assert head.background_logit.kernel.shape == (1, 1, width, 1)
    assert head.fine.kernel.shape == (1, 1, width + int(prior_concat), 3)


@pytest.mark.parametrize("separate_norm", [False, True])
@pytest.mark.parametrize("prior_concat", [False, True])
def test_prior_concatenation_feeds_the_coarse_prediction_to_the_fine_classifier(
        separate_norm, prior_concat):
    """PC: the fine classifier sees features + the coarse logits (all of them; with SN,
    the foreground logit); moving only the coarse logits moves the fine ones."""
    model = build_model(seg_config(separate_norm=separate_norm, prior_concat=prior_concat),
                        rngs=nnx.Rngs(0))
    head = model.seg_head
    width = 8
    if separate_norm:
        assert head.fine.kernel.shape == (1, 1, width + int(prior_concat), 3)
        coarse_bias = head.foreground_logit.bias
    else:
        assert head.fine.kernel.shape == (1, 1, width + 2 * int(prior_concat), 4)
        coarse_bias = head.coarse.bias
    x = images()
    before = model(x)
    coarse_bias[...] = coarse_bias[...] + 5.0  # shifts the (foreground) coarse logit only
    after = model(x)
    assert not np.allclose(before["coarse_logits"], after["coarse_logits"])
    subclasses = slice(1, None) if separate_norm else slice(None)
    moved = not np.allclose(before["fine_logits"][..., subclasses],
                            after["fine_logits"][..., subclasses])
    assert moved == prior_concat


# --------------------------------------------------------------------------- scan
def _stacked(params):
    return param_tree.unflatten(param_tree.stack(param_tree.flatten(params)))


@pytest.mark.parametrize("decoder", ["progressive", "unetr"])
def test_scanned_encoder_matches_unrolled(decoder):
    """The taps come out of the scan: stacked (+ remat) layers give the unrolled outputs,
    in evaluation and in training (drop path keys per block, batch statistics)."""
    cfg = seg_config(decoder=decoder, drop_path_rate=0.2, taps=(1, 2, 3) if decoder == "unetr"
                     else None)
    spec, params, model_state = spec_and_variables(cfg)
    scan_spec = ModelSpec.from_config(seg_config(**{**cfg.to_dict(), "scan": True,
                                                    "remat": True}))
    unrolled = spec.bind(params, model_state)
    scanned = scan_spec.bind(_stacked(params), model_state)
    x = images()
    for rng in (None, jax.random.PRNGKey(7)):
        a, b = unrolled(x, rng=rng), scanned(x, rng=rng)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=2e-5, rtol=2e-5, err_msg=key)
    if decoder == "unetr":
        taps_a = unrolled.encoder.encode_with_taps(x, (1, 3))[1]
        taps_b = scanned.encoder.encode_with_taps(x, (1, 3))[1]
        for ta, tb in zip(taps_a, taps_b):
            np.testing.assert_allclose(ta, tb, atol=2e-5, rtol=2e-5)


def test_encoder_taps_are_the_block_outputs():
    model = build_model(seg_config(), rngs=nnx.Rngs(0))
    encoder = model.encoder
    x = images()
    tokens = encoder._with_class_token(encoder.embed_patches(x))
    expected = []
    for block in encoder.transformer.blocks:
        tokens = block(tokens)
        expected.append(tokens)
    out, taps = encoder.encode_with_taps(x, (2, 1, 3))
    np.testing.assert_array_equal(out, encoder(x))
    for tap, block_index in zip(taps, (1, 0, 2)):
        np.testing.assert_array_equal(tap, expected[block_index])
    with pytest.raises(ValueError, match="taps must be block numbers in 1..3"):
        encoder.encode_with_taps(x, (0, 3))


# --------------------------------------------------------------------------- batch norm
# Where each model's first batch norm is: module path, its conv, the norm.
FIRST_NORM = {"unet": ("unet", "down_blocks", 0, "conv1", "norm1"),
              "vit_progressive": ("seg_decoder", "stem_full", "conv", "norm"),
              "vit_unetr": ("seg_decoder", "image_block", "conv1", "norm1")}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_batch_norm_train_and_eval_through_the_model_spec(backbone):
    cfg = seg_config(**BACKBONES[backbone])
    spec, params, model_state = spec_and_variables(cfg)
    assert spec.has_model_state
    model_state = random_running_stats(model_state, 1)
    x = images(batch=4)

    # Evaluation (no rng): running averages, nothing updated, deterministic.
    model = spec.bind(params, model_state)
    first, second = model(x), model(x)
    jax.tree.map(np.testing.assert_array_equal, first, second)
    jax.tree.map(np.testing.assert_array_equal, ModelSpec.model_state(model), model_state)
    other_stats = spec.bind(params, random_running_stats(model_state, 2))(x)
    assert not np.allclose(first["fine_logits"], other_stats["fine_logits"])

    # Training (rng): batch statistics (the running ones do not matter) and an update.
    rng = jax.random.PRNGKey(5)
    model = spec.bind(params, model_state)
    train_out = model(x, rng=rng)
    updated = ModelSpec.model_state(model)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), updated, model_state)
    assert all(jax.tree.leaves(changed)), "every batch norm updates its running statistics"
    same = spec.bind(params, random_running_stats(model_state, 2))(x, rng=rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 train_out, same)
    assert not np.allclose(train_out["fine_logits"], first["fine_logits"])

    # The first norm's update is PyTorch's: 0.9 * running + 0.1 * batch mean / variance.
    *module_path, conv_name, norm_name = FIRST_NORM[backbone]
    layer, stats, new = spec.bind(params, model_state), model_state, updated
    for key in module_path:
        layer = layer[key] if isinstance(key, int) else getattr(layer, key)
        stats, new = stats[key], new[key]
    stats, new = stats[norm_name], new[norm_name]
    hidden = getattr(layer, conv_name)(x)
    hidden = np.asarray(hidden).reshape(-1, hidden.shape[-1])
    np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * hidden.mean(0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * hidden.var(0),
                               rtol=1e-4, atol=1e-5)


def test_unet_dropout_only_in_training():
    cfg = seg_config(backbone="unet")
    spec, params, model_state = spec_and_variables(cfg)
    x = images()
    out = lambda rng: spec.bind(params, model_state)(x, rng=rng)["fine_logits"]
    assert not np.allclose(out(jax.random.PRNGKey(0)), out(jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(out(jax.random.PRNGKey(0)), out(jax.random.PRNGKey(0)))
    no_dropout = ModelSpec.from_config(seg_config(backbone="unet", unet_dropout=0.0))
    a = no_dropout.bind(params, model_state)(x, rng=jax.random.PRNGKey(0))["fine_logits"]
    b = no_dropout.bind(params, model_state)(x, rng=jax.random.PRNGKey(1))["fine_logits"]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_gradients_reach_every_parameter(backbone):
    cfg = seg_config(**BACKBONES[backbone], separate_norm=True, prior_concat=True)
    spec, params, model_state = spec_and_variables(cfg)
    x = images(batch=4)
    labels = jax.random.randint(jax.random.PRNGKey(2), (4, SIZE, SIZE), 0, 4)

    def loss(p):
        out = spec.bind(p, model_state)(x, rng=jax.random.PRNGKey(0))
        fine = jax.nn.log_softmax(out["fine_logits"])
        coarse = jax.nn.log_softmax(out["coarse_logits"])
        return -(jnp.take_along_axis(fine, labels[..., None], -1).mean()
                 + jnp.take_along_axis(coarse, (labels > 0)[..., None].astype(jnp.int32),
                                       -1).mean())

    grads = param_tree.flatten(jax.jit(jax.grad(loss))(params))
    assert all(np.isfinite(g).all() for g in grads.values())
    dead = [name for name, g in grads.items() if not np.any(g)]
    assert not dead, dead


# --------------------------------------------------------------------------- parameters
def test_parameter_names_keep_the_encoder_subtree():
    for decoder in ("progressive", "unetr"):
        cfg = seg_config(decoder=decoder)
        params = ModelSpec.from_config(cfg).abstract_params
        flat = param_tree.flatten_leaves(nnx.to_pure_dict(params))
        assert {n.split("/")[0] for n in flat} == {"encoder", "seg_decoder", "seg_head"}
        assert param_tree.kind_of(flat) == "encoder"
        classifier = ModelSpec.from_config(
            ml_collections.ConfigDict({**cfg.to_dict(), "name": "vit_classifier",
                                       "num_classes": 3}))
        classifier_flat = param_tree.flatten_leaves(nnx.to_pure_dict(classifier.abstract_params))
        encoder = {n: v.shape for n, v in flat.items() if n.startswith("encoder/")}
        assert encoder == {n: v.shape for n, v in classifier_flat.items()
                           if n.startswith("encoder/")}
    unet_params = ModelSpec.from_config(seg_config(backbone="unet")).abstract_params
    assert set(nnx.to_pure_dict(unet_params)) == {"unet", "seg_head"}


@pytest.mark.parametrize("scan", [False, True])
def test_a_pretrained_encoder_loads_into_the_vit_segmenter(scan):
    mae_cfg = tiny_model_config(scales=(SIZE,), width=32, depth=3, num_heads=2, mlp_dim=64)
    mae_params = ModelSpec.from_config(mae_cfg).init_params(mae_cfg, jax.random.PRNGKey(3))
    cfg = seg_config(scan=scan, decoder="unetr")
    spec, params, _ = spec_and_variables(cfg)
    loaded, report = pretrained.apply_pretrained(params, mae_params)
    source = param_tree.unroll(param_tree.flatten(mae_params["encoder"]))
    target = param_tree.unroll(param_tree.flatten(loaded["encoder"]))
    assert source.keys() == target.keys()
    for name in source:
        np.testing.assert_array_equal(source[name], target[name], err_msg=name)
    assert report.missing and all(n.startswith(("seg_decoder/", "seg_head/"))
                                  for n in report.missing)
    assert any(n.startswith("decoders/") for n in report.unexpected)
    spec.bind(loaded, spec.init_variables(cfg, jax.random.PRNGKey(0))[1])(images())


def test_layerwise_lr_decay_scales_encoder_blocks_not_decoder_or_head():
    params = ModelSpec.from_config(seg_config(decoder="unetr")).init_params(
        seg_config(decoder="unetr"), jax.random.PRNGKey(0))
    scales = param_tree.flatten(optim.layerwise_lr_scales(params, 0.5))
    depth = 3
    for name, scale in scales.items():
        if name.startswith(("seg_decoder/", "seg_head/", "encoder/norm/")):
            assert scale == 1.0, name
        elif name.startswith("encoder/transformer/blocks/"):
            block = int(name.split("/")[3])
            assert scale == 0.5 ** (depth - block), name
        else:
            assert name.startswith("encoder/patch_embed/") or name == "encoder/cls_token", name
            assert scale == 0.5 ** (depth + 1), name


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, message", [
    (dict(decoder="unetr", taps=(1, 2)), "model.taps must be 3 block numbers"),
    (dict(decoder="unetr", taps=(1, 2, 2)), "the last = depth 3"),
    (dict(decoder="unetr", taps=(2, 1, 3)), "non-decreasing"),
    (dict(taps=(1, 2, 3)), "model.taps is read only by model.decoder='unetr'"),
    (dict(image_size=36), "not divisible by patch_size"),
    (dict(variant="Ti/12", image_size=36), "power-of-two patch size"),
    (dict(backbone="unet", image_size=40), "model.image_size 40 must be divisible by 16"),
    (dict(separate_norm=True, fine_to_coarse=(0, 1, 2, 2)), "exactly one superclass"),
    (dict(fine_to_coarse=(0, 1, 3)), "model.fine_to_coarse must give"),
    (dict(fine_to_coarse=(0, 1, 1, 1), num_fine=3), "model.num_fine=3 disagrees"),
    (dict(fine_to_coarse=None), "model.num_fine must be an integer >= 2"),
    (dict(decoder_widths=(32, 16)), "model.decoder_widths must be 3 positive integers"),
    (dict(decoder="linear"), "model.decoder must be one of"),
    (dict(backbone="resnet"), "model.backbone must be one of"),
    (dict(norm="group"), "model.norm must be one of"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_config(seg_config(**overrides))


def test_default_taps_and_widths():
    assert dense_decoder.default_taps(12, 16) == (3, 6, 9, 12)
    assert dense_decoder.default_taps(24, 16) == (6, 12, 18, 24)
    assert dense_decoder.default_widths(16) == (128, 64, 32, 16)
    assert dense_decoder.default_widths(8) == (64, 32, 16)


# --------------------------------------------------------------------------- references
def test_bilinear_upsampling_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    ours = np.asarray(conv_blocks.upsample_bilinear(jnp.asarray(x)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          scale_factor=2, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def _torch_unet_reference(params, stats, x, *, separate_norm, prior_concat, training):
    """The reference code's UNetSingleBranchNetwork + UnetC2FOutput forward (NCHW),
    written with torch functionals on our parameters (dropout off)."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.array(a, np.float32))

    def conv(h, p):
        kernel = t(p["kernel"]).permute(3, 2, 0, 1)
        return F.conv2d(h, kernel, t(p["bias"]), padding=kernel.shape[-1] // 2)

    def bn(h, p, s):
        return F.batch_norm(h, t(s["mean"]), t(s["var"]), t(p["scale"]), t(p["bias"]),
                            training=training, momentum=0.1, eps=1e-5)

    def unet_conv(h, p, s):  # UnetConv; conv2 bare in the last block under SN
        h = F.relu(bn(conv(h, p["conv1"]), p["norm1"], s["norm1"]))
        h = conv(h, p["conv2"])
        return F.relu(bn(h, p["norm2"], s["norm2"])) if "norm2" in p else h

    u, us = params["unet"], stats["unet"]
    h = t(x).permute(0, 3, 1, 2)
    skips = []
    for level in range(4):
        h = unet_conv(h, u["down_blocks"][level], us["down_blocks"][level])
        skips.append(h)
        h = F.max_pool2d(h, 2)
    h = unet_conv(h, u["center"], us["center"])
    for i, skip in enumerate(reversed(skips)):  # deepest first
        up = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        h = unet_conv(torch.cat([skip, up], 1), u["up_blocks"][i], us["up_blocks"][i])

    hp, hs = params["seg_head"], stats["seg_head"]
    branch = lambda h, p, s: F.relu(conv(F.relu(bn(h, p["norm"], s["norm"])), p["conv"]))
    if separate_norm:
        fg = branch(h, hp["foreground"], hs["foreground"])
        fg_logit = conv(fg, hp["foreground_logit"])
        bg_logit = conv(branch(h, hp["background"], hs["background"]), hp["background_logit"])
        fine = conv(torch.cat([fg, fg_logit], 1) if prior_concat else fg, hp["fine"])
        coarse, fine = torch.cat([bg_logit, fg_logit], 1), torch.cat([bg_logit, fine], 1)
    else:
        h = branch(h, hp["branch"], hs["branch"])
        coarse = conv(h, hp["coarse"])
        fine = conv(torch.cat([h, coarse], 1) if prior_concat else h, hp["fine"])
    to_nhwc = lambda a: a.permute(0, 2, 3, 1).detach().numpy()
    return {"coarse_logits": to_nhwc(coarse), "fine_logits": to_nhwc(fine)}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_unet_and_heads_match_the_reference_wiring(head):
    pytest.importorskip("torch")
    cfg = seg_config(backbone="unet", unet_dropout=0.0, **HEADS[head])
    spec, params, model_state = spec_and_variables(cfg)
    params = perturbed(params, 1)
    model_state = random_running_stats(model_state, 2)
    x = np.asarray(images(batch=3))
    for training in (False, True):
        rng = jax.random.PRNGKey(0) if training else None
        ours = spec.bind(params, model_state)(jnp.asarray(x), rng=rng)
        ref = _torch_unet_reference(jax.device_get(params), jax.device_get(model_state), x,
                                    training=training, **{k: bool(v) for k, v in {
                                        "separate_norm": cfg.separate_norm,
                                        "prior_concat": cfg.prior_concat}.items()})
        for key in ours:
            np.testing.assert_allclose(ours[key], ref[key], atol=2e-4, rtol=2e-4,
                                       err_msg=f"{key} training={training}")


def test_unetr_decoder_matches_monai_blocks():
    """Our UNETR decoder (patch 16: 4 stages, taps 3, 6, 9 + final) against MONAI's
    UnetrBasicBlock / UnetrPrUpBlock / UnetrUpBlock wired as MONAI's UNETR.forward,
    with the same weights and batch-norm statistics, in training and evaluation."""
    torch = pytest.importorskip("torch")
    blocks = pytest.importorskip("monai.networks.blocks.unetr_block")
    token_width, channels, widths, grid = 24, 1, (32, 16, 8, 4), 2
    size = grid * 16
    decoder = dense_decoder.UnetrDecoder(
        token_width=token_width, image_channels=channels, patch_size=16, widths=widths,
        taps=(3, 6, 9, 12), norm="batch", dtype=jnp.float32, rngs=nnx.Rngs(0))
    param_state, stat_state = nnx.state(decoder, nnx.Param), nnx.state(decoder, nnx.BatchStat)
    params = perturbed(nnx.to_pure_dict(param_state), 1)
    stats = random_running_stats(nnx.to_pure_dict(stat_state), 2)
    nnx.replace_by_pure_dict(param_state, params)
    nnx.replace_by_pure_dict(stat_state, stats)
    nnx.update(decoder, param_state, stat_state)

    common = dict(spatial_dims=2, norm_name="batch", res_block=True)
    pr_up = lambda width, layers: blocks.UnetrPrUpBlock(
        in_channels=token_width, out_channels=width, num_layer=layers, kernel_size=3, stride=1,
        upsample_kernel_size=2, conv_block=True, **common)
    up = lambda cin, cout: blocks.UnetrUpBlock(in_channels=cin, out_channels=cout,
                                               kernel_size=3, upsample_kernel_size=2, **common)
    monai = torch.nn.ModuleDict(dict(
        encoder1=blocks.UnetrBasicBlock(in_channels=channels, out_channels=widths[3],
                                        kernel_size=3, stride=1, **common),
        encoder2=pr_up(widths[2], 2), encoder3=pr_up(widths[1], 1), encoder4=pr_up(widths[0], 0),
        decoder5=up(token_width, widths[0]), decoder4=up(widths[0], widths[1]),
        decoder3=up(widths[1], widths[2]), decoder2=up(widths[2], widths[3])))

    weights = {}
    conv_w = lambda k: np.asarray(k).transpose(3, 2, 0, 1)
    up_w = lambda k: np.asarray(k)[::-1, ::-1].transpose(2, 3, 0, 1)

    def res_block(prefix, p, s):
        for ours, theirs in (("conv1", "conv1"), ("conv2", "conv2"), ("proj", "conv3")):
            if ours in p:
                weights[f"{prefix}.{theirs}.conv.weight"] = conv_w(p[ours]["kernel"])
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("proj_norm", "norm3")):
            if ours in p:
                weights[f"{prefix}.{theirs}.weight"] = p[ours]["scale"]
                weights[f"{prefix}.{theirs}.bias"] = p[ours]["bias"]
                weights[f"{prefix}.{theirs}.running_mean"] = s[ours]["mean"]
                weights[f"{prefix}.{theirs}.running_var"] = s[ours]["var"]

    res_block("encoder1.layer", params["image_block"], stats["image_block"])
    for k in range(3):
        p, name = params["skip_blocks"][k], f"encoder{k + 2}"
        s = stats["skip_blocks"].get(k, {})  # the deepest skip has no norm
        weights[f"{name}.transp_conv_init.conv.weight"] = up_w(p["first"]["kernel"])
        for i in range(2 - k):  # MONAI's num_layer: 2, 1, 0
            weights[f"{name}.blocks.{i}.0.conv.weight"] = up_w(p["ups"][i]["kernel"])
            res_block(f"{name}.blocks.{i}.1", p["blocks"][i], s["blocks"][i])
    for j in range(4):
        p, s, name = params["up_blocks"][j], stats["up_blocks"][j], f"decoder{5 - j}"
        weights[f"{name}.transp_conv.conv.weight"] = up_w(p["up"]["kernel"])
        res_block(f"{name}.conv_block", p["block"], s["block"])
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
    missing, unexpected = monai.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), missing

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, size, size, channels)).astype(np.float32)
    grids = [rng.normal(size=(2, grid, grid, token_width)).astype(np.float32)
             for _ in range(4)]
    for training in (False, True):  # evaluation first: training updates the statistics
        ours = decoder(jnp.asarray(image), [jnp.asarray(g) for g in grids], training)
        monai.train(training)
        nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
        with torch.no_grad():
            enc = [monai[f"encoder{k + 2}"](nchw(grids[k])) for k in range(3)]
            h = monai["decoder5"](nchw(grids[3]), enc[2])
            h = monai["decoder4"](h, enc[1])
            h = monai["decoder3"](h, enc[0])
            h = monai["decoder2"](h, monai["encoder1"](nchw(image)))
        np.testing.assert_allclose(np.asarray(ours), h.permute(0, 2, 3, 1).numpy(), atol=2e-4,
                                   rtol=2e-4, err_msg=f"training={training}")
