"""Stop strings in the output text (engine/output.py TextStream), checked by behaviour with a tokenizer
that decodes one character per token: after every token the text handed out is the text so far minus
the longest tail that is still a proper prefix of a stop string (held back exactly that long, released
in full once it stops being one); a stop string cuts the text where it starts and nothing of it is ever
handed out. Then the same end to end on the demo model: LLM.generate with a stop string returns the
stop-free text up to the stop, plain, streamed and speculative (tests/test_engine.py has the basics)."""
from __future__ import annotations

import random

import pytest

from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.output import TextStream
from hf_util import DRAFT, LLAMA


class CharTokenizer:
    """Token id i decodes to chr(i): every token is exactly one character; id 0 is a special token,
    rendered as "<s>" unless skipped."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(("" if skip_special_tokens else "<s>") if i == 0 else chr(i) for i in ids)


class WordTokenizer:
    """Token ids index a list of pieces of several characters each."""
    PIECES = ["a", "bXc", "X", "dXeXf"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[i] for i in ids)


class ByteFallbackTokenizer:
    """Token id b < 256 is the byte b. Like tokenizers' ByteFallback decoder, a run of bytes that
    starts inside a character (a continuation byte) decodes to U+FFFD for every byte of the run."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if ids and 0x80 <= ids[0] < 0xC0:
            return "\ufffd" * len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def stream(stops: list[str], deferred: bool = False) -> TextStream:
    return TextStream(CharTokenizer(), [], stops, stream=not deferred)


def held_tail(text: str, stops: list[str]) -> int:
    """The reference: length of the longest tail of `text` that is a proper prefix of a stop."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


def first_stop(text: str, stops: list[str]) -> int:
    """Where the text must be cut: generation ends at the first character that completes a stop, cut
    where that stop starts; -1 if none occurs."""
    for end in range(1, len(text) + 1):
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return min(found)
    return -1


def run_stream(text: str, stops: list[str]) -> tuple[str, bool, list[str]]:
    """Push `text` one character at a time, taking after each: (handed-out text, stopped, pieces)."""
    ts, pieces = stream(stops), []
    for i, ch in enumerate(text):
        hit = ts.push(ord(ch))
        piece = ts.take(final=hit)
        pieces.append(piece)
        if hit:
            return "".join(pieces), True, pieces
        out = "".join(pieces)
        seen = text[:i + 1]
        # Held back exactly the tail that may still become a stop string, nothing more, nothing less.
        assert out == seen[:len(seen) - held_tail(seen, stops)], (seen, stops)
    hit = ts.finish()
    pieces.append(ts.take(final=True))
    return "".join(pieces), hit, pieces


def test_a_stop_prefix_is_held_while_it_is_one_and_released_whole_when_it_is_not():
    ts = stream(["abcd"])
    got = []
    for ch in "xabcx":
        assert not ts.push(ord(ch))
        got.append(ts.take(final=False))
    assert got == ["x", "", "", "", "abcx"]                 # "a", "ab", "abc" held; all four at once
    assert ts.finish() is False and ts.take(final=True) == ""


def test_the_longest_candidate_tail_is_held_across_several_stops():
    ts = stream(["xyz", "yzzq"])
    pieces = [(ts.push(ord(c)), ts.take(final=False))[1] for c in "axyz"]
    # "xy" is a prefix of "xyz", "y" of "yzzq"; then "xyz" is the stop itself.
    assert pieces[:3] == ["a", "", ""] and ts.text == "a"


def test_a_stop_string_cuts_the_text_where_it_starts_and_is_never_handed_out():
    out, hit, pieces = run_stream("hello world! more", ["ld!"])
    assert hit and out == "hello wor" and pieces[-3:] == ["", "", ""]     # "l", "ld", then the stop


def test_text_without_a_completed_stop_is_released_in_full_at_the_end():
    # Ends while "ab" is held: the final take hands it out; it never became the stop.
    out, hit, _ = run_stream("zzab", ["abc"])
    assert not hit and out == "zzab"


def test_a_stop_completed_by_the_last_token_is_cut():
    out, hit, _ = run_stream("zzabc", ["abc"])
    assert hit and out == "zz"


def _stop_sets(rng: random.Random, alphabet: str, longest: int) -> list[str]:
    """1-3 distinct stops where none is a suffix of another: a completed stop is then unambiguous."""
    while True:
        stops = list({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest)))
                      for _ in range(rng.randint(1, 3))})
        if not any(a != b and a.endswith(b) for a in stops for b in stops):
            return stops


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_match_the_reference_after_every_token(seed):
    rng = random.Random(seed)
    for i in range(300):
        # Half over "abc"; half over "ab" with longer stops (self-overlapping, like "aabaa").
        alphabet, longest = ("abc", 4) if i % 2 else ("ab", 7)
        stops = _stop_sets(rng, alphabet, longest)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        out, hit, _ = run_stream(text, stops)
        cut = first_stop(text, stops)
        assert hit == (cut >= 0), (text, stops)
        assert out == (text[:cut] if cut >= 0 else text), (text, stops)
        # finish_reason "stop": no stop string in the text, and the cut is at its first occurrence.
        assert all(s not in out for s in stops)


def test_a_stop_is_found_across_tokens_pushed_before_min_tokens():
    # check_stops=False (min_tokens not reached): a stop may start before and end after that point.
    ts = stream(["abc"])
    assert not ts.push(ord("a"), check_stops=False) and not ts.push(ord("b"), check_stops=False)
    assert ts.push(ord("c")) and ts.text == ""


def test_a_whole_stop_string_before_min_tokens_is_text_and_not_held():
    # Completed before min_tokens: it cannot end the request, so it is plain text, released at once.
    ts = stream(["abc"])
    for ch in "abc":
        assert not ts.push(ord(ch), check_stops=False)
    assert ts.take(final=False) == "abc"
    assert not ts.push(ord("d")) and ts.take(final=False) == "d"


def test_a_stop_overlapping_one_completed_before_min_tokens_is_found():
    # "aa" completed before min_tokens does not stop; its second "a" may start the next "aa".
    ts = stream(["aa"])
    assert not ts.push(ord("a"), check_stops=False) and not ts.push(ord("a"), check_stops=False)
    assert ts.push(ord("a")) and ts.text == "a"


def test_a_self_overlapping_stop_right_after_one_before_min_tokens_is_found():
    # "aabaaa" ends at 14 (before min_tokens) and again at 18, overlapping it from 12.
    text, stop = "bbaaabbbaabaaabaaa", "aabaaa"
    ts = stream([stop])
    for i, ch in enumerate(text):
        hit = ts.push(ord(ch), check_stops=i >= 14)
    assert hit and ts.text == text[:12]


def test_a_stopped_stream_stays_stopped():
    ts = stream(["b"])
    assert not ts.push(ord("a")) and ts.push(ord("b")) and ts.text == "a"
    assert ts.push(ord("c")) and ts.finish() and ts.text == "a"
    assert ts.take(final=True) == "a"


def test_a_stop_completed_by_the_text_flushed_at_the_end_is_found():
    # The stream ends inside a character: the flush renders it as U+FFFD, here a stop string.
    ts = TextStream(ByteFallbackTokenizer(), [], ["\ufffd"])
    for b in "a€".encode()[:-1]:
        assert not ts.push(b)
    assert ts.finish() and ts.text == "a" and ts.take(final=True) == "a"


def test_a_deferred_stream_hands_out_all_of_its_text_once_final():
    ts = stream([], deferred=True)
    for ch in "abc":
        assert ts.push(ord(ch)) is False
        assert ts.take(final=False) == ""
    assert ts.finish() is False and ts.take(final=True) == "abc"
    aborted = stream([], deferred=True)                          # ends without finish(): abort
    for ch in "xy":
        aborted.push(ord(ch))
    assert aborted.take(final=True) == "xy" and aborted.take(final=True) == ""


def test_streams_by_default_and_skips_special_tokens_unless_asked():
    ts = TextStream(CharTokenizer(), [], [])
    ts.push(ord("a"))
    ts.push(0)
    assert ts.take(final=False) == "a"
    shown = TextStream(CharTokenizer(), [], [], skip_special_tokens=False)
    for t in (ord("a"), 0, ord("b")):
        shown.push(t)
    shown.finish()
    assert shown.take(final=True) == "a<s>b"


def test_a_token_holding_a_stop_twice_is_cut_at_the_first():
    ts = TextStream(WordTokenizer(), [], ["X"])
    assert not ts.push(0) and ts.push(3) and ts.text == "ad"


@pytest.mark.parametrize("seed", range(3))
def test_multibyte_characters_stream_whole_even_when_the_window_starts_inside_one(seed):
    rng = random.Random(seed)
    chars = "aé€😀 z"
    text = "".join(rng.choice(chars) for _ in range(60))
    ids = list(text.encode())
    ts = TextStream(ByteFallbackTokenizer(), [], [])
    out = ""
    for t in ids:
        ts.push(t)
        out += ts.take(final=False)
    ts.finish()
    assert out + ts.take(final=True) == text


# --------------------------------------------------------------------------- end to end, demo model


@pytest.fixture(scope="module")
def llms() -> dict[str, LLM]:
    opts = dict(device="cpu", dtype="float32", max_kv_tokens=2048)
    return {"plain": LLM(LLAMA, **opts),
            "ngram": LLM(LLAMA, draft="ngram", speculate_k=4, **opts),
            "draft": LLM(LLAMA, draft=DRAFT, speculate_k=3, **opts)}


@pytest.mark.parametrize("how", ["plain", "streamed", "ngram", "draft"])
def test_generate_with_stop_strings_returns_exactly_the_text_before_the_first_stop(llms, how):
    free = llms["plain"].generate("ROMEO:", SamplingParams(temperature=0.0, max_tokens=60,
                                                           ignore_eos=True))[0].text
    llm = llms["plain" if how == "streamed" else how]
    # Stops of 2 to 6 characters that start at several places of the free text: each must cut the
    # text where it first starts, with nothing of the stop (not even its first character) left.
    for start, length in [(5, 2), (12, 3), (20, 4), (31, 6), (40, 5)]:
        stop = free[start:start + length]
        want = free[:free.find(stop)]
        params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, stop=[stop])
        pieces: list[str] = []
        on_token = (lambda d: pieces.append(d.new_text)) if how == "streamed" else None
        out = llm.generate("ROMEO:", params, on_token=on_token)[0]
        assert (out.finish_reason, out.text) == ("stop", want), (how, stop)
        if how == "streamed":
            assert "".join(pieces) == want
