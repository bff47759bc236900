"""Select a draft vocabulary from the target's own outputs (VocabTrim, FR-Spec, EAGLE-3's d2t).

The tokens counted are the assistant tokens (loss mask 1) of prepared training data, which for self-distilled
data are exactly the target's own replies: the distribution a drafter has to predict. The ``N`` most frequent
(plus the end-of-turn tokens, which a drafter must be able to propose) become the ``DraftVocabulary``. Its
coverage of held-out replies says how often the target emits a token the trimmed drafter cannot propose
(those positions are always rejected, so coverage bounds the acceptance a trimmed drafter can reach).

    python -m hf_spec.training.vocab_selection --config configs/data/smollm2-135m-selfdistill.yaml \\
        --size 8192 --out outputs/draft_vocab/smollm2-8k [--report 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..drafters.draft_vocab import DraftVocabulary

logger = logging.getLogger(__name__)


def count_assistant_tokens(prepared, split: str, vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` occurrences of each token among the assistant tokens of a prepared split."""
    tokens = prepared.tokens()
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for index in prepared.split_indices(split):
        row = tokens.read(index, ["input_ids", "loss_mask"])
        replies = row["input_ids"].long()[row["loss_mask"].bool()]
        if replies.numel() and int(replies.max()) >= vocab_size:
            raise ValueError(f"Token id {int(replies.max())} in the data is outside the {vocab_size}-token vocabulary; "
                             "the data was built with another tokenizer.")
        counts += torch.bincount(replies, minlength=vocab_size).double()
    return counts


def select_draft_vocabulary(prepared, size: int, vocab_size: int, always_include=()) -> DraftVocabulary:
    """The ``size`` most frequent target tokens of the prepared training split, with train and held-out coverage.
    The metadata names the prepared data by its fingerprinted folder name (never a local path: it is published)."""
    train = count_assistant_tokens(prepared, "train", vocab_size)
    heldout = count_assistant_tokens(prepared, "heldout", vocab_size)
    metadata = {"selected_from": Path(prepared.tokens_dir).name, "split": "train"}
    vocabulary = DraftVocabulary.from_token_counts(train, size, always_include=always_include, metadata=metadata)
    vocabulary.metadata["coverage_of_heldout_tokens"] = round(vocabulary.coverage(heldout), 6)
    vocabulary.metadata["heldout_tokens"] = int(heldout.sum())
    return vocabulary


def coverage_table(prepared, sizes: list[int], vocab_size: int) -> list[dict]:
    """Train and held-out coverage of the top-``N`` vocabulary for each ``N`` in ``sizes``."""
    train = count_assistant_tokens(prepared, "train", vocab_size)
    heldout = count_assistant_tokens(prepared, "heldout", vocab_size)
    rows = []
    for size in sizes:
        vocabulary = DraftVocabulary.from_token_counts(train, size)
        rows.append({"size": size, "fraction_of_vocabulary": round(size / vocab_size, 4),
                     "train_coverage": round(vocabulary.coverage(train), 4),
                     "heldout_coverage": round(vocabulary.coverage(heldout), 4)})
    return rows


def recipe_draft_vocabulary(config, target, section_name: str) -> DraftVocabulary | None:
    """A method's draft vocabulary from its recipe section ``section_name``: loaded from ``<section>.draft_vocab`` (a
    folder saved by ``--out``), or the ``<section>.draft_vocab_size`` most frequent assistant tokens of the recipe's
    prepared training split (with the end-of-turn tokens always in; the core prepares the data before it builds the
    method, and every rank selects the same tokens); ``None`` when neither is set."""
    from ..drafters.persistence import target_head_shape
    from .config import ConfigError

    section = getattr(config, section_name)
    target_vocab = target_head_shape(target)[0]  # (under ZeRO-3 the weight itself is a placeholder)
    if section.draft_vocab:
        vocabulary = DraftVocabulary.load(section.draft_vocab)
        if section.draft_vocab_size is not None and section.draft_vocab_size != vocabulary.size:
            raise ConfigError(f"{section_name}.draft_vocab ({section.draft_vocab}) has {vocabulary.size} tokens but "
                              f"{section_name}.draft_vocab_size is {section.draft_vocab_size}; set one of them.")
        if vocabulary.target_vocab_size != target_vocab:
            raise ConfigError(f"{section_name}.draft_vocab ({section.draft_vocab}) maps a "
                              f"{vocabulary.target_vocab_size}-token vocabulary, but {config.model.name_or_path} has "
                              f"{target_vocab}; select it from this target's data (python -m "
                              "hf_spec.training.vocab_selection).")
        return vocabulary
    if section.draft_vocab_size is None:
        return None
    if section.draft_vocab_size > target_vocab:
        raise ConfigError(f"{section_name}.draft_vocab_size {section.draft_vocab_size} exceeds the target's "
                          f"{target_vocab}-token vocabulary.")
    from .models import load_tokenizer
    from .prepare_data import load_prepared_data, needs_target
    from .self_distill import stop_token_ids

    tokenizer = load_tokenizer(config.model.name_or_path)
    prepared = load_prepared_data(config.data, tokenizer, target if needs_target(config.data) else None)
    vocabulary = select_draft_vocabulary(prepared, section.draft_vocab_size, target_vocab,
                                         always_include=stop_token_ids(target, tokenizer))
    logger.info("Draft vocabulary: %d of %d tokens, covering %.1f%% of the held-out assistant tokens.", vocabulary.size,
                target_vocab, 100 * vocabulary.metadata["coverage_of_heldout_tokens"])
    return vocabulary


def main(argv: list[str] | None = None) -> int:
    from .models import load_target
    from .prepare_data import load_prepared_data, load_recipe_sections, needs_target
    from .self_distill import stop_token_ids

    parser = argparse.ArgumentParser(prog="python -m hf_spec.training.vocab_selection",
                                     description="Select a draft vocabulary from prepared data.")
    parser.add_argument("--config", required=True, help="the recipe / data config the data was prepared with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--size", type=int, help="tokens in the draft vocabulary")
    parser.add_argument("--out", help="folder to save the vocabulary in (draft_vocab.safetensors + .json)")
    parser.add_argument("--report", type=int, nargs="*", default=[], help="also print coverage for these sizes")
    args = parser.parse_args(argv)
    model_section, data = load_recipe_sections(args.config, args.overrides)
    target, tokenizer = load_target(model_section.name_or_path, model_section.dtype)
    prepared = load_prepared_data(data, tokenizer, target if needs_target(data) else None)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    if args.report:
        print(json.dumps(coverage_table(prepared, args.report, vocab_size), indent=1))
    if args.size:
        vocabulary = select_draft_vocabulary(prepared, args.size, vocab_size,
                                             always_include=stop_token_ids(target, tokenizer))
        print(vocabulary, json.dumps(vocabulary.metadata, indent=1))
        if args.out:
            vocabulary.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
