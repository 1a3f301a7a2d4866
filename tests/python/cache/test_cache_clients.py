"""The response cache through the real clients (tests/cache.rs): the OpenAI SDK stores an answer,
then the OpenAI SDK (plain and streamed), the Anthropic SDK (plain and streamed) and MLflow's
deployments client are all answered from it, each exactly as a live answer."""

import time

import anthropic
import openai
from mlflow.deployments import get_deploy_client


def test_every_client_is_served_the_same_stored_answer(gateway_url, routes):
    route, prompt = routes["chat"], routes["prompt"]
    messages = [{"role": "user", "content": prompt}]
    oa = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30)

    raw = oa.chat.completions.with_raw_response.create(model=route, max_tokens=20, messages=messages)
    assert raw.headers["x-portcullis-cache"] == "miss"
    first = raw.parse()
    text = first.choices[0].message.content
    assert text
    # The entry is written in the background.
    time.sleep(0.3)

    raw = oa.chat.completions.with_raw_response.create(model=route, max_tokens=20, messages=messages)
    assert raw.headers["x-portcullis-cache"] == "hit"
    assert raw.headers["x-portcullis-cost-usd"] == "0"
    assert int(raw.headers["age"]) >= 0
    assert raw.parse().model_dump() == first.model_dump()

    chunks = list(
        oa.chat.completions.create(
            model=route,
            max_tokens=20,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    assert len(pieces) > 1, "a stream of chunks, not one blob"
    assert chunks[0].id == first.id
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens

    an = anthropic.Anthropic(base_url=gateway_url, api_key="unused", max_retries=0, timeout=30)
    raw = an.messages.with_raw_response.create(model=route, max_tokens=20, messages=messages)
    assert raw.headers["x-portcullis-cache"] == "hit"
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].text == text
    assert m.usage.output_tokens == first.usage.completion_tokens
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[first.choices[0].finish_reason]

    with an.messages.stream(model=route, max_tokens=20, messages=messages) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.usage.output_tokens == first.usage.completion_tokens

    answer = get_deploy_client(gateway_url).predict(
        endpoint=route, inputs={"messages": messages, "max_tokens": 20}
    )
    assert answer["choices"][0]["message"]["content"] == text
    assert answer["usage"]["completion_tokens"] == first.usage.completion_tokens


def test_an_anthropic_stream_stored_answers_openai_and_mlflow(gateway_url, routes):
    route = routes["chat"]
    messages = [{"role": "user", "content": routes["prompt"] + " (the Anthropic SDK first)"}]
    an = anthropic.Anthropic(base_url=gateway_url, api_key="unused", max_retries=0, timeout=30)
    with an.messages.stream(model=route, max_tokens=20, messages=messages) as stream:
        text = "".join(stream.text_stream)
        first = stream.get_final_message()
    assert text
    time.sleep(0.3)

    raw = an.messages.with_raw_response.create(model=route, max_tokens=20, messages=messages)
    assert raw.headers["x-portcullis-cache"] == "hit"
    again = raw.parse()
    assert again.id == first.id
    assert again.content[0].text == text
    assert again.usage.output_tokens == first.usage.output_tokens

    oa = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30)
    raw = oa.chat.completions.with_raw_response.create(model=route, max_tokens=20, messages=messages)
    assert raw.headers["x-portcullis-cache"] == "hit"
    answer = raw.parse()
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == {"end_turn": "stop", "max_tokens": "length"}[first.stop_reason]
    assert answer.usage.completion_tokens == first.usage.output_tokens

    answer = get_deploy_client(gateway_url).predict(
        endpoint=route, inputs={"messages": messages, "max_tokens": 20}
    )
    assert answer["choices"][0]["message"]["content"] == text
