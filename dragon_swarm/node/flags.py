"""A command line derived from a pydantic schema: one flag per field, each also read from ``DRAGON_<FIELD>``.

A schema declares its flags with :func:`flag` (default, help text, constraints); :func:`build_parser` turns it
into a configargparse parser (command line beats environment) whose errors are one line ending in
'(see --help)', and :func:`parse_flags` validates what came in against the schema, naming bad values by their
flag ('--threads must be >= 1, got 0'). Values not given stay None in the namespace, so the caller can tell a
given flag from a default and let other sources (a profile, a config file) fill in.

The env prefix is per program (the bootstrap's vars are ``DRAGON_BOOTSTRAP_<FIELD>``), so a peer and a
bootstrap on one machine do not read each other's settings.
"""

from __future__ import annotations

import argparse
import os
from types import UnionType
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import configargparse
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from dragon_swarm.node.cli import CleanArgumentParser
from dragon_swarm.schema import one_line

ENV_PREFIX = "DRAGON_"
SchemaT = TypeVar("SchemaT", bound=BaseModel)

__all__ = ["ENV_PREFIX", "ListenAddress", "build_parser", "flag", "flag_name", "parse_flags"]


def _listen_address(value: Any) -> Any:
    if isinstance(value, str):
        from dragon_swarm.monitor.dashboard import parse_listen_address

        return parse_listen_address(value)
    return value


# `--dashboard [HOST:]PORT` as (host, port)
ListenAddress = Annotated[tuple[str, int] | None, BeforeValidator(_listen_address)]


def flag(default: Any, help: str, *, short: str | None = None, metavar: str | None = None, env: bool = True,
         hidden: bool = False, **constraints: Any) -> Any:  # fmt: skip
    """A schema field with what its flag needs: help text, a short option, metavar, whether it has an env var
    (``DRAGON_<FIELD>``), whether --help hides it; `constraints` are pydantic's (ge=0, ...)."""
    extra = {"short": short, "metavar": metavar, "env": env, "hidden": hidden}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Parser(CleanArgumentParser, configargparse.ArgParser):
    """configargparse (flags and env vars) with one-line errors."""


def build_parser(
    schema: type[BaseModel],
    prog: str,
    description: str,
    groups: Mapping[str, Sequence[str]] = {},
    required: Sequence[str] = (),
    env_prefix: str = ENV_PREFIX,
) -> configargparse.ArgParser:
    """The parser for `schema`'s fields. `groups`: named sets of mutually exclusive fields; `required`: the names of
    groups of which one flag must be given; `env_prefix`: env vars are `<env_prefix><FIELD>`."""
    parser = _Parser(prog=prog, description=description)
    made = {name: parser.add_mutually_exclusive_group(required=name in required) for name in groups}
    group_of = {field: name for name, fields in groups.items() for field in fields}
    for field, info in schema.model_fields.items():
        target = made[group_of[field]] if field in group_of else parser
        extra = info.json_schema_extra
        options = ([extra["short"]] if extra["short"] else []) + [flag_name(field)]
        target.add_argument(*options, **_argument(field, info, env_prefix))
    return parser


def parse_flags(
    parser: argparse.ArgumentParser, schema: type[SchemaT], argv: Sequence[str] | None, env: Mapping[str, str] | None
) -> SchemaT:
    """Parse `argv` (default: sys.argv[1:]) and `env` (default: os.environ), validate against `schema`; bad input
    exits with one line (SystemExit 2)."""
    args = parser.parse_args(argv, env_vars=os.environ if env is None else env)
    given = {key: value for key, value in vars(args).items() if value is not None}
    try:
        return schema.model_validate(given)
    except ValidationError as e:
        parser.error(one_line(e, schema, name=lambda loc: flag_name(str(loc[0])) if loc else ""))


def _argument(field: str, info, env_prefix: str) -> dict[str, Any]:
    extra = info.json_schema_extra
    kwargs: dict[str, Any] = {
        "dest": field,
        "default": None,  # not given: the schema's default, or another source's value
        "help": argparse.SUPPRESS if extra["hidden"] else info.description,
        "env_var": f"{env_prefix}{field.upper()}" if extra["env"] else None,
    }
    kind = _without_none(info.annotation)
    if kind is bool:
        return {**kwargs, "action": "store_true"}
    if extra["metavar"]:
        kwargs["metavar"] = extra["metavar"]
    if get_origin(kind) is tuple and get_args(kind)[-1] is Ellipsis:
        kwargs["nargs"] = "+"
    elif kind is int:
        kwargs["type"] = int  # argparse's own message: "argument --max-steps: invalid int value: 'many'"
    elif get_origin(kind) is Literal:
        kwargs["choices"] = get_args(kind)
    return kwargs


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X; anything else as it is."""
    if get_origin(annotation) in (Union, UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation
