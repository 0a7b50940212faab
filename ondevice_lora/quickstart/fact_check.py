"""Fact checks: does a model state the facts a dataset taught it?

A facts file (facts.json) lists questions and the key phrases a right answer must contain:

    [{"fact": "dog", "question": "What's the name of my whippet?", "keywords": ["Pemberton"],
      "answer": "Your dog is Pemberton, your whippet."}, ...]

An answer states a fact when every keyword appears in it, ignoring case. Keyword matching is
deliberately simple: the facts are chosen so that their key phrase (a name, a day, a city) is
something a model cannot produce by chance, so a substring test is both strict and readable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..errors import OndeviceLoraError
from ..generation.generate import SamplingConfig, generate

FACTS_FILE = "facts.json"
FACT_KEYS = ("fact", "question", "keywords", "answer")  # "fact" (a label) and "answer" optional
STATED, NOT_STATED = "✓", "✗"


@dataclass(frozen=True)
class Fact:
    """One checkable fact: a question and the keywords every right answer contains."""

    fact: str
    question: str
    keywords: tuple[str, ...]
    answer: str | None = None  # the reference answer, for people reading the table

    def stated_in(self, text: str) -> bool:
        """True when every keyword appears in `text`, ignoring case."""
        return states_fact(text, self.keywords)


def states_fact(text: str, keywords) -> bool:
    """True when every keyword appears in `text`, ignoring case (casefold, so ß matches ss)."""
    folded = text.casefold()
    return all(k.casefold() in folded for k in keywords)


def read_facts(path) -> list[Fact]:
    """The facts of a facts.json file; every problem in it is reported at once, by entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OndeviceLoraError(f"{path}: facts file not found.") from None
    except json.JSONDecodeError as e:
        raise OndeviceLoraError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list) or not data:
        raise OndeviceLoraError(f"{path}: expected a non-empty JSON list of facts.")
    facts, problems = [], []
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object, got {type(entry).__name__}")
            continue
        question, keywords = entry.get("question"), entry.get("keywords")
        if not isinstance(question, str) or not question.strip():
            problems.append(f"{where}: 'question' must be a non-empty string, got {question!r}")
        if (
            not isinstance(keywords, list)
            or not keywords
            or not all(isinstance(k, str) and k.strip() for k in keywords)
        ):
            problems.append(f"{where}: 'keywords' must be a non-empty list of strings")
        unknown = sorted(set(entry) - set(FACT_KEYS))
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(unknown)}")
        if not problems:
            label = entry.get("fact") or f"fact {i + 1}"
            facts.append(Fact(str(label), question, tuple(keywords), entry.get("answer")))
    if problems:
        raise OndeviceLoraError(f"{path}: invalid facts:\n  - " + "\n  - ".join(problems))
    return facts


def ask(model, tokenizer, questions, max_tokens: int) -> list[str]:
    """Greedy answers to each question, in the model's chat template: deterministic, so the
    answers before and after training differ only because of the adapter."""
    config = SamplingConfig(temperature=0.0, max_tokens=max_tokens)
    return [generate(model, tokenizer, q, config).strip() for q in questions]


@dataclass
class FactAnswer:
    """A fact with the base model's answer and the adapted model's answer."""

    fact: Fact
    before: str
    after: str | None = None

    @property
    def stated_before(self) -> bool:
        return self.fact.stated_in(self.before)

    @property
    def stated_after(self) -> bool:
        return self.after is not None and self.fact.stated_in(self.after)

    def to_dict(self) -> dict:
        return {
            "fact": self.fact.fact,
            "question": self.fact.question,
            "keywords": list(self.fact.keywords),
            "before": self.before,
            "stated_before": self.stated_before,
            "after": self.after,
            "stated_after": self.stated_after,
        }


def facts_table(answers: list[FactAnswer], title: str = "") -> Table:
    """A table of the answers before and after training beside the expected key phrases."""
    table = Table(title=title or None, show_lines=True, expand=False)
    table.add_column("question", ratio=3)
    table.add_column("expected", style="bold")
    table.add_column("base model", ratio=3)
    table.add_column("with adapter", ratio=3)
    for a in answers:
        table.add_row(
            a.fact.question,
            ", ".join(a.fact.keywords),
            _cell(a.before, a.stated_before),
            _cell(a.after, a.stated_after) if a.after is not None else "-",
        )
    before = sum(a.stated_before for a in answers)
    after = sum(a.stated_after for a in answers)
    table.add_row(
        "[bold]facts stated", "", f"[bold]{before}/{len(answers)}", f"[bold]{after}/{len(answers)}"
    )
    return table


def _cell(text: str, ok: bool) -> str:
    mark = f"[green]{STATED}[/green]" if ok else f"[red]{NOT_STATED}[/red]"
    # Answers are model output: escape them so a "[" in the text is not read as rich markup.
    return f"{mark} {escape(_shorten(text))}"


def _shorten(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
