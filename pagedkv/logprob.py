"""``Logprob``: one token's log-probability with its rank and text, as vLLM's ``Logprob`` has them.

NOTE: a ``float`` subclass: ``lp.logprob``, ``lp.rank`` and ``lp.decoded_token`` read as in vLLM, and code that
treated the entries as plain floats (arithmetic, JSON, comparisons) keeps working unchanged.
"""
from __future__ import annotations


class Logprob(float):
    """Args:
        logprob: the log-probability (the model's distribution before temperature and filters).
        rank: 1 for the most likely token of the vocabulary (None where unknown).
        decoded_token: the token's text (None until a tokenizer decodes it).
    """

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):
        return Logprob, (float(self), self.rank, self.decoded_token)
