"""AUTOMATIC1111's prompt editing and alternation are refused by name, not read as [de-emphasis]."""

import pytest

from ldmkit.errors import InvalidRequest
from ldmkit.params import GenerationParams


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5]", "a [cat:dog:10] house", "[red|blue] car", "[:hat:0.2]"])
def test_prompt_editing_and_alternation_are_refused(prompt):
    with pytest.raises(InvalidRequest, match="prompt editing .* or alternation .* does not support"):
        GenerationParams(prompt).validate()
    with pytest.raises(InvalidRequest, match="^negative prompt: "):
        GenerationParams("a cat", negative_prompt=prompt).validate()


@pytest.mark.parametrize("prompt", ["a [dog]", "(x:1.2) [y]", r"a \[x:y\]", "[fog]: night", "x [a] : [b] | c"])
def test_brackets_without_scheduling_pass(prompt):
    GenerationParams(prompt).validate()
