"""Shared pieces of the end-to-end sampling distribution tests.

A sampling test of speculative decoding needs three things:

- a target that is peaked but not degenerate (so that a wrong verifier moves visible probability
  mass) and a draft that is sometimes right and sometimes wrong (so that acceptance, rejection and
  the residual all happen, at every depth of the tree);
- the exact distribution of the first few generated tokens under *plain* sampling, with the very
  logits processors plain ``generate()`` builds for the same kwargs (temperature, top-k, top-p,
  repetition penalty, ...);
- a record of how deep the verifier actually accepted, so that a test can prove it exercised deep
  tree nodes rather than passing because only the first draft token was ever verified.
"""

from __future__ import annotations

import dataclasses
import itertools
from copy import deepcopy

import torch
from transformers import LogitsProcessorList

from hf_spec.engine import rules, siblings
from hf_spec.engine import verify as verify_module
from hf_spec.engine.rules import VerificationRule
from hf_spec.engine.verify import Verdict
from tests.conftest import tiny_model

TINY_SAMPLING_MODEL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1)


def peaked_tiny_llama(vocab_size: int, seed: int = 0, lm_head_std: float = 0.5):
    """A one-layer float64 Llama whose next-token distributions are peaked but not degenerate.

    The randomly initialised ``lm_head`` (std 0.02) gives nearly uniform distributions; drawing it
    with ``lm_head_std`` instead makes the top token carry most of the mass (about two thirds on
    average with 0.5 and 8 tokens at temperature 0.7) while the others keep visible probability.
    """
    model = tiny_model("llama", seed=seed, vocab_size=vocab_size, **TINY_SAMPLING_MODEL)
    generator = torch.Generator().manual_seed(seed + 1000)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * lm_head_std)
    return model


def perturbed_copy(model, relative_noise: float, seed: int = 1, confidence: float = 1.0):
    """A copy of ``model``, every weight perturbed by Gaussian noise of ``relative_noise`` x the tensor's std.

    Used as a draft model: close enough to the target to be accepted often, different enough to be
    rejected often too. ``confidence`` scales the copy's ``lm_head``: above 1 the draft is
    overconfident (sharper than the target), as small drafts often are.
    """
    copy = deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in copy.parameters():
            noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
            weight.add_(noise * relative_noise * weight.std())
        copy.get_output_embeddings().weight.mul_(confidence)
    return copy


def _return_logits_processor(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
    return logits_processor


def plain_logits_processors(model, prompt: torch.Tensor, **generation_kwargs) -> LogitsProcessorList:
    """The ``LogitsProcessorList`` plain ``model.generate(prompt, **generation_kwargs)`` samples with.

    Obtained from generate() itself (a ``custom_generate`` callable that returns the list it is
    given), so the reference distribution uses exactly the processors, order and parameters of
    plain sampling.
    """
    return model.generate(prompt, custom_generate=_return_logits_processor, **generation_kwargs)


def _all_continuations(vocab_size: int, length: int) -> torch.Tensor:
    """``(vocab_size ** length, length)`` every token sequence of ``length``, in lexicographic order."""
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)),
                        dtype=torch.long).view(vocab_size**length, length)


def _plain_next_token_probs(model, ids: torch.Tensor, processors) -> torch.Tensor:
    """Plain sampling's next-token distribution after each row of ``ids`` (processors applied row by row,
    as plain decoding applies them to its one sequence)."""
    with torch.no_grad():
        logits = model(ids).logits[:, -1].double()
    rows = [processors(ids[row : row + 1], logits[row : row + 1].clone()) for row in range(ids.shape[0])]
    return torch.softmax(torch.cat(rows), dim=-1)


def exact_joint_distribution(model, prompt: torch.Tensor, processors, length: int) -> torch.Tensor:
    """``(vocab,) * length`` probability of each sequence of the first ``length`` tokens of plain sampling.

    The chain rule over every prefix: ``P(x1..xn) = prod_i p_processed(x_i | prompt, x_<i)``.
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    joint = torch.ones(1, dtype=torch.float64)
    for depth in range(length):
        continuations = _all_continuations(vocab_size, depth)
        ids = torch.cat([prompt.expand(continuations.shape[0], -1), continuations], dim=1)
        joint = (joint[:, None] * _plain_next_token_probs(model, ids, processors)).flatten()
    return joint.view((vocab_size,) * length)


def probability_of_continuations(model, prompts: torch.Tensor, continuations: torch.Tensor, processors) -> torch.Tensor:
    """Plain sampling's probability of generating ``continuations[i]`` right after ``prompts[i]``."""
    total = torch.ones(prompts.shape[0], dtype=torch.float64)
    rows = torch.arange(prompts.shape[0])
    for position in range(continuations.shape[1]):
        ids = torch.cat([prompts, continuations[:, :position]], dim=1)
        total *= _plain_next_token_probs(model, ids, processors)[rows, continuations[:, position]]
    return total


def lookup_friendly_prompt(model, processors, anchor: list[int], length: int, shortlist: int = 6) -> torch.Tensor:
    """A prompt ``anchor + C + anchor + B + anchor`` whose lookup candidates ``B`` and ``C`` the target likes.

    Prompt lookup after such a prompt proposes ``B`` and ``C`` (the continuations of the earlier
    occurrences of ``anchor``) as a tree. ``B`` and ``C`` are picked, among all sequences of
    ``length`` tokens, to maximise the probability that plain sampling generates one of them, so that
    lookup trees get accepted to full depth often, but not always. A search rather than a fixed prompt,
    so the test does not depend on how a random model happens to be initialised.
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    anchor_ids = torch.tensor(anchor, dtype=torch.long)
    candidates = _all_continuations(vocab_size, length)
    alone = torch.cat([anchor_ids.expand(candidates.shape[0], -1), candidates,
                       anchor_ids.expand(candidates.shape[0], -1)], dim=1)
    best_alone = candidates[probability_of_continuations(model, alone, candidates, processors).topk(shortlist).indices]
    pairs = [(b, c) for b in best_alone for c in best_alone if not torch.equal(b, c)]
    prompts = torch.stack([torch.cat([anchor_ids, c, anchor_ids, b, anchor_ids]) for b, c in pairs])
    hit = (probability_of_continuations(model, prompts, torch.stack([b for b, _ in pairs]), processors)
           + probability_of_continuations(model, prompts, torch.stack([c for _, c in pairs]), processors))
    return prompts[int(hit.argmax())][None]


class AcceptedDepthSpy:
    """Counts, over a run, how many verification steps accepted each number of draft tokens.

    Installed by replacing ``hf_spec.engine.rules.RULES[name]`` with the same rule whose ``verify``
    records ``len(verdict.accepted_nodes)`` (the depth reached in the tree); so it also wraps a
    deliberately broken rule installed before it.
    """

    def __init__(self, monkeypatch, name: str):
        self.counts: dict[int, int] = {}
        inner = rules.RULES[name]

        def verify_and_record(tree, scores):
            verdict = inner.verify(tree, scores)
            depth = len(verdict.accepted_nodes)
            self.counts[depth] = self.counts.get(depth, 0) + 1
            return verdict

        monkeypatch.setitem(rules.RULES, name, dataclasses.replace(inner, verify=verify_and_record))

    def steps_reaching(self, depth: int) -> int:
        """Verification steps that accepted at least ``depth`` draft tokens."""
        return sum(count for reached, count in self.counts.items() if reached >= depth)


def sample_generations(model, prompt: torch.Tensor, make_drafter, samples: int, **generation_kwargs) -> torch.Tensor:
    """``(samples, max_new_tokens)`` new tokens of ``samples`` speculative generate() calls (one sequence each)."""
    new_tokens = generation_kwargs["max_new_tokens"]
    out = torch.empty(samples, new_tokens, dtype=torch.long)
    attention_mask = torch.ones_like(prompt)  # the tiny models' pad id is a normal token of the prompt here
    for index in range(samples):
        sequence = model.generate(prompt, attention_mask=attention_mask, assistant_model=make_drafter(),
                                  **generation_kwargs)
        if sequence.shape[1] != prompt.shape[1] + new_tokens:
            raise AssertionError(f"generate() returned {sequence.shape[1] - prompt.shape[1]} new tokens, "
                                 f"expected {new_tokens}")
        out[index] = sequence[0, prompt.shape[1]:]
    return out


def joint_counts(tokens: torch.Tensor, vocab_size: int, length: int) -> torch.Tensor:
    """``(vocab,) * length`` counts of the first ``length`` tokens of each row of ``tokens``."""
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for position in range(length):
        index = index * vocab_size + tokens[:, position]
    return torch.bincount(index, minlength=vocab_size**length).view((vocab_size,) * length)


# ------------------------------------------------------------------------------------------ broken engines
# Negative controls: each installs one plausible sampling bug with ``monkeypatch`` (undone after the test).
def accept_every_draft_token(monkeypatch):
    """BROKEN: follow the first child down to a leaf, then sample the target there."""

    def verify(tree, scores):
        path, row = [], 0
        while tree.children[row]:
            path.append(tree.children[row][0])
            row = path[-1] + 1
        return Verdict(path, int(torch.multinomial(torch.softmax(scores[row], -1), 1)))

    monkeypatch.setitem(rules.RULES, "rrs", VerificationRule("rrs", verify, sampling=True, sibling_scheme="iid"))


def verify_without_temperature(monkeypatch, temperature: float):
    """BROKEN: the verifier sees the scores without temperature (all the other processors still applied).

    generate() divides by the temperature after the repetition penalty and before top-k/top-p, whose
    masks are -inf; multiplying the processed scores back by the temperature undoes exactly that step.
    """
    rrs = rules.RULES["rrs"]
    monkeypatch.setitem(rules.RULES, "rrs",
                        dataclasses.replace(rrs, verify=lambda tree, scores: rrs.verify(tree, scores * temperature)))


def stale_without_replacement_rows(monkeypatch):
    """BROKEN: siblings drawn without replacement, but each labelled with the original ``q``."""
    draw = siblings._without_replacement

    def stale(probs, count):
        tokens, _ = draw(probs, count)
        return tokens, [probs] * len(tokens)

    monkeypatch.setattr(siblings, "_without_replacement", stale)


def residual_is_target(monkeypatch):
    """BROKEN: after a rejection, the next sibling is tested against (and the correction token drawn from) ``p``
    instead of the residual ``norm(max(p - q, 0))``."""
    monkeypatch.setattr(verify_module, "_residual", lambda target, draft, token: target)


def rrs_on_spechub_drafts(monkeypatch):
    """BROKEN: drafts drawn as SpecHub hub pairs, verified by recursive rejection sampling (which assumes i.i.d.)."""
    rrs = rules.RULES["rrs"]
    monkeypatch.setitem(rules.RULES, "spechub", dataclasses.replace(rrs, name="spechub", sibling_scheme="spechub"))
