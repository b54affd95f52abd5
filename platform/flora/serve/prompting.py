"""From an OpenAI request to the engine's prompt: the chat template and the prompt's language.

Language (for per-language adapters) is the request's ``language`` field if given, else inferred
from the prompt's first lines, in this order:

1. StarCoder's ``<filename>name.ext`` metadata, or a file-name comment (``# file: x.py``,
   ``// src/app.ts``, ``-- init.lua``): the extension decides;
2. a shebang (``#!/usr/bin/env python3``, ``#!/bin/bash``, ``#!/usr/bin/perl``): the interpreter;
3. ``<?php`` at the start: PHP.

Nothing found means no language: the tenant's user adapters or the base model serve it.
"""

from __future__ import annotations

import re

from flora.serve.openai_types import ChatMessage

EXTENSIONS = {
    "py": "python", "pyi": "python", "pl": "perl", "pm": "perl", "c": "c", "h": "c",
    "cc": "cpp", "cpp": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp", "js": "javascript",
    "mjs": "javascript", "cjs": "javascript", "ts": "typescript", "tsx": "typescript",
    "rs": "rust", "go": "go", "java": "java", "rb": "ruby", "php": "php", "tcl": "tcl",
    "sh": "shell", "bash": "shell", "lua": "lua", "r": "r", "jl": "julia", "scala": "scala",
    "swift": "swift", "kt": "kotlin", "cs": "csharp", "sql": "sql", "hs": "haskell",
}  # fmt: skip
INTERPRETERS = {
    "python": "python", "python3": "python", "perl": "perl", "bash": "shell", "sh": "shell",
    "zsh": "shell", "node": "javascript", "ruby": "ruby", "php": "php", "tclsh": "tcl",
    "wish": "tcl", "lua": "lua", "Rscript": "r", "julia": "julia",
}  # fmt: skip
_FILENAME = re.compile(
    r"^\s*(?:<filename>|(?:#|//|--|;|/\*)\s*(?:file(?:name)?\s*:\s*)?)\s*"
    r"(?P<path>[\w./-]*\w\.(?P<ext>[A-Za-z]{1,5}))\b"
)
_SHEBANG = re.compile(r"^#!\s*(?:\S*/)?(?:env\s+(?:-\S+\s+)*)?(?P<interp>[A-Za-z]+[\d.]*)")
CHAT_STOP = "\n### User:"


def infer_language(prompt: str) -> str | None:
    """The prompt's programming language from its first lines, or ``None`` (see module doc)."""
    lines = prompt.lstrip("\ufeff").splitlines()[:3]
    for line in lines:
        match = _FILENAME.match(line)
        if match and match["ext"].lower() in EXTENSIONS:
            return EXTENSIONS[match["ext"].lower()]
    if lines and (match := _SHEBANG.match(lines[0])):
        interpreter = match["interp"].rstrip("0123456789.")
        return INTERPRETERS.get(interpreter) or INTERPRETERS.get(match["interp"])
    if prompt.lstrip().startswith("<?php"):
        return "php"
    return None


def render_chat(messages: list[ChatMessage]) -> str:
    """A plain template for code models (StarCoder has no chat format of its own)::

    {system}

    ### User:
    {user}

    ### Assistant:
    {assistant}
    …
    ### Assistant:
    """
    parts = []
    for message in messages:
        if message.role == "system":
            parts.append(message.content.strip() + "\n\n")
        else:
            title = "User" if message.role == "user" else "Assistant"
            parts.append(f"### {title}:\n{message.content.strip()}\n\n")
    return "".join(parts) + "### Assistant:\n"


def chat_text(messages: list[ChatMessage]) -> str:
    """The code the conversation is about, for language inference: the last user message."""
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else ""
