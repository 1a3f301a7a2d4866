"""The official MCP Python SDK's client, through the gateway's virtual server: tools of two real
servers (tests/python/mcp/servers.py), their own results, progress notifications, prompts and
resources. tests/mcp.rs passes the virtual server's URL and an API key in PORTCULLIS_ROUTES."""

import json
import os

import anyio
import pytest
from mcp import ClientSession
from mcp.shared.exceptions import McpError
from mcp.client.streamable_http import streamablehttp_client

SETUP = json.loads(os.environ["PORTCULLIS_ROUTES"])
URL = os.environ["PORTCULLIS_URL"] + SETUP["path"]
HEADERS = {"Authorization": f"Bearer {SETUP['key']}"}


async def _with_session(check):
    async with streamablehttp_client(URL, headers=HEADERS) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            await check(session)


def run(check):
    anyio.run(_with_session, check)


def test_lists_the_tools_of_both_servers_prefixed():
    async def check(session):
        tools = await session.list_tools()
        names = sorted(t.name for t in tools.tools)
        assert names == sorted(SETUP["tools"]), names
        get_issue = next(t for t in tools.tools if t.name == "jira_get_issue")
        assert get_issue.description == "Read one issue."
        assert get_issue.inputSchema["properties"]["key"]["type"] == "string"

    run(check)


def test_calls_return_the_servers_own_results():
    async def check(session):
        result = await session.call_tool("jira_get_issue", {"key": "PC-7"})
        assert not result.isError
        assert result.content[0].text == "issue PC-7: the build is red (from jira)"
        result = await session.call_tool("slow_echo", {"text": "hi"})
        assert result.content[0].text == "echo: hi"
        result = await session.call_tool("jira_search_issues", {"query": "red"})
        assert result.structuredContent == {"result": ["JIRA-1 matches red", "JIRA-2 matches red"]}

    run(check)


def test_progress_notifications_pass_through():
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async def check(session):
        result = await session.call_tool("slow_slow", {"seconds": 0.5}, progress_callback=on_progress)
        assert result.content[0].text == "slept 0.5s"

    run(check)
    assert [p for p, _, _ in seen] == list(range(10)), seen
    assert seen[3] == (3, 10, "step 3")


def test_unknown_tools_are_errors():
    async def check(session):
        with pytest.raises(McpError, match="Unknown tool: jira_no_such_tool"):
            await session.call_tool("jira_no_such_tool", {})
        # The session goes on.
        result = await session.call_tool("slow_echo", {"text": "after"})
        assert result.content[0].text == "echo: after"

    run(check)


def test_prompts_and_resources_are_federated_too():
    async def check(session):
        prompts = await session.list_prompts()
        assert [p.name for p in prompts.prompts] == ["jira_triage"]
        prompt = await session.get_prompt("jira_triage", {"key": "PC-1"})
        assert prompt.messages[0].content.text == "Please triage PC-1."
        resources = await session.list_resources()
        assert [str(r.uri) for r in resources.resources] == ["jira+jira://projects"]
        read = await session.read_resource("jira+jira://projects")
        assert read.contents[0].text == "PORT, CULL"

    run(check)
