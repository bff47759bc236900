"""Task groups: the prompts of the benchmark, built offline.

Spec-Bench (Xia et al. 2024) reports speedups per task group because methods differ by task:
retrieval drafters win where the answer copies the input, draft models where text is predictable.
The groups here:

- ``mt_bench``: multi-turn chat, MT-Bench's 80 two-turn questions (Zheng et al. 2023). Both turns are
  measured; the second is asked after the model's own first answer (see ``render.py``).
- ``code``: HumanEval (Chen et al. 2021): complete a Python function from its signature and docstring.
- ``math``: GSM8K test (Cobbe et al. 2021): grade-school word problems, solved step by step.
- ``summarization``, ``qa``, ``extraction``: input-grounded tasks over the documents of ``passages.py``.
- ``code_edit``: edit a given Python function (``code_edits.py``): the answer mostly repeats the input.

``load_tasks(groups, limit, seed)`` picks ``limit`` prompts per group with a seeded random sample, kept
in the data set's order, so that the same settings always measure the same prompts.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from typing import Callable

from .code_edits import CODE_EDITS
from .passages import PASSAGES
from .sources import read_data_file


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: its user turns; turn ``k > 0`` follows the model's answers to turns ``< k``."""

    id: str
    group: str
    turns: tuple[str, ...]


def mt_bench() -> list[Prompt]:
    rows = [json.loads(line) for line in read_data_file("mt_bench").decode().splitlines() if line.strip()]
    return [Prompt(f"mt_bench/{row['question_id']}", "mt_bench", tuple(row["turns"])) for row in rows]


def code() -> list[Prompt]:
    rows = [json.loads(line) for line in gzip.decompress(read_data_file("humaneval")).decode().splitlines() if line]
    return [
        Prompt(f"code/{row['task_id'].replace('/', '-')}", "code",
               ("Complete the following Python function. Reply with the whole function in a code block.\n\n"
                f"```python\n{row['prompt']}```",))
        for row in rows
    ]


def math() -> list[Prompt]:
    rows = [json.loads(line) for line in read_data_file("gsm8k").decode().splitlines() if line.strip()]
    return [
        Prompt(f"math/gsm8k-{index}", "math",
               (f"Solve this problem step by step, then give the final answer.\n\n{row['question']}",))
        for index, row in enumerate(rows)
    ]


def summarization() -> list[Prompt]:
    return [Prompt(f"summarization/{p['id']}", "summarization",
                   (f"Summarize the following {p['kind']} in three sentences.\n\n{p['text']}",)) for p in PASSAGES]


def qa() -> list[Prompt]:
    return [Prompt(f"qa/{p['id']}", "qa",
                   (f"Answer the question using only the text below.\n\nText:\n{p['text']}\n\n"
                    f"Question: {p['question']}",)) for p in PASSAGES]


def extraction() -> list[Prompt]:
    return [Prompt(f"extraction/{p['id']}", "extraction", (f"{p['extract']}\n\nText:\n{p['text']}",))
            for p in PASSAGES]


def code_edit() -> list[Prompt]:
    return [Prompt(f"code_edit/{edit['id']}", "code_edit", (f"{edit['request']}\n\n```python\n{edit['code']}```",))
            for edit in CODE_EDITS]


TASK_GROUPS: dict[str, Callable[[], list[Prompt]]] = {
    "mt_bench": mt_bench,
    "code": code,
    "math": math,
    "summarization": summarization,
    "qa": qa,
    "extraction": extraction,
    "code_edit": code_edit,
}


def load_tasks(groups: list[str] | None = None, limit: int | dict[str, int | None] | None = None,
               seed: int = 0) -> list[Prompt]:
    """Up to ``limit`` prompts of each group (all with ``limit=None``), chosen with ``seed``.

    ``limit`` is one number for every group or a mapping ``{group: number, "default": number}``.
    """
    prompts: list[Prompt] = []
    for group in groups or list(TASK_GROUPS):
        if group not in TASK_GROUPS:
            raise ValueError(f"Unknown task group {group!r}; choose from {', '.join(TASK_GROUPS)}.")
        prompts += select(TASK_GROUPS[group](), group_limit(limit, group), f"{seed}/{group}")
    return prompts


def group_limit(limit: int | dict[str, int | None] | None, group: str) -> int | None:
    """The number of prompts ``limit`` allows ``group``."""
    if not isinstance(limit, dict):
        return limit
    if group in limit:
        return limit[group]
    if "default" in limit:
        return limit["default"]
    raise ValueError(f"limit {limit} has no entry for task group {group!r}: add one, or a 'default' entry.")


def select(prompts: list[Prompt], limit: int | None, seed: str) -> list[Prompt]:
    """A seeded sample of ``limit`` prompts, in their original order."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[index] for index in chosen]
