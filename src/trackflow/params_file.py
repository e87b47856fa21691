"""Edits of ``params.yaml`` that keep the file as its owner wrote it: comments, order, flow style.

Commands that write chosen values back (``trackflow lr-find --apply``, ``trackflow sweep
--apply``) go through :func:`update_params_file`, so an applied value lands in the file DVC
tracks, with the file still valid and every comment in place.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trackflow.errors import ConfigError


def update_params_file(path: str | Path, values: Mapping[str, Any]) -> None:
    """Set dotted keys of a params file in place, keeping its comments and layout.

    The edited text is validated as a whole before it replaces the file (atomically), so a bad
    value leaves the file untouched.

    Args:
        path: The params file (YAML).
        values: Dotted keys to plain values, e.g. ``{"train.lr": 0.0023}``; lists are written in
            flow style (``[512, 256]``), like the rest of ``params.yaml``.

    Raises:
        ConfigError: The file is missing or not YAML, a key crosses a value, or the result is not
            valid params.
    """
    import yaml

    from trackflow.config import validate_params
    from trackflow.io import atomic_outputs

    path = Path(path)
    round_trip = _round_trip_yaml()
    try:
        original = path.read_text(encoding="utf-8")
        document = round_trip.load(original)
    except FileNotFoundError:
        raise ConfigError(f"params file {str(path)!r} does not exist") from None
    except Exception as exc:  # ruamel raises many kinds of parse errors
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    text = _spliced(original, document, values, round_trip)
    if text is None:  # a value that is not alone on its line: ruamel writes the whole document
        for key, value in values.items():
            _set(document, key, value)
        buffer = io.StringIO()
        round_trip.dump(document, buffer)
        text = buffer.getvalue()
    validate_params(yaml.safe_load(text) or {}, source=f"{path} with {dict(values)}")
    with atomic_outputs(path) as (staging,):
        staging.write_text(text, encoding="utf-8")


def _round_trip_yaml() -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """ruamel's, writing ``null`` out as ``params.yaml`` does (not an empty value)."""

    Representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    Representer.add_representer(float, _represent_float)
    yaml = YAML(typ="rt")
    yaml.Representer = Representer
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _represent_float(representer: Any, value: float) -> Any:
    """A float as YAML 1.1 reads it back as a float: ``1.0e-09``, not ``1e-09`` (a string)."""
    text = repr(value)
    if not math.isfinite(value) or "e" not in text or "." in text:
        return representer.represent_float(value)
    mantissa, exponent = text.split("e")
    sign = "" if exponent.startswith(("-", "+")) else "+"
    return representer.represent_scalar("tag:yaml.org,2002:float", f"{mantissa}.0e{sign}{exponent}")


def _set(document: Any, key: str, value: Any) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *parents, leaf = key.split(".")
    node = document
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = CommentedMap()
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    if isinstance(value, list | tuple):
        sequence = CommentedSeq(value)
        sequence.fa.set_flow_style()
        value = sequence
    node[leaf] = value


def _spliced(text: str, document: Any, values: Mapping[str, Any], round_trip: Any) -> str | None:
    """``text`` with each value rewritten where it stands, every other byte as it was.

    For values written on one line: a scalar or a one-line list after its key (a comment after it
    keeps its column where it can), or a scalar inside a one-line flow mapping. None when a value
    is not one of those, or the result does not read back as asked.
    """
    import yaml

    lines = text.splitlines(keepends=True)
    places = {key: _value_place(lines, document, key) for key in values}
    if None in places.values():
        return None
    # Right to left, so that an edit does not move the columns of those still to make.
    for key in sorted(values, key=lambda k: (places[k][0], -places[k][1])):
        line, col, old = places[key]
        rest = lines[line][col + len(old) :]
        new = _flow_text(values[key], round_trip)
        if rest.lstrip().startswith("#"):
            gap = len(rest) - len(rest.lstrip())
            rest = " " * max(1, len(old) + gap - len(new)) + rest.lstrip()
        lines[line] = lines[line][:col] + new + rest
    result = "".join(lines)
    try:
        parsed = yaml.safe_load(result)
        for key, value in values.items():
            node = parsed
            for part in key.split("."):
                node = node[part]
            if node != (list(value) if isinstance(value, tuple) else value):
                return None
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return result


def _value_place(lines: list[str], document: Any, key: str) -> tuple[int, int, str] | None:
    """Line, column and text of ``key``'s value when it is written on one line."""
    import yaml

    *parents, leaf = key.split(".")
    node = document
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node or not hasattr(node, "lc"):
        return None
    line, col = node.lc.value(leaf)
    body = lines[line][col:]
    for pattern in (r"(.*?)(\s+#.*)?(\r?\n)?", r"([^,{}\[\]#\r\n]*?)(\s*[,}].*)(\r?\n)?"):
        match = re.fullmatch(pattern, body, flags=re.DOTALL)
        if match is None or not match[1]:
            continue
        try:
            if yaml.safe_load(match[1]) == _plain(node[leaf]):
                return line, col, match[1]
        except yaml.YAMLError:
            continue
    return None


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _flow_text(value: Any, round_trip: Any) -> str:
    """``value`` as one line of YAML, written like the rest of the file (flow lists, null)."""
    from ruamel.yaml.comments import CommentedMap

    holder = CommentedMap()
    _set(holder, "v", value)
    buffer = io.StringIO()
    round_trip.dump(holder, buffer)
    return buffer.getvalue().strip().removeprefix("v:").strip()
