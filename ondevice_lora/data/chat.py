"""Which tokens of a rendered chat belong to assistant turns, for any chat template.

Templates differ (ChatML, Llama 3, Gemma, ...), so nothing here knows a template's markers.
Instead the chat is rendered incrementally: the text an assistant turn adds is
render(messages[:i+1]) minus render(messages[:i]), less the assistant header that the
generation prompt writes (`<|im_start|>assistant\\n`): the header is given to the model at
inference, the reply and its end-of-turn token (`<|im_end|>`, `<|eot_id|>`) are what it must
produce. Character spans become token positions through the tokenizer's offsets.
"""

from __future__ import annotations

from ..errors import TokenizerError


class TurnNotFound(Exception):
    """The assistant turn could not be located in the rendered chat (message says why)."""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _special_tokens(tokenizer) -> list[str]:
    decoder = tokenizer.backend.get_added_tokens_decoder()
    return [t.content for t in decoder.values() if t.special and t.content]


def _turn_span(before: str, prompt: str, after: str) -> tuple[int, int]:
    """Span in `after` of the reply an assistant turn adds to the conversation `before`.

    before: render(messages[:i]); prompt: the same with the generation prompt;
    after: render(messages[:i+1]).
    """
    if not after.startswith(before):
        raise TurnNotFound("the template renders the earlier messages differently once it is added")
    start = len(before)
    header = prompt[len(before) :] if prompt.startswith(before) else ""
    if header:
        found = after.find(header, start)
        if found >= 0:
            start = found + len(header)
        else:
            # The generation prompt differs from the turn's header (e.g. it opens an empty
            # thinking block): the header is the part both share.
            start += _common_prefix(header, after[start:])
    return start, len(after)


def assistant_spans(tokenizer, messages: list[dict], turns: list[int], tools=None):
    """Render a chat; return (text, [(start, end) character span of each message in turns]).

    A span covers the assistant's reply and the end-of-turn token, not the header before it
    nor whitespace the template writes after the end-of-turn token. Raises TurnNotFound if a
    turn cannot be located, TokenizerError if the template rejects the chat.
    """
    kwargs = {"tools": tools} if tools is not None else {}

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(
            msgs, add_generation_prompt=generation_prompt, **kwargs
        )

    text = render(messages)
    special = _special_tokens(tokenizer)
    spans, cursor = [], 0
    for i in turns:
        where = f"assistant message {i + 1}"
        try:
            before, prompt = render(messages[:i]), render(messages[:i], True)
        except TokenizerError as e:
            raise TurnNotFound(f"{where}: the messages before it do not render alone ({e})") from e
        after = render(messages[: i + 1])
        try:
            start, end = _turn_span(before, prompt, after)
        except TurnNotFound as e:
            raise TurnNotFound(f"{where}: {e}") from None
        reply = after[start:end].rstrip()
        # Newlines after the end-of-turn token separate turns; the model never generates them.
        if any(reply.endswith(token) for token in special):
            end = start + len(reply)
        content = messages[i].get("content")
        if isinstance(content, str) and content.strip() not in after[start:end]:
            raise TurnNotFound(f"{where}: its content is not in the text the template renders")
        if text.startswith(after):
            spans.append((start, end))
        else:
            # Later messages change how this turn renders (some templates drop the reasoning of
            # earlier turns): find the same text in the whole chat.
            found = text.find(after[start:end], cursor)
            if found < 0:
                raise TurnNotFound(f"{where}: it renders differently once later messages follow")
            spans.append((found, found + end - start))
        cursor = spans[-1][1]
    return text, spans


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose first character lies inside one of the spans.

    A token that starts before a span and runs into it belongs to the prompt (the model is
    given it); one that starts inside a span and runs past its end is needed to write the reply.
    Empty-offset tokens (added by a post-processor) are never in a span.
    """
    mask = [0] * len(offsets)
    for t, (s, e) in enumerate(offsets):
        if e > s and any(a <= s < b for a, b in spans):
            mask[t] = 1
    return mask


def encode_chat(tokenizer, messages: list[dict], loss_on: str, tools=None) -> tuple[list, list]:
    """Token ids and loss mask of one chat. loss_on: "assistant", "last_assistant" or "all".

    The template writes any BOS itself, so the post-processor's special tokens are not added
    (as Tokenizer.apply_chat_template(tokenize=True) does). Raises TurnNotFound or
    TokenizerError.
    """
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    turns = assistants[-1:] if loss_on == "last_assistant" else assistants
    if loss_on == "all":
        kwargs = {"tools": tools} if tools is not None else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids, [1] * len(ids)
    text, spans = assistant_spans(tokenizer, messages, turns, tools)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = spans_to_mask(encoding.offsets, spans)
    for i, (a, b) in zip(turns, spans):
        if not any(a <= s < b for s, _ in encoding.offsets):
            raise TurnNotFound(f"assistant message {i + 1}: no token falls inside its reply")
    return list(encoding.ids), mask
