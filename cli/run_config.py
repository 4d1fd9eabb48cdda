"""Run-config keys on the command line, all from ``core.config.RunConfig``'s one declaration.

``add_flags`` gives a parser one ``--KEY`` flag per declared key (plus the spellings a
key declares as aliases, e.g. ``--rounds``) and a repeatable ``--set KEY=VALUE``;
``overrides`` turns the parsed arguments back into Flower run-config keys. Nothing is
re-declared here: a new key in ``RunConfig`` is a new flag everywhere.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from core.config import RunConfig

_DEST = "rc_"  # argparse dest prefix: keeps run-config keys apart from a command's own options


def add_flags(parser: argparse.ArgumentParser, *, skip: frozenset[str] = frozenset()) -> None:
    """One flag per declared, non-internal key not in ``skip``, and ``--set KEY=VALUE``."""
    group = parser.add_argument_group("run config (any key also as --set KEY=VALUE)")
    for key, declared in RunConfig.settings().items():
        if declared.metadata["internal"] or key in skip:
            continue
        # parsed as text: RunConfig coerces and range-checks it, naming the key
        group.add_argument(f"--{key}", *declared.metadata["aliases"], dest=_DEST + declared.name, default=None,
                           metavar=declared.type.upper() if isinstance(declared.type, str) else None,
                           help=f"{declared.metadata['help']} (default: {declared.default!r})")
    parser.add_argument("--set", dest="rc_assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="any run-config key, e.g. --set model=tiny (repeatable)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys given on the command line (flags first, then ``--set``)."""
    declared = RunConfig.settings()
    by_dest = {_DEST + d.name: key for key, d in declared.items()}
    out = {by_dest[dest]: value for dest, value in vars(args).items() if dest in by_dest and value is not None}
    for text in args.rc_assignments:
        key, value = parse_assignment(text, option="--set")
        if key not in declared:
            raise ValueError(f"--set {text!r}: unknown run-config key {key!r}; valid keys: {sorted(declared)}")
        out[key] = value
    return out


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Keys declared as paths, made absolute: the ServerApp and ClientApps run elsewhere.

    A value that is not an existing path (``chatterbot``, ``hf:NAME``) is left alone,
    except for directories (``*-dir``), which may not exist yet.
    """
    out = dict(config)
    for key, declared in RunConfig.settings().items():
        value = out.get(key)
        if declared.metadata["path"] and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if path.exists() or key.endswith("-dir"):
                out[key] = str(path.resolve())
    return out


def parse_assignment(text: str, *, option: str) -> tuple[str, Any]:
    """'key=value' -> (key, TOML value, or the raw string when it is not a TOML literal)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(c.isspace() for c in key):
        raise ValueError(f"{option} {text!r} is not of the form key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if isinstance(value, (dict, list)):
        raise ValueError(f"{option} {text!r}: only strings, numbers and booleans are allowed")
    return key, value
