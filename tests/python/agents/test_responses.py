"""The OpenAI Python SDK's Responses API (`client.responses.create`) against `/v1/responses`, on
Routes served by OpenAI, Anthropic and Gemini; the gateway is stateless and says so."""

import json

import openai
import pytest
from openai import OpenAI

ANSWER = " ".join(f"word{i}" for i in range(1, 21))
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PROVIDERS = ["openai", "anthropic", "gemini"]


@pytest.fixture
def client(gateway_url, routes):
    return OpenAI(base_url=f"{gateway_url}/v1", api_key=routes["token"], max_retries=0, timeout=30)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain(client, routes, provider):
    r = client.responses.create(
        model=routes[provider], input="responses-plain", instructions="Be terse.", max_output_tokens=100
    )
    assert r.object == "response" and r.status == "completed"
    assert r.output_text == ANSWER
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens == 20
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be terse."


@pytest.mark.parametrize("provider", PROVIDERS)
def test_length_is_incomplete(client, routes, provider):
    r = client.responses.create(model=routes[provider], input="short", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "word1 word2"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_collects_every_event_type(client, routes, provider):
    events = list(client.responses.create(model=routes[provider], input="responses-stream", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    done = events[-1].response
    assert done.status == "completed" and done.output_text == ANSWER
    assert done.usage.output_tokens == 20


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_function_tool_round_trip(client, routes, provider):
    question = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]
    first = client.responses.create(model=routes[provider], input=question, tools=[WEATHER], tool_choice="auto")
    call = next(o for o in first.output if o.type == "function_call")
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments), dict)
    second = client.responses.create(
        model=routes[provider],
        tools=[WEATHER],
        input=question
        + [
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert second.status == "completed"
    assert second.output_text == ANSWER


@pytest.mark.parametrize("provider", PROVIDERS)
def test_json_schema_text_format(client, routes, provider):
    r = client.responses.create(
        model=routes[provider],
        input="json-check",
        text={
            "format": {
                "type": "json_schema",
                "name": "weather",
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
                "strict": True,
            }
        },
    )
    assert r.status == "completed" and r.output_text
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"previous_response_id": "resp_123"}, "stateless"),
        ({"store": True}, "stateless"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "does not run built-in tools"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "does not run built-in tools"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "does not run built-in tools"),
    ],
)
def test_refused_features_say_why(client, routes, kwargs, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=routes["openai"], input="x", **kwargs)
    assert says in str(e.value)


def test_unknown_route_and_bad_credentials(client, gateway_url, routes):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-route", input="x")
    stranger = OpenAI(base_url=f"{gateway_url}/v1", api_key="not-a-credential", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.responses.create(model=routes["openai"], input="x")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_helper_accumulates_the_response(client, routes, provider):
    with client.responses.stream(model=routes[provider], input="responses-helper") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == ANSWER
    assert final.output_text == ANSWER and final.status == "completed"
