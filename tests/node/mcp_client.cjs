// The official MCP TypeScript SDK's client through the gateway (run by tests/mcp.rs):
//   node mcp_client.cjs URL BEARER
// lists the tools, calls jira_get_issue and slow_slow (with progress), and prints one JSON line.
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");

async function main() {
  const [url, bearer] = process.argv.slice(2);
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${bearer}` } },
  });
  const client = new Client({ name: "portcullis-test", version: "1.0.0" });
  await client.connect(transport);
  const tools = (await client.listTools()).tools.map((t) => t.name).sort();
  const issue = await client.callTool({ name: "jira_get_issue", arguments: { key: "TS-1" } });
  const progress = [];
  const slept = await client.callTool(
    { name: "slow_slow", arguments: { seconds: 0.3 } },
    undefined,
    { onprogress: (p) => progress.push(p.progress) },
  );
  let unknown = null;
  try {
    await client.callTool({ name: "jira_missing", arguments: {} });
  } catch (e) {
    unknown = String(e.message);
  }
  console.log(JSON.stringify({
    protocolVersion: transport.protocolVersion ?? null,
    sessionId: transport.sessionId ? "set" : null,
    tools,
    issue: issue.content[0].text,
    slept: slept.content[0].text,
    progress,
    unknown,
  }));
  await transport.terminateSession();
  await client.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
