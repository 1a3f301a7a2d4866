"""Guardrails seen through the real clients (tests/guardrails.rs applies the policy and checks
what the simulated provider received): a blocked request is each client's own 400, masked text
goes upstream masked, and a streamed answer carrying a key split across chunks arrives masked."""

import anthropic
import openai
import pytest
import requests
from anthropic import Anthropic
from mlflow.deployments import get_deploy_client
from openai import OpenAI

CARD = "4111 1111 1111 1111"
MASKED = "The key is [SECRET] and [TICKET] ok"


@pytest.fixture
def oai(gateway_url, routes):
    return OpenAI(base_url=f"{gateway_url}/v1", api_key=routes["token"], max_retries=0, timeout=30)


@pytest.fixture
def claude(gateway_url, routes):
    return Anthropic(base_url=gateway_url, api_key=routes["token"], max_retries=0, timeout=30)


def ask(text):
    return [{"role": "user", "content": text}]


def assert_names_not_text(message):
    assert "guardrail_blocked" in message and "codenames" in message
    assert "bluebird" not in message.lower()


def test_openai_chat_block_is_a_bad_request_with_the_code(oai, routes):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=routes["guarded"], messages=ask("block-chat about Bluebird"))
    assert err.value.status_code == 400
    assert err.value.code == "guardrail_blocked"
    assert err.value.type == "invalid_request_error"
    assert_names_not_text(err.value.message)


def test_openai_completions_and_responses_blocks(oai, routes):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=routes["completions"], prompt="block-completions bluebird")
    assert err.value.code == "guardrail_blocked"
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=routes["guarded"], input="block-responses BLUEBIRD")
    assert err.value.code == "guardrail_blocked"
    assert_names_not_text(err.value.message)


def test_anthropic_block_is_an_invalid_request_error(claude, routes):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=routes["guarded"], max_tokens=50, messages=ask("block-anthropic bluebird"))
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert_names_not_text(body["error"]["message"])


def test_mlflow_deployments_block(gateway_url, routes):
    client = get_deploy_client(gateway_url)
    with pytest.raises(requests.HTTPError) as err:
        client.predict(endpoint=routes["guarded"], inputs={"messages": ask("block-mlflow nightjar")})
    assert err.value.response.status_code == 400
    assert_names_not_text(err.value.response.json()["detail"])


def test_masked_requests_are_served(oai, claude, gateway_url, routes):
    r = oai.chat.completions.create(model=routes["guarded"], messages=ask(f"mask-chat pay {CARD} now"))
    assert r.choices[0].message.content.startswith("word1")
    r = oai.embeddings.create(model=routes["embeddings"], input=[f"mask-emb {CARD}"])
    assert len(r.data) == 1
    m = claude.messages.create(model=routes["guarded"], max_tokens=50, messages=ask(f"mask-anthropic {CARD}"))
    assert m.content[0].text.startswith("word1")
    r = get_deploy_client(gateway_url).predict(
        endpoint=routes["guarded"], inputs={"messages": ask(f"mask-mlflow {CARD}")}
    )
    assert r["choices"][0]["message"]["content"].startswith("word1")


def test_openai_stream_key_split_across_chunks_is_masked(oai, routes):
    pieces = []
    for chunk in oai.chat.completions.create(model=routes["leaky"], messages=ask("stream"), stream=True):
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    assert "".join(pieces) == MASKED
    assert not any("sk-" in p or "TCK" in p for p in pieces), pieces


def test_anthropic_and_responses_streams_are_masked(oai, claude, routes):
    with claude.messages.stream(model=routes["leaky"], max_tokens=100, messages=ask("stream")) as s:
        text = "".join(s.text_stream)
    assert text == MASKED
    stream = oai.responses.create(model=routes["leaky"], input="stream", stream=True)
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == MASKED


def test_a_block_mid_stream_is_each_sdks_stream_error(oai, claude, routes):
    seen = []
    with pytest.raises(openai.APIError) as err:
        for chunk in oai.chat.completions.create(model=routes["blocky"], messages=ask("stream"), stream=True):
            for c in chunk.choices:
                seen.append(c.delta.content or "")
    assert "guardrail_blocked" in str(err.value)
    assert "classified" not in "".join(seen)
    with pytest.raises(anthropic.APIError) as err:
        with claude.messages.stream(model=routes["blocky"], max_tokens=100, messages=ask("stream")) as s:
            for _ in s.text_stream:
                pass
    assert "guardrail_blocked" in str(err.value)
