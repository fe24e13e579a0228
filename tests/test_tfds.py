"""TFDS as a data source (input_pipeline/tfds_source.py), read without TensorFlow.

A tiny dataset is built offline by a GeneratorBasedBuilder in the ArrayRecord
format (16-bit PNG images, a ClassLabel, a report, a mask, a colour image),
then read back through `data.source = "tfds"`: the decoded records, the errors
that name what exists, and a pretraining and a fine-tuning from it end to end,
in a fresh interpreter where `import tensorflow` raises.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from input_pipeline import finetune, pairs, pipeline, sources, tfds_source
from input_pipeline.phantom import PATHOLOGY_CLASSES

tfds = pytest.importorskip("tensorflow_datasets")

REPO = Path(__file__).resolve().parents[1]
DATASET = "mimjax_tiny_med"
SPLIT_SIZES = {"train": 40, "validation": 16, "test": 16}
SHAPE = (72, 80)  # H, W: the demo's 64-px scale still comes from real pixels


def written_image(split: str, i: int) -> np.ndarray:
    """The uint16 image of example i of `split`, using the whole 16-bit range."""
    rng = np.random.default_rng([list(SPLIT_SIZES).index(split), i])
    image = rng.integers(0, 65536, SHAPE, dtype=np.uint16)
    image[0, 0], image[0, 1] = 0, 65535
    image[20:50, 20:50] //= 1 + i % 4  # some label signal for the probe and the classifier
    return image


def written_rgb(i: int) -> np.ndarray:
    rng = np.random.default_rng([7, i])
    return rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def _builder_class():
    # Unregistered, as a user's own builder would be in a process that did not
    # import it: reading goes through TFDS's read-only builder of the files.
    with tfds.core.registered.skip_registration():

        class MimjaxTinyMed(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                # DatasetInfo(builder=self, ...), not dataset_info_from_configs:
                # the latter reads package metadata this test builder lacks.
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint16),
                        "label": tfds.features.ClassLabel(names=list(PATHOLOGY_CLASSES)),
                        "case_id": tfds.features.Text(),
                        "report": tfds.features.Text(),
                        "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
                        "photo": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    }),
                )

            def _split_generators(self, dl_manager):
                del dl_manager
                return {split: self._generate_examples(split) for split in SPLIT_SIZES}

            def _generate_examples(self, split):
                for i in range(SPLIT_SIZES[split]):
                    image = written_image(split, i)
                    # TFDS's own ndarray -> PNG encoder needs TensorFlow: hand it bytes.
                    yield f"{split}-{i}", {
                        "image": _png(image),
                        "label": i % len(PATHOLOGY_CLASSES),
                        "case_id": f"{split}-{i}",
                        "report": f"case {i}: {PATHOLOGY_CLASSES[i % 4]} lesion",
                        "mask": _png((image > 32768).astype(np.uint8)),
                        "photo": _png(cv2.cvtColor(written_rgb(i), cv2.COLOR_RGB2BGR)),
                    }

    MimjaxTinyMed.name = DATASET
    return MimjaxTinyMed


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = _builder_class()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(data_dir)


def _cfg(tfds_dir, **tfds_settings):
    c = finetune.default_finetune_data_config()
    c.update(source="tfds", num_workers=0, num_threads=1)
    c.tfds.update({"name": DATASET, "data_dir": tfds_dir, **tfds_settings})
    c.tfds.labels = {"pathology": "label", "case": "case_id"}
    c.tfds.report = "report"
    c.tfds.masks = {"mask": "mask"}
    return c


def _case(meta) -> tuple[str, int]:
    split, i = meta["case"].split("-")
    return split, int(i)


def test_records_decode_to_what_was_written(tfds_dir):
    c = _cfg(tfds_dir)
    seen = {}
    for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        src = sources.resolve(c, split)
        assert len(src) == SPLIT_SIZES[tfds_split] and src.paths is None
        assert isinstance(src.raw(0), bytes)  # grain reads serialized examples
        for k in range(len(src)):
            element = src[k]
            case = _case(element["meta"])
            assert case[0] == tfds_split
            image = element["image"]
            assert image.dtype == np.uint16 and image.shape == SHAPE
            np.testing.assert_array_equal(image, written_image(*case))  # 16-bit exact
            assert element["meta"]["pathology"] == case[1] % 4  # ClassLabel -> int
            assert isinstance(element["meta"]["pathology"], int)
            assert element["meta"]["report"].startswith(f"case {case[1]}:")
            assert src.meta(k) == element["meta"]  # meta alone, without the pixels
            _, _, extras = src.decoder.decode_with_extras(src.raw(k))
            np.testing.assert_array_equal(extras["mask"], image > 32768)
            assert extras["mask"].dtype == np.uint8
            seen.setdefault(split, set()).add(case)
    assert len(seen["train"]) == SPLIT_SIZES["train"]  # every example once

    # The split mapping takes TFDS slicing; the source pickles for grain's workers.
    sliced = _cfg(tfds_dir, splits={"train": "train[:75%]", "val": "train[75%:]", "test": "test"})
    train, val = sources.resolve(sliced, "train"), sources.resolve(sliced, "val")
    assert (len(train), len(val)) == (30, 10)
    cases = [_case(s[k]["meta"]) for s in (train, val) for k in range(len(s))]
    assert sorted(cases) == sorted(seen["train"])  # disjoint, together the train split
    again = pickle.loads(pickle.dumps(val))
    np.testing.assert_array_equal(again[3]["image"], val[3]["image"])
    assert pipeline.num_records(sliced) == 30  # pretraining reads "train" by default
    assert sources.data_root(c).endswith(os.path.join(DATASET, "1.0.0"))


def test_colour_images_become_luma(tfds_dir):
    from input_pipeline.ingest.readers import LUMA_WEIGHTS  # tools/prepare_data.py's convention

    src = sources.resolve(_cfg(tfds_dir, image="photo"), "test")
    for k in range(4):
        image = src[k]["image"]
        luma = written_rgb(_case(src[k]["meta"])[1]).astype(np.float64) @ LUMA_WEIGHTS
        assert image.dtype == np.uint8 and image.shape == luma.shape
        assert np.abs(image - luma).max() <= 0.51  # rounded to the nearest level
    # Arrays (Tensor features) are RGB, encoded images BGR (OpenCV's order).
    rgb = written_rgb(0)
    np.testing.assert_array_equal(
        tfds_source.decode_image(rgb, "rgb array"),
        tfds_source.decode_image(_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), "png"),
    )


def test_pipelines_read_tfds(tfds_dir):
    c = _cfg(tfds_dir)
    batches = finetune.make_eval_batches(c, "val", image_size=16, batch_size=8,
                                         label_keys=("pathology",))
    assert batches.num_records == 16 and batches[0]["image"].shape == (8, 16, 16, 1)
    balanced = c.copy_and_resolve_references()
    balanced.balanced_label = "pathology"
    it = iter(finetune.make_finetune_train_dataset(
        balanced, image_size=16, global_batch_size=8, seed=0, label_keys=("pathology",)))
    assert next(it)["label_pathology"].shape == (8,)
    fixed = pipeline.make_fixed_batch(c, scales=(32, 64), num_images=3, seed=0)
    assert fixed["image_64"].shape == (3, 64, 64, 1)
    p = pairs.default_pairs_data_config()
    p.update(source="tfds", vocab_size=60, max_text_length=16, num_workers=0)
    p.tfds = c.tfds.copy_and_resolve_references()
    p.tokenizer_path = os.path.join(tfds_dir, "tokenizer.json")  # not inside the dataset
    ev = pairs.make_eval_pairs(p, "val", image_size=16, batch_size=8)
    assert ev.num_pairs == 16 and ev.reports[0].startswith("case ")


def test_errors_name_what_exists_and_the_fix(tfds_dir, tmp_path):
    with pytest.raises(sources.DataSourceError, match=r"no feature for data.tfds.labels.grade="
                       r"'grade'.*label: ClassLabel \(4 classes: benign_mass"):
        c = _cfg(tfds_dir)
        c.tfds.labels = {"grade": "grade"}
        sources.resolve(c, "train")
    with pytest.raises(sources.DataSourceError, match="data.tfds.image='label' is a ClassLabel"):
        sources.resolve(_cfg(tfds_dir, image="label"), "train")
    with pytest.raises(FileNotFoundError, match=rf"'other_med' .* not prepared .*{DATASET}:1.0.0 "
                       r"\(array_record\).*tfds build other_med"):
        sources.resolve(_cfg(tfds_dir, name="other_med"), "train")
    with pytest.raises(FileNotFoundError, match=rf"'{DATASET}:2.0.0' .* not prepared .*"
                       rf"{DATASET}:1.0.0"):
        sources.resolve(_cfg(tfds_dir, name=f"{DATASET}:2.0.0"), "train")
    with pytest.raises(sources.DataNotFoundError, match="that folder does not exist"):
        sources.resolve(_cfg(str(tmp_path / "none")), "train")
    # A TFDS catalogue dataset that needs a manual download says how to get it.
    with pytest.raises(sources.DataNotFoundError, match=r"curated_breast_imaging_ddsm/patches.*"
                       r"--manual_dir=DIR.*cancerimagingarchive"):
        sources.resolve(_cfg(tfds_dir, name="curated_breast_imaging_ddsm/patches"), "train")
    with pytest.raises(sources.DataSourceError, match=r"splits.val='valid'.*'validation': 16"):
        sources.resolve(_cfg(tfds_dir, splits={"train": "train", "val": "valid"}), "val")
    with pytest.raises(sources.DataSourceError, match="needs the dataset"):
        sources.resolve(_cfg(tfds_dir, name=None), "train")
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------- end to end

_BLOCK_TENSORFLOW = '''
import importlib.abc, importlib.util, sys, traceback

class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """TensorFlow as if installed (find_spec finds it, as on a machine that has it,
    so code that checks for it takes its TensorFlow branch) but `import tensorflow`
    raises: a code path that needs it fails the run."""
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.attempts.append("".join(traceback.format_stack(limit=10)))
        raise ImportError(
            f"import {module.__name__} is blocked: the training path must not need it")

BLOCK = NoTensorFlow()
sys.meta_path.insert(0, BLOCK)
assert "tensorflow" not in sys.modules
'''

_RUN = '''
import json, logging
logging.basicConfig(level=logging.INFO)
from mimjax import run_config, train

data_dir, pre_dir, ft_dir = sys.argv[1:4]
tfds = [("tfds.name", "{dataset}"), ("tfds.data_dir", data_dir),
        ("tfds.labels", "{{'pathology': 'label'}}")]
pretrain = [("data.source", "tfds"), *(("data." + k, v) for k, v in tfds),
            ("evals.linear_probe.data.source", "tfds"),
            *(("evals.linear_probe.data." + k, v) for k, v in tfds),
            ("evals.linear_probe.data.roi_context", "0")]  # TFDS records are not mammograms
train.train_and_evaluate(run_config.load("configs/demo.py:tiny", pretrain), pre_dir)
finetune = [("data.source", "tfds"), *(("data." + k, v) for k, v in tfds),
            ("data.roi_context", "0"), ("data.num_workers", "1"), ("init", pre_dir)]
train.train_and_evaluate(
    run_config.load("configs/finetune_cbis_pathology.py:tiny", finetune), ft_dir)
print("RESULT " + json.dumps({{"tensorflow_imported": "tensorflow" in sys.modules,
                              "attempts": BLOCK.attempts}}))
'''


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_and_finetune_from_tfds_without_tensorflow(tfds_dir, tmp_path):
    pre_dir, ft_dir = tmp_path / "pretrain", tmp_path / "finetune"
    script = _BLOCK_TENSORFLOW + textwrap.dedent(_RUN.format(dataset=DATASET))
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")  # one CPU device
    proc = subprocess.run(
        [sys.executable, "-c", script, tfds_dir, str(pre_dir), str(ft_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert not result["tensorflow_imported"]
    assert result["attempts"] == [], "something tried to import TensorFlow:\n" + "\n".join(
        result["attempts"])

    pretrain = _metrics(pre_dir)
    losses = [r for r in pretrain if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in losses)
    probes = [r for r in pretrain if "probe/pathology/auc_macro" in r]
    assert [r["step"] for r in probes] == [4, 8]  # the probe read TFDS too
    assert (pre_dir / "checkpoints").is_dir() and any((pre_dir / "figures").glob("recon_*.png"))

    finetuned = _metrics(ft_dir)
    assert [r["step"] for r in finetuned if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in finetuned if "val/auc_macro" in r] == [4, 8]
    test = json.loads((ft_dir / "test_metrics.json").read_text())
    assert test["num_examples"] == SPLIT_SIZES["test"] and 0 <= test["auc_macro"] <= 1
    assert (ft_dir / "checkpoints").is_dir() and (ft_dir / "best").is_dir()
    assert "Pretrained encoder: loaded" in proc.stderr  # the pretraining initialised it
