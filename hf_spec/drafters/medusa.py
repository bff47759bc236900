"""Medusa: extra decoding heads on the target's last hidden state, verified as a static token tree.

Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads".
Head ``k`` (``k = 0..K-1``) reads the target's last-layer hidden state ``h_t`` at the position of the
last committed token ``x_t`` (the position whose logits produced the root ``x_{t+1}``) and predicts
``x_{t+2+k}``: the draft token at depth ``k + 1`` below the root. Each head is ``n`` residual blocks
``x + SiLU(W x + b)`` (``W``, ``b`` zero-initialised, so an untrained head starts as the target's own
next-token head) followed by a vocabulary projection, either the target's frozen ``lm_head`` (shared;
checkpoints then hold only the residual blocks and stay a few MB) or a copy of it trained with the head.

Candidates form a static tree of *rank paths*: node ``(r_1, ..., r_d)`` is head ``d-1``'s ``r_d``-th best
token below node ``(r_1, ..., r_{d-1})``. The default tree follows the paper's construction: from each
head's measured rank accuracies (probability that the target's token is the head's ``r``-th choice)
pick the nodes with the highest probability of being accepted, which maximises the expected accepted
length for a node budget. The engine verifies the tree (greedy, lossless rejection sampling, or any
other rule it is asked for); Medusa itself never decides acceptance.

Medusa-1 trains the heads with the target frozen; Medusa-2 also trains LoRA adapters on the target
(``hf_spec.training``), in which case generate with the target that has those adapters merged.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..engine.dynamic_tree import TreeSpec, grow_dynamic_tree
from ..engine.siblings import draw_siblings
from ..engine.tree import DraftTree
from ..errors import UnsupportedError
from ..training.hub import (
    CheckpointError,
    load_config_dict,
    load_weights,
    push_folder_to_hub,
    resolve_pretrained,
    save_weights_and_config,
)
from ..engine.features import FINAL
from .base import DraftRequest, Drafter

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RankPath = tuple[int, ...]


# ============================================================================ configuration
@dataclass
class MedusaConfig:
    """What a Medusa checkpoint is: head shapes, how they project to the vocabulary, and how to draft.

    Attributes:
        hidden_size: the target's hidden size (the heads' input and residual width).
        vocab_size: rows of the target's output embedding (the heads' output width).
        num_heads: ``K``; head ``k`` drafts depth ``k + 1`` below the root.
        num_layers: residual blocks per head (``n``).
        share_lm_head: project with the target's frozen ``lm_head`` (True) or with a per-head copy of it.
        logit_softcapping: the target's final logit soft-capping, applied to head logits too (Gemma-2 style).
        medusa_version: 1 (target frozen) or 2 (trained with LoRA adapters on the target; see ``adapter``).
        adapter: subfolder holding the Medusa-2 PEFT adapter, ``None`` for Medusa-1.
        base_model: name or path of the target the heads were trained for (informational).
        tree: rank paths of the static tree to draft; ``None`` derives one from ``head_rank_accuracies``.
        head_rank_accuracies: ``[k][r]``, measured probability that the target's token is head ``k``'s
            ``r``-th ranked token (from the held-out evaluation at the end of training).
        default_num_nodes: node budget of the derived tree.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    share_lm_head: bool = True
    logit_softcapping: float | None = None
    medusa_version: int = 1
    adapter: str | None = None
    base_model: str | None = None
    tree: list[list[int]] | None = None
    head_rank_accuracies: list[list[float]] | None = None
    default_num_nodes: int = 32
    method: str = "medusa"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers", "default_num_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MedusaConfig.{name} must be a positive integer, got {value!r}.")
        if self.medusa_version not in (1, 2):
            raise ValueError(f"MedusaConfig.medusa_version must be 1 or 2, got {self.medusa_version!r}.")
        if self.method != "medusa":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not Medusa.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        if self.tree is not None:
            validate_rank_paths([tuple(path) for path in self.tree], self.num_heads)
        if self.head_rank_accuracies is not None:
            validate_rank_accuracies(self.head_rank_accuracies, self.num_heads)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MedusaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"Unknown Medusa config keys {unknown} (checkpoint from a newer hf_spec, or not "
                                  "a Medusa checkpoint).")
        missing = sorted(name for name in ("hidden_size", "vocab_size") if name not in values)
        if missing:
            raise CheckpointError(f"Medusa config lacks {missing}.")
        return cls(**values)


# ============================================================================ module
class ResBlock(nn.Module):
    """``x + SiLU(W x + b)`` with ``W`` and ``b`` zero-initialised: the identity at initialisation."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """One head: ``num_layers`` residual blocks, then (unless shared) its own vocabulary projection."""

    def __init__(self, hidden_size: int, vocab_size: int, num_layers: int, own_projection: bool):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)))
        self.projection = nn.Linear(hidden_size, vocab_size, bias=False) if own_projection else None

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        features = self.blocks(hidden)
        if self.projection is not None:
            return self.projection(features)
        if lm_head is None:
            raise ValueError("These Medusa heads share the target's lm_head: pass lm_head=target.get_output_embeddings().")
        return lm_head(features)


class MedusaHeads(nn.Module):
    """The ``K`` Medusa heads, with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``."""

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(
            MedusaHead(config.hidden_size, config.vocab_size, config.num_layers, not config.share_lm_head)
            for _ in range(config.num_heads)
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_target(cls, target, num_heads: int = 4, num_layers: int = 1, share_lm_head: bool = True,
                   **config_kwargs) -> MedusaHeads:
        """Fresh heads shaped for ``target``; own projections start as copies of its ``lm_head``."""
        vocab_size, hidden_size = target_head_shape(target)
        text_config = target.config.get_text_config()
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = MedusaConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                              num_layers=num_layers, share_lm_head=share_lm_head,
                              logit_softcapping=getattr(text_config, "final_logit_softcapping", None), **config_kwargs)
        heads = cls(config)
        lm_head_weight = target.get_output_embeddings().weight
        heads.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        if not share_lm_head:
            with torch.no_grad():
                for head in heads.heads:
                    head.projection.weight.copy_(lm_head_weight)
        return heads

    # ------------------------------------------------------------------ forward
    def head_logits(self, index: int, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Logits of head ``index`` for hidden states ``(..., hidden_size)``."""
        logits = self.heads[index](hidden, lm_head)
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """``(K, ..., vocab)`` logits of every head for hidden states ``(..., hidden_size)``."""
        return torch.stack([self.head_logits(index, hidden, lm_head) for index in range(len(self.heads))])

    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """Raise ``UnsupportedError`` naming the mismatch if these heads cannot run on ``target``."""
        vocab_size, hidden_size = target_head_shape(target)
        problems = []
        if hidden_size != self.config.hidden_size:
            problems.append(f"hidden size {self.config.hidden_size} (target: {hidden_size})")
        if vocab_size != self.config.vocab_size:
            problems.append(f"vocabulary {self.config.vocab_size} (target's lm_head: {vocab_size})")
        if problems:
            raise UnsupportedError(
                f"These Medusa heads were trained for another model ({self.config.base_model or 'unknown base'}): "
                f"{'; '.join(problems)}. Load heads trained for this target, or train them with "
                "recipes/train_medusa.py."
            )
        base = self.config.base_model
        name = getattr(target.config, "_name_or_path", None)
        if note_base_model and base and name and Path(str(base)).name != Path(str(name)).name:
            logger.info("Medusa heads were trained for %s, the target is %s; shapes match.", base, name)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (atomically) into ``save_directory``.

        ``state_dict`` overrides the module's own tensors (e.g. parameters gathered under ZeRO-3).
        """
        tensors = state_dict if state_dict is not None else self.state_dict()
        return save_weights_and_config(save_directory, tensors, self.config.to_dict(),
                                       metadata={"format": "pt", "hf_spec_method": "medusa"})

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, target=None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False) -> MedusaHeads:
        """Load heads from a local folder or a Hub repo id; with ``target``, check and place them on it."""
        folder = resolve_pretrained(path_or_id, revision=revision, token=token, cache_dir=cache_dir,
                                    local_files_only=local_files_only)
        heads = cls(MedusaConfig.from_dict(load_config_dict(folder)))
        heads.load_checked_state_dict(load_weights(folder), source=str(path_or_id))
        heads.source = folder
        if target is not None:
            heads.check_compatible(target)
            weight = target.get_output_embeddings().weight
            heads.to(device=weight.device, dtype=weight.dtype)
        return heads.eval()

    def load_checked_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match its config.json: missing tensors {missing[:6]}, "
                                  f"unexpected tensors {unexpected[:6]} (corrupt or mismatched checkpoint).")
        for name, tensor in state_dict.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                      f"{tuple(expected[name].shape)} (corrupt or mismatched checkpoint).")
        dtypes = {tensor.dtype for tensor in state_dict.values()}
        if len(dtypes) == 1:  # keep the checkpoint's precision (a float64 save loads as float64)
            self.to(dtype=dtypes.pop())
            expected = self.state_dict()
        self.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in state_dict.items()})

    def push_to_hub(self, repo_id: str, *, model_card: str | None = None, token: str | None = None,
                    private: bool | None = None, commit_message: str = "Upload Medusa heads",
                    extra_folder: str | Path | None = None) -> str:
        """Save into a temporary folder (plus ``README.md`` = ``model_card``) and upload it as one commit.

        ``extra_folder`` (e.g. a Medusa-2 adapter folder) is uploaded alongside, under ``config.adapter``.
        """
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(staging)
            if model_card is not None:
                Path(staging, "README.md").write_text(model_card, encoding="utf-8")
            if extra_folder is not None:
                if not self.config.adapter:
                    raise ValueError("extra_folder is uploaded under config.adapter, which is not set.")
                shutil.copytree(extra_folder, Path(staging, self.config.adapter))
            return push_folder_to_hub(staging, repo_id, token=token, private=private, commit_message=commit_message)


def target_head_shape(target) -> tuple[int, int]:
    """``(vocab rows, hidden size)`` of the target's output embedding."""
    output = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    if output is None or not hasattr(output, "weight"):
        raise UnsupportedError(f"{type(target).__name__} has no output embedding (lm_head); Medusa needs a causal LM.")
    shape = tuple(output.weight.shape)
    if len(shape) != 2 or 0 in shape:
        text_config = target.config.get_text_config()
        return text_config.vocab_size, text_config.hidden_size
    return shape[0], shape[1]


# ============================================================================ static trees
def validate_rank_paths(paths: list[RankPath], num_heads: int) -> None:
    present = set(paths)
    for path in paths:
        if not path or len(path) > num_heads or min(path) < 0:
            raise ValueError(f"Medusa tree path {path} must have 1..{num_heads} non-negative ranks.")
        if len(path) > 1 and path[:-1] not in present:
            raise ValueError(f"Medusa tree path {path} lacks its parent {path[:-1]}.")
    if len(present) != len(paths):
        raise ValueError("Medusa tree paths must be distinct.")


def validate_rank_accuracies(accuracies: list[list[float]], num_heads: int) -> None:
    if len(accuracies) != num_heads or any(len(row) == 0 for row in accuracies):
        raise ValueError(f"head_rank_accuracies needs one non-empty row per head ({num_heads}).")
    for row in accuracies:
        if any(value < 0 for value in row) or sum(row) > 1 + 1e-6:
            raise ValueError("Each head_rank_accuracies row must be probabilities summing to at most 1.")


def prior_rank_accuracies(num_heads: int, num_ranks: int = 8) -> list[list[float]]:
    """A guess used only when a checkpoint carries no measured accuracies: top-1 of head ``k`` is
    ``0.6 * 0.75^k`` and each further rank half as likely as the one before."""
    return [[0.6 * 0.75**k * 0.5**r for r in range(num_ranks)] for k in range(num_heads)]


def best_rank_tree(rank_accuracies: list[list[float]], num_nodes: int) -> list[RankPath]:
    """The ``num_nodes`` rank paths most likely to be accepted, parents first.

    Under the Medusa paper's independence assumption a node ``(r_1..r_d)`` is accepted with probability
    ``prod_j a[j-1][r_j]`` and the expected accepted length is one plus the sum over the tree's nodes.
    A child is never more likely than its parent, so taking nodes in decreasing probability (best-first
    over the children of the nodes taken so far) yields a valid tree that maximises that sum.
    """
    frontier = [(-probability, (rank,)) for rank, probability in enumerate(rank_accuracies[0]) if probability > 0]
    heapq.heapify(frontier)
    chosen: list[RankPath] = []
    while frontier and len(chosen) < num_nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(rank_accuracies):
            for rank, probability in enumerate(rank_accuracies[len(path)]):
                if probability > 0:
                    heapq.heappush(frontier, (negative * probability, path + (rank,)))
    return sorted(chosen, key=lambda path: (len(path), path))


def expected_accepted_length(paths: list[RankPath], rank_accuracies: list[list[float]]) -> float:
    """Expected tokens per step (accepted drafts + the target's token) of a tree, under independence."""
    total = 1.0
    for path in paths:
        probability = 1.0
        for depth, rank in enumerate(path):
            row = rank_accuracies[depth]
            probability *= row[rank] if rank < len(row) else 0.0
        total += probability
    return total


def head_rank_accuracies(config: MedusaConfig) -> list[list[float]]:
    """The checkpoint's measured rank accuracies, or the prior when it has none."""
    return config.head_rank_accuracies or prior_rank_accuracies(config.num_heads)


def chain_paths(num_heads: int) -> list[RankPath]:
    """Top-1 of every head: a single chain of ``num_heads`` tokens."""
    return [(0,) * depth for depth in range(1, num_heads + 1)]


@dataclass(frozen=True)
class RankTree:
    """A static tree of rank paths laid out as a ``DraftTree`` skeleton (parents before children)."""

    paths: list[RankPath]
    parents: list[int] = field(init=False)
    depths: list[int] = field(init=False)
    ranks: list[int] = field(init=False)

    def __post_init__(self):
        ordered = sorted(self.paths, key=lambda path: (len(path), path))
        index_of = {path: index for index, path in enumerate(ordered)}
        object.__setattr__(self, "paths", ordered)
        object.__setattr__(self, "parents", [index_of[path[:-1]] if len(path) > 1 else -1 for path in ordered])
        object.__setattr__(self, "depths", [len(path) for path in ordered])
        object.__setattr__(self, "ranks", [path[-1] for path in ordered])

    def up_to_depth(self, max_depth: int) -> RankTree:
        return RankTree([path for path in self.paths if len(path) <= max_depth])

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)


# ============================================================================ drafter
class MedusaDrafter(Drafter):
    """Draft a tree from the Medusa heads on the target's hidden state of the last committed token.

    Args:
        heads: trained ``MedusaHeads``.
        tree: ``None`` (the best tree of ``num_nodes`` nodes for the checkpoint's measured head
            accuracies, as in the Medusa paper), ``"chain"`` (top-1 of every head), or a list of rank paths
            such as ``[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]``.
        num_nodes: node budget of the derived tree (default: the checkpoint's ``default_num_nodes``).
        proposal: ``"topk"`` proposes node ``(..., r)`` deterministically as its head's ``r``-th best token
            (point masses: lossless with every verification rule). ``"sample"`` draws the children of each
            node from the head's distribution (after the target's logits processors) in the way the
            verification rule asks for (``hf_spec.engine.siblings``) and reports each draw's distribution
            in ``draft_probs``; under greedy decoding it is the same as ``"topk"``.

    ``generate(tree="chain" | "static" | "dynamic", tree_budget=..., tree_depth=..., tree_top_k=...)``
    reshapes the tree for one call: ``"static"`` is the accuracy-derived tree with ``tree_budget`` nodes
    and ranks below ``tree_top_k``; ``"dynamic"`` grows an EAGLE-2-style tree from this step's head
    confidences (``hf_spec.engine.dynamic_tree``).

    Verification is the engine's (``generate(verification=...)``). Medusa's "typical acceptance" is a
    lossy rule the engine applies only when asked explicitly; the default rules keep the output exactly
    the target's (greedy) or distributed exactly as the target's (sampling).
    """

    target_features = (FINAL,)  # Medusa heads read the last hidden state after the final norm

    def __init__(self, heads: MedusaHeads, tree: str | list | None = None, num_nodes: int | None = None,
                 proposal: str = "topk"):
        super().__init__()
        if proposal not in ("topk", "sample"):
            raise ValueError(f"proposal must be 'topk' or 'sample', got {proposal!r}.")
        self.heads = heads.eval()
        self.proposal = proposal
        self.default_rank_tree = RankTree(self._choose_paths(heads.config, tree, num_nodes))
        self.rank_tree = self.default_rank_tree
        self.dynamic: TreeSpec | None = None
        self._lm_head: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str | list | None = None,
                        num_nodes: int | None = None, proposal: str = "topk", revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> MedusaDrafter:
        """Load heads from a folder or Hub repo id, check them against ``target`` and build the drafter.

        For a Medusa-2 checkpoint (``config.adapter`` set) ``target`` must already carry the trained
        adapters merged: ``PeftModel.from_pretrained(base, folder / adapter).merge_and_unload()``.
        """
        heads = MedusaHeads.from_pretrained(path_or_id, target=target, revision=revision, token=token,
                                            local_files_only=local_files_only)
        if heads.config.medusa_version == 2:
            logger.info("Medusa-2 heads: generate with the target whose LoRA adapter (%s) is merged.", heads.config.adapter)
        return cls(heads, tree=tree, num_nodes=num_nodes, proposal=proposal)

    @staticmethod
    def _choose_paths(config: MedusaConfig, tree, num_nodes: int | None) -> list[RankPath]:
        if tree == "chain":
            return chain_paths(config.num_heads)
        if tree is not None and not isinstance(tree, str):
            paths = [tuple(int(rank) for rank in path) for path in tree]
            validate_rank_paths(paths, config.num_heads)
            return paths
        if tree is not None:
            raise ValueError(f"tree must be None, 'chain' or a list of rank paths, got {tree!r}.")
        if num_nodes is None and config.tree is not None:
            return [tuple(path) for path in config.tree]
        return best_rank_tree(head_rank_accuracies(config), num_nodes or config.default_num_nodes)

    @property
    def tree_paths(self) -> list[RankPath]:
        return list(self.rank_tree.paths)

    def begin(self, target, input_ids, generation_config, logits_processor, tree: TreeSpec | None = None,
              **options) -> None:
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        self.heads.check_compatible(target, note_base_model=False)
        self._lm_head = target.get_output_embeddings() if self.heads.config.share_lm_head else None
        weight = target.get_output_embeddings().weight
        first = next(self.heads.parameters())
        if first.device != weight.device or first.dtype != weight.dtype:
            self.heads.to(device=weight.device, dtype=weight.dtype)
        self.rank_tree, self.dynamic = self._tree_for_call(tree)

    def _tree_for_call(self, spec: TreeSpec | None) -> tuple[RankTree, TreeSpec | None]:
        if spec is None:
            return self.default_rank_tree, None
        num_heads = self.heads.config.num_heads
        depth = min(spec.depth or num_heads, num_heads)
        if spec.shape == "chain":
            return RankTree(chain_paths(depth)), None
        if spec.shape == "dynamic":
            return RankTree(chain_paths(depth)), spec
        accuracies = [row[: spec.top_k] for row in head_rank_accuracies(self.heads.config)[:depth]]
        return RankTree(best_rank_tree(accuracies, spec.budget)), None

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        device = request.input_ids.device
        skeleton = self.rank_tree
        if skeleton.max_depth > request.max_tokens:
            skeleton = skeleton.up_to_depth(request.max_tokens)
        if request.target_features is None or skeleton.max_depth == 0:
            return DraftTree.empty(device)
        hidden = request.last_feature
        num_heads = skeleton.max_depth
        logits = torch.stack([self.heads.head_logits(k, hidden[None], self._lm_head)[0] for k in range(num_heads)])
        scores = self.logits_processor(request.input_ids.expand(num_heads, -1), logits.float())
        if self.dynamic is not None:
            return self._dynamic_tree(torch.log_softmax(scores, dim=-1), device)
        if self.proposal == "sample" and self.do_sample:
            return self._sampled_tree(skeleton, torch.softmax(scores, dim=-1), self.sibling_scheme, device)
        return self._topk_tree(skeleton, scores, device)

    @staticmethod
    def _topk_tree(skeleton: RankTree, scores: torch.Tensor, device) -> DraftTree:
        """Node ``(..., r)`` at depth ``d`` gets head ``d-1``'s ``r``-th best token (deterministic)."""
        top = scores.topk(max(skeleton.ranks) + 1, dim=-1).indices
        heads_of_nodes = torch.tensor(skeleton.depths, device=device) - 1
        tokens = top[heads_of_nodes, torch.tensor(skeleton.ranks, device=device)]
        return DraftTree(tokens.long(), torch.tensor(skeleton.parents, dtype=torch.long, device=device))

    @staticmethod
    def _sampled_tree(skeleton: RankTree, probs: torch.Tensor, scheme: str, device) -> DraftTree:
        """The children of each node are drawn together from their head's distribution with ``scheme``.

        Each node's ``draft_probs`` row is the distribution it was drawn from (``draw_siblings``). Skeleton
        nodes left without a token (a distribution with too little support) are dropped with their subtrees.
        """
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(skeleton.parents):
            children.setdefault(parent, []).append(node)
        tokens, parents, rows = [], [], []
        new_index = {-1: -1}
        for node in [-1] + list(range(len(skeleton.parents))):
            if node not in new_index or node not in children:
                continue
            depth = skeleton.depths[node] if node >= 0 else 0
            drawn, distributions = draw_siblings(probs[depth], len(children[node]), scheme)
            for child, token, distribution in zip(children[node], drawn, distributions):
                new_index[child] = len(tokens)
                tokens.append(token)
                parents.append(new_index[node])
                rows.append(distribution)
        if not tokens:
            return DraftTree.empty(device)
        draft_probs = None if rows[0] is None else torch.stack(rows).to(device)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device), draft_probs)

    def _dynamic_tree(self, log_probs: torch.Tensor, device) -> DraftTree:
        """EAGLE-2-style growth where every node at depth ``d`` expands with head ``d``'s distribution."""
        spec = self.dynamic
        depth_of: dict[int, int] = {-1: 0}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            for node in range(len(depth_of) - 1, len(parents)):
                depth_of[node] = depth_of[parents[node]] + 1
            return log_probs[[depth_of[node] for node in frontier]]

        return grow_dynamic_tree(expand, log_probs.shape[0], spec.top_k, spec.budget, device)

    def __repr__(self) -> str:
        config = self.heads.config
        tree = self.default_rank_tree
        return (f"MedusaDrafter(heads={config.num_heads}, layers={config.num_layers}, nodes={len(tree.paths)}, "
                f"depth={tree.max_depth}, proposal={self.proposal!r})")
