"""generate()'s logits processors applied to draft-tree rows exactly as plain decoding applies them.

Plain decoding calls each processor once per step on a batch of one sequence. A speculative step
scores many rows at once (the root and every draft node), each continuing a different sequence.
That is only exact for processors that are pure, row-wise functions of ``(input_ids, scores)``:

- ``ROW_WISE`` transformers processors are batched across rows of equal length;
- every other processor runs on one row at a time, as a batch of one (so a processor that keys its
  rules by batch index, like ``prefix_allowed_tokens_fn``, sees batch index 0 as in plain
  decoding); user processors are assumed pure (documented, warned once);
- ``STATEFUL`` processors (they keep a cache or a call counter across steps, so scoring rows that
  are later rejected would change what they do next) are refused up front.
"""

from __future__ import annotations

import warnings

import torch
from transformers import LogitsProcessorList
from transformers.generation import logits_process as lp

from ..errors import UnsupportedError

ROW_WISE = (
    lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
    lp.TopHLogitsWarper, lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper,
    lp.NoRepeatNGramLogitsProcessor, lp.SequenceBiasLogitsProcessor, lp.NoBadWordsLogitsProcessor,
    lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor, lp.ForcedBOSTokenLogitsProcessor,
    lp.ForcedEOSTokenLogitsProcessor, lp.InfNanRemoveLogitsProcessor, lp.ExponentialDecayLengthPenalty,
    lp.LogitNormalization, lp.SuppressTokensLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor,
    lp.WatermarkLogitsProcessor,
)
# Row-wise processors that never read ``input_ids``: one call covers rows of every length.
IGNORE_INPUT_IDS = (
    lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
    lp.TopHLogitsWarper, lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper,
    lp.LogitNormalization, lp.InfNanRemoveLogitsProcessor,
)
ONE_ROW_AT_A_TIME = (lp.PrefixConstrainedLogitsProcessor, lp.RepetitionPenaltyLogitsProcessor)
STATEFUL = {
    lp.UnbatchedClassifierFreeGuidanceLogitsProcessor:
        "classifier-free guidance (guidance_scale != 1) runs the model on its own cached unconditional sequence, "
        "one token per call",
    lp.ClassifierFreeGuidanceLogitsProcessor: "batched classifier-free guidance needs the doubled batch it was built for",
    lp.SynthIDTextWatermarkLogitsProcessor: "SynthID watermarking keeps a per-call context history",
}
MODEL_SPECIFIC = (
    lp.WhisperTimeStampLogitsProcessor, lp.WhisperNoSpeechDetection, lp.AlternatingCodebooksLogitsProcessor,
    lp.BarkEosPrioritizerLogitsProcessor, lp.EncoderRepetitionPenaltyLogitsProcessor,
    lp.EncoderNoRepeatNGramLogitsProcessor,
)


class TreeLogitsProcessor:
    """Wraps generate()'s ``LogitsProcessorList`` for rows of draft trees; call it like the list itself.

    ``processor(input_ids, scores)`` with ``input_ids`` of shape ``(rows, length)`` and ``scores`` of
    shape ``(rows, vocab)`` returns what plain decoding would give for each row on its own.
    """

    def __init__(self, processors: LogitsProcessorList | None):
        self.processors = list(processors or [])
        for processor in self.processors:
            _check_supported(processor)
        self._batchable = [_batchable(p) for p in self.processors]
        # exact types: a subclass may read input_ids
        self.ignores_input_ids = all(type(p) in IGNORE_INPUT_IDS for p in self.processors)

    def __len__(self) -> int:
        return len(self.processors)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor, batchable in zip(self.processors, self._batchable):
            if batchable or scores.shape[0] == 1:
                scores = processor(input_ids, scores)
            else:
                scores = torch.cat([processor(input_ids[row : row + 1], scores[row : row + 1])
                                    for row in range(scores.shape[0])])
        return scores


def _check_supported(processor) -> None:
    reason = STATEFUL.get(type(processor))
    if reason is not None:
        raise UnsupportedError(
            f"hf_spec cannot apply {type(processor).__name__} losslessly: {reason}, so scoring draft tokens that are "
            "later rejected would change it. Use plain generate() for this option."
        )
    if isinstance(processor, MODEL_SPECIFIC):
        raise UnsupportedError(f"{type(processor).__name__} belongs to encoder-decoder or audio models, which "
                               "hf_spec does not support; use plain generate().")
    if not isinstance(processor, ROW_WISE + ONE_ROW_AT_A_TIME):
        warnings.warn(
            f"hf_spec applies {type(processor).__name__} to each draft row separately (a batch of one, as plain "
            "decoding does); this is exact only if it is a pure function of (input_ids, scores) that keeps no state "
            "between calls.", stacklevel=4)


def _batchable(processor) -> bool:
    if isinstance(processor, lp.RepetitionPenaltyLogitsProcessor):
        # A per-sequence prompt_ignore_length tensor is sized for generate()'s batch of one.
        return not isinstance(processor.prompt_ignore_length, torch.Tensor)
    return isinstance(processor, ROW_WISE)
