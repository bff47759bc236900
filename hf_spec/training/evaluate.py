"""Held-out evaluation of draft heads: per-head top-1/top-k accuracy, rank accuracies, and tau estimates.

Each head's prediction at position ``t`` is compared with the target's greedy choice for the token it
drafts (the argmax of the target's distribution on the data context), which is what greedy
verification accepts. From the same pass:

- ``rank_accuracies[k][r]``: probability that the target's token is head ``k``'s ``r``-th choice; the
  Medusa paper builds its static tree from exactly these numbers (``best_rank_tree``).
- ``tau_chain``: 1 + the mean number of leading heads whose top-1 is right (teacher-forced estimate of
  the tokens per step of a top-1 chain).
- ``tau_tree``: the same for the accuracy-derived tree: 1 + the depth of the longest tree path whose
  ranks match the target's tokens, measured per position.
- ``tau_tree_expected``: the tree's expected accepted length under the paper's independence assumption.

The true tokens per step of speculative decoding are measured separately by decoding held-out prompts
(``measure_generation``), since teacher forcing conditions later heads on the data, not the drafts.
"""

from __future__ import annotations

import time

import torch

from ..drafters.medusa import best_rank_tree, expected_accepted_length

UNRANKED = 1 << 20


@torch.no_grad()
def evaluate_heads(accelerator, objective, dataloader, top_k: int = 5, num_ranks: int = 10,
                   tree_num_nodes: int = 32) -> dict:
    """Accuracy and tau estimates over ``dataloader`` (sharded across processes, reduced)."""
    model = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    num_heads = model.heads.config.num_heads
    histogram = torch.zeros(num_heads, num_ranks + 1, dtype=torch.float64, device=accelerator.device)
    rank_rows: list[torch.Tensor] = []
    for batch in dataloader:
        _, head_batches = model.head_batches(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                             batch.get("hidden"), need_teacher=True)
        ranks = torch.full((*batch["input_ids"].shape, num_heads), UNRANKED, dtype=torch.long, device=accelerator.device)
        for head in head_batches:
            if head.rows.numel() == 0:
                continue
            reference = head.reference_tokens
            chosen = head.logits.gather(-1, reference[:, None])
            rank = (head.logits > chosen).sum(-1)
            histogram[head.index] += torch.bincount(rank.clamp(max=num_ranks), minlength=num_ranks + 1).double()
            ranks[head.rows, head.positions, head.index] = rank
        rank_rows.append(ranks[ranks[..., 0] != UNRANKED].cpu())
    histogram = accelerator.reduce(histogram, reduction="sum")
    objective.train(was_training)

    totals = histogram.sum(-1).clamp(min=1)
    rank_accuracies = (histogram[:, :num_ranks] / totals[:, None]).tolist()
    paths = best_rank_tree(rank_accuracies, tree_num_nodes)
    local = torch.cat(rank_rows) if rank_rows else torch.empty(0, num_heads, dtype=torch.long)
    sums = torch.tensor([local.shape[0], _leading_hits(local).sum().item(), _tree_depths(local, paths).sum().item()],
                        dtype=torch.float64, device=accelerator.device)
    count, chain_hits, tree_depth = accelerator.reduce(sums, reduction="sum").tolist()
    count = max(count, 1.0)
    return {
        "positions": int(histogram[0].sum().item()),
        "heads": [
            {"head": k, "drafts_depth": k + 1, "top1": rank_accuracies[k][0],
             f"top{top_k}": sum(rank_accuracies[k][:top_k])}
            for k in range(num_heads)
        ],
        "rank_accuracies": rank_accuracies,
        "tau_chain": 1.0 + chain_hits / count,
        "tree_num_nodes": len(paths),
        "tree": [list(path) for path in paths],
        "tau_tree": 1.0 + tree_depth / count,
        "tau_tree_expected": expected_accepted_length(paths, rank_accuracies),
    }


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
