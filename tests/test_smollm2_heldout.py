"""Held-out-style greedy identity: every drafter that applies to SmolLM2-135M-Instruct, on 21 real chat
prompts that are not the demo's, token for token against plain greedy generate() (64 new tokens per prompt in
CI, 128 in the full matrix).

The prompts (written for this test; none is in ``hf_spec.demo.demo_prompts()``) mix input-grounded tasks
(rewrite, reformat, fix this code: prompt lookup accepts there), open questions, code, arithmetic, a
system prompt and a multi-turn conversation; each goes through the tokenizer's chat template. The
plain reference is computed once per prompt and shared by every drafter.

The target runs in float32, where its logits over a draft tree differ from sequential decoding by
~1e-5 (different matmul shapes): ``tests.identity.assert_greedy_identical`` tolerates a divergence
only at a provable near-tie of plain decoding's top-2 logits, nothing else.

Drafters: prompt lookup (chain and candidate tree), an 8-layer early exit of the target through
``DraftModelDrafter`` (chain, static top-k tree, EAGLE-2-style dynamic tree) and the committed Medusa
heads (``artifacts/medusa-smollm2-135m-instruct``; static tree and dynamic tree), the committed EAGLE-3 draft
(``artifacts/eagle3-smollm2-135m-instruct``; dynamic tree and chain) and the committed gated-LoRA MTP adapter
(``artifacts/mtp-smollm2-135m-instruct``; quadratic and linear decoding, on a copy of the target that shares its
weights). Each drafter must
also have had drafts accepted on its prompts, so that the identity is not reached by rejecting everything.

Runtime budget (CI: 2 cores, ~3 minutes for this file). One plain 128-token generation costs ~6 s
there; measured per prompt relative to it, prompt lookup costs ~1.5x, Medusa ~1.3x and the early exit
~3-4x (untrained, it is rejected almost always, and every draft step still runs). Every drafter on every
prompt at 128 tokens would take ~25 minutes, so in CI each drafter runs on its own prompts (the ``DRAFTERS``
table, two or three each; lookups get input-grounded ones), which together cover all 21 prompts once, with 64
new tokens each: 21 plain references plus 21 speculative runs. ``HF_SPEC_HELDOUT_ALL_PROMPTS=1`` runs every
drafter on every prompt with 128 new tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import hf_spec
from hf_spec.bench.methods import shared_weights_copy
from hf_spec.demo import demo_prompts
from hf_spec.drafters.early_exit import early_exit_model
from tests.identity import assert_greedy_identical

pytestmark = pytest.mark.real_model
FULL_MATRIX = os.environ.get("HF_SPEC_HELDOUT_ALL_PROMPTS") == "1"
MAX_NEW_TOKENS = 128 if FULL_MATRIX else 64
EARLY_EXIT_LAYERS = 8
TRAINED_MEDUSA = Path(__file__).resolve().parents[1] / "artifacts" / "medusa-smollm2-135m-instruct"
TRAINED_EAGLE3 = Path(__file__).resolve().parents[1] / "artifacts" / "eagle3-smollm2-135m-instruct"
TRAINED_MTP = Path(__file__).resolve().parents[1] / "artifacts" / "mtp-smollm2-135m-instruct"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


HELDOUT_CONVERSATIONS: list[list[dict]] = [
    user("Write a haiku about autumn leaves, then explain its imagery in two sentences."),
    user("What are three differences between a virus and a bacterium?"),
    user("Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."),
    user("Convert this list into a Markdown table with the columns Fruit, Colour and Price:\n\n"
         "apple - red - 1.20\nbanana - yellow - 0.50\ngrape - purple - 2.75\nlemon - yellow - 0.80"),
    user("A train leaves at 9:15 and arrives at 11:40. How long is the journey? Reason step by step."),
    user("Give me five tips for staying focused while studying from home."),
    user("Translate into French: 'The library opens at eight in the morning and closes at six in the evening.'"),
    user("Rewrite this email so that it sounds polite and professional:\n\n"
         "hey, the report you sent is missing the sales numbers again. fix it by tomorrow."),
    user("Explain recursion to a ten-year-old, with an example."),
    user("Write a SQL query that returns the ten customers with the highest total order value, from the tables "
         "customers(id, name) and orders(id, customer_id, amount)."),
    user("List the planets of the solar system in order from the Sun, with one fact about each."),
    user("Fix the bug in this JavaScript function and explain it:\n\n"
         "function sum(values) {\n  let total = 0;\n  for (let i = 0; i <= values.length; i++) {\n"
         "    total += values[i];\n  }\n  return total;\n}"),
    user("Write a short dialogue between a customer and a barista who got the order wrong."),
    user("Turn these notes into a short paragraph:\n- meeting moved to Thursday\n- bring the Q3 budget draft\n"
         "- Sara presents the hiring plan\n- lunch is provided"),
    user("Explain the difference between a list and a tuple in Python, with a code example."),
    [{"role": "user", "content": "I'm planning a trip to Japan in spring. Which cities should I visit?"},
     {"role": "assistant",
      "content": "Tokyo, Kyoto and Osaka are popular in spring, especially for the cherry blossoms."},
     {"role": "user", "content": "What should I pack for that trip?"}],
    user("Answer with a JSON object with the keys name, capital and population for the country France."),
    user("Describe how a bill becomes a law in the United States, in numbered steps."),
    user("Correct the grammar in this paragraph and return only the corrected text:\n\n"
         "Me and my friend goes to the park every sundays. We likes to feeding the ducks, but last week "
         "their was no ducks because it were too cold."),
    [{"role": "system", "content": "You are a concise assistant who always answers in exactly three bullet points."},
     {"role": "user", "content": "Why is sleep important?"}],
    user("Write a bash command that finds every .log file larger than 10 MB under /var/log, and explain each part."),
]


def early_exit_drafter(model, **options):
    return hf_spec.DraftModelDrafter(early_exit_model(model, EARLY_EXIT_LAYERS), num_tokens=3, **options)


def medusa_drafter(model):
    return hf_spec.MedusaDrafter.from_pretrained(TRAINED_MEDUSA, target=model)


def eagle3_drafter(model, **options):
    return hf_spec.Eagle3Drafter.from_pretrained(TRAINED_EAGLE3, target=model, **options)


def mtp_drafter(model, **options):
    """On a copy of the target sharing its weights: the adapter wraps its target's linears in place."""
    return hf_spec.MTPDrafter.from_pretrained(TRAINED_MTP, target=shared_weights_copy(model), **options)


# name -> (drafter built from the target, extra generate() options, the prompts it runs on in CI)
# prompt lookup runs with the library's cost-aware default; the rest with their own trees every step (at this CPU's
# cost curve goodput drafts little with them, which would leave little to check)
FIXED = {"draft_length": "fixed"}
GOODPUT = {"draft_length": "goodput"}
DRAFTERS = {
    "lookup-chain": (lambda model: hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=8), GOODPUT, (3, 11, 15)),
    "lookup-tree": (lambda model: hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=8, max_candidates=4), GOODPUT,
                    (7, 13, 18)),
    "early-exit-chain": (early_exit_drafter, FIXED, (0,)),
    "early-exit-static-tree": (lambda model: early_exit_drafter(model, tree="static", top_k=3), FIXED, (1, 9)),
    "early-exit-dynamic-tree": (lambda model: early_exit_drafter(model, tree="dynamic", top_k=3, tree_budget=12),
                                FIXED, (4, 12)),
    "medusa-static-tree": (medusa_drafter, FIXED, (2, 10)),
    "medusa-dynamic-tree": (medusa_drafter, {**FIXED, "tree": "dynamic", "tree_budget": 12}, (5, 6)),
    "eagle3-dynamic-tree": (eagle3_drafter, FIXED, (16, 17)),
    "eagle3-chain": (lambda model: eagle3_drafter(model, tree="chain", depth=4), FIXED, (14, 20)),
    "mtp-quadratic": (mtp_drafter, FIXED, (8,)),
    "mtp-linear": (lambda model: mtp_drafter(model, decoding="linear"), FIXED, (19,)),
}


def prompts_for(name: str) -> tuple[int, ...]:
    """The CI share of the prompts, or all of them with ``HF_SPEC_HELDOUT_ALL_PROMPTS=1``."""
    if FULL_MATRIX:
        return tuple(range(len(HELDOUT_CONVERSATIONS)))
    return DRAFTERS[name][2]


def test_heldout_prompts_are_new_and_each_is_checked():
    texts = [message["content"] for conversation in HELDOUT_CONVERSATIONS for message in conversation]
    assert len(HELDOUT_CONVERSATIONS) >= 20
    assert not set(texts) & set(demo_prompts())
    assert len({conversation[-1]["content"] for conversation in HELDOUT_CONVERSATIONS}) == len(HELDOUT_CONVERSATIONS)
    shares = [share for _, _, share in DRAFTERS.values()]
    assert sorted(index for share in shares for index in share) == list(range(len(HELDOUT_CONVERSATIONS)))


@pytest.fixture(scope="module")
def plain_greedy(smollm2):
    """``reference(index) -> (prompt ids, plain greedy output)``, each computed once and shared by every drafter."""
    model, tokenizer = smollm2
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in cache:
            ids = tokenizer.apply_chat_template(HELDOUT_CONVERSATIONS[index], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.inference_mode():
                cache[index] = ids, model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return cache[index]

    return model, reference


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_every_drafter_is_greedy_identical_on_heldout_prompts(plain_greedy, name):
    model, reference = plain_greedy
    make_drafter, options, _ = DRAFTERS[name]
    drafter = make_drafter(model)
    failures, accepted = [], 0
    for index in prompts_for(name):
        ids, expected = reference(index)
        target = drafter.model if drafter.wraps_target else model
        with torch.inference_mode():
            got = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, assistant_model=drafter,
                                  **options)
        accepted += drafter.stats.accepted_tokens  # the stats count one generate() call
        try:
            assert_greedy_identical(model, expected, got)
        except AssertionError as error:
            failures.append(f"prompt {index}: {error}")
    assert not failures, f"{name} differs from plain greedy generate():\n" + "\n".join(failures)
    assert accepted > 0, f"{name} had no draft token accepted: the identity would prove little"
