"""The OpenAI Python SDK against `/v1`, with the route name as the model."""

import openai
import pytest
from openai import OpenAI

MESSAGES = [{"role": "user", "content": "hello"}]
ANSWER = " ".join(f"word{i}" for i in range(1, 21))


@pytest.fixture
def client(gateway_url):
    return OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat(client, routes):
    response = client.chat.completions.create(model=routes["chat"], messages=MESSAGES)
    assert response.choices[0].message.content == ANSWER
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == 20


def test_chat_stream_collects_every_delta(client, routes):
    stream = client.chat.completions.create(
        model=routes["chat"], messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_stream_without_usage_has_no_usage_chunk(client, routes):
    chunks = list(client.chat.completions.create(model=routes["chat"], messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_completions(client, routes):
    response = client.completions.create(model=routes["completions"], prompt="Say hi", max_tokens=2)
    assert response.choices[0].text == "word1 word2"
    assert response.choices[0].finish_reason == "length"


def test_completions_stream(client, routes):
    stream = client.completions.create(model=routes["completions"], prompt="Say hi", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == ANSWER


def test_embeddings(client, routes):
    response = client.embeddings.create(model=routes["embeddings"], input=["a", "bb", "ccc"])
    assert [d.index for d in response.data] == [0, 1, 2]
    assert len(response.data[0].embedding) == 8


def test_models_list(client, routes):
    ids = {m.id for m in client.models.list()}
    assert set(routes["all"]) <= ids


def test_errors_carry_the_gateway_message(client, routes):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-route", messages=MESSAGES)
    assert "does not exist" in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=routes["embeddings"], messages=MESSAGES)
    assert "llm/v1/embeddings" in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=routes["chat"], messages=MESSAGES, temperature=3)
    assert "temperature" in err.value.message

    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=routes["limited"], messages=MESSAGES)
    assert "Rate limit reached" in err.value.message
    assert err.value.response.headers["retry-after"] == "7"


def test_gateway_rate_limit_is_a_rate_limit_error_with_openai_headers(client, routes):
    # Three calls within about a second hit a one-call-per-second limit at least once.
    errors = []
    for _ in range(3):
        try:
            client.chat.completions.create(model=routes["throttled"], messages=MESSAGES)
        except openai.RateLimitError as e:
            errors.append(e)
    assert errors
    err = errors[0]
    assert err.code == "rate_limit_exceeded"
    assert "rate limit exceeded" in err.message
    headers = err.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) == 1


def test_sdk_retries_honour_retry_after(gateway_url, routes):
    retrying = OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=5, timeout=30)
    for _ in range(3):
        response = retrying.chat.completions.create(model=routes["throttled"], messages=MESSAGES)
        assert response.choices[0].message.content == ANSWER


def test_a_backend_outage_is_invisible_to_the_sdk(client, routes):
    if "resilient" not in routes:
        pytest.skip("no multi-backend route in this setup")
    raw = client.chat.completions.with_raw_response.create(model=routes["resilient"], messages=MESSAGES)
    assert raw.headers["x-portcullis-backend"] == "anthropic/claude-sonnet-4-5"
    assert raw.headers["x-portcullis-attempts"] == "2"
    assert raw.parse().choices[0].message.content == ANSWER
    stream = client.chat.completions.create(model=routes["resilient"], messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER


def test_spent_usd_budget_is_a_rate_limit_error_naming_the_budget(client, routes):
    if "broke" not in routes:
        pytest.skip("no spent USD budget in this setup")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=routes["broke"], messages=MESSAGES)
    e = err.value
    assert e.code == "rate_limit_exceeded"
    assert "USD budget exceeded for route " in e.message
    assert f"/{routes['broke']}: $0.000001 per month, resets " in e.message
    assert e.body["message"].endswith("T00:00:00Z")
    headers = e.response.headers
    assert headers["x-ratelimit-limit-usd"] == "0.000001"
    assert headers["x-ratelimit-remaining-usd"] == "0.00"
    assert int(headers["retry-after"]) >= 1
