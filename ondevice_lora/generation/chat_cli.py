"""`ondevice-lora chat`: talk to the model (and its adapters) in the terminal.

The replies go to stdout, one after another, each ended by a newline; everything else (the
banner, command answers, tokens/s) goes to stderr, so `chat < questions.txt > replies.txt`
keeps just the replies.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from ..adapters.mix import active_adapters, adapter_names, load_adapters, parse_adapter_specs
from ..errors import OndeviceLoraError
from .chat_session import ChatSession
from .generate import SamplingConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}

HELP = """Commands:
  /adapter NAME      use one adapter (at weight 1)
  /mix A=0.5,B=0.5   use a weighted mix of adapters
  /base              use the base model alone
  /adapters          list the loaded adapters and the active ones
  /reset             start a new conversation
  /stats             tokens and tokens/s of the last turn and of the whole session
  /help              this list
  /quit              leave (so does end of input, Ctrl-D)
Switching adapters drops the KV cache: the cached keys and values were computed with the
other weights, so the next turn reads the whole conversation again."""


def _say(text: str) -> None:
    click.echo(text, err=True)


def parse_mix(text: str) -> dict[str, float]:
    """{"a": 0.5, "b": 0.5} from "a=0.5,b=0.5"."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise OndeviceLoraError(f"cannot read {item!r}: write /mix NAME=WEIGHT,NAME=WEIGHT.")
    if not weights:
        raise OndeviceLoraError("/mix needs NAME=WEIGHT pairs, e.g. /mix chat=0.7,sql=0.3.")
    return weights


def _describe(active: dict[str, float]) -> str:
    if not active:
        return "the base model (no adapter)"
    return ", ".join(f"{n}={w:g}" for n, w in active.items())


def _stats(session: ChatSession) -> str:
    if not session.turns:
        return "no turn yet in this conversation."
    turns = session.turns
    prefilled = sum(t.prefilled_tokens for t in turns)
    reused = sum(t.reused_tokens for t in turns)
    generated = sum(t.generation.generation_tokens for t in turns)
    return (
        f"last turn: {turns[-1].summary()}\n"
        f"conversation: {len(turns)} turns, {prefilled} tokens prefilled, {reused} reused from "
        f"the KV cache, {generated} generated"
    )


def run_command(session: ChatSession, line: str) -> bool:
    """Carry out one /command; returns False when the chat should end."""
    command, _, argument = line[1:].partition(" ")
    argument = argument.strip()
    loaded = adapter_names(session.model)
    if command in ("quit", "exit", "q"):
        return False
    if command == "help":
        _say(HELP)
    elif command == "reset":
        session.reset()
        _say("new conversation.")
    elif command == "stats":
        _say(_stats(session))
    elif command in ("adapter", "mix", "base", "adapters"):
        if not loaded:
            raise OndeviceLoraError("no adapters loaded: start chat with --adapter FOLDER.")
        if command == "adapters":
            _say(
                f"loaded: {', '.join(loaded)}; active: {_describe(active_adapters(session.model))}"
            )
            return True
        if command == "adapter" and not argument:
            raise OndeviceLoraError(f"/adapter needs a name; loaded: {', '.join(loaded)}.")
        active = {"adapter": argument, "base": None}.get(command)
        if command == "mix":
            active = parse_mix(argument)
        before = active_adapters(session.model)
        weights = session.set_adapters(active)
        note = " (KV cache dropped: the next turn re-reads the conversation)"
        _say(f"now using {_describe(weights)}" + (note if weights != before else ""))
    else:
        raise OndeviceLoraError(f"unknown command /{command}; /help lists them.")
    return True


def _read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def chat_loop(session: ChatSession) -> None:
    """Read turns and /commands from stdin until /quit or end of input."""
    while True:
        try:
            line = _read_line()
        except KeyboardInterrupt:
            return
        if line is None:
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            try:
                if not run_command(session, line.strip()):
                    return
            except OndeviceLoraError as e:
                _say(f"error: {e}")
            continue
        pieces = session.reply(line)
        try:
            for piece in pieces:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            pieces.close()  # the partial reply stays in the conversation
            _say(" [interrupted]")
        click.echo()
        _say(session.turns[-1].summary())


@click.command("chat")
@click.option("--model", "model_name", default=None, help="Model folder, .gguf file or Hub id.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Adapter folder, or NAME=FOLDER; repeat to load several (the first starts active).",
)
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--greedy", is_flag=True, help="Always pick the most likely token.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=_DEFAULTS["top_p"], show_default=True)
@click.option("--max-tokens", type=int, default=_DEFAULTS["max_tokens"], show_default=True)
@click.option("--seed", type=int, default=None, help="Make sampling reproducible.")
def chat_command(model_name, adapters, system, greedy, temperature, top_p, max_tokens, seed):
    """Chat with the model in the terminal; /help lists the commands.

    The KV cache is kept between turns, so each turn reads only its new tokens.
    """
    from ..loading import load

    if greedy and temperature not in (None, 0):
        raise click.UsageError("--greedy and --temperature contradict each other; pass one.")
    if temperature is None:
        temperature = _DEFAULTS["temperature"]
    config = SamplingConfig(
        temperature=0.0 if greedy else temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
    )
    model, tokenizer = load(model_name)
    specs = parse_adapter_specs(adapters)
    if specs:
        load_adapters(model, specs, tokenizer, active=next(iter(specs)))
    session = ChatSession(model, tokenizer, config, system=system)
    _say(f"chatting with {_describe(active_adapters(session.model))}. /help lists the commands.")
    chat_loop(session)
