"""Two real MCP servers on the official Python SDK (FastMCP, Streamable HTTP) for tests/mcp.rs.

    python servers.py jira PORT TOKEN   tools get_issue, search_issues, delete_issue, a prompt and a
                                        resource; every request must carry `Authorization: Bearer TOKEN`
    python servers.py slow PORT         tools echo, slow (progress notifications, cancellable) and
                                        hang (never answers)
    python servers.py legacy PORT       the older HTTP+SSE transport (GET /sse, POST /messages/):
                                        tools hello and count (progress)
    python servers.py oauth PORT ID SECRET LIFETIME
                                        a token endpoint at /token (client credentials, Basic auth)
                                        issuing tokens that live LIFETIME seconds; tool whoami; every
                                        MCP request needs a token that has not expired

Each prints `ready` once it listens. The gateway's headers are recorded (one JSON line per request
on stderr) so tests can assert on what the gateway sent."""

import asyncio
import json
import sys

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings

import base64
import time

KIND, PORT = sys.argv[1], int(sys.argv[2])
TOKEN = sys.argv[3] if KIND == "jira" else None
if KIND == "oauth":
    CLIENT_ID, CLIENT_SECRET, LIFETIME = sys.argv[3], sys.argv[4], float(sys.argv[5])
ISSUED = {}  # token -> expiry (monotonic)

mcp = FastMCP(
    KIND,
    host="127.0.0.1",
    port=PORT,
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)

if KIND == "jira":

    @mcp.tool()
    def get_issue(key: str) -> str:
        """Read one issue."""
        return f"issue {key}: the build is red (from jira)"

    @mcp.tool()
    def search_issues(query: str) -> list[str]:
        """Search issues."""
        return [f"JIRA-1 matches {query}", f"JIRA-2 matches {query}"]

    @mcp.tool()
    def delete_issue(key: str) -> str:
        """Delete an issue."""
        return f"deleted {key}"

    @mcp.prompt()
    def triage(key: str) -> str:
        """Triage an issue."""
        return f"Please triage {key}."

    @mcp.resource("jira://projects")
    def projects() -> str:
        """The projects."""
        return "PORT, CULL"

elif KIND == "legacy":

    @mcp.tool()
    def hello(name: str) -> str:
        """Greets over the older HTTP+SSE transport."""
        return f"hello {name} over HTTP+SSE"

    @mcp.tool()
    async def count(to: int, ctx: Context) -> str:
        """Counts, reporting progress."""
        for i in range(to):
            await ctx.report_progress(i, to)
            await asyncio.sleep(0.01)
        return f"counted to {to}"

elif KIND == "oauth":

    @mcp.tool()
    def whoami() -> str:
        """Answers only with a valid token."""
        return "token ok"

else:

    @mcp.tool()
    def echo(text: str) -> str:
        """Echo text back."""
        return f"echo: {text}"

    @mcp.tool()
    async def slow(seconds: float, ctx: Context) -> str:
        """Sleep, reporting progress every tenth of the time."""
        for i in range(10):
            await ctx.report_progress(i, 10, f"step {i}")
            await asyncio.sleep(seconds / 10)
        return f"slept {seconds}s"

    @mcp.tool()
    async def hang() -> str:
        """Never answers."""
        await asyncio.sleep(3600)
        return "unreachable"


app = mcp.sse_app() if KIND == "legacy" else mcp.streamable_http_app()


async def respond(send, status, body, content_type=b"text/plain"):
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


def log(event):
    print(json.dumps(event), file=sys.stderr, flush=True)


async def token_endpoint(headers, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    if headers.get("authorization") != expected or b"grant_type=client_credentials" not in body:
        log({"event": "token_refused"})
        return await respond(send, 401, b'{"error": "invalid_client"}', b"application/json")
    token = f"tok-{len(ISSUED) + 1}-{time.monotonic()}"
    ISSUED[token] = time.monotonic() + LIFETIME
    log({"event": "token_issued"})
    answer = {"access_token": token, "token_type": "Bearer", "expires_in": int(LIFETIME)}
    await respond(send, 200, json.dumps(answer).encode(), b"application/json")


async def guarded(scope, receive, send):
    if scope["type"] == "http":
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        log({"method": scope["method"], "path": scope["path"], "headers": headers})
        if KIND == "oauth":
            if scope["path"] == "/token":
                return await token_endpoint(headers, receive, send)
            token = headers.get("authorization", "").removeprefix("Bearer ")
            if ISSUED.get(token, 0) <= time.monotonic():
                log({"event": "expired_or_unknown_token"})
                return await respond(send, 401, b"token expired")
        if TOKEN is not None and headers.get("authorization") != f"Bearer {TOKEN}":
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"bad token"})
            return
    await app(scope, receive, send)


class Ready(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print("ready", flush=True)


Ready(uvicorn.Config(guarded, host="127.0.0.1", port=PORT, log_level="warning", lifespan="on")).run()
