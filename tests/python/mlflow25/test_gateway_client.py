"""The MLflow 2.5 `mlflow.gateway` client, used the way MLflow's AI Gateway announcement shows it."""

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.gateway import MlflowGatewayClient, get_route, query, search_routes, set_gateway_uri


@pytest.fixture(autouse=True)
def _gateway(gateway_url):
    set_gateway_uri(gateway_url)


def test_is_the_announcement_client():
    assert mlflow.__version__ == "2.5.0"


def test_completions_query_as_announced(routes):
    response = query(
        route=routes["completions"],
        data={"prompt": "What is the best day of the week?", "temperature": 0.3},
    )
    assert response["candidates"][0]["text"].startswith("word1")
    assert response["candidates"][0]["metadata"]["finish_reason"] == "stop"
    meta = response["metadata"]
    assert meta["route_type"] == "llm/v1/completions"
    assert meta["model"] == "gpt-4o-mini"
    assert meta["output_tokens"] == 20
    assert meta["total_tokens"] == meta["input_tokens"] + meta["output_tokens"]


def test_chat_query_with_25_parameters(routes):
    response = query(
        route=routes["chat"],
        data={
            "messages": [{"role": "user", "content": "temperature-check"}],
            "temperature": 0.5,
            "candidate_count": 2,
            "max_tokens": 5,
            "stop": ["END"],
            "top_p": 0.9,
            "user": "passed-through",
        },
    )
    assert len(response["candidates"]) == 2
    for candidate in response["candidates"]:
        assert candidate["message"] == {"role": "assistant", "content": "word1 word2 word3 word4 word5"}
        assert candidate["metadata"] == {"finish_reason": "length"}
    assert response["metadata"]["route_type"] == "llm/v1/chat"
    assert response["metadata"]["output_tokens"] == 10


def test_embeddings_query(routes):
    response = query(route=routes["embeddings"], data={"text": ["a", "bb"]})
    assert len(response["embeddings"]) == 2
    assert all(len(v) == 8 for v in response["embeddings"])
    assert response["embeddings"][0] != response["embeddings"][1]
    assert response["metadata"]["route_type"] == "llm/v1/embeddings"
    assert response["metadata"]["output_tokens"] == 0
    single = query(route=routes["embeddings"], data={"text": "a"})
    assert single["embeddings"] == response["embeddings"][:1]


def test_get_route(routes, gateway_url):
    route = get_route(routes["chat"])
    assert route.name == routes["chat"]
    assert route.route_type == "llm/v1/chat"
    assert route.model.name == "gpt-4o-mini"
    assert route.model.provider == "openai"
    assert route.route_url == f"{gateway_url}/gateway/{routes['chat']}/invocations"


def test_search_routes_follows_every_page(routes):
    first = MlflowGatewayClient().search_routes()
    assert len(first) == routes["page_size"]
    assert first.token, "a full first page must point to the next"
    found = search_routes()
    assert sorted(r.name for r in found) == sorted(routes["all"])
    assert len(found) > 2 * routes["page_size"]


def test_errors_carry_the_gateway_message(routes):
    with pytest.raises(requests.HTTPError) as err:
        query(route="no-such-route", data={"prompt": "x"})
    assert err.value.response.status_code == 404
    assert "does not exist" in err.value.response.json()["detail"]

    with pytest.raises(requests.HTTPError) as err:
        query(route=routes["chat"], data={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert err.value.response.status_code == 422
    assert "'model' is not permitted" in err.value.response.json()["detail"]

    with pytest.raises(requests.HTTPError) as err:
        query(route=routes["embeddings"], data={"messages": [{"role": "user", "content": "x"}]})
    assert err.value.response.status_code == 400

    with pytest.raises(requests.HTTPError) as err:
        get_route("no-such-route")
    assert err.value.response.status_code == 404


def test_upstream_rate_limit_surfaces_as_429(routes):
    # MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 (set by the runner) keeps the client's retries short.
    with pytest.raises(MlflowException) as err:
        query(route=routes["limited"], data={"messages": [{"role": "user", "content": "x"}]})
    assert "429" in str(err.value)


def test_a_backend_outage_is_invisible_to_query(routes):
    if "resilient" not in routes:
        pytest.skip("no multi-backend route in this setup")
    response = query(route=routes["resilient"], data={"messages": [{"role": "user", "content": "hello"}]})
    assert response["candidates"][0]["message"]["content"].startswith("word1")


def test_spent_usd_budget_surfaces_as_429_naming_the_budget(routes, gateway_url):
    if "broke" not in routes:
        pytest.skip("no spent USD budget in this setup")
    with pytest.raises(MlflowException) as err:
        query(route=routes["broke"], data={"messages": [{"role": "user", "content": "x"}]})
    # MLflow 2.5's client reports only the status of a 429 (urllib3's retry gives up on it before
    # the body is read); the budget message is in the body for clients that read it.
    assert "429" in str(err.value)
    body = requests.post(
        f"{gateway_url}/gateway/{routes['broke']}/invocations",
        json={"messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert body.status_code == 429
    assert f"/{routes['broke']}: $0.000001 per month, resets " in body.json()["detail"]
