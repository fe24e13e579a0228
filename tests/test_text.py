"""Report preprocessing, BPE tokenizer training / saving / loading, and
fixed-length encoding with truncation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import cxr_phantom, text
from input_pipeline.builders import mimic_cxr

RAW_MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 COMPARISON:  None.

 FINDINGS:

 The lungs are clear.  There is a small LEFT pleural effusion.
 Heart size is normal.

 IMPRESSION:

 Small left   pleural effusion.

 NOTIFICATION:  Dr. ___ was called.
"""


@pytest.fixture(scope="module")
def reports():
    return [text.preprocess_report(cxr_phantom.sample_meta(i, 0)["report"]) for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer(reports):
    return text.train_tokenizer(reports, 400)


# ------------------------------------------------------------- preprocessing


def test_preprocess_keeps_findings_and_impression_only():
    out = text.preprocess_report(RAW_MIMIC)
    assert out == (
        "findings: the lungs are clear. there is a small left pleural effusion. heart size is "
        "normal. impression: small left pleural effusion."
    )
    # The builder's stored form ("FINDINGS: ... IMPRESSION: ...") gives the same text.
    stored, _, _ = mimic_cxr.parse_report(RAW_MIMIC)
    assert text.preprocess_report(stored) == out
    assert text.preprocess_report(out) == out  # idempotent


def test_preprocess_without_sections_keeps_everything_normalised():
    assert text.preprocess_report("  The LUNGS\tare\n\nclear.  ") == "the lungs are clear."
    assert text.preprocess_report("Impression only:\nIMPRESSION: Normal.") == "impression: normal."
    assert text.preprocess_report("") == ""
    with pytest.raises(TypeError):
        text.preprocess_report(None)


# ----------------------------------------------------------------- training


def test_special_tokens_have_fixed_ids_and_vocab_is_exact(tokenizer, reports):
    assert text.SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    for expected, token in enumerate(text.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected
    assert tokenizer.get_vocab_size() == 400
    # More than the corpus has: filled with entries that never come out of text.
    big = text.train_tokenizer(reports, 2000)
    assert big.get_vocab_size() == 2000
    for expected, token in enumerate(text.SPECIAL_TOKENS):
        assert big.token_to_id(token) == expected
    unused = {i for t, i in big.get_vocab().items() if t.startswith("[unused")}
    ids, _ = text.encode_reports(big, ["[unused3] unused3 " + reports[0]], 256)
    assert len(unused) > 100 and not unused & set(ids[0].tolist())
    assert text.decode(big, ids[0]).replace(" ", "").endswith(reports[0].replace(" ", ""))


_TRAIN_IN_A_NEW_PROCESS = """
import sys
from input_pipeline import cxr_phantom, text
reports = [text.preprocess_report(cxr_phantom.sample_meta(i, 0)["report"]) for i in range(120)]
sys.stdout.write(text.train_tokenizer(reports, 400).to_str())
"""


def test_training_is_deterministic_across_processes(tokenizer):
    """The data directory's tokenizer (and so every run's token ids) must not depend
    on which process trained it: hash-map orders differ between processes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        assert out == tokenizer.to_str()


def test_decoding_restores_the_preprocessed_text(tokenizer, reports):
    ids, _ = text.encode_reports(tokenizer, reports[:20], 256)
    for row, report in zip(ids, reports[:20], strict=True):
        assert text.decode(tokenizer, row) == report


def test_training_rejects_bad_settings(reports):
    with pytest.raises(ValueError, match="no texts"):
        text.train_tokenizer([], 100)
    with pytest.raises(ValueError, match="raise vocab_size"):
        text.train_tokenizer(reports, 20)  # smaller than the alphabet


def test_save_load_round_trip_and_vocab_mismatch(tokenizer, tmp_path):
    path = str(tmp_path / "sub" / "tokenizer.json")
    text.save_tokenizer(tokenizer, path)
    assert not [p for p in os.listdir(tmp_path / "sub") if p.endswith(".tmp")]
    loaded = text.load_tokenizer(path, 400)
    assert loaded.to_str() == tokenizer.to_str()
    with pytest.raises(ValueError, match="delete it"):
        text.load_tokenizer(path, 512)
    with pytest.raises(FileNotFoundError):
        text.load_tokenizer(str(tmp_path / "missing.json"))


def test_exclusive_save_keeps_the_first_writer(tokenizer, reports, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    first = text.save_tokenizer(tokenizer, path, exclusive=True)
    other = text.train_tokenizer(reports[:60], 300)
    won = text.save_tokenizer(other, path, exclusive=True)
    with open(path) as f:
        assert won.to_str() == first.to_str() == f.read()


def test_wrong_special_token_order_is_rejected(tokenizer, tmp_path):
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["[PAD]"], vocab["[MASK]"] = vocab["[MASK]"], vocab["[PAD]"]
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="special token"):
        text.load_tokenizer(str(path))


# ----------------------------------------------------------------- encoding


def test_encoding_layout_round_trip(tokenizer, reports):
    ids, mask = text.encode_reports(tokenizer, reports[:8], 128)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (8, 128)
    for row, m, report in zip(ids, mask, reports[:8]):
        n = int(m.sum())
        assert (m[:n] == 1).all() and (m[n:] == 0).all()
        assert row[0] == text.CLS_ID and row[n - 1] == text.SEP_ID
        assert (row[n:] == text.PAD_ID).all()
        assert not np.isin(row[1 : n - 1], [text.PAD_ID, text.CLS_ID, text.SEP_ID]).any()
        # Decoding gives the text back (up to spaces around punctuation).
        assert text.decode(tokenizer, row).replace(" ", "") == report.replace(" ", "")
        single_ids, single_mask = text.encode_report(tokenizer, report, 128)
        np.testing.assert_array_equal(single_ids, row)
        np.testing.assert_array_equal(single_mask, m)


def test_truncation_cuts_before_sep(tokenizer, reports):
    long = max(reports, key=len)
    full = tokenizer.encode(long, add_special_tokens=False).ids
    assert len(full) > 20
    ids, mask = text.encode_reports(tokenizer, [long], 12)
    assert mask.all()
    assert ids[0, 0] == text.CLS_ID and ids[0, -1] == text.SEP_ID
    assert ids[0, 1:-1].tolist() == full[:10]
    with pytest.raises(ValueError):
        text.encode_reports(tokenizer, [long], 2)
    with pytest.raises(TypeError):
        text.encode_reports(tokenizer, long, 12)
    empty_ids, empty_mask = text.encode_reports(tokenizer, [""], 6)
    assert empty_ids[0].tolist() == [text.CLS_ID, text.SEP_ID, 0, 0, 0, 0]
    assert empty_mask[0].tolist() == [1, 1, 0, 0, 0, 0]


def test_masked_ids_decode_visibly(tokenizer, reports):
    ids, _ = text.encode_reports(tokenizer, reports[:1], 32)
    ids[0, 2] = text.MASK_ID
    assert "[MASK]" in text.decode(tokenizer, ids[0])
