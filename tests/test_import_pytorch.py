"""Import from PyTorch: export -> import gives bit-identical parameters (HF and timm,
every model kind, both block layouts); the result is a checkpoint `--config.init`
(pretrained.init_from_checkpoint) and mimjax.inference read; weights from HF models
mimjax did not make (GELU exact, eps 1e-12, learned table with a class-token row)
import with the same numerics."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mimjax import inference, pretrained, run_config
from mimjax.export import convert
from mimjax.models import param_tree as tree

from export_fixtures import exported_workdir, images, nchw, random_params, tiny_config


def _flat(params):
    return tree.flatten(params)


def _assert_identical(imported, original, prefix_filter=lambda name: True):
    original = {n: v for n, v in _flat(original).items() if prefix_filter(n)}
    imported = _flat(imported)
    assert sorted(imported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(imported[name], value, err_msg=name)
        assert imported[name].dtype == value.dtype == np.float32


def _round_trip(tmp_path, config, fmt, scan=False, **export_kwargs):
    saved, _ = exported_workdir(tmp_path, config, fmt, **export_kwargs)
    convert.import_checkpoint(fmt, str(tmp_path / fmt), str(tmp_path / "back"), scan=scan)
    params, _info = pretrained.load_pretrained_params(str(tmp_path / "back"))
    return saved, params, run_config.load_run_config(str(tmp_path / "back"))


@pytest.mark.parametrize(
    "fmt,kind,settings",
    [
        ("hf", "mae", {"scales": (16,)}),
        ("hf", "vit_classifier", {"head": "cls", "channels": 3, "posemb": "learn"}),
        ("timm", "vit_classifier", {"head": "map", "class_token": False}),
        (
            "timm",
            "vit_classifier",
            {"head": "gap", "gelu_approximate": False, "layer_norm_eps": 1e-5},
        ),
        ("timm", "mae", {"scales": (16,), "channels": 3}),
    ],
    ids=["hf-mae", "hf-cls-learned", "timm-map-nocls", "timm-gap-exact", "timm-encoder-3ch"],
)
def test_export_then_import_gives_identical_parameters(tmp_path, fmt, kind, settings):
    config = tiny_config(kind, **settings)
    saved, params, back = _round_trip(tmp_path, config, fmt)
    keep = (lambda n: not n.startswith("decoders/")) if fmt == "timm" else (lambda n: True)
    _assert_identical(params, saved, keep)
    for field in (
        "width",
        "depth",
        "num_heads",
        "mlp_dim",
        "image_size",
        "channels",
        "posemb",
        "class_token",
        "layer_norm_eps",
        "gelu_approximate",
    ):
        assert back.model[field] == config.model[field], field
    assert back.data.norm_mean == 0.19 and back.data.norm_std == 0.22
    if kind == "vit_classifier":
        assert back.model.head == config.model.head
        assert list(back.finetune.class_names) == ["benign", "malignant", "normal"]
    if fmt == "hf" and kind == "mae":
        assert back.model.decoder.to_dict() == {
            "width": 16,
            "depth": 1,
            "num_heads": 2,
            "mlp_dim": 64,
            "posemb": "sincos2d",
        }
        assert back.objectives.masked_reconstruction.mask_ratio == 0.75


def test_miram_round_trip_keeps_encoder_and_base_decoder_and_scan_layout(tmp_path):
    config = tiny_config(scales=(16, 32), scan=True)
    saved, params, back = _round_trip(tmp_path, config, "hf", scan=True)
    assert back.model.scan is True and back.model.scales == [16]
    # decoders/1 (32 px) has no ViTMAE counterpart; the rest is identical, stacked as saved
    _assert_identical(params, saved, lambda n: not n.startswith("decoders/1/"))


def test_imported_checkpoint_initialises_a_classifier_and_embeds_like_the_source(tmp_path):
    config = tiny_config(scales=(16,))
    exported_workdir(tmp_path, config, "hf")
    convert.import_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    # --config.init: the trainer's path into a fresh classifier
    target = random_params(tiny_config("vit_classifier", head="gap"), seed=9)
    _loaded, report = pretrained.init_from_checkpoint(target, str(tmp_path / "back"))
    assert not [n for n in report.missing if n.startswith("encoder/")]
    source = inference.Encoder.from_workdir(str(tmp_path / "run"))(images(2)).tokens
    imported = inference.Encoder.from_workdir(str(tmp_path / "back"))(images(2)).tokens
    np.testing.assert_array_equal(imported, source)
    with pytest.raises(FileExistsError, match="empty --out"):
        convert.import_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "back"))


def test_foreign_hf_vit_imports_with_its_numerics(tmp_path):
    hf_config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        num_labels=2,
        id2label={0: "no", 1: "yes"},
        label2id={"no": 0, "yes": 1},
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(hf_config).eval()
    with torch.no_grad():  # non-trivial norms, biases and a class-token position row
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "hf"))
    convert.import_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    back = run_config.load_run_config(str(tmp_path / "back"))
    assert back.model.posemb == "learn" and back.model.gelu_approximate is False
    assert back.model.layer_norm_eps == 1e-12 and back.model.head == "cls"
    x = images(3, 3, seed=6)
    with torch.no_grad():
        out = model(nchw(x), output_hidden_states=True)
    ours = inference.Encoder.from_workdir(str(tmp_path / "back"))(x)
    assert np.abs(out.logits.numpy() - ours.logits).max() <= 1e-4
    hf_tokens = model.vit(nchw(x)).last_hidden_state
    assert np.abs(hf_tokens.detach().numpy() - ours.tokens).max() <= 1e-4


def test_timm_state_dict_and_stacked_npz_import(tmp_path):
    config = tiny_config("vit_classifier", head="cls")
    saved, _ = exported_workdir(tmp_path, config, "timm")
    # the state dict alone needs the head count (timm_args.json is beside it here)
    convert.import_checkpoint(
        "timm", str(tmp_path / "timm" / "model.safetensors"), str(tmp_path / "sd")
    )
    _assert_identical(pretrained.load_pretrained_params(str(tmp_path / "sd"))[0], saved)
    # big_vision's scan layout: Transformer/encoderblock/... with a leading layer axis
    with np.load(tmp_path / "timm" / "model.npz") as w:
        flat = {k: w[k] for k in w}
    stacked = {k: v for k, v in flat.items() if "/encoderblock_" not in k}
    for key in [k for k in flat if "/encoderblock_0/" in k]:
        rest = key.split("/encoderblock_0/")[1]
        stacked[f"params/Transformer/encoderblock/{rest}"] = np.stack(
            [flat[f"params/Transformer/encoderblock_{i}/{rest}"] for i in range(2)]
        )
    (tmp_path / "bv").mkdir()
    np.savez(tmp_path / "bv" / "stacked.npz", **stacked)
    convert.import_checkpoint("timm", str(tmp_path / "bv" / "stacked.npz"), str(tmp_path / "st"))
    _assert_identical(pretrained.load_pretrained_params(str(tmp_path / "st"))[0], saved)
    back = run_config.load_run_config(str(tmp_path / "st"))
    assert back.model.num_heads == 4 and back.model.gelu_approximate is True  # npz default


def test_cli_imports_and_reports_bad_input(tmp_path, capsys):
    from tools import import_pytorch

    config = tiny_config("vit_classifier", head="cls")
    exported_workdir(tmp_path, config, "timm")
    json_args = json.loads(Path(tmp_path / "timm" / "timm_args.json").read_text())
    assert json_args["timm_args"]["num_heads"] == 4
    sd = tmp_path / "timm" / "model.safetensors"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes(sd.read_bytes())
    assert (
        import_pytorch.main(
            ["--from", "timm", str(lone / "model.safetensors"), "--out", str(tmp_path / "a")]
        )
        == 2
    )
    assert "--num-heads" in capsys.readouterr().err
    assert (
        import_pytorch.main(
            [
                "--from",
                "timm",
                str(lone / "model.safetensors"),
                "--num-heads",
                "4",
                "--gelu",
                "tanh",
                "--norm-mean",
                "0.19",
                "--norm-std",
                "0.22",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert "--config.init=" in capsys.readouterr().out
    encoder = inference.Encoder.from_workdir(str(tmp_path / "b"))
    reference = inference.Encoder.from_workdir(str(tmp_path / "run"))
    raw = np.random.default_rng(0).integers(0, 255, (2, 16, 16), dtype=np.uint8)
    np.testing.assert_array_equal(encoder(raw).logits, reference(raw).logits)
