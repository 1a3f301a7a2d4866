"""MLflow 3's `mlflow.deployments` client against the deployments surface."""

import time

import mlflow
import pytest
import requests
from mlflow.deployments import get_deploy_client

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def client(gateway_url):
    return get_deploy_client(gateway_url)


def test_is_mlflow_3():
    assert mlflow.__version__.startswith("3.")


def test_list_endpoints_follows_every_page(client, routes):
    endpoints = client.list_endpoints()
    assert sorted(e.name for e in endpoints) == sorted(routes["all"])
    by_name = {e.name: e for e in endpoints}
    chat = by_name[routes["chat"]]
    assert chat.endpoint_type == "llm/v1/chat"
    assert chat.model.provider == "openai"
    assert chat.limit.calls == 100
    assert chat.limit.renewal_period == "minute"
    assert by_name[routes["embeddings"]].limit is None


def test_get_endpoint(client, routes, gateway_url):
    endpoint = client.get_endpoint(routes["completions"])
    assert endpoint.name == routes["completions"]
    assert endpoint.endpoint_type == "llm/v1/completions"
    assert endpoint.model.name == "gpt-4o-mini"
    assert endpoint.endpoint_url == f"{gateway_url}/endpoints/{routes['completions']}/invocations"


def test_predict_chat(client, routes):
    response = client.predict(
        endpoint=routes["chat"], inputs={**CHAT, "temperature": 0.7, "n": 2, "user": "deployments-extra"}
    )
    assert response["object"] == "chat.completion"
    assert len(response["choices"]) == 2
    assert response["choices"][0]["message"]["role"] == "assistant"
    assert response["choices"][0]["message"]["content"].startswith("word1")
    assert response["usage"]["completion_tokens"] == 40


def test_predict_completions(client, routes):
    response = client.predict(endpoint=routes["completions"], inputs={"prompt": "Say hi", "max_tokens": 3})
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == "word1 word2 word3"
    assert response["choices"][0]["finish_reason"] == "length"


def test_predict_embeddings(client, routes):
    response = client.predict(endpoint=routes["embeddings"], inputs={"input": ["a", "bb"]})
    assert [d["index"] for d in response["data"]] == [0, 1]
    assert len(response["data"][0]["embedding"]) == 8
    assert response["usage"]["prompt_tokens"] == 2


def test_errors_carry_the_gateway_message(client, routes):
    with pytest.raises(Exception) as err:
        client.get_endpoint("no-such-route")
    assert "404" in str(err.value) and "does not exist" in str(err.value)

    with pytest.raises(requests.HTTPError) as err:
        client.predict(endpoint=routes["chat"], inputs={**CHAT, "model": "gpt-4"})
    assert err.value.response.status_code == 422
    assert "'model' is not permitted" in err.value.response.json()["detail"]

    with pytest.raises(requests.HTTPError) as err:
        client.predict(endpoint=routes["chat"], inputs={"messages": []})
    assert err.value.response.status_code == 422


def test_upstream_rate_limit_surfaces_as_429(client, routes):
    with pytest.raises(Exception) as err:
        client.predict(endpoint=routes["limited"], inputs=CHAT)
    assert "429" in str(err.value)
    assert "Rate limit reached" in str(err.value)


def test_gateway_rate_limit_is_retried_after_retry_after(client, routes, monkeypatch):
    # One call per second: the client's automatic 429 retries, waiting Retry-After (1 s), get each
    # through. The runner turns retries off for speed; this test turns them back on.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    started = time.monotonic()
    for _ in range(3):
        response = client.predict(endpoint=routes["throttled"], inputs=CHAT)
        assert response["choices"][0]["message"]["content"]
    assert time.monotonic() - started >= 1.0


def test_a_backend_outage_is_invisible_to_predict(client, routes):
    if "resilient" not in routes:
        pytest.skip("no multi-backend route in this setup")
    response = client.predict(endpoint=routes["resilient"], inputs=CHAT)
    assert response["choices"][0]["message"]["content"].startswith("word1")


def test_spent_usd_budget_surfaces_as_429_naming_the_budget(client, routes):
    if "broke" not in routes:
        pytest.skip("no spent USD budget in this setup")
    with pytest.raises(Exception) as err:
        client.predict(endpoint=routes["broke"], inputs=CHAT)
    assert "429" in str(err.value)
    assert f"/{routes['broke']}: $0.000001 per month, resets " in str(err.value)
