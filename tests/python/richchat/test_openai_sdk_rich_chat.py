"""The OpenAI Python SDK against every tool-capable provider behind the gateway: streamed and plain
tool calls, and structured output parsed into the caller's model (tests/richchat.rs starts the
gateway and passes, per provider, the route and the arguments the simulated provider sends)."""

import json
import os

import pytest
from openai import OpenAI
from pydantic import BaseModel

ROUTES = json.loads(os.environ.get("PORTCULLIS_ROUTES", "{}"))
PROVIDERS = sorted(ROUTES.get("tools", {}))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
]
MESSAGES = [{"role": "user", "content": "Weather and time in Zürich?"}]


@pytest.fixture
def client(gateway_url):
    return OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_tool_calls_accumulate_to_the_providers_arguments(client, provider):
    stream = client.chat.completions.create(
        model=ROUTES["tools"][provider],
        messages=MESSAGES,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls = {}
    finish = None
    fragments = 0
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                fragments += 1
                entry = calls.get(call.index)
                if entry is None:
                    assert call.id, f"the first fragment of call {call.index} has no id"
                    assert call.function.name, f"the first fragment of call {call.index} has no name"
                    entry = calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None, "a later fragment repeats the call id"
                entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == ROUTES["expected_arguments"]
    assert len({c["id"] for c in calls.values()}) == 2
    assert fragments >= 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_calls_without_streaming(client, provider):
    response = client.chat.completions.create(model=ROUTES["tools"][provider], messages=MESSAGES, tools=TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == ROUTES["expected_arguments"]


class Reply(BaseModel):
    """What the simulated Gemini and Cohere answer when asked for JSON."""

    answer: str
    confidence: float
    tags: list[str]


class ToolInput(BaseModel):
    """What the simulated Anthropic and Bedrock put in the forced structured-output tool's input."""

    tool: str
    n: int
    city: str


@pytest.mark.parametrize(
    "provider,model",
    [("gemini", Reply), ("cohere", Reply), ("anthropic", ToolInput), ("bedrock", ToolInput)],
)
def test_structured_output_parses_into_the_callers_model(client, provider, model):
    if provider not in PROVIDERS:
        pytest.skip(f"no {provider} route")
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(
        model=ROUTES["tools"][provider],
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format=model,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, model)
    assert completion.choices[0].finish_reason == "stop"
