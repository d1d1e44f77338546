"""Tests for sparselens.lm.tokenizers: specials, round trips, determinism, persistence, errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparselens.lm import tokenizers as T
from sparselens.lm.corpora import shakespeare_slice, verbs_corpus
from sparselens.lm.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
)

EDGE_TEXTS = [
    "",
    " ",
    "  leading spaces",
    "\n\nleading newlines\n",
    "trailing spaces   ",
    "a\n\n b\n \n\tc\r\nd\re",
    "Mañana él comerá; São Paulo; naïve café; Ærøskøbing",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flags 🇪🇸",
    "<eos> <pad><bos><unk> are text, not specials",
    "NUL\x00 and \x7f and \u2028 and \xa0 nbsp",
    "Tomorrow she will go.\nTomorrow she is going to walk.\n",
    "don't it's we'll they've I'm",
]
MIXED = st.text(alphabet=st.sampled_from(list(" \n\t\r.'aéZ7🤖<>sheTomorrow")), max_size=80)


@pytest.fixture(scope="module")
def train_text() -> str:
    return verbs_corpus(seed=0, n_sentences=3000) + shakespeare_slice()


@pytest.fixture(scope="module")
def bpe(train_text: str) -> BPETokenizer:
    return BPETokenizer.train(train_text, vocab_size=512)


# -- specials --------------------------------------------------------------------------------
def test_specials_ids_are_fixed_and_shared(bpe: BPETokenizer) -> None:
    char = CharTokenizer.train("abc")
    for tok in (char, bpe):
        assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
        assert tok.special_ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
        assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    for i, t in enumerate(T.SPECIAL_TOKENS):
        assert bpe.backend.token_to_id(t) == i


def test_specials_in_text_are_plain_text(bpe: BPETokenizer) -> None:
    char = CharTokenizer.train("<eos> x")
    for tok in (char, bpe):
        ids = tok.encode("<eos>")
        assert len(ids) > 1 and tok.eos_id not in ids
        assert tok.decode(ids) == "<eos>"


def test_bos_eos_only_when_asked(bpe: BPETokenizer) -> None:
    for tok in (CharTokenizer.train("hello"), bpe):
        plain = tok.encode("hello")
        assert tok.bos_id not in plain and tok.eos_id not in plain
        assert tok.encode("hello", add_bos=True, add_eos=True) == [tok.bos_id, *plain, tok.eos_id]


def test_decode_specials_policy(bpe: BPETokenizer) -> None:
    for tok in (CharTokenizer.train("hi"), bpe):
        ids = [tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]
        assert tok.decode(ids) == "hi"
        assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos><pad>"
        assert tok.decode([tok.unk_id]) == "\ufffd"
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([tok.vocab_size])
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([-1])


# -- char ------------------------------------------------------------------------------------
def test_char_vocab_is_specials_plus_sorted_chars() -> None:
    tok = CharTokenizer.train("hello world\n")
    assert tok.chars == tuple(sorted(set("hello world\n")))
    assert tok.vocab_size == 4 + len(set("hello world\n"))
    assert tok.encode("\n") == [4]  # "\n" sorts first
    assert tok.encode("d") == [4 + tok.chars.index("d")]


def test_char_unknown_characters_map_to_unk() -> None:
    tok = CharTokenizer.train("abc")
    assert tok.encode("abxc") == [4, 5, 3, 6]
    assert tok.decode(tok.encode("abxc")) == "ab\ufffdc"


def test_char_lowercase() -> None:
    tok = CharTokenizer.train("Hello World", lowercase=True)
    assert tok.chars == tuple(sorted(set("hello world")))
    assert tok.decode(tok.encode("HELLO")) == "hello"
    assert load_tokenizer_roundtrip(tok).lowercase is True


def test_char_corpora_fit_in_64_ids() -> None:
    assert CharTokenizer.train(verbs_corpus(n_sentences=2000)).vocab_size <= 64
    assert CharTokenizer.train(shakespeare_slice(), lowercase=True).vocab_size <= 64


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_char_round_trip(text: str) -> None:
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_rejects_bad_vocab() -> None:
    with pytest.raises(ValueError):
        CharTokenizer(["b", "a"])
    with pytest.raises(ValueError):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError):
        CharTokenizer(["ab"])


# -- BPE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_bpe_round_trip_edge_cases(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.unk_id not in ids
    assert bpe.decode(ids) == text


@given(st.text(max_size=200))
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_bpe_round_trip_any_unicode(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@given(MIXED)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_bpe_round_trip_whitespace_heavy(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@given(st.lists(MIXED, min_size=1, max_size=30))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_bpe_chunked_encoding_is_exact(
    bpe: BPETokenizer, monkeypatch: pytest.MonkeyPatch, parts: list[str]
) -> None:
    """Long texts are encoded in chunks; the ids must equal one whole-text encode."""
    text = "\n".join(parts)
    whole = bpe.backend.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(T, "_CHUNK_MIN_CHARS", 0)
    assert bpe.encode(text) == whole


def test_bpe_chunked_encoding_on_real_text(bpe: BPETokenizer, train_text: str) -> None:
    assert len(train_text) > T._CHUNK_MIN_CHARS and len(T._chunks(train_text)) > 100
    assert bpe.encode(train_text) == bpe.backend.encode(train_text, add_special_tokens=False).ids


def test_bpe_rejects_invalid_unicode(bpe: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        bpe.encode("a\ud800b")


def test_bpe_vocab_size_respected(train_text: str, bpe: BPETokenizer) -> None:
    assert bpe.vocab_size == 512
    small = BPETokenizer.train(train_text, vocab_size=300)
    assert small.vocab_size == 300 and len(small.merges) == 300 - 260
    assert max(max(small.encode(train_text[:5000])), 0) < 300
    tiny = BPETokenizer.train("ab ab ab", vocab_size=1000)  # runs out of pairs: an upper bound
    assert 260 <= tiny.vocab_size < 1000
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        BPETokenizer.train(train_text, vocab_size=259)


def test_bpe_bytes_cover_all_256(bpe: BPETokenizer) -> None:
    assert sorted(bpe.token_bytes(i)[0] for i in range(4, 260)) == list(range(256))
    assert all(len(bpe.token_bytes(i)) == 1 for i in range(4, 260))
    assert all(len(bpe.token_bytes(i)) >= 2 for i in range(260, bpe.vocab_size))
    assert bpe.token_bytes(bpe.eos_id) == b""


def test_bpe_learns_the_verb_morphology(bpe: BPETokenizer) -> None:
    """Frequent words of the verb corpus become single tokens (course: will, going, -ed, ...)."""
    for word in (" will", " going", " to", "Tomorrow", " she"):
        ids = bpe.encode(word)
        assert len(ids) == 1, (word, [bpe.id_to_token(i) for i in ids])
        assert bpe.id_to_token(ids[0]) == word
    assert [bpe.id_to_token(i) for i in bpe.encode("é")] == ["\\xc3", "\\xa9"]


def test_bpe_training_is_deterministic(train_text: str, bpe: BPETokenizer) -> None:
    again = BPETokenizer.train(train_text, vocab_size=512)
    assert again.to_dict() == bpe.to_dict()
    assert again.merges == bpe.merges and len(bpe.merges) == 512 - 260
    # the same text as a list of pieces (split at line starts) trains the same model
    pieces = BPETokenizer.train(train_text.splitlines(keepends=True), vocab_size=512)
    assert pieces.merges == bpe.merges
    other = BPETokenizer.train(verbs_corpus(seed=0, n_sentences=3000), vocab_size=512)
    assert other.merges != bpe.merges


def test_char_training_is_deterministic() -> None:
    text = verbs_corpus(seed=3, n_sentences=500)
    assert CharTokenizer.train(text).to_dict() == CharTokenizer.train(text).to_dict()


# -- persistence -----------------------------------------------------------------------------
def load_tokenizer_roundtrip(tok: Tokenizer) -> Tokenizer:
    return Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, bpe: BPETokenizer, train_text: str, kind: str) -> None:
    tok = CharTokenizer.train(train_text) if kind == "char" else bpe
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temp files
    d = json.loads(path.read_text())
    assert d["kind"] == kind and d["specials"] == list(T.SPECIAL_TOKENS)
    assert d["vocab_size"] == tok.vocab_size
    if kind == "bpe":
        assert isinstance(d["tokenizer_json"], str) and json.loads(d["tokenizer_json"])["model"]
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.to_dict() == tok.to_dict()
    for text in [train_text[:3000], *EDGE_TEXTS]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode("<eos>") == tok.encode("<eos>")  # still text after loading
    assert load_tokenizer_roundtrip(tok).to_dict() == tok.to_dict()


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as e:
        load_tokenizer(tmp_path / "nope.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        ("[1, 2]", "not a sparselens tokenizer"),
        ('{"format": "other", "kind": "char"}', "not a sparselens tokenizer"),
        ('{"kind": "wordpiece"}', "unknown tokenizer kind 'wordpiece'"),
        ('{"kind": "char"}', "corrupt char tokenizer"),
        ('{"kind": "char", "chars": 5}', "corrupt char tokenizer"),
        ('{"kind": "char", "chars": "ba"}', "corrupt char tokenizer"),
        ('{"kind": "char", "chars": "ab", "vocab_size": 99}', "vocab_size 99 != 6"),
        ('{"kind": "char", "chars": "ab", "version": 7}', "version"),
        ('{"kind": "char", "chars": "ab", "specials": ["<pad>"]}', "specials"),
        ('{"kind": "bpe"}', "corrupt bpe tokenizer"),
        ('{"kind": "bpe", "tokenizer_json": "{garbage"}', "corrupt bpe tokenizer"),
    ],
)
def test_load_corrupt_files(tmp_path, content: str | bytes, match: str) -> None:
    p = tmp_path / "tok.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_bpe_json_with_wrong_special_ids(bpe: BPETokenizer) -> None:
    d = bpe.to_dict()
    inner = json.loads(d["tokenizer_json"])
    inner["added_tokens"][0]["content"], inner["added_tokens"][1]["content"] = "<eos>", "<pad>"
    vocab = inner["model"]["vocab"]
    vocab["<pad>"], vocab["<eos>"] = vocab["<eos>"], vocab["<pad>"]
    d["tokenizer_json"] = json.dumps(inner)
    with pytest.raises(ValueError, match="corrupt bpe tokenizer"):
        Tokenizer.from_dict(d)


def test_subclass_from_dict_checks_kind(bpe: BPETokenizer) -> None:
    with pytest.raises(ValueError, match=r"CharTokenizer\.from_dict got a 'bpe'"):
        CharTokenizer.from_dict(bpe.to_dict())
    assert isinstance(BPETokenizer.from_dict(bpe.to_dict()), BPETokenizer)
