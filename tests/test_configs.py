"""Config files load, document themselves, and state the paper setups exactly."""

import importlib
from pathlib import Path

import jax
import pytest
from flax import nnx

from mimjax import drivers, run_config, tasks
from mimjax.models import build_model
from mimjax.models.spec import ModelSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Every config file: a module under configs/ with get_config (the *_base.py modules hold
# shared defaults and are not run on their own).
CONFIG_FILES = sorted(
    str(path.relative_to(CONFIG_DIR.parent).with_suffix("")).replace("/", ".")
    for path in CONFIG_DIR.rglob("*.py") if "def get_config" in path.read_text())


def test_config_files_are_discovered():
    assert {"configs.demo", "configs.mcr_demo", "configs.experiments.miram_vs_mae",
            "configs.finetune_cbis_pathology"} <= set(CONFIG_FILES)
    assert not any(name.endswith("_base") for name in CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_documents_command_time_result_and_builds(name):
    """Each config file's docstring gives its command, wall time and expected result;
    its config (and its :tiny variant, where it has one) passes the checks and builds."""
    module = importlib.import_module(name)
    doc = module.__doc__
    assert f"python main.py --config {name.replace('.', '/')}.py" in doc, name
    assert "Expected wall time" in doc and "Expected result" in doc, name
    args = [None] + (["tiny"] if ":tiny" in doc else [])
    for arg in args:
        config = module.get_config(arg)
        run_config.check(config)
        if drivers.check(config):  # a multi-run experiment: checked as a whole
            continue
        tasks.for_config(config)
        ModelSpec.from_config(config.model)  # builds (abstractly)
        if config.model.name == "mae":
            scales = config.model.scales
            assert scales[0] == config.model.image_size
            weights = config.objectives.masked_reconstruction.scale_weights
            assert len(weights) == len(scales)


@pytest.mark.parametrize("name,scales", [("miram_vit_b16", [112, 224]), ("mae_vit_b16", [112])])
def test_paper_setups(name, scales):
    config = importlib.import_module(f"configs.{name}").get_config("/data/cbis_shards")
    assert config.data.source == "shards" and config.data.dir == "/data/cbis_shards"
    model = config.model
    assert (model.variant, model.image_size, model.scales) == ("B/16", 112, scales)
    assert config.objectives.masked_reconstruction.mask_ratio == 0.75
    decoder = config.model.decoder
    assert (decoder.width, decoder.depth, decoder.num_heads) == (512, 8, 16)
    assert (config.total_epochs, config.warmup_epochs, config.global_batch_size) == (500, 40, 1024)
    opt = config.optimizer
    assert (opt.base_lr, opt.b1, opt.b2, opt.weight_decay) == (1.5e-4, 0.9, 0.95, 0.05)
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    assert len(model.decoders) == len(scales)
    encoder_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.encoder, nnx.Param)))
    assert 85e6 < encoder_params < 86e6  # ViT-B/16, 1 channel


def test_demo_rejects_unknown_argument():
    with pytest.raises(ValueError, match="no argument or 'tiny'"):
        importlib.import_module("configs.demo").get_config("huge")


FINETUNE_FILES = ["finetune_cbis_pathology", "finetune_cbis_margin"]


@pytest.mark.parametrize("name", FINETUNE_FILES)
def test_finetune_configs_document_and_build(name):
    module = importlib.import_module(f"configs.{name}")
    assert "python main.py --config configs/" in module.__doc__
    assert "Expected" in module.__doc__
    for arg in (None, "tiny", "/data/cbis_prepared"):
        config = module.get_config(arg)
        assert config.task == "classification" and config.model.name == "vit_classifier"
        assert config.model.num_classes == len(config.finetune.class_names)
        model = nnx.eval_shape(lambda c=config: build_model(c.model, rngs=nnx.Rngs(0)))
        assert model.head is not None
    paper = module.get_config("/data/cbis_prepared")
    assert (paper.data.source, paper.data.dir) == ("prepared", "/data/cbis_prepared")
    assert (paper.model.variant, paper.model.image_size) == ("B/16", 224)


def test_experiment_config_compares_equal_budgets():
    module = importlib.import_module("configs.experiments.miram_vs_mae")
    assert "python main.py --config configs/experiments/miram_vs_mae.py" in module.__doc__
    for arg in (None, "/data/cbis_prepared"):
        c = module.get_config(arg)
        assert c.driver == "experiment" and list(c.arms) == ["miram", "mae", "scratch"]
        miram, mae = c.pretrain.miram, c.pretrain.mae
        assert len(miram.model.scales) == 2 and list(mae.model.scales) == [miram.model.image_size]
        for key in ("total_steps", "total_epochs", "global_batch_size", "seed"):
            assert miram.get(key) == mae.get(key), key
        assert miram.data.to_dict() == mae.data.to_dict()
        assert miram.model.image_size <= c.finetune.pathology.model.image_size
    demo_scale = module.get_config()
    # Pretraining never sees the images fine-tuning tests on.
    pretrain_data = demo_scale.pretrain.miram.data
    assert pretrain_data.phantom_seed != demo_scale.finetune.pathology.data.phantom_seed
    paper = module.get_config("/data/cbis_prepared")
    assert paper.pretrain.miram.data.dir == "/data/cbis_prepared/train"


def test_mcr_mimic_cxr_paper_setup():
    module = importlib.import_module("configs.mcr_mimic_cxr")
    doc = module.__doc__
    assert "python main.py --config configs/mcr_mimic_cxr.py:PREPARED_DIR" in doc
    assert "tools/prepare_data.py --builder mimic_cxr" in doc
    assert "Expected wall time" in doc and "Expected result" in doc
    placeholder = module.get_config()
    assert placeholder.data.dir == "data/mimic_cxr_prepared"
    config = module.get_config("/data/mimic_prepared")
    assert config.task == "image_text" and config.model.name == "mcr"
    data = config.data
    assert (data.source, data.dir, tuple(data.view_groups)) == (
        "prepared", "/data/mimic_prepared", ("frontal",))
    text_cfg = config.model.text
    assert text_cfg.vocab_size == data.vocab_size and 30000 <= data.vocab_size <= 31000
    assert text_cfg.max_length == data.max_text_length
    assert (text_cfg.width, text_cfg.depth, text_cfg.num_heads) == (768, 12, 12)
    assert list(config.objectives) == ["mcr"]
    mcr = config.objectives.mcr
    assert (mcr.image_mask_ratio, mcr.text_mask_ratio, mcr.loss) == (0.5, 0.25, "infonce")
    assert mcr.itc_inputs == "masked" and min(mcr.mim_weight, mcr.mlm_weight) > 0
    assert (config.model.variant, config.model.image_size, config.model.dtype) == (
        "B/16", 224, "bfloat16")
    assert config.model.projection_dim == 512 and config.global_batch_size == 512
    assert config.total_epochs > 0 and config.warmup_epochs > 0 and config.eval_every > 0
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert 85e6 < count(model.encoder) < 86e6  # ViT-B/16, 1 channel
    assert 100e6 < count(model.text_encoder) < 115e6  # BERT-base-sized with a 30k vocabulary
    assert len(model.decoders) == 1 and model.mlm_head is not None
    assert model.vocab_size == data.vocab_size
    # The baselines on the same data: ",clip" (no masking, contrastive only), ",two_stream".
    clip = module.get_config("/data/mimic_prepared,clip")
    assert clip.data.dir == "/data/mimic_prepared" and clip.model.decoder is None
    assert (clip.objectives.mcr.image_mask_ratio, clip.objectives.mcr.mlm_weight) == (0.0, 0.0)
    assert module.get_config(",two_stream").objectives.mcr.itc_inputs == "unmasked"
    with pytest.raises(ValueError, match="clip"):
        module.get_config("/data/mimic_prepared,huge")
