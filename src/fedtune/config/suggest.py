""" "Did you mean" for a mistyped config key: the valid keys at the key's place in the schema, by similarity."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence

from pydantic import BaseModel


def _section_type(annotation: object) -> type[BaseModel] | None:
    """The config section class inside a field's annotation (through ``X | None`` and ``Annotated``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def keys_at(root: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The field names of the section at ``path`` (the parent of an unknown key); [] if not a section."""
    model: type[BaseModel] | None = root
    for part in path:
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return []
        model = _section_type(field.annotation)
    return list(model.model_fields) if model is not None else []


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def all_paths(root: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``federation``, ``federation.rounds``, ...)."""
    out = []
    for name, field in root.model_fields.items():
        out.append(prefix + name)
        section = _section_type(field.annotation)
        if section is not None:
            out += all_paths(section, prefix + name + ".")
    return out


def unknown_key_message(root: type[BaseModel], loc: Sequence[str | int]) -> str:
    """The message for an unknown key at ``loc``: the same key name where it exists in one other section
    (``rounds`` at the top level -> ``federation.rounds``), else the closest valid key beside it."""
    if not loc:
        return "unknown key"
    word = str(loc[-1])
    elsewhere = [p for p in all_paths(root) if p.rsplit(".", 1)[-1] == word]
    if len(elsewhere) == 1:
        return f"unknown key; did you mean {elsewhere[0]!r}?"
    return "unknown key" + did_you_mean(word, keys_at(root, loc[:-1]))
