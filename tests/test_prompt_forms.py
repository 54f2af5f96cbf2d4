"""What the engine's door (engine/request.py) takes as a prompt, without a model: text is tokenized,
token ids come as Python, numpy or torch integers in a list, tuple or 1-D array and leave as Python
ints; bools, floats, None, nested lists, 2-D arrays, bytes and other objects are refused by a
RequestError that names the item seen. `is_single_prompt` tells one prompt from a list of them.
(tests/test_bad_requests.py checks the same forms end to end, each failing alone in a batch.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyinfer import RequestError
from tinyinfer.engine.request import is_single_prompt, prompt_ids


class SplitTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.mark.parametrize("ids", [[5, 6, 7], (5, 6, 7), np.array([5, 6, 7]), torch.tensor([5, 6, 7]),
                                 [np.int64(5), np.uint16(6), torch.tensor(7)]],
                         ids=["list", "tuple", "numpy", "torch", "scalars"])
def test_token_ids_leave_as_python_ints(ids):
    got = prompt_ids(ids, SplitTokenizer())
    assert got == [5, 6, 7] and all(type(t) is int for t in got)


def test_text_is_tokenized():
    assert prompt_ids("hi", SplitTokenizer()) == [104, 105]


NOT_AN_ID = "not a token id: give integers (Python, numpy or torch; not bools)"
BAD = {  # prompt: the whole message
    "empty_text": ("", "empty prompt: give at least one token or character"),
    "bool": ([5, True], f"prompt item 1 is True (bool), {NOT_AN_ID}"),
    "float": ([5.0], f"prompt item 0 is 5.0 (float), {NOT_AN_ID}"),
    "none_item": ([5, 6, None], f"prompt item 2 is None (NoneType), {NOT_AN_ID}"),
    "nested": ([[5, 6]], f"prompt item 0 is [5, 6] (list), {NOT_AN_ID}"),
    "numpy_floats": (np.array([1.5]), f"prompt item 0 is 1.5 (float), {NOT_AN_ID}"),
    "torch_bools": (torch.tensor([True]), f"prompt item 0 is True (bool), {NOT_AN_ID}"),
    "2d": (np.array([[5, 6]]), "a prompt array must be 1-D (token ids), got shape (1, 2)"),
    "bytes": (b"hi", "a prompt must be text (str) or a list of token ids, got b'hi' (bytes); decode "
                     "bytes to str first"),
    "none": (None, "a prompt must be text (str) or a list of token ids, got None (NoneType)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_prompts_are_refused_naming_what_was_seen(name):
    bad, message = BAD[name]
    with pytest.raises(RequestError) as err:
        prompt_ids(bad, SplitTokenizer())
    assert str(err.value) == message


@pytest.mark.parametrize("prompts,single", [
    ("text", True), ([5, 6], True), ((5, 6), True), (np.array([5, 6]), True), (torch.tensor([5]), True),
    ([np.int32(5)], True), (None, True), (b"x", True), (np.array(5), True),
    (["a", "b"], False), ([[5], [6]], False), ([], False), ((), False), (np.array([[5, 6]]), False),
    (torch.tensor([[5]]), False), ([True, 5], False), ([None], False)])
def test_one_prompt_or_a_list_of_them(prompts, single):
    assert is_single_prompt(prompts) is single
