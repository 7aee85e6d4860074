"""Size limits on text that comes from files, widgets and HTTP bodies, checked where it enters.

A text or JSON value from outside (a manifest, a LoRA's metadata, a caption file, a request body) can
be arbitrarily large or deep. Without limits a 5 MB prompt kept the host's tokenizer busy for 15+
minutes (and a tokenizer does not answer Cancel), a 100k-deep JSON array raised a bare RecursionError,
and a 300-character name failed in the operating system with a raw ``OSError 36``. Every entry point
checks its value against these limits and raises :class:`LimitError` with the value's origin, its size
and what to do.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "MAX_NAME_BYTES", "MAX_PROMPT_CHARS", "LimitError", "check_json_depth",
           "check_name", "check_prompt", "loads_json", "shorten"]

#: Characters of one prompt. CLIP reads 77 tokens per chunk (ComfyUI concatenates chunks for longer
#: prompts, T5 truncates at 256-512 tokens); 10,000 characters are over 2,000 tokens, far more than any
#: model conditions on, and tokenize in well under a second.
MAX_PROMPT_CHARS = 10_000
#: Nesting depth of JSON read from files and requests (what this project writes is at most 4 deep).
MAX_JSON_DEPTH = 64
#: UTF-8 bytes of one file or folder name a user chooses; the file systems' limit is 255 bytes, and
#: the writers add a counter, an extension and a temporary-file prefix of up to ~60 bytes.
MAX_NAME_BYTES = 150


class LimitError(ValueError):
    """A value from outside is larger, longer or deeper than this project reads; the message says
    where it came from and what to do."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with a note of its full length (for error messages)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_prompt(prompt: Any, where: str) -> str:
    """``prompt`` if it is a string of at most :data:`MAX_PROMPT_CHARS` characters; raises otherwise.

    where: the prompt's origin for the message (e.g. "manifest items[3]", "caption file a.txt").
    """
    if not isinstance(prompt, str):
        raise LimitError(f"{where}: a prompt must be text, got {type(prompt).__name__} "
                         f"{shorten(repr(prompt))}.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise LimitError(
            f"{where}: the prompt is {len(prompt):,} characters long, over the limit of {MAX_PROMPT_CHARS:,} "
            f"(text encoders read a few hundred tokens; the rest is cut off, and tokenizing that much text "
            f"blocks the server): {shorten(prompt)!r}. Shorten the prompt.")
    return prompt


def check_json_depth(value: Any, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value`` if its lists/dicts nest at most ``max_depth`` deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise LimitError(f"{what} nests JSON deeper than {max_depth} levels; it is not something "
                                 "this project wrote: replace it with the file or request it expects.")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children)
    return value


def loads_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` that raises :class:`json.JSONDecodeError` for invalid JSON and
    :class:`LimitError` (never RecursionError) for JSON nested deeper than ``max_depth``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise LimitError(f"{what} nests JSON deeper than Python can read; it is not something this "
                         "project wrote: replace it with the file or request it expects.") from None
    return check_json_depth(value, what, max_depth)


def check_name(name: str, what: str) -> str:
    """``name`` (one file or folder name) if it is not hidden, has no control characters and is at most
    :data:`MAX_NAME_BYTES` UTF-8 bytes; raises :class:`LimitError` naming ``what`` otherwise."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise LimitError(f"{what} {shorten(name)!r} is {size} bytes long; names may be at most "
                         f"{MAX_NAME_BYTES} bytes (file systems allow 255, and a counter and extension are "
                         "added): choose a shorter name.")
    if name.startswith("."):
        raise LimitError(f"{what} {shorten(name)!r} starts with '.', which hides the file from file "
                         "browsers and from ComfyUI's file lists: choose a name that starts with a letter "
                         "or digit.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise LimitError(f"{what} {shorten(name)!r} contains a control character (a newline or tab?): "
                         "choose a name of printable characters.")
    return name
