"""Offline code for the ``code_edit`` task group: small Python functions with one editing request each.

Editing code is the most input-grounded task there is: most of the answer repeats the input, which
is where retrieval drafters such as prompt lookup (Saxena 2023) pay, and where Spec-Bench-style
measurements of them are most favourable. HumanEval (the ``code`` group) asks for new code instead.
These snippets were written for hf_spec and ship as Python data, so any install has them.
"""

from __future__ import annotations

CODE_EDITS: tuple[dict[str, str], ...] = (
    {
        "id": "type-hints",
        "request": "Add type hints and a docstring to this Python function, and return the full function.",
        "code": (
            "def moving_average(values, window):\n"
            "    if window <= 0:\n"
            "        raise ValueError('window must be positive')\n"
            "    result = []\n"
            "    total = 0\n"
            "    for index, value in enumerate(values):\n"
            "        total += value\n"
            "        if index >= window:\n"
            "            total -= values[index - window]\n"
            "        if index >= window - 1:\n"
            "            result.append(total / window)\n"
            "    return result\n"
        ),
    },
    {
        "id": "rename-variables",
        "request": "Rename the variable `d` to `counts` and `w` to `word` everywhere in this code, and return the "
                   "full code.",
        "code": (
            "def word_frequencies(text, min_length=1):\n"
            "    d = {}\n"
            "    for w in text.lower().split():\n"
            "        w = w.strip('.,;:!?\"()')\n"
            "        if len(w) < min_length:\n"
            "            continue\n"
            "        d[w] = d.get(w, 0) + 1\n"
            "    return sorted(d.items(), key=lambda item: (-item[1], item[0]))\n"
        ),
    },
    {
        "id": "fix-bug",
        "request": "This function should merge overlapping intervals, but it gives wrong results when the input is "
                   "not sorted. Fix it and return the corrected function.",
        "code": (
            "def merge_intervals(intervals):\n"
            "    merged = []\n"
            "    for start, end in intervals:\n"
            "        if merged and start <= merged[-1][1]:\n"
            "            merged[-1][1] = max(merged[-1][1], end)\n"
            "        else:\n"
            "            merged.append([start, end])\n"
            "    return [tuple(interval) for interval in merged]\n"
        ),
    },
    {
        "id": "add-logging",
        "request": "Add a log message with the logging module each time a retry happens, and return the full code.",
        "code": (
            "import time\n"
            "\n"
            "\n"
            "def fetch_with_retries(fetch, url, attempts=3, delay=0.5):\n"
            "    last_error = None\n"
            "    for attempt in range(1, attempts + 1):\n"
            "        try:\n"
            "            return fetch(url)\n"
            "        except ConnectionError as error:\n"
            "            last_error = error\n"
            "            time.sleep(delay * attempt)\n"
            "    raise RuntimeError(f'could not fetch {url} after {attempts} attempts') from last_error\n"
        ),
    },
)
