"""Atomic file writes: a reader (or a killed process) sees the old file or the new one, never
half a file.

Every writer goes through :func:`atomic_write_bytes`-style logic: write a temporary file in the
destination directory (hidden, ``.<name>.<random>.tmp``), flush and ``fsync`` it, then
``os.replace`` it onto the destination and ``fsync`` the directory. A crash before the replace
leaves the old file intact plus, at worst, a hidden ``*.tmp`` file that :func:`remove_temp_files`
cleans up.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

TEMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8, ``\\n`` newlines).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists, so that an interrupt (signals become exceptions) landing as the file
    # is created still finds the name to remove; mkstemp names it only after creating it.
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if mode == "w":
            f: IO[Any] = open(fd, "w", encoding="utf-8", newline="\n")
        else:
            f = open(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as block-style YAML (keys in insertion order) atomically."""
    return atomic_write_text(
        path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)
    )


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``writer(binary_file)`` on a temporary file, then move it onto ``path``."""
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` atomically. Keep ``obj`` to tensors, containers and plain scalars so
    that :func:`load_torch` (``weights_only=True``) can read it back."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: never unpickles arbitrary objects."""
    import torch

    return torch.load(Path(path), map_location=map_location, weights_only=True)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the checksums recorded beside checkpoint files)."""
    return hashlib.sha256(data).hexdigest()


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """A flat ``{name: tensor}`` mapping serialised as safetensors (tensors moved to the CPU)."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(flat, metadata=dict(metadata) if metadata else None)


def tensors_from_bytes(
    blob: bytes, name: str | os.PathLike[str] = "data"
) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (never a pickle); a corrupt blob raises one ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: not a safetensors file ({e})") from None


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a flat ``{name: tensor}`` mapping as safetensors, atomically."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file as ``{name: tensor}`` on the CPU."""
    return tensors_from_bytes(Path(path).read_bytes(), path)


def remove_temp_files(directory: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Delete leftover temporary files of interrupted atomic writes; return what was removed."""
    root = Path(directory)
    if not root.is_dir():
        return []
    pattern = f"**/.*{TEMP_SUFFIX}" if recursive else f".*{TEMP_SUFFIX}"
    removed = []
    for p in root.glob(pattern):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "atomic_write_yaml",
    "load_safetensors",
    "load_torch",
    "remove_temp_files",
    "save_safetensors",
    "save_torch",
]
