"""Rendering Hugging Face style chat templates (jinja2, sandboxed, HF semantics)."""
from __future__ import annotations

import datetime
import functools
import json

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import GenerationError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise GenerationError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise GenerationError(f"invalid chat template: {e}") from None


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables) -> str:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise GenerationError("messages must be a list of {'role': ..., 'content': ...} dicts")
    template = compile_template(source)
    try:
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except GenerationError:
        raise
    except jinja2.TemplateError as e:
        raise GenerationError(f"chat template failed to render: {e}") from None
