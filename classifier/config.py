"""Experiment YAML + command-line overrides -> one typed, validated config object per command."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from classifier.errors import UserError

Config = TypeVar("Config")


def load_section(path: Path | None, section: str) -> dict[str, Any]:
    """Return the `section:` mapping of an experiment YAML (empty when no file is given)."""
    if path is None:
        return {}
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise UserError(f"{path}: cannot read config ({error.strerror}); pass an existing YAML file") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]}); fix the file") from error
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a mapping of sections (prepare:, train:, search:) at the top level")
    values = document.get(section) or {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: section '{section}' must be a mapping of option: value")
    return values


def build_config(cls: type[Config], *sources: dict[str, Any], origin: str = "config") -> Config:
    """Merge mappings (later ones win, None values ignored) into dataclass `cls`, checking names and types."""
    names = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(names))}"
                raise UserError(f"{origin}: unknown option '{key}'{hint}")
            if value is not None:
                values[key] = _coerce(value, hints[key], f"{origin}: option '{key}'")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _coerce(value: Any, hint: Any, what: str) -> Any:
    """Convert YAML/CLI values to the annotated type (int, float, bool, str, Path, lists, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _coerce(value, option, what)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, list | tuple):
            raise UserError(f"{what} must be a list, got {value!r}")
        return [_coerce(part, item, what) for part in value]
    if origin is dict or hint is Any:
        return value
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError) as error:
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{what} must be of type {name}, got {value!r}") from error
