"""The Anthropic Python SDK against `/v1/messages`, with a Route's name as the model, on a Route
served by OpenAI and one served by Anthropic (tests/agents.rs checks what each provider received)."""

import base64

import anthropic
import pytest
from anthropic import Anthropic

ANSWER = " ".join(f"word{i}" for i in range(1, 21))
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PROVIDERS = ["openai", "anthropic"]


@pytest.fixture
def client(gateway_url, routes):
    # The SDK sends its key as `x-api-key`: here a ServiceAccount token.
    return Anthropic(base_url=gateway_url, api_key=routes["token"], max_retries=0, timeout=30)


def ask(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain(client, routes, provider):
    m = client.messages.create(
        model=routes[provider],
        max_tokens=100,
        system="Be terse.",
        messages=ask("plain-check"),
        stop_sequences=["END"],
        metadata={"user_id": "agent-1"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        # This SDK no longer offers sampling parameters; older ones and other clients still send them.
        extra_body={"temperature": 0.5, "top_k": 5},
    )
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == ANSWER
    assert m.stop_reason == "end_turn"
    assert m.usage.output_tokens == 20 and m.usage.input_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bearer_credential_and_length_stop(gateway_url, routes, provider):
    client = Anthropic(base_url=gateway_url, auth_token=routes["token"], max_retries=0, timeout=30)
    m = client.messages.create(model=routes[provider], max_tokens=3, messages=ask("length-check"))
    assert m.content[0].text == "word1 word2 word3"
    assert m.stop_reason == "max_tokens"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream(client, routes, provider):
    with client.messages.stream(model=routes[provider], max_tokens=100, messages=ask("stream-check")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ANSWER
    assert final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 20
    assert final.usage.input_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_events_in_order(client, routes, provider):
    events = list(client.messages.create(model=routes[provider], max_tokens=100, messages=ask("events"), stream=True))
    kinds = [e.type for e in events if e.type != "ping"]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas)
    message_delta = next(e for e in events if e.type == "message_delta")
    assert message_delta.delta.stop_reason == "end_turn"
    assert message_delta.usage.output_tokens == 20


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_use_round_trip(client, routes, provider):
    question = ask("What is the weather in Paris?")
    first = client.messages.create(
        model=routes[provider], max_tokens=200, tools=[WEATHER], tool_choice={"type": "auto"}, messages=question
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather"
    # Whatever the simulated provider chose to call it with, parsed into an object.
    assert isinstance(call.input, dict) and call.input
    second = client.messages.create(
        model=routes[provider],
        max_tokens=200,
        tools=[WEATHER],
        messages=question
        + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == ANSWER


@pytest.mark.parametrize("provider", PROVIDERS)
def test_image_block(client, routes, provider):
    m = client.messages.create(
        model=routes[provider],
        max_tokens=100,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "text", "text": "image-check"},
                ],
            }
        ],
    )
    assert m.content[0].text == ANSWER


@pytest.mark.parametrize("provider", PROVIDERS)
def test_structured_output(client, routes, provider):
    m = client.messages.create(
        model=routes[provider],
        max_tokens=100,
        messages=ask("structured-check"),
        output_config={"format": {"type": "json_schema", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    )
    assert m.content[0].type == "text" and m.content[0].text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cache_breakpoints(client, routes, provider):
    m = client.messages.create(
        model=routes[provider],
        max_tokens=100,
        system=[{"type": "text", "text": "cache-check system", "cache_control": {"type": "ephemeral"}}],
        messages=ask("cache-check"),
    )
    assert m.content[0].text == ANSWER


def test_count_tokens_is_an_estimate(client, routes):
    counted = client.messages.count_tokens(model=routes["openai"], messages=ask("one two three four " * 10))
    assert 5 < counted.input_tokens < 100


@pytest.mark.parametrize("provider", PROVIDERS)
def test_error_classes(client, gateway_url, routes, provider):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-route", max_tokens=5, messages=ask("x"))
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=routes[provider], max_tokens=5, messages=[{"role": "user", "content": [{"type": "hologram"}]}])
    assert "hologram" in e.value.body["error"]["message"]
    stranger = Anthropic(base_url=gateway_url, api_key="not-a-credential", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as e:
        stranger.messages.create(model=routes[provider], max_tokens=5, messages=ask("x"))
    assert e.value.body["error"]["type"] == "authentication_error"
    throttled = routes["throttled"][provider]
    client.messages.create(model=throttled, max_tokens=5, messages=ask("first call fits"))
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model=throttled, max_tokens=5, messages=ask("second call does not"))
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert int(e.value.response.headers["retry-after"]) > 0


def test_models_in_anthropics_shape(client, routes):
    ids = [m.id for m in client.models.list()]
    assert routes["openai"] in ids and routes["anthropic"] in ids
    assert client.models.retrieve(routes["anthropic"]).type == "model"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-route")


THINKING = "The caller wants an answer; twenty words will do."
DOCUMENT = {
    "type": "document",
    "source": {"type": "text", "media_type": "text/plain", "data": "Paris is the capital of France."},
    "title": "passthrough-doc",
    "citations": {"enabled": True},
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_only_fields_pass_through(client, routes, stream):
    # tests/agents.rs checks that the simulated Anthropic received all of this untouched.
    kwargs = dict(
        model=routes["anthropic"],
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        service_tier="standard_only",
        tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}, WEB_SEARCH],
        messages=[
            {"role": "user", "content": [DOCUMENT, {"type": "text", "text": f"passthrough-check stream={stream}"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Look it up.", "signature": "sig_earlier"},
                    {"type": "tool_use", "id": "toolu_pt", "name": "get_weather", "input": {"city": "Atlantis"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_pt", "content": "no such city", "is_error": True}],
            },
        ],
        extra_body={"cache_control": {"type": "ephemeral"}},
    )
    if stream:
        with client.messages.stream(**kwargs) as s:
            kinds = [e.type for e in s]
            final = s.get_final_message()
        assert "thinking" in kinds and "signature" in kinds
    else:
        final = client.messages.create(**kwargs)
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THINKING
    assert final.content[0].signature == "sig_sim_thinking"
    assert final.content[1].text == ANSWER
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 20 and final.usage.input_tokens > 0
