"""Dotted overrides (`"moe.num_experts=16"`) and a field-by-field description of a config.

    cfg = apply_overrides(tiny(), ["moe.num_experts=16", "model.dtype=bfloat16"])
    for key, value, meaning in describe(cfg): print(key, value, meaning)

Values are parsed by the field's type: ints, floats, booleans (true/false/1/0), strings
and tuples (comma-separated). Unknown keys raise with a "did you mean".
"""

import dataclasses
import difflib
import inspect

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
        raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__}; "
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
