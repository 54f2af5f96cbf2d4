"""engine/output.py StopMatcher (one KMP automaton per stop string) against a brute-force reference:
the same cut and the same held-back tail for random texts fed in random pieces, and a stop flood fed
one character at a time touches each stop's automaton a bounded number of times per character."""
from __future__ import annotations

import random

import pytest

from tinyinfer.engine.output import StopMatcher


def reference(text: str, stops: list[str], checked_from: int) -> tuple[int | None, int]:
    """(where the earliest-starting stop that ends after checked_from starts, the held tail)."""
    starts = [text.find(stop, max(0, checked_from - len(stop) + 1)) for stop in stops]
    if any(i >= 0 for i in starts):
        return min(i for i in starts if i >= 0), 0
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return None, held


@pytest.mark.parametrize("seed", range(40))
def test_matcher_agrees_with_a_brute_force_scan(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
             for _ in range(rng.randint(1, 4))]
    m, text = StopMatcher(stops), ""
    for _ in range(30):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        hit = m.feed(piece)
        want_hit, want_held = reference(text + piece, stops, len(text))
        if want_hit is not None:
            assert hit is not None and len(text) + hit == want_hit, (stops, text, piece)
            return
        assert hit is None and m.held() == want_held, (stops, text, piece)
        text += piece


def test_the_cut_is_at_the_earliest_stop_whatever_the_list_order():
    # Both stops end inside one piece: cutting at "X" (first in the list) would leave "b", a stop.
    assert StopMatcher(["X", "b"]).feed("bXc") == 0
    assert StopMatcher(["b", "X"]).feed("bXc") == 0
    assert StopMatcher(["Xc", "aX"]).feed("aXc") == 0


def test_a_stop_ending_after_min_tokens_text_is_still_found():
    m = StopMatcher(["abc"])
    assert m.feed("xab", report=False) is None and m.held() == 2
    assert m.feed("c") == -2                    # starts two characters before the new text


def test_a_stop_flood_costs_linear_work_per_new_character():
    """300 stops of 3,000 characters (the issue's flood): each character fed moves each automaton
    by amortised O(1) steps; the old scan sliced every prefix of every stop, each step."""
    stops = ["x" * 2999 + str(i % 10) for i in range(300)]
    compared = 0

    class Counting(str):
        def __getitem__(self, i):
            nonlocal compared
            compared += 1
            return str.__getitem__(self, i)

    m = StopMatcher([Counting(s) for s in stops])
    compared = 0                                # building the automata is linear, once per request
    for _ in range(200):
        assert m.feed("x") is None
    assert m.held() == 200
    assert compared <= 4 * 200 * len(stops)
