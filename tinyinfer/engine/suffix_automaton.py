"""Suffix automata over token sequences: the index behind the suffix proposer (engine/suffix_proposer.py).

SuffixDecoding (Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
Applications", arXiv:2411.04975) drafts from a suffix *tree* over prompts and earlier outputs. We use a
suffix *automaton* (Blumer et al., "The smallest automaton recognizing the subwords of a text", 1985)
instead: it answers the same questions -- the longest suffix of the text so far that occurred before,
and what followed it how often -- but it is built online in amortized O(1) per appended token with at
most 2n states (a suffix tree needs Ukkonen's algorithm for that, with its active point and suffix
links, and a depth-bounded suffix trie costs O(depth) nodes per token). A decode step appends one to
k + 1 tokens, so there is never a rebuild.

State v stands for a set of substrings sharing their end positions; `length[v]` is the longest,
`link[v]` the state of the longest suffix with more end positions, `count[v]` how many end positions
(occurrences). A path from the root spells a substring of the text; from the state of a match, the
transition to the state with the most occurrences is the most frequent continuation.

Memory: at most 2n states and 3n transitions for n tokens, a Python dict per state; on English text
about 1.3 states and 0.4 KB per indexed token (tracemalloc, 5.6k tokens of Shakespeare). A request's
index lives while the request does; `SuffixStore` bounds the cross-request index to `capacity` tokens
(the default 32768: about 13 MB).
"""
from __future__ import annotations

from collections import deque

# Occurrence counts are kept exact along the first MAX_CHAIN suffix links of each new end position;
# beyond them (very short, very frequent substrings of long repetitive texts) they undercount. That
# keeps an append O(MAX_CHAIN) in the worst case; drafting only compares counts after a match.
MAX_CHAIN = 64


class SuffixAutomaton:
    """The suffix automaton of one token sequence, extended one token at a time."""

    def __init__(self, tokens: list[int] = ()):
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.count = [-1], [0], [0]
        self.last = 0                  # the state of the whole text
        self.n = 0                     # tokens indexed
        for t in tokens:
            self.extend(t)

    def __len__(self) -> int:
        return self.n

    def extend(self, c: int) -> None:
        nxt, link, length, count = self.next, self.link, self.length, self.count
        cur = len(length)
        nxt.append({})
        length.append(length[self.last] + 1)
        link.append(0)
        count.append(1)
        p = self.last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:                      # split q: its shorter strings gain the new end position
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                count.append(count[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        self.n += 1
        # Every suffix of the text (the suffix-link path of cur) occurs once more.
        v, steps = link[cur], 0
        while v > 0 and steps < MAX_CHAIN:
            count[v] += 1
            v, steps = link[v], steps + 1

    def extend_all(self, tokens: list[int]) -> None:
        for t in tokens:
            self.extend(t)

    def repeated_suffix(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also ends earlier; (0, 0): none."""
        v = self.link[self.last] if self.n else 0
        return max(v, 0), self.length[max(v, 0)]

    def step(self, state: int, matched: int, c: int) -> tuple[int, int]:
        """Matching another text against this one: the longest suffix of (that text + c) that is a
        substring here, from the (state, length) of the longest suffix before c."""
        nxt, link, length = self.next, self.link, self.length
        while state and c not in nxt[state]:
            state = link[state]
            matched = length[state]
        if c in nxt[state]:
            return nxt[state][c], matched + 1
        return 0, 0

    def match(self, tokens: list[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of `tokens` that is a substring of this text."""
        state = matched = 0
        for c in tokens:
            state, matched = self.step(state, matched, c)
        return state, matched

    def continuation(self, state: int, limit: int) -> list[int]:
        """Up to `limit` tokens after the match at `state`, each the most frequent next token (the
        earliest seen wins a tie); stops at the end of the text or a separator (negative id)."""
        nxt, count = self.next, self.count
        out: list[int] = []
        while len(out) < limit and state and nxt[state]:
            c, state = max(nxt[state].items(), key=lambda kv: count[kv[1]])
            if c < 0:
                break
            out.append(c)
        return out


class SuffixStore:
    """The cross-request index: one automaton over the outputs of recent finished requests, each ended
    by its own separator (a negative id no text contains, so no match spans two outputs).

    Bounded: holding more than `capacity` tokens, the oldest outputs are dropped until at most half of
    it is left and the automaton is rebuilt from the rest -- O(capacity / 2) work once per capacity / 2
    tokens added, so amortized O(1) per token. `version` changes with every change, so a request's
    match against the store knows when to be redone."""

    def __init__(self, capacity: int = 32768):
        self.capacity = capacity
        self.docs: deque[list[int]] = deque()
        self.tokens = 0
        self.version = 0
        self._separators = 0
        self.sam = SuffixAutomaton()

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens[-(self.capacity // 2):]) if self.capacity > 1 else []   # at most half
        if not tokens:
            return
        if self.tokens + len(tokens) > self.capacity:
            while self.docs and self.tokens + len(tokens) > self.capacity // 2:
                self.tokens -= len(self.docs.popleft())
            self.sam = SuffixAutomaton()
            for doc in self.docs:
                self._index(doc)
        self.docs.append(tokens)
        self.tokens += len(tokens)
        self._index(tokens)
        self.version += 1

    def _index(self, tokens: list[int]) -> None:
        self.sam.extend_all(tokens)
        self._separators += 1
        self.sam.extend(-self._separators)
