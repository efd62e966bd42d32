"""Dataclass configs: defaults from the paper, overridden by a YAML file, then by the command line.

Every stage declares its own dataclass next to the code that uses it; this module only knows
how to fill one in. Overrides come from the generated ``--field-name value`` flags; list
values may be written ``3,4,5`` or ``[3, 4, 5]``, booleans ``true``/``false``; a boolean flag
alone (``--use-gpu``) means true, in every job alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
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
    if annotation is str and isinstance(value, (list, tuple)):
        # Fields holding comma-separated names (--variants, --baselines) take lists too.
        return ",".join(str(v) for v in value)
    if annotation is str and isinstance(value, str) and value.startswith("["):
        listed = yaml.safe_load(value) if value.endswith("]") else None
        if isinstance(listed, list):
            return ",".join(str(v) for v in listed)
    if annotation is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"config field {name!r}: expected int, got {value!r}")
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
    return cls(**coerce_values(cls, values or {}))


def coerce_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields (also a nested config given as
    a mapping, such as ``--model``), unknown keys refused instead of ignored. An empty YAML
    value (``storage:``, ``~``) leaves a field that cannot be None at its default: str(None)
    would make it the text "None" (a folder, a run name)."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(types_by_name))}")
    return {k: _coerce(v, types_by_name[k], k) for k, v in values.items()
            if v is not None or _optional(types_by_name[k])}


def _optional(annotation: Any) -> bool:
    return (annotation is Any or typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(annotation))


def load_config(
    cls: type[ConfigT],
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
    auto_section: str | None = None,
) -> ConfigT:
    """Defaults <- YAML file (optionally one top-level ``section`` of it; ``auto_section``:
    that section where the file has it, else the whole file) <- overrides.

    Every problem with what the user gave (the file missing or not YAML, a section it lacks,
    an unknown field, a value of the wrong type or out of range) is a :class:`ConfigError`."""
    try:
        values: dict[str, Any] = {}
        if yaml_path:
            loaded = _read_yaml_mapping(yaml_path)
            if section is None and isinstance(loaded.get(auto_section), dict):
                section = auto_section
            if section is not None:
                loaded = _section_of(loaded, section, yaml_path)
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return build_config(cls, values)
    except ConfigError:
        raise
    except (ValueError, TypeError, yaml.YAMLError) as err:
        raise ConfigError(' '.join(str(err).split())) from err


class ConfigError(ValueError):
    """What the user configured cannot run: the commands print it in one line and exit 2."""


def _read_yaml_mapping(yaml_path: str | Path) -> dict[str, Any]:
    from csmn.data.storage import read_text

    try:
        loaded = yaml.safe_load(read_text(str(yaml_path))) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"no config file {yaml_path}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {yaml_path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{yaml_path} is not YAML: {' '.join(str(err).split())}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of config fields")
    return loaded


def _section_of(loaded: dict[str, Any], section: str, yaml_path: str | Path) -> dict[str, Any]:
    """One section of a file of sections; a section it lacks, or fields beside the sections
    (which would be dropped without a word), are refused."""
    if section not in loaded:
        raise ConfigError(f"{yaml_path} has no section {section!r} (its top-level keys: "
                          f"{', '.join(map(str, loaded)) or 'none'})")
    # An empty value (``train:`` with nothing under it) is an empty section, not a field.
    beside = sorted(str(k) for k, v in loaded.items() if not isinstance(v, dict | None))
    if beside:
        raise ConfigError(f"{yaml_path}: field(s) {', '.join(beside)} beside the section "
                          f"{section!r} would be ignored; move them into a section")
    chosen = loaded[section] or {}
    if not isinstance(chosen, dict):
        raise ConfigError(f"{yaml_path}: section {section!r} is not a mapping of fields")
    return chosen


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
    prefix: str = "", section: str | None = None, auto_section: str | None = None,
) -> ConfigT:
    overrides = {
        f.name: getattr(args, prefix + f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, prefix + f.name, None) is not None
    }
    return load_config(cls, yaml_path, overrides, section=section, auto_section=auto_section)


def configs_from_args(classes: tuple[type, ...], args: argparse.Namespace,
                      yaml_path: str | None = None) -> tuple[Any, ...]:
    """One config per class from one command line and one YAML file whose keys may belong
    to any of them (each key to the first class with such a field; a key none has is
    refused, as :func:`build_config` refuses it)."""
    loaded = _read_yaml_mapping(yaml_path) if yaml_path else {}
    names = [set(_field_types(cls)) for cls in classes]
    unknown = sorted(set(loaded) - set().union(*names))
    if unknown:
        known = sorted(set().union(*names))
        raise ConfigError(f"unknown {' / '.join(c.__name__ for c in classes)} field(s): "
                          f"{', '.join(unknown)}; known: {', '.join(known)}")
    out = []
    for i, cls in enumerate(classes):
        values = {k: v for k, v in loaded.items()
                  if k in names[i] and not any(k in n for n in names[:i])}
        values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                       if getattr(args, f.name, None) is not None})
        try:
            out.append(build_config(cls, values))
        except (ValueError, TypeError, yaml.YAMLError) as err:
            raise ConfigError(' '.join(str(err).split())) from err
    return tuple(out)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data for manifests and summaries, secrets redacted."""
    return redact(dataclasses.asdict(config))


# --------------------------------------------------------------------------------------------
# Redaction: every value the project writes to a manifest, a summary, MLflow or stdout goes
# through :func:`redact` (mappings) or :func:`redact_text` (one string).

REDACTED = "***"
# Key words that mark a secret: "db_password", "AWS_SECRET_ACCESS_KEY", "apiToken". Matched
# as words, so "max_tokens" or "token_ids" are not taken for one.
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "secret", "token", "credential",
                           "credentials", "apikey", "passphrase"})
# ...unless a word after it says the value only counts or names such things ("token_ids").
_NOT_SECRET_AFTER = frozenset({"id", "ids", "count", "counts", "length", "lengths", "rate"})
_SECRET_PAIRS = frozenset({("access", "key"), ("api", "key"), ("private", "key"),
                           ("secret", "key"), ("session", "key"), ("auth", "key")})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
# scheme://userinfo@host: everything before the last "@" of the authority.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/?#\s@]*(?::[^/?#\s@]*)?"
                       r"(?:@[^/?#\s@]*)*@")
# A password holding "/" (unencoded, but seen): user:pa/ss@host.
_USERINFO_SLASH = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^\s:/?#@]+:[^\s@?#]*@")
# Query parameters that carry a credential (signed URLs: X-Amz-Signature, X-Amz-Credential,
# sig, token, access_token, api_key, password).
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:[^=&;#\s]*(?:sig|signature|token|key|secret|password|passwd|"
    r"credential|auth)[^=&;#\s]*)=)[^&;#\s]*", re.IGNORECASE)
# AWS access key ids, wherever they appear.
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
# Environment values shorter than this are not searched for (they would match by chance).
_MIN_ENV_SECRET = 8


def is_secret_key(key: Any) -> bool:
    """True when a key's name says its value is a secret."""
    words = [w.lower() for w in _WORD.findall(str(key))]
    if words and words[-1] in _NOT_SECRET_AFTER:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


# The shell's working directories: "pwd" names a password anywhere else.
_SHELL_VARIABLES = frozenset({"PWD", "OLDPWD"})


def _environment_secrets() -> list[str]:
    # By name, then .get: another thread (MLflow's telemetry) may unset a variable between
    # the listing and the read, where os.environ.items() raises KeyError.
    values = {value for name in list(os.environ)
              if is_secret_key(name) and name not in _SHELL_VARIABLES
              for value in [os.environ.get(name) or ""] if len(value) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with credentials blanked: URI user info (``postgresql://user:pw@host`` ->
    ``postgresql://***@host``), secret query parameters, AWS key ids, and the value of every
    secret-named environment variable wherever it appears."""
    if not text:
        return text
    for value in _environment_secrets():
        if value in text:
            text = text.replace(value, REDACTED)
    if "@" in text:
        text = _USERINFO_SLASH.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
        text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m.group('name')}{REDACTED}", text)
    return _AWS_KEY_ID.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists, strings; other values as they are) with the
    values of secret-named keys replaced by ``***`` and every string (keys too) passed
    through :func:`redact_text`."""
    if isinstance(value, Mapping):
        return {redact_text(k) if isinstance(k, str) else k:
                (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
