"""Config plumbing shared by every run: YAML files onto pydantic models, one-line errors."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
import yaml
from pydantic import BaseModel, ValidationError


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding one mapping (an empty file is ``{}``).

    Raises FileNotFoundError / ValueError with one line naming the file and the problem.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {p}: cannot read ({_reason(e)})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"config file {p}: invalid YAML ({problem}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"config file {p}: must hold a mapping of setting: value")
    return data


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def field_range(model: type[BaseModel], name: str) -> str | None:
    """The numeric bounds declared on ``model.name`` as text, e.g. ``"> 0 and <= 1"``."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    parts = []
    for m in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(m, getattr(at, attr.capitalize())):
                parts.append(f"{op} {_num(getattr(m, attr))}")
    return " and ".join(parts) or None


def _is_int_field(model: type[BaseModel] | None, name: str) -> bool:
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return False
    ann = field.annotation
    return ann is int or (int in typing.get_args(ann) and float not in typing.get_args(ann))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if not value or value.strip() != value else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem joined with ``"; "``, each naming the field and the allowed range."""
    model = model or _model_of(err)
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(x) for x in e["loc"] if not str(x).startswith(("function-", "literal["))]
        name = ".".join(loc) or "config"
        top = loc[0] if loc else ""
        kind = e["type"]
        got = f", got {_shown(e['input'])}" if "input" in e and kind != "missing" else ""
        rng = field_range(model, top) if model is not None else None
        ctx = e.get("ctx") or {}
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            what = "an integer " if _is_int_field(model, top) else ""
            bound = rng or e["msg"].removeprefix("Input should be ")
            lines.append(f"{name} must be {what}{bound}{got}")
        elif kind in ("int_parsing", "int_type", "int_from_float"):
            extra = f" {rng}" if rng else ""
            lines.append(f"{name} must be an integer{extra}{got}")
        elif kind in ("float_parsing", "float_type", "finite_number"):
            extra = f" {rng}" if rng else ""
            lines.append(f"{name} must be a finite number{extra}{got}")
        elif kind in ("bool_parsing", "bool_type"):
            lines.append(f"{name} must be true or false{got}")
        elif kind == "literal_error":
            lines.append(f"{name} must be one of {ctx.get('expected', '?')}{got}")
        elif kind == "extra_forbidden":
            lines.append(f"unknown setting {name!r}")
        elif kind == "missing":
            lines.append(f"{name} is required")
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
            lines.append(msg if msg.startswith(name) or not loc else f"{name}: {msg}")
        else:
            lines.append(f"{name}: {e['msg']}{got}")
    seen: list[str] = []
    for line in lines:
        if line not in seen:
            seen.append(line)
    return "; ".join(seen)


def _model_of(err: ValidationError) -> type[BaseModel] | None:
    title = err.title
    for cls in _all_subclasses(BaseModel):
        if cls.__name__ == title:
            return cls
    return None


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def config_to_yaml_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain YAML-safe data (paths as strings), in field order."""
    return config.model_dump(mode="json")


__all__ = ["config_to_yaml_dict", "field_range", "format_validation_error", "load_yaml_mapping"]


def check_resume_config(
    saved: BaseModel, given: BaseModel, resumable: frozenset[str] = frozenset({"progress"})
) -> None:
    """Raise if a resumed run is given settings that differ from its saved ``config.yaml``.

    Only the fields in ``resumable`` (display options such as ``progress``) may change.
    """
    a, b = saved.model_dump(mode="json"), given.model_dump(mode="json")
    for key in a:
        if key not in resumable and a[key] != b.get(key):
            raise ValueError(
                f"{key} differs from the run's config.yaml (saved {a[key]!r}, "
                f"given {b.get(key)!r}); a resumed run keeps its settings"
            )
