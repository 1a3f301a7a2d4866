"""Streamed tool calls through `/v1/messages` and `/v1/responses` from OpenAI, Anthropic and Gemini
Routes (the simulated providers call the tools offered, in their own streaming shapes), and tool
round trips on a Gemini Route."""

import json

import pytest
from anthropic import Anthropic
from openai import OpenAI

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FUNCTION = {"type": "function", "name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}


@pytest.fixture
def claude(gateway_url, routes):
    return Anthropic(base_url=gateway_url, api_key=routes["token"], max_retries=0, timeout=30)


@pytest.fixture
def openai_client(gateway_url, routes):
    return OpenAI(base_url=f"{gateway_url}/v1", api_key=routes["token"], max_retries=0, timeout=30)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_messages_stream_tool_use(claude, routes, provider):
    question = [{"role": "user", "content": "stream-tools"}]
    events = list(claude.messages.create(model=routes[provider], max_tokens=300, tools=[WEATHER], messages=question, stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    call = next(b for b in starts if b.type == "tool_use")
    assert call.name == "get_weather" and call.id
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial)["tool"] == "get_weather"
    assert next(e for e in events if e.type == "message_delta").delta.stop_reason == "tool_use"
    assert events[-1].type == "message_stop"
    with claude.messages.stream(model=routes[provider], max_tokens=300, tools=[WEATHER], messages=question) as stream:
        final = stream.get_final_message()
    used = next(b for b in final.content if b.type == "tool_use")
    assert final.stop_reason == "tool_use" and used.input["tool"] == "get_weather"


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_responses_stream_function_call(openai_client, routes, provider):
    events = list(openai_client.responses.create(model=routes[provider], input="stream-tools", tools=[FUNCTION], stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["tool"] == "get_weather"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == done.arguments
    call = next(o for o in events[-1].response.output if o.type == "function_call")
    assert call.name == "get_weather" and call.call_id and call.arguments == done.arguments
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_tool_round_trips_on_gemini(claude, openai_client, routes):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = claude.messages.create(model=routes["gemini"], max_tokens=300, tools=[WEATHER], messages=question)
    call = next(b for b in first.content if b.type == "tool_use")
    assert first.stop_reason == "tool_use" and call.name == "get_weather"
    second = claude.messages.create(
        model=routes["gemini"],
        max_tokens=300,
        tools=[WEATHER],
        messages=question
        + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
        ],
    )
    assert second.stop_reason == "end_turn" and second.content[0].text
    first = openai_client.responses.create(model=routes["gemini"], input=question, tools=[FUNCTION])
    fc = next(o for o in first.output if o.type == "function_call")
    second = openai_client.responses.create(
        model=routes["gemini"],
        tools=[FUNCTION],
        input=question
        + [
            {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
            {"type": "function_call_output", "call_id": fc.call_id, "output": "Sunny"},
        ],
    )
    assert second.status == "completed" and second.output_text
