"""The base of every settings file a person writes (swarm config, model shape, peer profile): strict pydantic
models, YAML reading, and validation errors turned into one line a user can act on.

`Schema` is frozen, rejects unknown keys and is strict about types: `true` is not an int, `'3'` is not a number,
while an int given for a float is stored as a float (so `lr: 1` and `lr: 1.0` hash alike). `one_line(error)` says
every problem of a `ValidationError` on one line, naming each key by its dotted path:

    training.lr must be a number, got 'fast'; unknown key(s) in 'averaging': tua; known: matchmaking_time, ...

Imports nothing heavy (no torch): option parsing uses it before anything is started.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

__all__ = ["Schema", "interval", "load_yaml_mapping", "one_line"]


class Schema(BaseModel):
    """A strict, frozen, closed settings section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def interval(low: float, high: float, bounds: str = "[)") -> AfterValidator:
    """A validator for `low <= value < high` (bounds "[)"; also "()", "[]", "(]"), with one message for either
    end: 'must be in [0, 1), got 1.0'. NaN is outside every interval."""
    closed_low, closed_high = bounds[0] == "[", bounds[1] == "]"

    def check(value: float) -> float:
        above = value >= low if closed_low else value > low
        below = value <= high if closed_high else value < high
        if not (above and below):
            raise ValueError(f"must be in {bounds[0]}{low:g}, {high:g}{bounds[1]}, got {value!r}")
        return value

    return AfterValidator(check)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word; in a settings file that is a mistake that
    silently changes a value, so it is an error here."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_mapping(path: Path, what: str) -> dict:
    """The top-level mapping of a YAML file; ValueError (one line naming the file) if unreadable, not YAML, empty
    or not a mapping. `what` names the file's kind in messages ('config', 'peer profile')."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        detail = f": {problem}" if problem.startswith("duplicate key") else ""
        raise ValueError(f"{path}: not valid YAML{where}{detail}") from None
    if raw is None:
        raise ValueError(f"{path}: {what} is empty")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a {what} must be a mapping of keys, got {type(raw).__name__}")
    return raw


# ----------------------------------------------------------------------------- one-line errors

_TYPE_WORDS = {
    "int_type": "an int",
    "int_parsing": "an int",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a bool (true or false)",
    "bool_parsing": "a bool (true or false)",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a path",
    "none_required": "null",
}


def one_line(error: ValidationError, root: type[BaseModel] | None = None, name: Callable[[tuple], str] | None = None) -> str:
    """Every problem in `error` on one line, '; '-separated.

    :param root: the validated model, to list the known keys next to unknown ones
    :param name: how a location is spelled (default: dotted, 'training.lr'); the peer's options use '--max-steps'
    """
    name = name or _dotted
    unknown: dict[tuple, list[str]] = defaultdict(list)
    missing: dict[tuple, list[str]] = defaultdict(list)
    problems: list[str] = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown[loc[:-1]].append(str(loc[-1]))
        elif err["type"] == "missing" and loc and isinstance(loc[-1], int):  # a too-short list for a tuple
            problems.append(f"{name(loc[:-1])} has too few items (no item {loc[-1]}), got {_short(err.get('input'))}")
        elif err["type"] == "missing":
            missing[loc[:-1]].append(str(loc[-1]))
        else:
            problems.append(_describe(err, loc, name))
    lines = []
    for parent, keys in unknown.items():
        known = _known_keys(root, parent)
        tail = f"; known: {', '.join(known)}" if known else ""
        lines.append(f"unknown key(s){_inside(parent, name)}: {', '.join(sorted(keys))}{tail}")
    for parent, keys in missing.items():
        lines.append(f"missing key(s){_inside(parent, name)}: {', '.join(sorted(keys))}")
    return "; ".join(_dedupe(lines + problems))


def _describe(err: dict, loc: tuple, name: Callable[[tuple], str]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    where = name(loc) if loc else ""
    if kind in _TYPE_WORDS:
        message = f"must be {_TYPE_WORDS[kind]}, got {_short(value)}"
    elif kind == "greater_than":
        message = ("must be positive" if ctx.get("gt") == 0 else f"must be > {ctx.get('gt')}") + f", got {_short(value)}"
    elif kind == "greater_than_equal":
        message = f"must be >= {ctx.get('ge')}, got {_short(value)}"
    elif kind == "less_than":
        message = f"must be < {ctx.get('lt')}, got {_short(value)}"
    elif kind == "less_than_equal":
        message = f"must be <= {ctx.get('le')}, got {_short(value)}"
    elif kind in ("too_short", "too_long"):
        message = f"must have {ctx.get('min_length') if kind == 'too_short' else ctx.get('max_length')} item(s), got {_short(value)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}, got {_short(value)}"
    elif kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err["msg"]))
    else:
        message = err["msg"][:1].lower() + err["msg"][1:]
    if not where:
        return message
    return f"{where} {message}" if message.startswith("must") else f"{where}: {message}"


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _inside(parent: tuple, name: Callable[[tuple], str]) -> str:
    return f" in '{name(parent)}'" if parent else ""


def _known_keys(root: type[BaseModel] | None, parent: tuple) -> list[str]:
    model = root
    for part in parent:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"
    text = " ".join(text.split())  # one line, whatever the input
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
