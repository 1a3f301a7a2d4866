"""Shared fixtures: tests/clients.rs starts the control plane, the simulated provider and the
gateway, applies the Routes, and passes their names and the gateway's URL in the environment."""

import json
import os

import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through tests/clients.rs (make test)")
    return value


@pytest.fixture(scope="session")
def gateway_url():
    return _env("PORTCULLIS_URL")


@pytest.fixture(scope="session")
def routes():
    """chat, completions, embeddings, limited (upstream answers 429), throttled (the gateway's own
    limit: one call per second), all (every route name), page_size."""
    return json.loads(_env("PORTCULLIS_ROUTES"))
