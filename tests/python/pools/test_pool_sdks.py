"""The OpenAI SDK and the Anthropic SDK (through `/v1/messages`) on a Route whose backend is an
InferencePool of simulated model servers (tests/pools.rs starts them and checks which answered)."""

from anthropic import Anthropic
from openai import OpenAI

ANSWER = "word1 word2 word3 word4 word5"


def test_openai_sdk_plain_and_stream(gateway_url, routes):
    client = OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model=routes["chat"], messages=[{"role": "user", "content": "hello pool"}]
    )
    assert raw.headers["x-portcullis-backend"].startswith("inferencepool/")
    assert raw.headers["x-portcullis-endpoint"].startswith("vllm-")
    answer = raw.parse()
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=routes["chat"],
        messages=[{"role": "user", "content": "stream from the pool"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ANSWER


def test_anthropic_sdk_plain_and_stream(gateway_url, routes):
    client = Anthropic(base_url=gateway_url, api_key="unused", max_retries=0, timeout=30)
    m = client.messages.create(
        model=routes["chat"], max_tokens=100, messages=[{"role": "user", "content": "hello pool"}]
    )
    assert m.content[0].text == ANSWER
    assert m.stop_reason == "end_turn"
    with client.messages.stream(
        model=routes["chat"], max_tokens=100, messages=[{"role": "user", "content": "stream"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == ANSWER
