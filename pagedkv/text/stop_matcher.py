"""Stop strings matched with an Aho–Corasick automaton: O(1) amortized work per output character, whatever the
number and length of the stop strings (issue 21: 10,000 stop strings of 499 characters cost seconds per token
with a scan of every string at every token).

The automaton is a trie of the stop strings with failure links; its state after reading the text is the
longest suffix of the text that is a prefix of some stop string::

    stops  ["ab", "bc"]      trie  0 -a-> 1 -b-> 2 (ab)      fail(2) = 4 ("b")
                                   0 -b-> 4 -c-> 5 (bc)
    text   "xab"             states 0, 1, 2: "ab" ends here

``feed`` returns the *longest* stop string ending at the character (the first to end wins; among those ending
together the longest, as :mod:`pagedkv.text.detokenizer` promises). ``depth(state)`` is how many trailing
characters could still become a stop string (the detokenizer withholds them). One automaton is built per
distinct tuple of stop strings and shared read-only by every branch and request that uses it.
"""
from __future__ import annotations

from functools import lru_cache


class StopMatcher:
    """Args:
        stops: non-empty strings.
    Attributes:
        start: the initial state (0).
        num_transitions: automaton steps taken so far by every ``feed`` (tests bound it by the text's length).
    """

    start = 0

    def __init__(self, stops):
        self.goto: list[dict[str, int]] = [{}]
        self.depth_of: list[int] = [0]
        terminal: list[str | None] = [None]
        for s in stops:
            state = 0
            for ch in s:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth_of.append(self.depth_of[state] + 1)
                    terminal.append(None)
                state = nxt
            terminal[state] = s
        self.fail, self.out = self._links(terminal)
        self.num_transitions = 0

    def _links(self, terminal: list[str | None]) -> tuple[list[int], list[str | None]]:
        """Failure links (breadth first) and each state's longest stop string ending there (its own, else
        its failure state's)."""
        fail, out = [0] * len(self.goto), list(terminal)
        queue = list(self.goto[0].values())
        head = 0
        while head < len(queue):
            state = queue[head]
            head += 1
            for ch, nxt in self.goto[state].items():
                f = fail[state]
                while f and ch not in self.goto[f]:
                    f = fail[f]
                fail[nxt] = self.goto[f].get(ch, 0)  # f is a shallower state: never nxt itself
                if out[nxt] is None:
                    out[nxt] = out[fail[nxt]]
                queue.append(nxt)
        return fail, out

    def feed(self, state: int, ch: str) -> tuple[int, str | None]:
        """The state after one more character, and the longest stop string ending at it (or None)."""
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
            self.num_transitions += 1
        self.num_transitions += 1
        state = goto[state].get(ch, 0)
        return state, self.out[state]

    def depth(self, state: int) -> int:
        """Length of the text's longest tail that is a prefix of a stop string."""
        return self.depth_of[state]


@lru_cache(maxsize=64)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The shared automaton of a tuple of stop strings (built once per distinct tuple)."""
    return StopMatcher(stops)
