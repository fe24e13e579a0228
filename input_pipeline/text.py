"""Radiology report text: preprocessing, a BPE tokenizer trained on the
training reports, and fixed-length encoding.

Preprocessing (`preprocess_report`) keeps the FINDINGS and IMPRESSION sections
when the report has section headings (either at the start of a line, as in raw
MIMIC-CXR reports, or inline, as in the "FINDINGS: ... IMPRESSION: ..." text the
MIMIC-CXR builder and the chest X-ray phantom store), drops every other section
(indication, technique, comparison ...), and normalises case (lower), Unicode
(NFKC) and whitespace (single spaces). A report without either heading is kept
whole. The section names stay in the text ("findings: ... impression: ...").

Tokenizer: HF `tokenizers` BPE, SentencePiece-style: lower-casing, words split at
whitespace with a "▁" word-start marker, punctuation split off, special tokens
[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. BPE rather than WordPiece because
training is then deterministic: every initial piece is a character of the sorted
alphabet, so merge ties break the same way in every process (the WordPiece
trainer numbers its "##" pieces in hash-map order, which differs between runs:
huggingface/tokenizers#1794). Its vocabulary has exactly the requested size:
when the corpus has fewer distinct pieces (the phantom's templates use a few
hundred words), the remainder is "[unused{i}]" entries that no text ever
produces, so the embedding table size equals the setting. Saved as one JSON
file (`Tokenizer.to_str`), written atomically.

Encoding: [CLS] pieces... [SEP] then [PAD] up to max_length; pieces beyond
max_length - 2 are cut before [SEP]. mask = 1 on real tokens (CLS and SEP
included), 0 on padding.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
_UNUSED = "[unused{}]"
_WORD_START = "\u2581"  # SentencePiece's word-start marker

# A FINDINGS / IMPRESSION heading, anywhere; other headings only where a line
# starts (inline capitals followed by ":" are too often ordinary text).
_KEPT = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "FINDINGS AND IMPRESSION": "findings",
    "FINDINGS/IMPRESSION": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
}
_KEPT_HEADING = re.compile(
    r"\b(FINDINGS AND IMPRESSION|FINDINGS/IMPRESSION|FINDINGS?|IMPRESSIONS?|CONCLUSIONS?)[ \t]*:",
    re.IGNORECASE,
)
_LINE_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ,&/()\-]{0,60}[A-Z)])[ \t]*:", re.MULTILINE)


def preprocess_report(text: str) -> str:
    """The text a report is tokenized from (see the module docstring).

    >>> preprocess_report("INDICATION: cough.\\nFINDINGS:  Lungs  clear.\\nIMPRESSION: Normal.")
    'findings: lungs clear. impression: normal.'
    """
    if not isinstance(text, str):
        raise TypeError(f"a report must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text)
    headings = sorted(
        [
            (m.start(), m.end(), _KEPT[_squash(m.group(1)).upper()])
            for m in _KEPT_HEADING.finditer(text)
        ]
        + [
            (m.start(), m.end(), None)
            for m in _LINE_HEADING.finditer(text)
            if _squash(m.group(1)).upper() not in _KEPT
        ]
    )
    # Overlapping matches (a kept word ending a longer line heading, as in
    # "CHEST FINDINGS:"): the one that starts first wins, as in the MIMIC-CXR
    # builder, which keeps only exactly named sections.
    headings = [h for i, h in enumerate(headings) if i == 0 or h[0] >= headings[i - 1][1]]
    if not any(name for _, _, name in headings):
        return _squash(text).lower()
    parts = []
    for i, (_, end, name) in enumerate(headings):
        if name is None:
            continue
        stop = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        body = _squash(text[end:stop])
        if body:
            parts.append(f"{name}: {body}")
    return " ".join(parts).lower()


def _squash(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------- tokenizer


def _pipeline_parts():
    from tokenizers import decoders, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top

    return (
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
        # Word-start markers first, then punctuation split off ("▁mass." ->
        # "▁mass", "."), so decoding restores "mass." rather than "mass .".
        pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]),
        decoders.Metaspace(replacement=_WORD_START, prepend_scheme="always"),
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    path: str | None = None,
    *,
    min_frequency: int = 2,
    exclusive: bool = False,
):
    """A BPE tokenizer of exactly `vocab_size` entries trained on `texts`
    (already preprocessed, see `preprocess_report`), saved to `path` (atomic
    write) when given. The same texts give the same tokenizer in every process.
    Returns the `tokenizers.Tokenizer`; with `exclusive`, the one at `path` if
    another process saved one first (see `save_tokenizer`)."""
    from tokenizers import Tokenizer, models, processors, trainers  # pylint: disable=g-import-not-at-top

    vocab_size = int(vocab_size)
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer got no texts: the training split has no reports")
    normalizer, pre_tokenizer, decoder = _pipeline_parts()
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the reports' alphabet (the trainer "
            f"keeps every character: {len(vocab)} pieces); raise vocab_size"
        )
    if len(vocab) < vocab_size:
        # Fill to the exact size with pieces no text produces (the
        # pre-tokenizer splits "[" and "]" off), so ids never reach past it.
        # The merges stay as trained: only the id table grows.
        spec = json.loads(tokenizer.to_str())
        table = spec["model"]["vocab"]
        for i in range(vocab_size - len(vocab)):
            table[_UNUSED.format(i)] = len(vocab) + i
        tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoder
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)]
    )
    check_tokenizer(tokenizer)
    if path is not None:
        tokenizer = save_tokenizer(tokenizer, path, exclusive=exclusive)
    return tokenizer


def check_tokenizer(tokenizer, vocab_size: int | None = None, where: str = "tokenizer") -> None:
    """Raises ValueError unless the special tokens have their fixed ids (and the
    vocabulary has `vocab_size` entries, when given)."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != expected:
            raise ValueError(
                f"{where}: special token {token} has id {found}, expected {expected} "
                f"(the order must be {', '.join(SPECIAL_TOKENS)})"
            )
    if vocab_size is not None and tokenizer.get_vocab_size() != int(vocab_size):
        raise ValueError(
            f"{where} has {tokenizer.get_vocab_size()} tokens but the config asks for "
            f"vocab_size={vocab_size}: delete it to train a new one, or set vocab_size to "
            f"{tokenizer.get_vocab_size()}"
        )


def save_tokenizer(tokenizer, path: str, *, exclusive: bool = False):
    """Writes the tokenizer's JSON to `path` atomically (write, then rename).

    exclusive: the first writer wins. If `path` already exists (another
    process got there first) nothing is written and the tokenizer saved there
    is returned instead, so concurrent trainers (several hosts sharing a
    data directory) all use the one file that won, whatever the tokenizers
    version each runs. Returns the tokenizer
    now stored at `path`.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(tokenizer.to_str())
    if not exclusive:
        os.replace(tmp, path)
        return tokenizer
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        return load_tokenizer(path)
    except OSError:
        # File systems without hard links: a small race window remains.
        if os.path.exists(path):
            return load_tokenizer(path)
        os.replace(tmp, path)
        return tokenizer
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tokenizer


def load_tokenizer(path: str, vocab_size: int | None = None):
    """The tokenizer saved at `path` (checked: special ids, and `vocab_size`
    when given)."""
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file {path!r} (train one with train_tokenizer)")
    tokenizer = Tokenizer.from_file(path)
    check_tokenizer(tokenizer, vocab_size, where=f"tokenizer {path!r}")
    return tokenizer


def tokenizer_from_json(json_text: str):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    return Tokenizer.from_str(json_text)


# ------------------------------------------------------------------ encoding


def encode_reports(
    tokenizer, texts: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, L], mask int32 [N, L]) with L = max_length: [CLS] pieces
    [SEP] [PAD]...; pieces past max_length - 2 are dropped. `texts` are
    preprocessed reports (see `preprocess_report`)."""
    max_length = int(max_length)
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one token, [SEP]), got {max_length}")
    if isinstance(texts, str):
        raise TypeError("encode_reports takes a sequence of texts, got one str")
    texts = list(texts)
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    if not texts:
        return ids, np.zeros_like(ids)
    keep = max_length - 2
    lengths = np.empty(len(texts), np.int64)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    for i, encoding in enumerate(encodings):
        pieces = encoding.ids[:keep]
        n = len(pieces)
        ids[i, 0] = CLS_ID
        ids[i, 1 : n + 1] = pieces
        ids[i, n + 1] = SEP_ID
        lengths[i] = n + 2
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


def encode_report(tokenizer, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """One report: (ids int32 [L], mask int32 [L]), as `encode_reports`."""
    if int(max_length) < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one token, [SEP]), got {max_length}")
    pieces = tokenizer.encode(text, add_special_tokens=False).ids[: int(max_length) - 2]
    ids = np.full(int(max_length), PAD_ID, np.int32)
    ids[0], ids[1 : len(pieces) + 1], ids[len(pieces) + 1] = CLS_ID, pieces, SEP_ID
    mask = (np.arange(int(max_length)) < len(pieces) + 2).astype(np.int32)
    return ids, mask


def decode(tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id row without [PAD], [CLS] and [SEP]; [MASK] and [UNK] stay
    visible (figures of masked text)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (PAD_ID, CLS_ID, SEP_ID)]
    return tokenizer.decode(ids, skip_special_tokens=False)


def token_count(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Pieces per text, without [CLS]/[SEP] (to choose max_length)."""
    return np.asarray(
        [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    )
