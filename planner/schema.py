"""One small type checker for the JSON documents lqplan reads back (plan.json, run.json, profile.json, the quantized
folder's manifest): strict types (a string is never read as a number or a boolean, a boolean never as a number)
for every field a reader uses, so a wrong-typed field is one line naming it instead of a crash later.

A spec is a type name ("int", "number", "str", "bool", "any"), a dict of field specs (an object holding them; a key
ending in "?" is optional; other fields are allowed), ("list", spec), ("map", spec) (an object of any keys),
("opt", spec) (null or spec), ("any", specs) (one of them) or ("enum", values)."""

from __future__ import annotations

import math

INT, NUM, STR, BOOL, ANY = "int", "number", "str", "bool", "any"


def list_of(spec):
    return ("list", spec)


def map_of(spec):
    return ("map", spec)


def optional(spec):
    return ("opt", spec)


def one_of(*values):
    return ("enum", values)


def any_of(*specs):
    return ("any", specs)


def _scalar(value, kind: str) -> bool:
    if kind == ANY:
        return True
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STR:
        return isinstance(value, str)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            not isinstance(value, float) or not math.isnan(value))
    raise ValueError(f"unknown spec {kind!r}")


_WORDS = {INT: "an integer", NUM: "a number", STR: "a string", BOOL: "true or false", ANY: "a value"}


def show(value) -> str:
    """A value as a message quotes it: repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(doc, spec, where: str = "") -> str | None:
    """The first place where `doc` does not match `spec`, in words ("totals.error is '0.1', not a number"), or
    None when it matches."""
    name = where or "the document"
    if isinstance(spec, str):
        return None if _scalar(doc, spec) else f"{name} is {show(doc)}, not {_WORDS[spec]}"
    if isinstance(spec, dict):
        if not isinstance(doc, dict):
            return f"{name} is {show(doc)}, not an object"
        for key, sub in spec.items():
            opt = key.endswith("?")
            key = key.rstrip("?")
            if key not in doc:
                if opt:
                    continue
                return f"{name} has no field {key!r}"
            found = problem(doc[key], sub, f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    kind, sub = spec
    if kind == "opt":
        return None if doc is None else problem(doc, sub, where)
    if kind == "any":
        found = [problem(doc, one, where) for one in sub]
        return None if any(f is None for f in found) else found[-1]
    if kind == "enum":
        return None if doc in sub else f"{name} is {show(doc)}, not one of {', '.join(map(repr, sub))}"
    if kind == "list":
        if not isinstance(doc, list):
            return f"{name} is {show(doc)}, not a list"
        for i, item in enumerate(doc):
            found = problem(item, sub, f"{where}[{i}]")
            if found:
                return found
        return None
    if kind == "map":
        if not isinstance(doc, dict):
            return f"{name} is {show(doc)}, not an object"
        for key, item in doc.items():
            found = problem(item, sub, f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    raise ValueError(f"unknown spec {spec!r}")
