"""mimjax.inference: checkpoint loading at any step, the image encoder
(normalisation as in training, any batch size, gray -> RGB, classifier heads).
"""


import numpy as np
import pytest
from flax import nnx

from mimjax import inference

from export_fixtures import (
    IMAGE_SIZE,
    images,
    reference_tokens,
    tiny_config,
    write_workdir,
)


# --------------------------------------------------------------------------- tests
def test_encoder_loads_any_step_and_matches_the_model(tmp_path):
    config = tiny_config()
    saved = write_workdir(tmp_path, config, steps=(3, 5), train_state=True)
    x = images(3)
    for step in (3, 5):
        encoder = inference.Encoder.from_workdir(str(tmp_path), step)
        assert encoder.step == step and encoder.kind == "mae"
        out = encoder(x)
        expected, _ = reference_tokens(config, saved[step], x)
        assert out.tokens.shape == (3, 1 + 16, 32) and out.logits is None
        np.testing.assert_allclose(out.tokens, expected, atol=1e-5)
        np.testing.assert_array_equal(out.pooled, out.tokens[:, 0])
    latest = inference.Encoder.from_workdir(str(tmp_path))
    assert latest.step == 5


def test_integer_images_are_normalised_as_in_training(tmp_path):
    from input_pipeline import transforms

    config = tiny_config()
    write_workdir(tmp_path, config)
    encoder = inference.Encoder.from_workdir(str(tmp_path))
    rng = np.random.default_rng(1)
    raw16 = rng.integers(0, 4096, (2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint16)
    raw8 = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for raw, bits in ((raw16, 12), (raw16, None), (raw8, None)):
        meta = {"bits_stored": bits} if bits else {}
        expected = np.stack(
            [
                transforms.normalize(
                    im,
                    max_value=transforms.intensity_max(im, meta),
                    mean=0.19,
                    std=0.22,
                    channels=1,
                )
                for im in raw
            ]
        )
        got = encoder.preprocess(raw, bits_stored=bits)
        np.testing.assert_array_equal(got, expected)
        # float input is the normalised image itself: same features
        np.testing.assert_allclose(
            encoder(raw, bits_stored=bits).tokens, encoder(expected).tokens, atol=1e-6
        )


def test_any_batch_size_gives_the_same_features(tmp_path):
    config = tiny_config()
    write_workdir(tmp_path, config)
    encoder = inference.Encoder.from_workdir(str(tmp_path), batch_size=4)
    x = images(7)
    together = encoder(x).tokens
    one_by_one = np.concatenate([encoder(x[i, ..., 0]).tokens for i in range(7)])  # (H, W)
    assert together.shape[0] == 7
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_three_channel_model_takes_gray_and_rgb(tmp_path):
    config = tiny_config(channels=3, class_token=False, scan=True)
    saved = write_workdir(tmp_path, config)
    encoder = inference.Encoder.from_workdir(str(tmp_path))
    gray = images(2, channels=1)
    rgb = np.repeat(gray, 3, axis=-1)
    out = encoder(gray[..., 0])
    expected, _ = reference_tokens(config, saved[5], rgb)
    assert out.tokens.shape == (2, 16, 32)  # no class token
    np.testing.assert_allclose(out.tokens, expected, atol=1e-5)
    np.testing.assert_allclose(out.pooled, expected.mean(axis=1), atol=1e-5)


@pytest.mark.parametrize("head", ["cls", "gap", "map"])
def test_classifier_checkpoint_gives_pooled_features_and_logits(tmp_path, head):
    config = tiny_config("vit_classifier", head=head)
    saved = write_workdir(tmp_path, config)
    out = inference.Encoder.from_workdir(str(tmp_path))(images(2))
    tokens, model = reference_tokens(config, saved[5], images(2))
    np.testing.assert_allclose(out.tokens, tokens, atol=1e-5)
    pooled, logits = nnx.jit(lambda m, x: (m.features(x), m(x)))(model, images(2))
    np.testing.assert_allclose(out.pooled, pooled, atol=1e-5)
    np.testing.assert_allclose(out.logits, logits, atol=1e-5)


def test_bad_inputs_name_the_fix(tmp_path):
    config = tiny_config()
    write_workdir(tmp_path, config)
    encoder = inference.Encoder.from_workdir(str(tmp_path))
    with pytest.raises(ValueError, match="resize"):
        encoder(np.zeros((1, 20, 20), np.float32))
    with pytest.raises(ValueError, match="unsigned"):
        encoder(np.zeros((1, 16, 16), np.int32))
    wrong = tiny_config(width=64, num_heads=4)
    with pytest.raises(ValueError, match="config the run used"):
        inference.Encoder.from_workdir(str(tmp_path), config=wrong)
