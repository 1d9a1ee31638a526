"""Checks every protocol makes on what arrives, before anything is parsed further, tokenized or stored.

JSON may escape a lone UTF-16 surrogate ("\\ud800"): valid JSON, but not a Unicode string that UTF-8 (the
tokenizer, the database, the logs) can hold. Model names end up in the database (100 characters) and in logs,
so they are bounded and free of control characters.
"""

from __future__ import annotations

import re
from typing import Any

MODEL_NAME_MAX_CHARS = 100  # the database's column
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def unicode_problem(value: Any) -> str | None:
    """What is wrong with the strings (values and keys) in parsed JSON, or None. Iterative: any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):  # isascii is O(1): a base64 payload is not scanned
                return (
                    "a string holds a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode; "
                    "send UTF-8 text"
                )
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def model_name_problem(name: str) -> str | None:
    """What is wrong with a model name, or None."""
    if len(name) > MODEL_NAME_MAX_CHARS:
        return f"model: at most {MODEL_NAME_MAX_CHARS} characters"
    if _CONTROL.search(name) or _SURROGATE.search(name):
        return "model: control characters and lone surrogates are not allowed"
    return None


def check_request_json(data: Any) -> Any:
    """A pydantic `mode="before"` validator for request bodies: raises ValueError (a 400 in the envelope).

    Before the fields' own validation, size bounds included, on purpose: pydantic refuses a lone surrogate in a
    `str` field as "Input should be a valid string", which tells the client nothing. The walk is linear in the
    body, as JSON parsing is, and the body's size is bounded before parsing (api/middleware.py)."""
    problem = unicode_problem(data)
    if problem is None and isinstance(data, dict) and isinstance(data.get("model"), str):
        problem = model_name_problem(data["model"])
    if problem is not None:
        raise ValueError(problem)
    return data
