"""Character and byte-level BPE tokenizers, saved as one JSON file next to the model.

Both kinds share the same four special tokens with the same ids, first in the vocabulary:

====  =========  =============================================================================
id    token      meaning
====  =========  =============================================================================
0     ``<pad>``  padding (never produced by :meth:`Tokenizer.encode`)
1     ``<eos>``  end of sequence: generation stops on it; ``encode(..., add_eos=True)`` appends it
2     ``<bos>``  begin of sequence; **never added implicitly** — only ``encode(..., add_bos=True)``
3     ``<unk>``  a character the char tokenizer never saw in training (the byte-level BPE covers
                 every byte, so it never produces ``<unk>``; the id is kept so ids match)
====  =========  =============================================================================

Special tokens are *not* recognised inside text: ``encode("<eos>")`` encodes the five
characters, so every text round-trips. :meth:`Tokenizer.decode` drops ``<pad>``, ``<eos>`` and
``<bos>`` by default (``skip_special_tokens=False`` renders them as ``"<eos>"`` etc.) and always
renders ``<unk>`` as U+FFFD, so a lost character stays visible. BPE ids whose bytes do not form
whole UTF-8 characters (e.g. a generation cut mid-emoji) also decode to U+FFFD.

Round trips: ``decode(encode(s)) == s`` for any ``s`` whose characters the char tokenizer saw
(after lowercasing, if it lowercases), and for any valid Unicode ``s`` with the BPE (byte-level:
no normaliser, no prefix space, a byte-level decoder).
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sparselens.train.atomic import atomic_write_json

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK)
"""The special tokens, in id order (ids 0..3 in every tokenizer)."""
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
FORMAT = "sparselens.tokenizer"
FORMAT_VERSION = 1
_REPLACEMENT = "\ufffd"
# Split points that the byte-level pre-tokenizer also splits at: a single "\n" between two
# printable non-space ASCII characters. Encoding/training chunk by chunk is then exact.
_CHUNK_SPLIT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
_CHUNK_MIN_CHARS = 8192


class Tokenizer(abc.ABC):
    """Base class: the special-token policy, ``decode`` of specials, and (de)serialisation."""

    kind: ClassVar[str]
    specials: ClassVar[tuple[str, ...]] = SPECIAL_TOKENS
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    bos_id: int = BOS_ID
    """Always an int (2); no method adds it unless asked with ``add_bos=True``."""
    unk_id: int = UNK_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; every id is in ``range(vocab_size)``."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Decode ids that are all ``>= len(specials)``."""

    @abc.abstractmethod
    def _payload(self) -> dict[str, Any]: ...

    @classmethod
    @abc.abstractmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> Tokenizer: ...

    # -- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``<bos>``/``<eos>`` only when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (see the module docstring for how specials render)."""
        n_special, vocab = len(self.specials), self.vocab_size
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < vocab:
                raise ValueError(f"token id {i} is out of range for vocab_size {vocab}")
            if i >= n_special:
                run.append(i)
                continue
            if run:
                out.append(self._decode_plain(run))
                run = []
            if i == self.unk_id:
                out.append(_REPLACEMENT)
            elif not skip_special_tokens:
                out.append(self.specials[i])
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        """Readable text of one id (specials by name, ``"<unk>"`` too), e.g. for tables of next
        tokens."""
        if 0 <= int(i) < len(self.specials):
            return self.specials[int(i)]
        return self.decode([i])

    @property
    def special_ids(self) -> dict[str, int]:
        """``{"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}``."""
        return {t: i for i, t in enumerate(self.specials)}

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with a ``"kind"`` field; inverse of :meth:`from_dict`."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "specials": list(self.specials),
            "vocab_size": self.vocab_size,
            **self._payload(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer of the kind named in ``d["kind"]`` (``"char"`` or ``"bpe"``).

        ``Tokenizer.from_dict`` accepts either kind; ``CharTokenizer.from_dict`` only its own.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a tokenizer dict must be a JSON object, got {type(d).__name__}")
        kind = d.get("kind")
        if kind not in _KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r} (expected one of {sorted(_KINDS)})")
        if cls is not Tokenizer and kind != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict got a {kind!r} tokenizer")
        if d.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"unsupported tokenizer format version {d.get('version')!r}")
        specials = d.get("specials", list(SPECIAL_TOKENS))
        if list(specials) != list(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer specials {specials!r} != {list(SPECIAL_TOKENS)!r}")
        try:
            tok = _KINDS[kind]._from_payload(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"corrupt {kind} tokenizer: {msg}") from e
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f"corrupt {kind} tokenizer: vocab_size {d['vocab_size']} != {tok.vocab_size}"
            )
        return tok

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as one JSON file, atomically; return the path."""
        return atomic_write_json(path, self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a file written by :meth:`Tokenizer.save`, dispatching on its ``"kind"``.

    Raises ``FileNotFoundError`` (missing file) or ``ValueError`` (not JSON, not a tokenizer,
    unknown kind, corrupt payload), each with a one-line message naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format", FORMAT) != FORMAT or "kind" not in d:
        raise ValueError(f"{p} is not a sparselens tokenizer file (no 'kind' field)")
    try:
        return Tokenizer.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


# -- character tokenizer ---------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """One id per character: ids 0..3 are the specials, then the sorted distinct characters.

    Characters not seen in training encode to ``<unk>`` (id 3), which decodes to U+FFFD. With
    ``lowercase=True`` text is lowercased before encoding (the vocabulary is lowercase too), so
    the round trip holds up to case.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], *, lowercase: bool = False) -> None:
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct")
        if chars != sorted(chars):
            raise ValueError("chars must be sorted")
        self.chars: tuple[str, ...] = tuple(chars)
        self.lowercase = bool(lowercase)
        n = len(self.specials)
        self._stoi = {c: i + n for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str | Iterable[str], *, lowercase: bool = False) -> CharTokenizer:
        """Vocabulary = specials + the sorted distinct characters of ``text`` (a str or an
        iterable of str)."""
        texts = [text] if isinstance(text, str) else list(text)
        seen: set[str] = set()
        for t in texts:
            seen.update(t.lower() if lowercase else t)
        return cls(sorted(seen), lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    def _encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        get, unk = self._stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def _decode_plain(self, ids: list[int]) -> str:
        n, chars = len(self.specials), self.chars
        return "".join(chars[i - n] for i in ids)

    def _payload(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase, "chars": "".join(self.chars)}

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> CharTokenizer:
        chars = d["chars"]
        if not isinstance(chars, str):
            raise ValueError("'chars' must be a string")
        return cls(list(chars), lowercase=bool(d.get("lowercase", False)))


# -- byte-level BPE --------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the alphabet of ``pre_tokenizers.ByteLevel``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


def _chunks(text: str) -> list[str]:
    return _CHUNK_SPLIT.split(text) if len(text) > _CHUNK_MIN_CHARS else [text]


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with the Hugging Face ``tokenizers`` package.

    Ids 0..3 are the specials, 4..259 the 256 single bytes (in the order of the ``tokenizers``
    byte alphabet), then one id per merge in the order learned. No normaliser and no prefix
    space, so encoding is exactly reversible. The trained ``tokenizers.Tokenizer`` is stored as
    its own JSON string inside the sparselens file. Long texts are encoded in chunks split at
    single newlines between printable ASCII characters, where the byte-level pre-tokenizer
    splits anyway, so the ids equal those of one whole-text encode (tested).
    """

    kind = "bpe"
    MIN_VOCAB: ClassVar[int] = len(SPECIAL_TOKENS) + 256

    def __init__(self, backend: Any) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(backend, HFTokenizer):
            raise TypeError("backend must be a tokenizers.Tokenizer")
        for i, t in enumerate(self.specials):
            if backend.token_to_id(t) != i:
                raise ValueError(f"special token {t!r} must have id {i}")
        if backend.get_vocab_size() < self.MIN_VOCAB:
            raise ValueError(f"a byte-level BPE needs at least {self.MIN_VOCAB} ids")
        backend.encode_special_tokens = True  # "<eos>" in text is text, not the special id
        self.backend = backend

    @classmethod
    def train(
        cls, texts: str | Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2
    ) -> BPETokenizer:
        """Train on ``texts`` (one str or an iterable of str); deterministic for equal input.

        ``vocab_size`` counts specials and the 256 bytes (so at least 260); it is an upper
        bound: training stops early when no pair occurs ``min_frequency`` times.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if int(vocab_size) < cls.MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {cls.MIN_VOCAB} (4 specials + 256 bytes)")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            min_frequency=int(min_frequency),
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        if isinstance(texts, str):
            texts = [texts]

        def pieces() -> Iterable[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise TypeError(f"training texts must be str, got {type(t).__name__}")
                yield from _chunks(t)

        backend.train_from_iterator(pieces(), trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size())

    def _encode(self, text: str) -> list[int]:
        try:
            chunks = _chunks(text)
            if len(chunks) == 1:
                return list(self.backend.encode(text, add_special_tokens=False).ids)
            encs = self.backend.encode_batch(chunks, add_special_tokens=False)
        except TypeError as e:  # lone surrogates cannot be UTF-8 encoded
            raise ValueError(f"text is not valid Unicode: {e}") from None
        return [i for enc in encs for i in enc.ids]

    def _decode_plain(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for (``b""`` for a special)."""
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id {i} is out of range for vocab_size {self.vocab_size}")
        if int(i) < len(self.specials):
            return b""
        return bytes(_BYTE_DECODER[c] for c in self.backend.id_to_token(int(i)))

    def id_to_token(self, i: int) -> str:
        """Readable text of one id; bytes that are not whole UTF-8 characters show as ``\\xNN``."""
        if 0 <= int(i) < len(self.specials):
            return super().id_to_token(i)
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    @property
    def merges(self) -> list[str]:
        """The learned merges in order, as ``"left right"`` strings of byte symbols."""
        model = json.loads(self.backend.to_str())["model"]
        return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def _payload(self) -> dict[str, Any]:
        return {"tokenizer_json": self.backend.to_str()}

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        s = d["tokenizer_json"]
        if not isinstance(s, str):
            raise ValueError("'tokenizer_json' must be a string")
        try:
            backend = HFTokenizer.from_str(s)
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"bad tokenizer_json ({str(e).splitlines()[0][:200]})") from None
        return cls(backend)


_KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}

__all__ = [
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK",
    "UNK_ID",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
