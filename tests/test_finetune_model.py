"""Fine-tuning building blocks: heads, classifier, drop path, loading a pretrained
encoder from a real demo checkpoint, and layer-wise lr decay."""

import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mimjax import optim, pretrained
from mimjax.models import build_model, heads, param_tree, vit
from mimjax.models.spec import ModelSpec

from helpers import start_main, tiny_model_config


def classifier_config(**overrides) -> ml_collections.ConfigDict:
    """The tiny demo's encoder (width 64, 2 blocks, Ti/8 at 32 px) with a head."""
    cfg = tiny_model_config(name="vit_classifier", head="gap", num_classes=5, drop_path_rate=0.0)
    del cfg.scales, cfg.decoder
    cfg.update(overrides)
    return cfg


def _init(cfg, seed=0) -> dict:
    return nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def init_params(cfg, seed=0) -> dict:
    return _init(cfg, seed)  # eager: op-by-op compiles are shared across the tiny models


def abstract_params(cfg) -> dict:
    """Shapes and dtypes only: enough for apply_pretrained's checks, no compute."""
    return jax.eval_shape(lambda: _init(cfg))


def bind(cfg, params):
    return ModelSpec.from_config(cfg).bind(params)


def flat(tree) -> dict:
    return param_tree.flatten_leaves(tree)


def images(channels=1, size=32, batch=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, channels))


# --------------------------------------------------------------------------- heads
@pytest.mark.parametrize(
    "head,dtype", [("cls", "float32"), ("gap", "float32"), ("map", "bfloat16")]
)
def test_heads_give_f32_logits_and_pooled_features(head, dtype):
    model = build_model(classifier_config(head=head, dtype=dtype), rngs=nnx.Rngs(0))
    logits = model(images())
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert model.features(images()).shape == (2, 64)
    # MAE's head init (std 2e-5): near-zero logits, so the loss starts at log(classes).
    assert float(jnp.abs(logits).max()) < 1e-2
    kernel = model.head.fc.kernel[...]
    assert 0 < float(jnp.std(kernel)) < 1e-4
    zero = build_model(classifier_config(head=head, head_init_std=0.0), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(zero(images()), 0.0)


def test_gap_pools_patch_tokens_only():
    encoder_cfg = vit.vit_config_from(classifier_config())
    head = heads.GapHead(encoder_cfg, 5, rngs=nnx.Rngs(0))
    tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 64))
    other_cls = tokens.at[:, 0].set(100.0)
    np.testing.assert_array_equal(head(tokens), head(other_cls))
    np.testing.assert_allclose(
        head.pool(tokens), head.fc_norm(tokens[:, 1:].mean(axis=1)), rtol=1e-6, atol=1e-6
    )
    assert float(jnp.abs(head(tokens.at[:, 3].add(1.0)) - head(tokens)).max()) > 0


def test_cls_head_reads_the_class_token_and_needs_one():
    encoder_cfg = vit.vit_config_from(classifier_config())
    head = heads.ClsTokenHead(encoder_cfg, 5, init_std=0.1, rngs=nnx.Rngs(0))
    tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 64))
    np.testing.assert_array_equal(head(tokens), head(tokens.at[:, 1:].set(0.0)))
    with pytest.raises(ValueError, match="needs an encoder with a class token"):
        build_model(classifier_config(head="cls", class_token=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown head"):
        build_model(classifier_config(head="avg"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        build_model(classifier_config(num_classes=None), rngs=nnx.Rngs(0))


def test_map_pooling_is_permutation_invariant():
    encoder_cfg = vit.vit_config_from(classifier_config())
    head = heads.MapHead(encoder_cfg, 5, init_std=0.1, rngs=nnx.Rngs(0))
    tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 64))
    order = np.random.default_rng(0).permutation(17)
    np.testing.assert_allclose(head(tokens), head(tokens[:, order]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(head(tokens) - head(tokens.at[:, 5].add(3.0))).max()) > 1e-4


# --------------------------------------------------------------------------- drop path
def test_drop_path_zero_changes_nothing():
    model = build_model(classifier_config(head="map", drop_path_rate=0.0), rngs=nnx.Rngs(0))
    x = images()
    np.testing.assert_array_equal(model(x), model(x, jax.random.PRNGKey(1)))
    block = model.encoder.transformer.blocks[0]
    tokens = jax.random.normal(jax.random.PRNGKey(2), (2, 17, 64))
    np.testing.assert_array_equal(block(tokens), block(tokens, jax.random.PRNGKey(3), 0.0))


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_acts_in_training_only(scan):
    plain = build_model(classifier_config(scan=scan, remat=scan), rngs=nnx.Rngs(0))
    dropped = build_model(
        classifier_config(scan=scan, remat=scan, drop_path_rate=0.5), rngs=nnx.Rngs(0)
    )
    key = jax.random.PRNGKey

    def outputs(plain, dropped, x):
        return (
            plain.encoder(x),
            dropped.encoder(x),
            dropped.encoder(x, key(1)),
            dropped.encoder(x, key(1)),
            dropped.encoder(x, key(2)),
        )

    if scan:  # one compile instead of one per eager call; plus the trainer's path:
        outputs = nnx.jit(outputs)  # gradients through scan + remat + per-layer keys
        grads = nnx.jit(jax.grad(lambda m, x: m(x, key(1)).sum()))(dropped, images(batch=8))
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
    eval_plain, eval_dropped, train_a, train_a_again, train_b = outputs(
        plain, dropped, images(batch=8)
    )
    np.testing.assert_array_equal(eval_dropped, eval_plain)  # eval: no rng, no drop path
    assert float(jnp.abs(train_a - eval_plain).max()) > 1e-3
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3
    np.testing.assert_array_equal(train_a, train_a_again)


def test_drop_path_schedule_and_scaling():
    cfg = vit.vit_config_from(classifier_config(depth=4, drop_path_rate=0.3)).transformer
    np.testing.assert_allclose(cfg.drop_path_rates(), [0.0, 0.1, 0.2, 0.3], rtol=1e-6)
    out = vit.drop_path(jnp.ones((4000, 3, 2)), jax.random.PRNGKey(0), 0.25)
    per_example = np.asarray(out[:, 0, 0])
    np.testing.assert_array_equal(np.unique(out), np.float32([0.0, 4 / 3]))
    assert (np.asarray(out) == per_example[:, None, None]).all()  # whole example at once
    assert abs(per_example.mean() - 1.0) < 0.05  # expectation preserved
    with pytest.raises(ValueError, match="drop_path_rate"):
        vit.vit_config_from(classifier_config(drop_path_rate=1.0))


# ------------------------------------------------------------ pretrained: transfer
def test_learned_posemb_resampled_to_a_larger_grid():
    source = init_params(classifier_config(posemb="learn"))
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    ramp = (rows + 2 * cols)[..., None] * np.linspace(-1, 1, 64)  # linear over the grid
    source["encoder"]["pos_embedding"] = ramp.reshape(1, 16, 64).astype(np.float32)
    target = init_params(classifier_config(posemb="learn", image_size=64), seed=1)
    loaded, report = pretrained.apply_pretrained(target, source)
    table = np.asarray(loaded["encoder"]["pos_embedding"])
    assert table.shape == (1, 64, 64)
    assert any("pos_embedding: resampled 16 -> 64" in a for a in report.adapted)
    grid = table.reshape(8, 8, 64)
    # Half-pixel centres: new cell (i, j) sits at old coordinate (i - 0.5) / 2. Bicubic
    # reproduces a linear ramp exactly where its 4x4 support lies inside the grid ...
    r, c = np.meshgrid((np.arange(8) - 0.5) / 2, (np.arange(8) - 0.5) / 2, indexing="ij")
    expected = (r + 2 * c)[..., None] * np.linspace(-1, 1, 64)
    np.testing.assert_allclose(grid[3:5, 3:5], expected[3:5, 3:5], atol=1e-4)
    # ... and keeps the corners close to the source's corners.
    source_grid = ramp.reshape(4, 4, 64)
    for (i, j), (k, m) in {(0, 0): (0, 0), (0, 7): (0, 3), (7, 0): (3, 0), (7, 7): (3, 3)}.items():
        np.testing.assert_allclose(grid[i, j], source_grid[k, m], atol=0.5)

    same, report = pretrained.apply_pretrained(
        init_params(classifier_config(posemb="learn")), source
    )
    np.testing.assert_array_equal(
        same["encoder"]["pos_embedding"], source["encoder"]["pos_embedding"]
    )
    assert report.adapted == []


def test_sincos_checkpoint_into_learned_posemb_starts_from_the_table():
    source = init_params(classifier_config())
    loaded, report = pretrained.apply_pretrained(
        init_params(classifier_config(posemb="learn")), source
    )
    np.testing.assert_array_equal(
        loaded["encoder"]["pos_embedding"][0], vit.sincos_posemb_2d(64, 4)
    )
    assert all(n.startswith("head/") for n in report.missing)
    assert any("sin-cos" in a for a in report.adapted)


@pytest.mark.parametrize(
    "source_channels,target_channels,known",
    # without the model's channel count only gray <-> RGB is assumed
    [(1, 3, False), (3, 1, False), (3, 1, True), (1, 4, True), (1, 6, True)],
)
def test_patch_embedding_channel_adaptation(source_channels, target_channels, known):
    source_cfg = classifier_config(channels=source_channels)
    target_cfg = classifier_config(channels=target_channels)
    source = init_params(source_cfg)
    loaded, report = pretrained.apply_pretrained(
        init_params(target_cfg, seed=1), source,
        target_channels=target_channels if known else None)
    assert f"{source_channels} -> {target_channels} input channels" in " ".join(report.adapted)
    gray = images(channels=1)
    as_input = lambda channels: jnp.repeat(gray, channels, axis=-1)
    source_model, target_model = bind(source_cfg, source), bind(target_cfg, loaded)
    # A gray image replicated to RGB gives the same patch embedding and features.
    np.testing.assert_allclose(
        target_model.encoder.embed_patches(as_input(target_channels)),
        source_model.encoder.embed_patches(as_input(source_channels)),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        target_model.encoder(as_input(target_channels)),
        source_model.encoder(as_input(source_channels)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_unrolled_checkpoint_into_scanned_model():
    source = init_params(classifier_config())
    target = init_params(classifier_config(scan=True), seed=1)
    loaded, report = pretrained.apply_pretrained(target, source["encoder"])
    stacked = loaded["encoder"]["transformer"]["blocks"]["mlp"]["fc1"]["kernel"]
    blocks = source["encoder"]["transformer"]["blocks"]
    np.testing.assert_array_equal(
        stacked, np.stack([blocks[i]["mlp"]["fc1"]["kernel"] for i in range(2)])
    )
    assert report.unexpected == [] and all(n.startswith("head/") for n in report.missing)
    back, _ = pretrained.apply_pretrained(init_params(classifier_config(), seed=2), loaded)
    for name, value in flat(source).items():
        if name.startswith("encoder/"):
            np.testing.assert_array_equal(flat(back)[name], value)


def test_shape_mismatch_names_the_parameter_and_the_cause():
    source = init_params(classifier_config())
    wider = classifier_config(width=128, mlp_dim=256)
    with pytest.raises(
        ValueError,
        match=r"'encoder/.*'.*\(1, 1, 64\) vs .*\(1, 1, 128\).*"
        r"width 64 vs 128: a different model variant",
    ):
        pretrained.apply_pretrained(abstract_params(wider), source)
    with pytest.raises(ValueError, match=r"'encoder/transformer/blocks/0/mlp/fc1/\w+'.*MLP size"):
        pretrained.apply_pretrained(abstract_params(classifier_config(mlp_dim=256)), source)
    with pytest.raises(ValueError, match="'encoder/patch_embed/kernel'.*patch size"):
        pretrained.apply_pretrained(
            abstract_params(classifier_config(variant="Ti/4")), source, target_channels=1)
    with pytest.raises(ValueError, match="2 blocks, the model 3"):
        pretrained.apply_pretrained(abstract_params(classifier_config(depth=3)), source)


# --------------------------------------------------------------------------- lr decay
def _optimizer(**overrides):
    opt_cfg = ml_collections.ConfigDict(
        {
            "base_lr": 1e-3,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.05,
            "grad_clip_norm": None,
        }
    )
    opt_cfg.update(overrides)
    return optim.make_optimizer(opt_cfg, optax.constant_schedule(1e-3))


def test_layerwise_lr_decay_scales_each_update():
    params = init_params(classifier_config(head="map", posemb="learn"))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    plain_tx, decay_tx = _optimizer(), _optimizer(layer_decay=0.5, head_lr_mult=10.0)

    @jax.jit
    def updates(params, grads):
        first_update = lambda tx, g: tx.update(g, tx.init(params), params)[0]
        zeros = jax.tree.map(jnp.zeros_like, grads)  # update = weight decay alone
        return (
            first_update(plain_tx, grads),
            first_update(decay_tx, grads),
            first_update(decay_tx, zeros),
        )

    plain, decayed, decay_only = map(flat, updates(params, grads))
    # depth L = 2: block i at 0.5**(2 - i), embeddings 0.5**3, final norm 1, head 10.
    for name, update in plain.items():
        if name.startswith("encoder/transformer/blocks/"):
            expected = update * np.float32(0.5 ** (2 - int(name.split("/")[3])))
        elif name.startswith(("encoder/patch_embed", "encoder/pos_embedding", "encoder/cls_token")):
            expected = update * np.float32(0.125)
        elif name.startswith("head/"):  # x10 is inexact in binary: fusion may round differently
            np.testing.assert_allclose(decayed[name], update * 10, rtol=1e-6, err_msg=name)
            continue
        else:
            assert name.startswith("encoder/norm/"), name
            expected = update
        np.testing.assert_array_equal(decayed[name], expected, err_msg=name)
    # Weight decay is scaled too, as MAE's per-group lr_scale scales it.
    kernel = "encoder/transformer/blocks/0/mlp/fc1/kernel"
    np.testing.assert_allclose(
        decay_only[kernel], -1e-3 * 0.05 * 0.25 * flat(params)[kernel], rtol=1e-6
    )
    for name in ("encoder/norm/scale", "head/probe"):  # not weight-decayed
        np.testing.assert_array_equal(decay_only[name], 0.0)


def test_layerwise_lr_decay_per_slice_for_stacked_blocks():
    unrolled = flat(optim.layerwise_lr_scales(abstract_params(classifier_config()), 0.5, 10.0))
    stacked_params = abstract_params(classifier_config(scan=True))
    stacked = flat(optim.layerwise_lr_scales(stacked_params, 0.5, 10.0))
    for name, scale in stacked.items():
        if "/blocks/" in name:
            head, rest = name.split("/blocks/")
            per_layer = [unrolled[f"{head}/blocks/{i}/{rest}"] for i in range(2)]
            assert scale.shape == (2,) + (1,) * (flat(stacked_params)[name].ndim - 1)
            np.testing.assert_array_equal(scale.reshape(-1), per_layer)
        else:
            assert scale == unrolled[name], name
    grads = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), stacked_params)
    scaled, _ = optim.scale_by_layerwise_lr(0.5, 10.0).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(
        flat(scaled)["encoder/transformer/blocks/attn/query/bias"], [[0.25] * 64, [0.5] * 64]
    )


def test_layerwise_lr_decay_defaults_and_errors():
    params = init_params(classifier_config())
    tx = _optimizer()
    reference = optax.chain(
        optax.adamw(optax.constant_schedule(1e-3), weight_decay=0.05, mask=optim.decay_mask)
    )
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
        reference.init(params)
    )  # no extra state by default
    scales = optim.layerwise_lr_scales(params, None, head_lr_mult=3.0)
    assert flat(scales)["head/fc/kernel"] == 3.0 and flat(scales)["encoder/cls_token"] == 1.0
    with pytest.raises(ValueError, match="needs the encoder's blocks"):
        optim.layerwise_lr_scales({"w": np.zeros((2, 2))}, 0.75)
    with pytest.raises(ValueError, match="layer_decay must be in"):
        optim.layerwise_lr_scales(params, 1.5)


# ------------------------------------------ pretrained: a real checkpoint (last: waits)
@pytest.fixture(scope="module", autouse=True)
def _demo_pretraining(tmp_path_factory):
    """Starts the tiny demo pretraining (2 steps, one CPU device) in a subprocess when
    this module starts, so it runs beside the in-process tests; `demo_workdir` waits."""
    root = tmp_path_factory.mktemp("pretrain")
    overrides = [f"--config.data.dir={root / 'data'}", "--config.total_steps=2",
                 "--config.warmup_steps=1", "--config.checkpoint_every=1",
                 "--config.figure_every=1000"]
    with open(root / "log.txt", "w") as log:
        proc = start_main("configs/demo.py:tiny", root / "work", *overrides, stdout=log,
                          stderr=subprocess.STDOUT)
        yield proc, root
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def demo_workdir(_demo_pretraining):
    """A real pretraining checkpoint (steps 1 and 2) written by main.py."""
    proc, root = _demo_pretraining
    returncode = proc.wait(timeout=600)
    assert returncode == 0, (root / "log.txt").read_text()[-4000:]
    return root / "work"


def _checkpoint_params(workdir, step):
    """The checkpoint's params by an independent route: a full orbax restore."""
    state = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return jax.tree.map(np.asarray, state["params"])


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_load_encoder_from_demo_checkpoint(demo_workdir):
    params, info = pretrained.load_pretrained_params(demo_workdir)
    assert info["step"] == 2 and info["subtree"] == "params"
    reference = _checkpoint_params(demo_workdir, 2)
    assert flat(params).keys() == flat(reference).keys()
    for name, value in flat(reference).items():
        np.testing.assert_array_equal(flat(params)[name], value, err_msg=name)

    target = init_params(classifier_config(head="gap"))
    loaded, report = pretrained.apply_pretrained(target, params)
    encoder_names = {n for n in flat(reference) if n.startswith("encoder/")}
    assert set(report.loaded) == encoder_names
    assert set(report.unexpected) == {n for n in flat(reference) if n.startswith("decoders/")}
    assert set(report.missing) == {
        "head/fc/kernel",
        "head/fc/bias",
        "head/fc_norm/scale",
        "head/fc_norm/bias",
    }
    for name in encoder_names:
        np.testing.assert_array_equal(flat(loaded)[name], flat(reference)[name], err_msg=name)
    for name in report.missing:
        np.testing.assert_array_equal(flat(loaded)[name], flat(target)[name])
    assert "decoders/0/mask_token" in report.summary(max_names=100)

    # The classifier's encoder then computes what the pretrained MAE encoder computes.
    mae = bind(tiny_model_config(), params)
    classifier = bind(classifier_config(head="gap"), loaded)
    np.testing.assert_array_equal(classifier.encoder(images()), mae.encoder(images()))


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_load_by_step_and_encoder_only(demo_workdir):
    encoder, info = pretrained.load_encoder_params(demo_workdir / "checkpoints", step=1)
    reference = _checkpoint_params(demo_workdir, 1)["encoder"]
    np.testing.assert_array_equal(
        encoder["patch_embed"]["kernel"], reference["patch_embed"]["kernel"]
    )
    assert "decoders/1/pred/kernel" in info["dropped"]
    _, report = pretrained.apply_pretrained(init_params(classifier_config()), encoder)
    assert report.unexpected == [] and len(report.loaded) == len(flat(reference))
    with pytest.raises(ValueError, match=r"No checkpoint for step 7 .* available: \[1, 2\]"):
        pretrained.load_pretrained_params(demo_workdir, step=7)
    with pytest.raises(ValueError, match="ema_params"):
        pretrained.load_pretrained_params(demo_workdir, use_ema=True)
    with pytest.raises(FileNotFoundError, match="No mimjax checkpoints"):
        pretrained.load_pretrained_params(demo_workdir / "figures")
