"""Render Hugging Face chat templates (Jinja) exactly as transformers' apply_chat_template does.

Templates come from model repositories, so they are untrusted code: they run in Jinja's immutable
sandbox. The environment settings (trim_blocks, lstrip_blocks, loop controls) and the extra
globals and filters (raise_exception, strftime_now, tojson) are the ones template authors write
against, so the same template gives the same text here as in transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

# Named special tokens a template may refer to (`{{ bos_token }}`), as transformers names them.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# A message's reasoning travels under several names; templates read `reasoning_content` (Qwen3)
# or `thinking` (gpt-oss), so every message that has one of them gets both.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    """Template global: lets a template reject its input (`{{ raise_exception('...') }}`)."""
    raise TokenizerError(f"the chat template rejected the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Template filter replacing Jinja's own tojson, which HTML-escapes <, >, & and ' and takes
    no separators; templates written for transformers expect plain json.dumps output."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    """Template global: today's date in the template's format (Llama 3 puts it in the prompt)."""
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template cannot store or reach
    dunder attributes through it (the sandbox alone does not guard namespace item access)."""

    def __init__(*args, **kwargs):
        # Same positional trick as jinja's Namespace, so that `namespace(self=1)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set the underscore name {name!r} on a namespace"
            )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template once; later calls with the same string reuse it.

    Raises TokenizerError (with the template line) if the template is not valid Jinja.
    """
    if not isinstance(template, str):
        raise TokenizerError(f"a chat template must be a string, got {type(template).__name__}")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template does not compile: {e.message} (template line {e.lineno}). "
            "Fix the template in tokenizer_config.json or chat_template.jinja."
        ) from e


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs,
) -> str:
    """Render `messages` (dicts with "role" and "content") with a Jinja chat template.

    add_generation_prompt: end with the header that starts an assistant turn.
    tools, documents: JSON-schema tool descriptions and retrieval documents, for templates that
    use them. Any other keyword (bos_token="<s>", enable_thinking=False, ...) is passed to the
    template as a variable. Raises TokenizerError if the template does not compile, rejects the
    messages through raise_exception, or fails while rendering.
    """
    compiled = compile_chat_template(template)
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError(
            "messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}, "
            f"got {messages!r:.200}"
        )
    for name, items in (("tools", tools), ("documents", documents)):
        if items is not None and not all(isinstance(i, dict) for i in items):
            raise TokenizerError(
                f"{name} must be a list of dicts (JSON schemas), got {items!r:.200}"
            )
    try:
        return compiled.render(
            messages=[_with_reasoning_aliases(m) for m in messages],
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except TokenizerError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise TokenizerError(
            f"the chat template failed while rendering: {type(e).__name__}: {e}"
        ) from e
