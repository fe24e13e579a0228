"""Export to Hugging Face transformers: ViTModel / ViTMAEForPreTraining /
ViTForImageClassification load the exported directory offline and compute what mimjax
computes (max abs difference <= 1e-4 in float32) on tiny random models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx

from mimjax import inference
from mimjax.export import convert
from mimjax.models import vit
from mimjax.objectives import masked_reconstruction

from export_fixtures import (
    Parity,
    bind,
    exported_workdir,
    images,
    nchw,
    tiny_config,
    write_workdir,
)

PARITY = Parity("HF parity")
_report = PARITY.report_fixture()


def _compare_encoder(case, hf_dir, workdir, x):
    """ViTModel.from_pretrained(hf_dir) against the workdir's encoder on images `x`:
    records the tokens' max abs difference; returns (HF tokens, mimjax tokens)."""
    model = transformers.ViTModel.from_pretrained(str(hf_dir), add_pooling_layer=False)
    with torch.no_grad():
        hf_tokens = model(nchw(x)).last_hidden_state.numpy()
    ours = inference.Encoder.from_workdir(str(workdir))(x).tokens
    PARITY.record(case, np.abs(hf_tokens - ours).max())
    return hf_tokens, ours


@pytest.fixture(scope="module")
def miram(tmp_path_factory):
    """A MIRAM workdir (16 -> 32 px, 1 channel) and its HF export."""
    root = tmp_path_factory.mktemp("miram")
    config = tiny_config(scales=(16, 32))
    params, record = exported_workdir(root, config, "hf")
    return config, params, root, record


@pytest.mark.parametrize(
    "settings",
    [
        {"channels": 1},
        {
            "channels": 3,
            "posemb": "learn",
            "gelu_approximate": False,
            "layer_norm_eps": 1e-5,
            "scan": True,
        },
    ],
    ids=["1ch-sincos-tanh", "3ch-learned-exact-scan"],
)
def test_vit_model_features_match(tmp_path, settings):
    config = tiny_config(scales=(16,), **settings)
    exported_workdir(tmp_path, config, "hf")
    hf_config = json.loads(Path(tmp_path / "hf" / "config.json").read_text())
    assert hf_config["hidden_act"] == (
        "gelu_pytorch_tanh" if config.model.gelu_approximate else "gelu"
    )
    assert hf_config["layer_norm_eps"] == config.model.layer_norm_eps
    assert hf_config["num_channels"] == settings["channels"]
    x = images(3, settings["channels"])
    hf_tokens, ours = _compare_encoder(f"ViTModel {settings}", tmp_path / "hf", tmp_path / "run", x)
    assert hf_tokens.shape == ours.shape == (3, 17, 32)


def test_mae_logits_mask_and_loss_match(miram):
    config, params, root, record = miram
    assert record["hf_class"] == "ViTMAEForPreTraining"
    model = transformers.ViTMAEForPreTraining.from_pretrained(str(root / "hf"))
    assert model.config.mask_ratio == 0.75 and model.config.norm_pix_loss is True
    assert model.config.hidden_act == "gelu_pytorch_tanh" and model.config.layer_norm_eps == 1e-6
    x = images(4, 1, seed=3)
    noise = np.random.default_rng(7).uniform(size=(4, 16)).astype(np.float32)
    with torch.no_grad():
        out = model(nchw(x), noise=torch.from_numpy(noise))

    ours = bind(config, params)

    def run(model, x, noise):
        preds, info = model(x, noise, 0.75)
        return preds[16], info.mask

    pred, mask = nnx.jit(run)(ours, x, noise)
    target = masked_reconstruction.patch_targets(x, 4, norm_pix_loss=True)
    loss = masked_reconstruction.masked_mse(pred, target, mask)
    np.testing.assert_array_equal(out.mask.numpy(), np.asarray(mask))
    PARITY.record("ViTMAE logits (MIRAM base scale)", np.abs(out.logits.numpy() - pred).max())
    PARITY.record("ViTMAE loss", abs(float(out.loss) - float(loss)))


def test_mae_position_tables_survive_loading_and_equal_hf_sincos(miram):
    _config, _, root, _ = miram
    loaded = transformers.ViTMAEForPreTraining.from_pretrained(str(root / "hf"))
    enc = loaded.vit.embeddings.position_embeddings.detach().numpy()[0]
    dec = loaded.decoder.decoder_pos_embed.detach().numpy()[0]
    # The exported values are mimjax's own table, kept by from_pretrained ...
    np.testing.assert_array_equal(enc[1:], vit.sincos_posemb_2d(32, 4))
    np.testing.assert_array_equal(dec[1:], vit.sincos_posemb_2d(16, 4))
    assert not enc[0].any() and not dec[0].any()
    # ... and HF's own sin-cos builders give the same layout. (A ViTMAE built from its
    # config in transformers 5.23 leaves both tables at zero -- the encoder's builder
    # is skipped once the patch projection is initialised, the decoder's is zeroed by
    # _init_weights -- so the values must come from the file, as they do.)
    fresh = transformers.ViTMAEForPreTraining(loaded.config)
    fresh.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    fresh.vit.embeddings.initialize_weights()
    fresh.decoder.initialize_weights(16)
    np.testing.assert_allclose(
        fresh.vit.embeddings.position_embeddings.detach().numpy()[0], enc, atol=1e-6
    )
    np.testing.assert_allclose(fresh.decoder.decoder_pos_embed.detach().numpy()[0], dec, atol=1e-6)


def test_mae_export_loads_as_an_encoder(miram):
    _, _, root, _ = miram
    _compare_encoder(
        "ViTModel from the MAE export", root / "hf", root / "run", images(2, 1, seed=5)
    )


def test_classifier_logits_match(tmp_path):
    config = tiny_config("vit_classifier", head="cls", channels=3)
    exported_workdir(tmp_path, config, "hf")
    model = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"))
    assert model.config.id2label == {0: "benign", 1: "malignant", 2: "normal"}
    assert model.config.problem_type == "single_label_classification"
    x = images(3, 3, seed=2)
    with torch.no_grad():
        logits = model(nchw(x)).logits.numpy()
    ours = inference.Encoder.from_workdir(str(tmp_path / "run"))(x).logits
    PARITY.record("ViTForImageClassification logits", np.abs(logits - ours).max())


def test_what_hf_cannot_express_is_refused_with_the_fix(tmp_path):
    write_workdir(tmp_path / "nocls", tiny_config(scales=(16,), class_token=False))
    with pytest.raises(ValueError, match="class_token=False.*--format timm"):
        convert.export_checkpoint(str(tmp_path / "nocls"), str(tmp_path / "a"), "hf")
    write_workdir(tmp_path / "gap", tiny_config("vit_classifier", head="gap"))
    with pytest.raises(ValueError, match="model.head='gap'.*--encoder-only"):
        convert.export_checkpoint(str(tmp_path / "gap"), str(tmp_path / "b"), "hf")
    # the fix the message names works: the encoder alone
    convert.export_checkpoint(str(tmp_path / "gap"), str(tmp_path / "b"), "hf", encoder_only=True)
    case = "ViTModel --encoder-only of a gap classifier"
    _compare_encoder(case, tmp_path / "b", tmp_path / "gap", images(2))


def test_export_holds_no_data_settings_or_paths(miram):
    _, _, root, record = miram
    run_dir = str(root / "run")
    for name in os.listdir(root / "hf"):
        content = (root / "hf" / name).read_bytes()
        assert run_dir.encode() not in content and b"/secret/patient_data" not in content, name
    assert set(record) == {
        "exported_by",
        "format",
        "kind",
        "step",
        "model",
        "preprocessing",
        "objective",
        "hf_class",
    }
    assert record["preprocessing"]["norm_mean"] == 0.19 and record["step"] == 5
    assert sorted(os.listdir(root / "hf")) == [
        "config.json",
        "mimjax_export.json",
        "model.safetensors",
    ]


def test_cli_exports_a_step(miram, tmp_path, capsys):
    from tools import export_pytorch

    _, _, root, _ = miram
    code = export_pytorch.main(
        ["--workdir", str(root / "run"), "--step", "5", "--format", "hf", "--out", str(tmp_path)]
    )
    assert code == 0 and "ViTMAEForPreTraining" in capsys.readouterr().out
    assert (
        export_pytorch.main(
            [
                "--workdir",
                str(root / "run"),
                "--step",
                "9",
                "--format",
                "hf",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "available: [5]" in capsys.readouterr().err


def test_cli_config_overrides(miram, tmp_path, capsys):
    """--config.KEY=VALUE overrides the workdir's config.json (here the LayerNorm eps the
    export records); an unknown field is one line naming the closest ones, exit status 2."""
    from tools import export_pytorch

    _, _, root, _ = miram
    argv = ["--workdir", str(root / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert export_pytorch.main([*argv, "--config.model.layer_norm_eps=1e-5"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_eps"] == 1e-5
    capsys.readouterr()
    assert export_pytorch.main([*argv, "--config.model.layer_norm_epsilon=1e-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config.model has no field 'layer_norm_epsilon'; did you mean")
    assert "config.model.layer_norm_eps" in err and err.count("\n") == 1


def test_segmentation_checkpoint_exports_its_encoder(tmp_path):
    """A segmenter's encoder exports like any other; its decoder and head stay in mimjax
    (the exported ViTModel computes the segmenter's encoder tokens)."""
    config = tiny_config("segmenter", backbone="vit", decoder="progressive", norm="batch",
                         separate_norm=False, prior_concat=False, fine_to_coarse=(0, 1, 1, 1))
    del config.model["head"], config.model["num_classes"], config.model["head_init_std"]
    del config.finetune
    config.objectives = {"subclass_segmentation": {"weight": 1.0}}
    write_workdir(tmp_path / "seg", config)
    record = convert.export_checkpoint(str(tmp_path / "seg"), str(tmp_path / "hf"), "hf")
    assert record["kind"] == "encoder"
    case = "ViTModel from a segmentation checkpoint"
    _compare_encoder(case, tmp_path / "hf", tmp_path / "seg", images(2, 1, seed=3))
    record = convert.export_checkpoint(str(tmp_path / "seg"), str(tmp_path / "timm"), "timm")
    assert record["kind"] == "encoder"
    written = np.load(tmp_path / "timm" / "model.npz")
    assert written.files and not any("seg_" in name for name in written.files)
