"""Reading JSONL datasets: one JSON object per line, its format detected from the first record.

Three formats, one per file:
  chat         {"messages": [{"role": "user", "content": "..."}, ...], "tools": [...]?}
  completions  {"prompt": "...", "completion": "..."}
  text         {"text": "..."}
Every line is checked; all problems of a file are reported together, each with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import format_list
from .errors import LineErrors

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Role names of other dataset formats (ShareGPT, Gemini), suggested in the error message.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

# Checked in this order, so a record with both "messages" and "text" counts as a chat.
FORMAT_KEYS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}
EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}',
    "completions": '{"prompt": "Q: 2+2?", "completion": " 4"}',
    "text": '{"text": "Some text to learn."}',
}


@dataclass
class Record:
    """One valid JSONL record: its 1-based line number, its format and its JSON object."""

    line: int
    kind: str
    data: dict


def _format_of(obj: dict) -> str | None:
    for kind, keys in FORMAT_KEYS.items():
        if all(k in obj for k in keys):
            return kind
    return None


def _expected_all() -> str:
    return "; ".join(f"{kind}: {example}" for kind, example in EXAMPLES.items())


def json_lines(path: Path, errors: LineErrors, example=lambda: EXAMPLES["chat"]):
    """(line number, parsed JSON value) for every non-blank line of a JSONL file.

    The one reader of JSONL bytes, shared by training and the privacy commands, so both take
    and refuse the same files. A line that is not UTF-8, not JSON, nested too deeply, or holds
    a lone surrogate escape ("\\ud800", which no UTF-8 text can hold) goes to `errors` instead;
    example() is a valid line to show in the message.
    """
    # Split the bytes, not the decoded text: str.splitlines() would also break at U+2028 and
    # other separators that JSON strings may hold unescaped.
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.add(
                line_no,
                f"is not UTF-8 text ({e.reason} at byte {e.start + 1}); save the file as UTF-8",
            )
            continue
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # byte order mark written by some Windows editors
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.add(
                line_no,
                f"is not valid JSON: {e.msg} at column {e.colno}. Each line must be one complete "
                f"JSON object (no line breaks inside a record), e.g. {example()}",
            )
            continue
        except RecursionError:
            errors.add(line_no, f"is nested too deeply to be a record, e.g. {example()}")
            continue
        problem = _unencodable(obj)
        if problem is not None:
            errors.add(line_no, problem)
            continue
        yield line_no, obj


def _unencodable(obj) -> str | None:
    """Why a parsed JSON value cannot be text we train on, or None. Walked without recursion:
    the value may be nested as deeply as the JSON parser allows."""
    pending = [obj]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                code = ord(value[e.start])
                return (
                    f"holds the escape \\u{code:04x}, half of a UTF-16 surrogate pair with no "
                    "other half: it is not a character. Fix the text that wrote it, or remove it"
                )
    return None


def read_jsonl(path: Path, require_assistant: bool = True) -> list[Record]:
    """Read and check every record of a JSONL file.

    require_assistant: chats must have an assistant message (else nothing would be trained).
    Blank lines are skipped. Raises DatasetError listing the bad lines (file, line, what was
    expected, how to fix it), or saying the file holds no records.
    """
    errors = LineErrors(path)
    records: list[Record] = []
    kind = first_line = None
    # The example shown follows the file's format once its first record has set it.
    example = lambda: EXAMPLES[kind or "chat"]  # noqa: B023, E731 (reads `kind` as it is then)
    for line_no, obj in json_lines(path, errors, example):
        if not isinstance(obj, dict):
            errors.add(line_no, f"expected a JSON object {{...}}, got a JSON {type(obj).__name__}")
            continue
        found = _format_of(obj)
        if kind is None:
            if found is None:
                errors.add(
                    line_no,
                    f"has keys [{format_list(obj)}] but a record needs one of these shapes: "
                    f"{_expected_all()}",
                )
                continue
            kind, first_line = found, line_no
        elif found is None:
            keys = " and ".join(f'"{k}"' for k in FORMAT_KEYS[kind])
            errors.add(
                line_no,
                f"has keys [{format_list(obj)}] but needs {keys}, as this is a {kind} file "
                f"(line {first_line}); e.g. {EXAMPLES[kind]}",
            )
            continue
        elif found != kind:
            errors.add(
                line_no,
                f"is a {found} record but line {first_line} is a {kind} record; a file holds one "
                "format: move these records to a file of their own",
            )
            continue
        problems = CHECKS[kind](obj, require_assistant)
        for problem in problems:
            errors.add(line_no, problem)
        if not problems:
            records.append(Record(line_no, kind, obj))
    errors.raise_if_any()
    if not records:
        errors.add(
            None, f"holds no records. Write one JSON object per line, e.g. {_expected_all()}"
        )
        errors.raise_if_any()
    return records


def _check_text(obj: dict, require_assistant: bool) -> list[str]:
    text = obj["text"]
    if not isinstance(text, str):
        return [f'"text" must be a string, got {type(text).__name__}']
    return [] if text.strip() else ['"text" is empty; remove the line or write the text']


def _check_completions(obj: dict, require_assistant: bool) -> list[str]:
    problems = []
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            problems.append(f'"{key}" must be a string, got {type(obj[key]).__name__}')
    if not problems and not obj["completion"].strip():
        problems.append('"completion" is empty, so there is nothing to train; write the answer')
    return problems


def _check_chat(obj: dict, require_assistant: bool) -> list[str]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return ['"messages" must be a non-empty list of {"role": ..., "content": ...} objects']
    tools = obj.get("tools")
    problems = []
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        problems.append('"tools" must be a list of JSON-schema objects')
    for number, message in enumerate(messages, start=1):
        problems += _check_message(number, message)
    has_assistant = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    if require_assistant and not has_assistant:
        problems.append(
            'has no "assistant" message, so nothing would be trained; add the reply, '
            'or train on every token with loss_on="all"'
        )
    return problems


def _check_message(number: int, message) -> list[str]:
    where = f"message {number}"
    if not isinstance(message, dict):
        return [f'{where} must be an object like {{"role": "user", "content": "Hi"}}']
    role = message.get("role")
    if role not in CHAT_ROLES:
        hint = f" (did you mean {ROLE_ALIASES[role]!r}?)" if role in ROLE_ALIASES else ""
        return [f"{where} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)}{hint}"]
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            return [f'{where} ({role}) has "tool_calls"; only assistant messages call tools']
        if not isinstance(tool_calls, list) or not tool_calls:
            return [f'{where} "tool_calls" must be a non-empty list']
    content = message.get("content")
    if content is None and tool_calls:
        return []  # an assistant turn that only calls tools
    if not isinstance(content, str):
        got = "no content" if content is None else f"a {type(content).__name__}"
        return [f'{where} ({role}) needs "content" as a string, got {got}']
    # An empty system prompt is a choice; an empty user, assistant or tool turn is a data bug.
    if not content.strip() and role != "system" and not tool_calls:
        return [f"{where} ({role}) has empty content; write the text or remove the message"]
    return []


CHECKS = {"chat": _check_chat, "completions": _check_completions, "text": _check_text}
