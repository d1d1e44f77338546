"""Mini-GPT checkpoints: a directory of ``model.safetensors``, ``config.json`` and, optionally,
``tokenizer.json``. Nothing is ever unpickled.

Every file is written atomically (:mod:`sparselens.train.atomic`); ``config.json`` is written
last and records the SHA-256 of the other files, so a directory whose tensors or tokenizer were
replaced, truncated or half-written is rejected on load instead of giving a silently different
model. The tied head is stored once (``embed.weight``; safetensors refuses shared tensors).

``config.json``::

    {"format": "sparselens.minigpt/1", "config": {...MiniGPTConfig...}, "dtype": "float32",
     "files": {"model.safetensors": "<sha256>", "tokenizer.json": "<sha256>"},
     "tokenizer": "tokenizer.json" | null, "extra": {...}}
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from sparselens.lm.model import MiniGPT, MiniGPTConfig
from sparselens.train.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    safetensors_bytes,
    sha256_bytes,
    tensors_from_bytes,
)
from sparselens.train.config import format_validation_error

if TYPE_CHECKING:
    from sparselens.lm.tokenizers import Tokenizer

FORMAT = "sparselens.minigpt/1"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_TIED = "head.weight"


def _tokenizer_bytes(tokenizer: Any) -> bytes:
    """What ``tokenizer.save(path)`` writes, read back (saved in a scratch directory)."""
    with tempfile.TemporaryDirectory(prefix="sparselens-tok-") as tmp:
        path = Path(tmp) / TOKENIZER_FILE
        tokenizer.save(str(path))
        return path.read_bytes()


def _check_vocab(tokenizer: Any, config: MiniGPTConfig, where: Path | str) -> None:
    n = getattr(tokenizer, "vocab_size", None)
    if isinstance(n, int) and n > config.vocab_size:
        raise ValueError(
            f"{where}: tokenizer has {n} ids but the model's vocab_size is {config.vocab_size}"
        )


def save_checkpoint(
    directory: str | Path,
    model: MiniGPT,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``, ``extra``) into ``directory``; return the directory.

    ``extra`` must be JSON-serialisable (training step, corpus hash, ...). An existing
    checkpoint in ``directory`` is replaced: a reader that comes in before the new
    ``config.json`` lands gets a checksum error, never a mix of old and new files. A stale
    ``tokenizer.json`` is removed when no tokenizer is given.
    """
    if not isinstance(model, MiniGPT):
        raise TypeError(f"model must be a MiniGPT, got {type(model).__name__}")
    directory = Path(directory)
    try:
        extra_json = json.loads(json.dumps(extra or {}, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable: {e}") from None
    if tokenizer is not None:
        _check_vocab(tokenizer, model.config, "tokenizer")
    blob = safetensors_bytes({k: v for k, v in model.state_dict().items() if k != _TIED})
    files = {MODEL_FILE: sha256_bytes(blob)}
    tok_blob = _tokenizer_bytes(tokenizer) if tokenizer is not None else None
    if tok_blob is not None:
        files[TOKENIZER_FILE] = sha256_bytes(tok_blob)
    atomic_write_bytes(directory / MODEL_FILE, blob)
    if tok_blob is not None:
        atomic_write_bytes(directory / TOKENIZER_FILE, tok_blob)
    doc = {
        "format": FORMAT,
        "config": model.config.model_dump(mode="json"),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "files": files,
        "tokenizer": TOKENIZER_FILE if tok_blob is not None else None,
        "extra": extra_json,
    }
    atomic_write_json(directory / CONFIG_FILE, doc)
    if tok_blob is None:
        (directory / TOKENIZER_FILE).unlink(missing_ok=True)
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (not a Mini-GPT checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: not a Mini-GPT checkpoint (format {got!r}, expected {FORMAT})")
    files = doc.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise ValueError(f"{path}: no checksum for {MODEL_FILE}")
    unknown = sorted(set(files) - {MODEL_FILE, TOKENIZER_FILE})
    if unknown or not all(isinstance(v, str) for v in files.values()):
        raise ValueError(f"{path}: malformed file list {unknown or files}")
    return doc


def _read_checked(directory: Path, name: str, files: dict[str, Any]) -> bytes:
    path = directory / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (listed in {CONFIG_FILE})") from None
    if sha256_bytes(data) != files.get(name):
        raise ValueError(
            f"{path}: does not match the SHA-256 recorded in {CONFIG_FILE} "
            "(corrupt or partially written)"
        )
    return data


def default_checkpoint() -> Path:
    """The bundled Mini-GPT trained on the verbs corpus (``sparselens/data/minigpt-verbs``)."""
    return Path(__file__).resolve().parent.parent / "data" / "minigpt-verbs"


def load_checkpoint(
    directory: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[MiniGPT, Tokenizer | None]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(model in eval mode, tokenizer)``.

    ``directory=None`` loads the bundled :func:`default_checkpoint`. Raises FileNotFoundError /
    ValueError with one line naming the offending file.
    """
    directory = Path(directory) if directory is not None else default_checkpoint()
    doc = _read_config(directory)
    cfg_path = directory / CONFIG_FILE
    try:
        config = MiniGPTConfig.model_validate(doc.get("config"))
    except ValidationError as e:
        msg = format_validation_error(e, MiniGPTConfig)
        raise ValueError(f"{cfg_path}: invalid model config: {msg}") from None
    files = doc["files"]
    blob = _read_checked(directory, MODEL_FILE, files)
    model_path = directory / MODEL_FILE
    tensors = tensors_from_bytes(blob, model_path)
    if "embed.weight" not in tensors:
        raise ValueError(f"{model_path}: no embed.weight tensor")
    with torch.random.fork_rng(devices=[]):  # building the model must not move the global RNG
        model = MiniGPT(config)
    model.to(dtype=tensors["embed.weight"].dtype)
    try:
        model.load_state_dict({**tensors, _TIED: tensors["embed.weight"]}, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        msg = f"{model_path}: does not fit the config in {CONFIG_FILE}: {detail}"
        raise ValueError(msg) from None
    model.to(map_location).eval()
    tokenizer = None
    tok_name = doc.get("tokenizer")
    if tok_name is not None:
        if tok_name != TOKENIZER_FILE:
            raise ValueError(f"{cfg_path}: unexpected tokenizer file {tok_name!r}")
        _read_checked(directory, TOKENIZER_FILE, files)
        from sparselens.lm.tokenizers import load_tokenizer

        tok_path = directory / TOKENIZER_FILE
        try:
            tokenizer = load_tokenizer(tok_path)  # its errors name the file
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{tok_path}: cannot load tokenizer ({e})") from None
        _check_vocab(tokenizer, config, tok_path)
    return model, tokenizer


def read_checkpoint_extra(directory: str | Path) -> dict[str, Any]:
    """The ``extra`` dict stored with a checkpoint (no tensors are read)."""
    return dict(_read_config(Path(directory)).get("extra") or {})


def checkpoint_hash(directory: str | Path) -> str:
    """SHA-256 identifying a checkpoint: over the names and contents of ``config.json`` and the
    files it lists (which it verifies), in sorted order. Stable across copies and re-saves."""
    directory = Path(directory)
    doc = _read_config(directory)
    names = sorted({CONFIG_FILE, *doc["files"]})
    h = hashlib.sha256()
    for name in names:
        if name == CONFIG_FILE:
            data = (directory / CONFIG_FILE).read_bytes()
        else:
            data = _read_checked(directory, name, doc["files"])
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "checkpoint_hash",
    "load_checkpoint",
    "read_checkpoint_extra",
    "save_checkpoint",
]
