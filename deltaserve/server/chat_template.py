"""The checkpoint's chat template, rendered with jinja2 the way transformers' apply_chat_template does.

Same environment (sandboxed, trim_blocks, lstrip_blocks, loop controls), same helpers (raise_exception,
strftime_now, a tojson that keeps non-ASCII and does not HTML-escape) and same variables: messages,
tools, documents, add_generation_prompt, the special tokens of tokenizer_config.json, and any extra
keyword arguments (enable_thinking, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render it."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """chat_template.jinja if present, else tokenizer_config.json's chat_template; None if neither."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        jinja_file = path / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else _pick_template(config.get("chat_template"))
        if source is None:
            return None
        special = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
        return cls(source, special)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs,
                   "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _pick_template(value: Any) -> str | None:
    """A string, or a list of {"name", "template"} of which "default" is the chat template."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
