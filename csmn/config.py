"""Dataclass configs: defaults from the paper, overridden by a YAML file, then by the command line.

Every stage declares its own dataclass next to the code that uses it; this module only knows
how to fill one in. Overrides come from the generated ``--field-name value`` flags; list
values may be written ``3,4,5`` or ``[3, 4, 5]``, booleans ``true``/``false``; a boolean flag
alone (``--use-gpu``) means true, in every job alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with a clear error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, name) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any or origin is dict:
        return value
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError(f"config field {name!r}: expected a boolean, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"config field {name!r}: expected {annotation.__name__}, got {value!r}"
            ) from err
    return value


def build_config(cls: type[ConfigT], values: dict[str, Any] | None = None) -> ConfigT:
    """Instantiate ``cls`` from a mapping, rejecting unknown keys instead of ignoring them."""
    values = dict(values or {})
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(types_by_name))}"
        )
    kwargs = {k: _coerce(v, types_by_name[k], k) for k, v in values.items()}
    return cls(**kwargs)


def load_config(
    cls: type[ConfigT],
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
) -> ConfigT:
    """Defaults <- YAML file (optionally one top-level ``section`` of it) <- overrides."""
    values: dict[str, Any] = {}
    if yaml_path:
        from csmn.data.storage import read_text

        loaded = yaml.safe_load(read_text(str(yaml_path))) or {}
        if section is not None:
            loaded = loaded.get(section, {}) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, values)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--field-name`` flag per dataclass field (default None: keep the config's).
    Boolean fields take an optional value: ``--register`` and ``--register true`` are the same."""
    types_of = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = _default_of(f)
        if default is not dataclasses.MISSING and default not in ("", None, {}, [], ()):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})".strip()
        if types_of[f.name] is bool:
            parser.add_argument(flag, dest=prefix + f.name, default=None, nargs="?",
                                const="true", metavar="true|false", help=help_text)
        else:
            parser.add_argument(flag, dest=prefix + f.name, default=None, help=help_text)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A job's command line: ``--config FILE.yaml`` and one flag per field of ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", dest="config_file", default=None,
                        help=f"YAML file of {cls.__name__} fields (flags override it)")
    add_config_arguments(parser, cls)
    return parser


def config_from_args(
    cls: type[ConfigT], args: argparse.Namespace, yaml_path: str | None = None,
    prefix: str = "", section: str | None = None,
) -> ConfigT:
    overrides = {
        f.name: getattr(args, prefix + f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, prefix + f.name, None) is not None
    }
    return load_config(cls, yaml_path, overrides, section=section)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
