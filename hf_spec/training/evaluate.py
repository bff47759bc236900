"""Held-out evaluation of draft heads: per-head top-1/top-k accuracy, rank accuracies, and tau estimates.

``evaluate_heads`` serves any method whose objective drafts one token per head and depth: it needs
``objective.heads.config.num_heads`` and ``objective.head_batches(input_ids, attention_mask, loss_mask,
hidden, need_teacher=True)`` returning each head's positions and the rank of its reference token among the
head's logits (``HeadBatch.reference_ranks`` of ``methods/medusa_objective.py``; with a draft vocabulary a
reference token outside it ranks below every token the head can propose, so it counts as a miss). Each head's prediction at position ``t`` is compared with the
target's greedy choice for the token it drafts (the argmax of the target's distribution on the data context), which is what greedy
verification accepts. From the same pass:

- ``rank_accuracies[k][r]``: probability that the target's token is head ``k``'s ``r``-th choice; the
  Medusa paper builds its static tree from exactly these numbers (``best_rank_tree``).
- ``tau_chain``: 1 + the mean number of leading heads whose top-1 is right (teacher-forced estimate of
  the tokens per step of a top-1 chain).
- ``tau_tree``: the same for the accuracy-derived tree (``rank_paths``, ``tree_num_nodes`` nodes): 1 + the
  depth of the longest tree path whose ranks match the target's tokens, measured per position.
- ``tau_tree_expected``: the tree's expected accepted length under the paper's independence assumption.

The true tokens per step of speculative decoding are measured separately by decoding held-out prompts
(``measure_generation``), since teacher forcing conditions later heads on the data, not the drafts.
"""

from __future__ import annotations

import time

import torch

from ..drafters.medusa.rank_tree import best_rank_tree, expected_accepted_length

UNRANKED = 1 << 20


@torch.no_grad()
def evaluate_heads(accelerator, objective, dataloader, top_k: int = 5, num_ranks: int = 10,
                   tree_num_nodes: int = 32) -> dict:
    """Accuracy and tau estimates over ``dataloader`` (prepared: sharded across processes).

    A prepared loader gives every process the same number of batches (``even_batches``, which ZeRO-3's
    collective forwards need), padding the last ones with repeated examples; the per-position ranks are
    gathered with ``gather_for_metrics``, which drops those repeats, so each held-out position counts once.
    """
    model = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    num_heads = model.heads.config.num_heads
    gathered: list[torch.Tensor] = []
    for batch in dataloader:
        ranks = _position_ranks(model, batch, num_heads, accelerator.device)
        ranks = accelerator.pad_across_processes(ranks, dim=1, pad_index=UNRANKED)
        ranks = accelerator.gather_for_metrics(ranks).cpu()
        gathered.append(ranks[(ranks != UNRANKED).any(-1)])
    objective.train(was_training)

    ranks = torch.cat(gathered) if gathered else torch.empty(0, num_heads, dtype=torch.long)
    histogram = torch.stack([_rank_histogram(ranks[:, k], num_ranks) for k in range(num_heads)])
    totals = histogram.sum(-1).clamp(min=1)
    rank_accuracies = (histogram[:, :num_ranks] / totals[:, None]).tolist()
    paths = best_rank_tree(rank_accuracies, tree_num_nodes)
    rooted = ranks[ranks[:, 0] != UNRANKED]  # positions where head 0 drafts: the steps a decoder would take
    count = max(rooted.shape[0], 1)
    return {
        "positions": int(histogram[0].sum().item()),
        "heads": [
            {"head": k, "drafts_depth": k + 1, "top1": rank_accuracies[k][0],
             f"top{top_k}": sum(rank_accuracies[k][:top_k])}
            for k in range(num_heads)
        ],
        "rank_accuracies": rank_accuracies,
        "tau_chain": 1.0 + _leading_hits(rooted).sum().item() / count,
        "tree_num_nodes": len(paths),
        "rank_paths": [list(path) for path in paths],
        "tau_tree": 1.0 + _tree_depths(rooted, paths).sum().item() / count,
        "tau_tree_expected": expected_accepted_length(paths, rank_accuracies),
    }


def _position_ranks(model, batch, num_heads: int, device) -> torch.Tensor:
    """``(batch, length, heads)``: the rank of the reference token in head ``k``'s logits at each position
    (``UNRANKED`` where head ``k`` has no label)."""
    _, head_batches = model.head_batches(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                         batch.get("hidden"), need_teacher=True)
    ranks = torch.full((*batch["input_ids"].shape, num_heads), UNRANKED, dtype=torch.long, device=device)
    for head in head_batches:
        if head.rows.numel() == 0:
            continue
        ranks[head.rows, head.positions, head.index] = head.reference_ranks()
    return ranks


def _rank_histogram(ranks: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Counts of ranks ``0 .. num_ranks - 1`` and, last, of every worse rank (unranked positions left out)."""
    ranked = ranks[ranks != UNRANKED]
    return torch.bincount(ranked.clamp(max=num_ranks), minlength=num_ranks + 1).double()


def _leading_hits(ranks: torch.Tensor) -> torch.Tensor:
    """Per position, how many heads in a row (from head 0) have the target's token as their top-1."""
    return (ranks == 0).long().cumprod(dim=-1).sum(-1)


def _tree_depths(ranks: torch.Tensor, paths: list[tuple[int, ...]]) -> torch.Tensor:
    """Per position, the depth of the longest tree path that matches the target's tokens' ranks."""
    in_tree = set(paths)
    depths = []
    for row in ranks.tolist():
        depth = 0
        while depth < len(row) and tuple(row[: depth + 1]) in in_tree:
            depth += 1
        depths.append(depth)
    return torch.tensor(depths, dtype=torch.long)


@torch.no_grad()
def measure_generation(target, drafter, prompts: list[torch.Tensor], max_new_tokens: int) -> dict:
    """Greedy-decode ``prompts`` plainly and with ``drafter``: tokens per target forward and wall-clock speedup.

    Also checks that both produce the same tokens (the engine's greedy verification is exact).
    """
    plain_seconds = speculative_seconds = 0.0
    new_tokens = forwards = mismatches = 0
    for prompt in prompts:
        start = time.perf_counter()
        expected = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
        plain_seconds += time.perf_counter() - start
        start = time.perf_counter()
        got = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
        speculative_seconds += time.perf_counter() - start
        new_tokens += drafter.stats.new_tokens
        forwards += drafter.stats.target_forwards
        mismatches += int(not torch.equal(expected, got))
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "tau": new_tokens / max(forwards, 1),
        "speedup": plain_seconds / max(speculative_seconds, 1e-9),
        "plain_seconds": plain_seconds,
        "speculative_seconds": speculative_seconds,
        "outputs_differing_from_plain": mismatches,
    }
