"""Shared fixtures: tiny random components (diffusers' get_dummy_components shape) that run in milliseconds."""

import pytest
from support.tiny import make_tiny_components

from ldmkit.loading import Components


@pytest.fixture
def tiny_components() -> Components:
    return make_tiny_components()
