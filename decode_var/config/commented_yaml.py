"""Param files with a comment on the keys that need one (what ``decode-var-init`` writes).

PyYAML drops comments, so the file is written here line by line: sections as block mappings, values in
YAML's flow style (``[0.46, 0.46]``, ``null``), and after a key its comment (``  # ...``). What
:func:`dump_commented` writes loads back with ``yaml.safe_load`` to the same data (tested).
"""
from __future__ import annotations

from typing import Mapping

import yaml

__all__ = ["dump_commented"]


def _flow(value) -> str:
    """One value in YAML flow style, on one line (text with line breaks double-quoted, breaks escaped)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6, sort_keys=False)
    text = text[:-4] if text.endswith("\n...\n") else text
    if "\n" in text.strip("\n"):
        text = yaml.safe_dump(value, default_flow_style=True, default_style='"', width=10 ** 6, sort_keys=False)
    return text.strip()


def _lines(data: Mapping, comments: Mapping[str, str], path: str, indent: int) -> list[str]:
    out = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        note = comments.get(where)
        tail = f"  # {' '.join(note.split())}" if note else ""
        if isinstance(value, Mapping) and value:
            out.append(f"{' ' * indent}{_flow(key)}:{tail}")
            out += _lines(value, comments, where, indent + 2)
        else:
            out.append(f"{' ' * indent}{_flow(key)}: {_flow(value)}{tail}")
    return out


def dump_commented(data: Mapping, comments: Mapping[str, str], header: str = "") -> str:
    """YAML text of ``data`` (nested mappings of plain values) with ``comments[path]`` after each key
    (``"Camera.e_per_adu"``, ``"VAR.gaussian_psf.sigma_0"``); ``header`` lines become comments on top."""
    top = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return "\n".join(top + _lines(data, comments, "", 0)) + "\n"
