"""Exceptions hf_spec raises for requests it cannot serve losslessly."""


class UnsupportedError(ValueError):
    """The request (model, cache, generation option or drafter) is not supported; the message says what to do."""
