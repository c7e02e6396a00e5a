"""Model input: text through the checkpoint's tokenizer.json, or token ids given directly.

Text needs the optional ``tokenizers`` package (imported only when text is tokenized).
One string gives a batch of one, unpadded.  A list of strings is padded on the right to
the longest item; ``attention_mask`` is the tokenizer's (1 = a real token, 0 = padding)
and is meant as a key-padding mask: no query attends to a key whose mask is 0.  The
tokenizer's post-processor adds what the model expects ([CLS] ... [SEP] and
``token_type_ids`` for BERT).  A truncation or fixed-length padding stored in
tokenizer.json is switched off: a text is never cut silently -- a sequence longer than
a learned position table is refused instead.

Codes: ATT-E335 tokenizers missing, ATT-E336 tokenizer.json unusable, ATT-E337 bad ids,
ATT-E338 bad text, ATT-E339 too long for the position table; ATT-W303 the pad id was not
given by the tokenizer (says which id was used).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.errors import Diagnosis, InputError
from attntrace.models.config import ModelConfig

INSTALL_HINT = "pip install 'attntrace[models]'"


@dataclass
class TokenizedInput:
    """What a forward pass takes, plus the labels a renderer shows."""

    ids: np.ndarray                 # (batch, seq) int64
    attention_mask: np.ndarray      # (batch, seq) int64: 1 real token, 0 padding (right side)
    token_type_ids: np.ndarray      # (batch, seq) int64: BERT's segment ids; zeros elsewhere
    tokens: List[List[str]]         # per item, per position (padding shown as the pad token)
    texts: Optional[List[str]] = None
    pad_id: Optional[int] = None    # the id padding positions hold (None when nothing was padded)
    warnings: List[Diagnosis] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per item."""
        return self.attention_mask.sum(axis=1)


def _fail(code: str, message: str, hint: Optional[str] = None, details: Sequence[str] = ()) -> InputError:
    return InputError(Diagnosis(code=code, message=message, hint=hint, details=list(details)))


def load_tokenizer(path: Union[str, Path]) -> Any:
    """A ``tokenizers.Tokenizer`` from tokenizer.json (ATT-E335 without the package, ATT-E336 if unusable)."""
    try:
        from tokenizers import Tokenizer  # optional dependency: imported only when text is tokenized
    except ImportError:
        raise _fail("ATT-E335", "tokenizing text needs the optional package 'tokenizers'", hint=INSTALL_HINT,
                    details=["or give token ids directly (ids: [...])"]) from None
    path = Path(path)
    if not path.is_file():
        raise _fail("ATT-E336", f"no tokenizer file {path}", hint="give token ids directly, or add tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:               # the Rust side raises plain Exception subclasses
        raise _fail("ATT-E336", f"{path.name} is not a usable tokenizer.json: {str(exc)[:200]}",
                    details=[f"file: {path}"]) from None


def _pad_choice(tokenizer: Any, config: Optional[ModelConfig]) -> Tuple[int, str, Optional[Diagnosis]]:
    """(pad id, pad token, a warning when the tokenizer did not name its own padding)."""
    padding = tokenizer.padding if tokenizer is not None else None
    if padding and padding.get("pad_token") is not None:
        return int(padding["pad_id"]), padding["pad_token"], None
    candidates = [("config.json pad_token_id", config.pad_token_id if config else None),
                  ("config.json eos_token_id", _first(config.eos_token_id) if config else None),
                  ("id 0", 0)]
    source, pad_id = next((s, i) for s, i in candidates if i is not None)
    token = (tokenizer.id_to_token(pad_id) if tokenizer is not None else None) or f"<{pad_id}>"
    who = "the tokenizer defines" if tokenizer is not None else "ids of different lengths and"
    note = Diagnosis(code="ATT-W303", severity="warning",
                     message=f"{who} no padding: padded with {source} ({pad_id}, {token!r})",
                     hint="padding positions are masked out as keys; their own rows are not meaningful")
    return pad_id, token, note


def _first(value) -> Optional[int]:
    return value[0] if isinstance(value, tuple) and value else value if isinstance(value, int) else None


def tokenize(text: Union[str, Sequence[str]], tokenizer: Any, config: Optional[ModelConfig] = None) -> TokenizedInput:
    """One string or a list of strings → ids, mask, segment ids and token labels.

    ``tokenizer`` is a path to tokenizer.json or a ``tokenizers.Tokenizer`` (which is copied,
    not reconfigured).
    """
    texts = _texts(text)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else _copy(tokenizer)
    tok.no_truncation()
    warnings: List[Diagnosis] = []
    pad_id, note = None, None
    if len(texts) > 1:
        pad_id, pad_token, note = _pad_choice(tok, config)
        pad_type_id = (tok.padding or {}).get("pad_type_id", 0)
        tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, pad_type_id=pad_type_id)
        encodings = tok.encode_batch(texts)
    else:
        tok.no_padding()
        encodings = [tok.encode(texts[0])]
    padded = any(not all(e.attention_mask) for e in encodings)
    if padded and note:
        warnings.append(note)
    for i, encoding in enumerate(encodings):
        if not any(encoding.attention_mask):
            raise _fail("ATT-E338", f"text {i} ({texts[i][:40]!r}) gives no tokens",
                        hint="give a non-empty text")
    result = TokenizedInput(
        ids=np.array([e.ids for e in encodings], dtype=np.int64),
        attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
        token_type_ids=np.array([e.type_ids for e in encodings], dtype=np.int64),
        tokens=[list(e.tokens) for e in encodings], texts=texts,
        pad_id=pad_id if padded else None,
        warnings=warnings)
    _check_fits(result, config, "the tokenizer")
    return result


def _copy(tokenizer: Any) -> Any:
    return type(tokenizer).from_str(tokenizer.to_str())


def _texts(text) -> List[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return list(text)
    if isinstance(text, (list, tuple)) and not text:
        raise _fail("ATT-E338", "the list of texts is empty", hint="give one string or a list of strings")
    bad = next((t for t in text if not isinstance(t, str)), text) if isinstance(text, (list, tuple)) else text
    raise _fail("ATT-E338", f"text must be a string or a list of strings, got {type(bad).__name__} {str(bad)[:40]!r}")


def from_ids(ids, config: Optional[ModelConfig] = None, tokenizer: Any = None,
             attention_mask=None) -> TokenizedInput:
    """Token ids given directly: a list, a list of lists (ragged lists are right-padded), or an array.

    ``tokenizer`` (a path or Tokenizer, optional) only names the tokens; without it a token is
    shown as its id.
    """
    rows = _id_rows(ids)
    lengths = [len(r) for r in rows]
    width = max(lengths)
    pad_id = None
    warnings: List[Diagnosis] = []
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if min(lengths) < width:
        pad_id, _, note = _pad_choice(tok, config)
        warnings += [note] if note else []
    ids_array = np.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids_array[i, :len(row)] = row
        mask[i, :len(row)] = 1
    if attention_mask is not None:
        mask = _given_mask(attention_mask, ids_array.shape)
    names = (lambda i: tok.id_to_token(int(i)) or str(int(i))) if tok is not None else (lambda i: str(int(i)))
    result = TokenizedInput(ids=ids_array, attention_mask=mask, token_type_ids=np.zeros_like(ids_array),
                            tokens=[[names(i) for i in row] for row in ids_array], pad_id=pad_id, warnings=warnings)
    _check_fits(result, config, "ids")
    return result


def _id_rows(ids) -> List[List[int]]:
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (list, tuple)) and ids and all(_is_id(i) for i in ids):
        rows = [list(ids)]
    elif isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple)) for r in ids):
        rows = [list(r) for r in ids]
    else:
        raise _fail("ATT-E337", f"ids must be a list of token ids or a list of such lists, got {str(ids)[:60]}")
    for b, row in enumerate(rows):
        bad = next((v for v in row if not _is_id(v)), None)
        if not row or bad is not None:
            raise _fail("ATT-E337", f"ids item {b} " + ("is empty" if not row else f"holds {bad!r}, not a token id"))
    return [[int(v) for v in row] for row in rows]


def _is_id(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, float) and value.is_integer()


def _given_mask(mask, shape) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 1:
        array = array[None]
    if array.shape != shape or not np.isin(array, (0, 1)).all():
        raise _fail("ATT-E337", f"attention_mask must be 0/1 of shape {list(shape)} like the ids, got "
                    f"shape {list(array.shape)}")
    return array.astype(np.int64)


def _check_fits(result: TokenizedInput, config: Optional[ModelConfig], origin: str) -> None:
    if config is None:
        return
    ids = result.ids
    bad = np.argwhere((ids < 0) | (ids >= config.vocab_size))
    if bad.size:
        b, s = bad[0]
        raise _fail("ATT-E337", f"token id {int(ids[b, s])} (item {b}, position {s}) from {origin} is outside "
                    f"the model's vocabulary 0..{config.vocab_size - 1}",
                    details=[f"{len(bad)} id(s) out of range", f"config: {config.source}"],
                    hint="the tokenizer or ids do not belong to this checkpoint")
    if config.positional == "learned" and ids.shape[1] > config.max_positions:
        raise _fail("ATT-E339", f"{ids.shape[1]} tokens, but the model has {config.max_positions} learned "
                    "positions", hint="shorten the text (attntrace never truncates silently)",
                    details=[f"config: {config.source} ({config.key('max_positions')})"])
