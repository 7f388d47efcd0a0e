"""Dotted overrides (`"moe.num_experts=16"`), config files, and a field-by-field description.

    cfg = apply_overrides(tiny(), ["moe.num_experts=16", "model.dtype=bfloat16"])
    cfg = apply_overrides(tiny(), config_file_overrides("my_moe.json"))
    for key, value, meaning in describe(cfg): print(key, value, meaning)

Values are parsed by the field's type: ints, floats, booleans (true/false/1/0), strings
and tuples (comma-separated). Unknown keys raise with a "did you mean".

A config file is JSON shaped like a run's `config.json`, whole or in part:
`{"name": "wide", "moe": {"num_experts": 16, "top_k": 4}}`. Its values must have the
field's JSON type (a number for a number, true/false for a flag, a list for a tuple).
"""

import dataclasses
import difflib
import inspect
import json
from pathlib import Path

from toolkit.config.schema import Config, ConfigError

_NUMERIC_TUPLES = ("data.domain_weights",)


def suggest(word, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _sections(cfg: Config) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name))}


def all_keys(cfg: Config) -> list:
    keys = [f.name for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    for sec, obj in _sections(cfg).items():
        keys += [f"{sec}.{f.name}" for f in dataclasses.fields(obj)]
    return keys


def _parse(key: str, text: str, current):
    kind = type(current)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is tuple:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return tuple(float(p) for p in parts) if key in _NUMERIC_TUPLES else tuple(parts)
        return text
    except ValueError:
        kind_name = "comma-separated list of numbers, e.g. 0.7,0.3" if key in _NUMERIC_TUPLES \
            else kind.__name__
        raise ConfigError(f"{key}={text!r} is not a valid {kind_name}; "
                          f"the current value is {current!r}") from None


def apply_overrides(cfg: Config, overrides) -> Config:
    """Apply `["section.field=value", ...]` (or a dict of them) and return a new config."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    sections = _sections(cfg)
    for key, value in items:
        parts = key.split(".")
        if key == "precision" and isinstance(value, str):   # a whole recipe: precision=fp8
            from toolkit.config.presets import precision_recipe
            cfg = dataclasses.replace(cfg, precision=precision_recipe(value))
            sections = _sections(cfg)
            continue
        if len(parts) == 1 and parts[0] in {f.name for f in dataclasses.fields(cfg)} \
                and parts[0] not in sections:
            cfg = dataclasses.replace(cfg, **{key: value if not isinstance(value, str) else value})
            continue
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"unknown config key {key!r}{suggest(key, all_keys(cfg))}; "
                              f"keys look like 'moe.num_experts' (see `python -m toolkit config`)")
        sec, name = parts
        obj = sections[sec]
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}{suggest(key, all_keys(cfg))}; "
                              f"{sec} has: {', '.join(names)}")
        current = getattr(obj, name)
        parse = isinstance(value, str) and not isinstance(current, str)
        new = _parse(key, value, current) if parse else value
        obj = dataclasses.replace(obj, **{name: new})
        sections[sec] = obj
        cfg = dataclasses.replace(cfg, **{sec: obj})
    return cfg


def _json_type_ok(value, current) -> bool:
    if isinstance(current, bool):
        return isinstance(value, bool)
    if isinstance(current, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(current, tuple):
        return isinstance(value, list)
    return isinstance(value, str)


def config_file_overrides(path, base: Config | None = None) -> dict:
    """The settings of a JSON config file as `{"section.field": value}` for
    `apply_overrides`; every key and value type is checked against `base` (default:
    `Config()`), and a file that is missing, unreadable or not JSON is named with the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file; give a JSON "
                          f"file such as runs/NAME/config.json")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; give a JSON file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} holds a JSON {type(tree).__name__}; it must be "
                          f'an object like {{"moe": {{"num_experts": 16}}}}')
    base = base or Config()
    sections, out = _sections(base), {}
    for key, value in tree.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config file {str(path)!r}: {key!r} must be an object of "
                                  f"{key} fields, got {value!r}")
            items = [(f"{key}.{name}", v) for name, v in value.items()]
        elif key == "name":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"config file {str(path)!r}: name={value!r} must be a non-empty string")
            out["name"] = value
            continue
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown key {key!r}{suggest(key, sections)}; "
                              f"top-level keys are name, {', '.join(sections)}")
        for dotted, v in items:
            sec, name = dotted.split(".", 1)
            fields = {f.name for f in dataclasses.fields(sections[sec])}
            if name not in fields:
                raise ConfigError(f"config file {str(path)!r}: unknown key {dotted!r}"
                                  f"{suggest(dotted, all_keys(base))}; "
                                  f"{sec} has: {', '.join(sorted(fields))}")
            current = getattr(sections[sec], name)
            if not _json_type_ok(v, current):
                raise ConfigError(f"config file {str(path)!r}: {dotted}={json.dumps(v)} should be a JSON "
                                  f"{_JSON_NAMES[type(current)]} like {json.dumps(_jsonable(current))}")
            out[dotted] = tuple(v) if isinstance(current, tuple) else v
    return out


_JSON_NAMES = {bool: "true/false", int: "integer", float: "number", str: "string", tuple: "list"}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _split(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as section.field=value, "
                          f"e.g. moe.num_experts=16")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _attribute_docs(cls) -> dict:
    doc = inspect.getdoc(cls) or ""
    out, current = {}, None
    in_attrs = False
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("    ") and ":" in stripped:
            current, text = stripped.split(":", 1)
            out[current] = text.strip()
        elif current and stripped:
            out[current] += " " + stripped
    return out


def describe(cfg: Config) -> list:
    """`[(key, value, meaning), ...]` for every field, meanings from the `Attributes:` docs."""
    rows = [("name", cfg.name, "run label; names the run directory")]
    for sec, obj in _sections(cfg).items():
        docs = _attribute_docs(type(obj))
        rows += [(f"{sec}.{f.name}", getattr(obj, f.name), docs.get(f.name, ""))
                 for f in dataclasses.fields(obj)]
    return rows
