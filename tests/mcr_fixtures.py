"""Tiny image-report model configs and synthetic image-report batches for tests."""

from __future__ import annotations

import ml_collections
import numpy as np

from mimjax.models import text

from export_fixtures import ENCODER_FIELDS

VOCAB = 40
LENGTH = 12
WORDS = tuple(f"w{i}" for i in range(VOCAB - text.NUM_SPECIAL_TOKENS))


def tiny_mcr_config(**overrides) -> ml_collections.ConfigDict:
    """Width-32 ViT (patch 8, 32 px) + 1-block decoder + 1-block text encoder."""
    cfg = {
        "name": "mcr",
        "variant": "Ti/8",
        "width": 32,
        "depth": 1,
        "num_heads": 2,
        "mlp_dim": 64,
        "image_size": 32,
        **ENCODER_FIELDS,
        "decoder": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": None, "posemb": "sincos2d"},
        "text": {
            "vocab_size": VOCAB,
            "max_length": 16,
            "width": 32,
            "depth": 1,
            "num_heads": 2,
            "mlp_dim": None,
            "mlm_head": True,
        },
        "projection_dim": 16,
        "projection_hidden_dim": 32,
        "pooling": "map_then_mean",
        "logit_scale_init": 1 / 0.07,
        "logit_bias_init": -10.0,
    }
    for key, value in overrides.items():  # dict values update a section; None drops it
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = dict(cfg[key], **value)
        else:
            cfg[key] = value
    return ml_collections.ConfigDict(cfg)


def token_rows(
    batch_size: int, length: int = LENGTH, seed: int = 0, min_words: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] words [SEP] [PAD]...: int32 ids and mask (1 = real), lengths vary."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch_size, length), np.int32)
    for i in range(batch_size):
        words = rng.integers(min_words, length - 1)
        ids[i, 0] = text.CLS_ID
        ids[i, 1 : 1 + words] = rng.integers(text.NUM_SPECIAL_TOKENS, VOCAB, size=words)
        ids[i, 1 + words] = text.SEP_ID
    return ids, (ids != text.PAD_ID).astype(np.int32)


def random_pairs(batch_size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the data pipeline's contract: image, text_ids, text_mask, pair_index."""
    rng = np.random.default_rng(seed)
    ids, mask = token_rows(batch_size, seed=seed + 1)
    return {
        "image": rng.normal(size=(batch_size, 32, 32, 1)).astype(np.float32),
        "text_ids": ids,
        "text_mask": mask,
        "pair_index": np.arange(batch_size, dtype=np.int32),
    }


def report_strings(ids: np.ndarray) -> list[str]:
    """Readable 'reports' for token rows (word per regular token)."""
    return [
        " ".join(WORDS[t - text.NUM_SPECIAL_TOKENS] for t in row if t >= text.NUM_SPECIAL_TOKENS)
        for row in ids
    ]
