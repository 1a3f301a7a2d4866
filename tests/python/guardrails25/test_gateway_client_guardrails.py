"""Guardrails seen through the MLflow 2.5 `mlflow.gateway` client (tests/guardrails.rs applies the
policy and checks what the simulated provider received)."""

import pytest
import requests
from mlflow.gateway import query, set_gateway_uri

CARD = "4111 1111 1111 1111"


@pytest.fixture(autouse=True)
def _gateway(gateway_url):
    set_gateway_uri(gateway_url)


def test_a_blocked_query_is_a_400_naming_the_check_not_the_text(routes):
    with pytest.raises(requests.HTTPError) as err:
        query(route=routes["guarded"], data={"messages": [{"role": "user", "content": "block-gateway25 nightjar"}]})
    assert err.value.response.status_code == 400
    detail = err.value.response.json()["detail"]
    assert "guardrail_blocked" in detail and "codenames" in detail
    assert "nightjar" not in detail.lower()


def test_a_masked_query_is_served(routes):
    response = query(route=routes["completions"], data={"prompt": f"mask-gateway25 {CARD}"})
    assert response["candidates"][0]["text"].startswith("word1")
