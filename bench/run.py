#!/usr/bin/env python3
"""`make bench`: what the gateway costs over calling the provider directly.

Every data-plane scenario measures the direct path (client -> simulated provider) and the gateway
path (client -> gateway -> simulated provider) in the same run, alternating, several times, and
reports the median of the paired differences, so the figures hold on a noisy shared machine.
Load comes from oha; only the streaming timings need a client that sees individual chunks.
Writes one Markdown table to stdout and to bench/results/latest.md.
"""

import argparse
import base64
import concurrent.futures
import ctypes
import http.client
import json
import math
import os
import pathlib
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
# The bench's floor: a bare reverse proxy (bench/floor) on the same stack, no parsing or translation.
FLOOR = "floor"
# The peer: agentgateway built by bench/peer/build.sh, measured when its binary is in the cache.
PEERS = pathlib.Path.home() / ".cache" / "portcullis" / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def peer_binary():
    found = sorted(PEERS.glob("agentgateway-*/agentgateway"))
    return found[-1] if found else None


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, args, env=None, log_path=None):
        self.log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=self.log, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def cpu_seconds(self):
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def status_kib(self, key):
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def rss_mib(self):
        return self.status_kib("VmRSS") / 1024

    def peak_rss_mib(self):
        return self.status_kib("VmHWM") / 1024

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def wait_http(url, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} never answered 200")


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def post_status(url, body, headers=None):
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Kubectl:
    def __init__(self, binary, kubeconfig):
        self.binary, self.env = binary, {**os.environ, "KUBECONFIG": kubeconfig}

    def run(self, *args, stdin=None):
        out = subprocess.run([self.binary, *args], input=stdin, env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout


def secret_yaml(ns, name, key):
    return f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\nstringData:\n  apiKey: {key}\n"


def api_key_yaml(ns, name, key):
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n"
            f"    portcullis.dev/api-key: \"true\"\nstringData:\n  apiKey: {key}\n")


def route_yaml(ns, name, route_type, api_base, secret="bench-key"):
    return (f"apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
            f"spec:\n  routeType: {route_type}\n  model:\n    provider: openai\n    name: gpt-4o-mini\n"
            f"    apiBase: {api_base}\n    secretRef:\n      name: {secret}\n")


def reconcile_totals(metrics_url):
    """Table rebuilds so far and the seconds they took, from the gateway's metrics."""
    count, total = 0.0, 0.0
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("portcullis_reconciles_total "):
                count = float(line.split()[1])
            elif line.startswith("portcullis_reconcile_duration_seconds_sum "):
                total = float(line.split()[1])
    return count, total


def wait_quiet(metrics_url, quiet=3.0, timeout=180.0):
    """Waits until no table rebuild happened for `quiet` seconds (status writes after a sync settle)."""
    deadline = time.monotonic() + timeout
    last, since = reconcile_totals(metrics_url)[0], time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.5)
        now = reconcile_totals(metrics_url)[0]
        if now != last:
            last, since = now, time.monotonic()


def pool_yaml(ns, name, api_base, secret="bench-key"):
    """A chat Route with two equal backends on the same provider: the policy layer's healthy path."""
    backend = (f"  - provider: openai\n    name: gpt-4o-mini\n    apiBase: {api_base}\n"
               f"    secretRef:\n      name: {secret}\n")
    return (f"apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
            f"spec:\n  routeType: llm/v1/chat\n  backends:\n{backend}{backend}")


# --- load generation ---------------------------------------------------------------------------

# Callers of the provider itself must authenticate; callers of the gateway never send a key.
DIRECT_AUTH = "authorization: Bearer sk-bench-direct"


def oha(oha_bin, url, body, concurrency, n=None, duration=None, header=None):
    args = [oha_bin, "--no-tui", "--output-format", "json", "-m", "POST", "-T", "application/json",
            "-d", body, "-c", str(concurrency)]
    if "/openai/v1/" in url:
        args += ["-H", DIRECT_AUTH]
    if header:
        args += ["-H", header]
    args += ["-n", str(n)] if n else ["-z", duration]
    out = subprocess.run(args + [url], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr}")
    result = json.loads(out.stdout)
    codes = result.get("statusCodeDistribution", {})
    if set(codes) - {"200"}:
        raise RuntimeError(f"non-200 answers from {url}: {codes}")
    return result


def oha_ok(result):
    return sum(v for k, v in result.get("statusCodeDistribution", {}).items() if k == "200")


def paired(reps, *fns):
    """Runs the measurements in turn, rotating which goes first; returns one tuple per rep, in the
    order of `fns` (direct first by convention)."""
    rows = []
    for i in range(reps):
        results = [None] * len(fns)
        for k in range(len(fns)):
            j = (i + k) % len(fns)
            results[j] = fns[j]()
        rows.append(tuple(results))
    return rows


def median_diff(pairs, key, side=1, base=0):
    return statistics.median(key(p[side]) - key(p[base]) for p in pairs)


def median_of(pairs, side, key):
    return statistics.median(key(p[side]) for p in pairs)


# --- exact per-request counts under callgrind ---------------------------------------------------

ALLOCATOR_ENTRY = re.compile(r"^_rjem_(malloc|mallocx|calloc|realloc|rallocx)\b")


def allocator_calls(path):
    """Calls into the allocator's entry points recorded in a callgrind output file."""
    names, target, total = {}, None, 0
    for line in open(path, errors="replace"):
        if line.startswith(("fn=", "cfn=")):
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.strip())
            if m:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    target = names.get(m.group(1), "")
        elif line.startswith("calls=") and target is not None:
            if ALLOCATOR_ENTRY.match(target):
                total += int(line.split("=", 1)[1].split()[0])
            target = None
    return total


# --- the machine's idle state ---------------------------------------------------------------------

HALT_POLL = pathlib.Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
# The kernel's default halt-poll window (drivers/cpuidle/cpuidle-haltpoll.c).
KERNEL_HALT_POLL_NS = 200000


def set_halt_poll(keep):
    """On a KVM guest whose idle driver is haltpoll, a CPU going idle polls for up to
    guest_halt_poll_ns before it halts; a halted vCPU is woken by the host tens of microseconds
    later. Some VM images boot with the window at 0 (this bench's machine does), which inflates every
    figure here that crosses a process boundary, the floor's and the peer's too (two to four times
    in the cache rows). Like pyperf's
    `system tune`, the run uses the kernel's default window and restores the VM's after; `keep`
    measures as the machine is. Returns (the note for the results, how to restore)."""
    try:
        booted = int(HALT_POLL.read_text())
    except (OSError, ValueError):
        return "", lambda: None
    if keep or booted != 0:
        return f"Idle: haltpoll, guest_halt_poll_ns {booted} (as the machine is).", lambda: None
    try:
        HALT_POLL.write_text(str(KERNEL_HALT_POLL_NS))
    except OSError:
        return f"Idle: haltpoll, guest_halt_poll_ns {booted} (as the machine is; not root, not changed).", lambda: None
    note = (f"Idle: haltpoll, guest_halt_poll_ns {KERNEL_HALT_POLL_NS}, the kernel's default, for the run "
            f"(this VM boots with {booted}; restored after; --keep-idle measures as booted).")
    return note, lambda: HALT_POLL.write_text(str(booted))


def callgrind_counts(work, kubeconfig, oha_bin, body, n, binary=RELEASE / "portcullis"):
    """(allocator calls, instructions) of the gateway while it proxies `n` chat calls, counted by
    callgrind from the moment the counters are zeroed after a warm-up."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="callgrind-", dir=work))
    out = work / "callgrind.out"
    port, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env["KUBECONFIG"] = kubeconfig
    # `binary` may carry flags after it ("path --no-pass-through"), to count one build two ways.
    binary, *flags = str(binary).split()
    p = Process(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "run",
                 "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}", "--namespace", "bench",
                 *flags],
                env=env, log_path=work / "gateway-callgrind.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=300)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        oha(oha_bin, url, body, 4, n=200)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, stdout=subprocess.DEVNULL)
        oha(oha_bin, url, body, 4, n=n)
        subprocess.run(["callgrind_control", "-d", "window", str(p.pid)], check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(work.glob("callgrind.out.*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        p.stop()
    dump = sorted(work.glob("callgrind.out.*"))[0]
    instructions = next(int(l.split()[1]) for l in open(dump, errors="replace") if l.startswith(("summary:", "totals:")))
    return allocator_calls(dump), instructions


def callgrind_scenario(args, work, procs, row, quick, kubectl, kubeconfig):
    """Scenario 7 alone, for this build and each `--compare` binary: instructions and allocator
    calls per proxied chat call, side by side (an A/B of a refactor)."""
    sim_port = free_port()
    procs.append(Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}", "--words", "20"],
                         log_path=work / "sim.log"))
    wait_port(sim_port)
    kubectl.run("apply", "-f", "-", stdin=secret_yaml("bench", "bench-key", "sk-bench-1") + "---\n"
                + route_yaml("bench", "chat", "llm/v1/chat", f"http://127.0.0.1:{sim_port}/openai/v1"))
    # No wait for Ready: the gateway that writes the status starts under callgrind, and its /readyz
    # waits for the initial sync that puts the Route in its table.
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
    n = 200 if quick else 1000
    this = RELEASE / "portcullis"
    builds = [("this build, pass-through", this), ("this build, translating (--no-pass-through)",
                                                    f"{this} --no-pass-through")]
    for label, binary in builds + [c.split("=", 1) for c in args.compare]:
        log(f"callgrind: {label} ({binary})")
        calls, instructions = callgrind_counts(work, kubeconfig, args.oha, body, n, binary)
        row("per request", f"instructions per proxied chat call (callgrind), {label}", "",
            f"{instructions / n / 1000:.1f}k", "", "reported")
        row("per request", f"allocations (allocator calls) per proxied chat call, {label}", "",
            f"{calls / n:.1f}", "", "reported")


def content_times(host, port, path, body):
    """(seconds, answer bytes so far) at each read of a chat stream that carried answer text."""
    payload = body.encode()
    auth = f"{DIRECT_AUTH}\r\n" if path.startswith("/openai/") else ""
    request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{auth}"
               f"connection: close\r\ncontent-length: {len(payload)}\r\n\r\n").encode() + payload
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    s.sendall(request)
    seen, total = [], 0
    with s:
        while data := s.recv(65536):
            texts = re.findall(rb'"content":("(?:[^"\\]|\\.)*")', data)
            got = sum(len(json.loads(t)) for t in texts)
            if got:
                total += got
                seen.append((time.perf_counter() - start, total))
    return seen


def guardrails_scenario(args, work, procs, row, quick, kubectl, start_gateway):
    """Scenario 8: what guardrails cost. CPU per call of the seven built-in detectors on a 4 KiB
    prompt (masking, both phases) against the same Route without a policy; and a response policy's
    effect on a stream's time to first byte, against the time the provider takes to send the
    policy's hold-back (a stream's text is released only once no match can still start in it)."""
    kubectl.run("wait", "--for=condition=Established", "crd/guardrailpolicies.portcullis.dev", "--timeout=60s")
    sim_port, stream_port = free_port(), free_port()
    procs.append(Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}", "--words", "20"],
                         log_path=work / "sim-guard.log"))
    procs.append(Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{stream_port}", "--words", "60",
                          "--chunk-delay-ms", "2"], log_path=work / "sim-guard-stream.log"))
    wait_port(sim_port)
    wait_port(stream_port)
    base = lambda port: f"http://127.0.0.1:{port}/openai/v1"
    checks = "".join(f"  - {{name: {b}, action: mask, detector: {{builtin: {b}}}}}\n"
                     for b in ("email", "phone", "card", "iban", "ssn", "ip", "secret"))
    policy = lambda name, body: (f"apiVersion: portcullis.dev/v1alpha1\nkind: GuardrailPolicy\nmetadata:\n"
                                 f"  name: {name}\n  namespace: guard\nspec:\n  checks:\n{body}")
    streamed = ("  - {name: cards, phase: response, action: mask, detector: {builtin: card}}\n"
                "  - {name: mail, phase: response, action: mask, detector: {builtin: email}}\n"
                "  - {name: tickets, phase: response, action: mask, detector: {regex: 'TCK-[0-9]{6}'}}\n")
    guarded = lambda name, port, pol: route_yaml("guard", name, "llm/v1/chat", base(port)) + f"  guardrails: [{pol}]\n"
    kubectl.run("create", "namespace", "guard")
    kubectl.run("apply", "-f", "-", stdin="---\n".join([
        secret_yaml("guard", "bench-key", "sk-bench-1"),
        policy("builtins", checks), policy("streamed", streamed),
        route_yaml("guard", "plain", "llm/v1/chat", base(sim_port)),
        guarded("guarded", sim_port, "builtins"),
        route_yaml("guard", "stream", "llm/v1/chat", base(stream_port)),
        guarded("stream-guarded", stream_port, "streamed"),
    ]))
    gw, port = start_gateway("gateway-guard", ["--namespace", "guard"])
    for r in ("plain", "guarded", "stream", "stream-guarded"):
        kubectl.run("wait", "-n", "guard", "--for=condition=Ready", f"route.portcullis.dev/{r}", "--timeout=30s")
    kubectl.run("wait", "-n", "guard", "--for=condition=Ready", "guardrailpolicy/streamed", "--timeout=30s")
    message = kubectl.run("get", "-n", "guard", "guardrailpolicy/streamed", "-o",
                          "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}")
    hold = int(re.search(r"held back (\d+) bytes", message).group(1))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    # 4 KiB of ordinary prose: nothing to mask, so every detector scans it all and finds nothing.
    words = ("the quarterly report shows revenue grew in every region while costs held steady "
             "and the team plans to hire two engineers for the platform group next spring ").split()
    prompt = " ".join(words[i % len(words)] for i in range(4096 // 5))[:4096]
    body = lambda model: json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})
    for model in ("plain", "guarded"):
        oha(args.oha, url, body(model), 4, n=300)

    def cpu_c64(model):
        before = gw.cpu_seconds()
        r = oha(args.oha, url, body(model), 64, duration="3s" if quick else "10s")
        return {"cpu": (gw.cpu_seconds() - before) / max(oha_ok(r), 1) * 1e6}

    pairs = paired(max(3, args.reps - 2), lambda: cpu_c64("plain"), lambda: cpu_c64("guarded"))
    cpu_key = lambda r: r["cpu"]
    added = median_diff(pairs, cpu_key)
    row("guardrails, 4 KiB prompt, c=64", "gateway CPU per request (µs), no policy → 7 built-in detectors",
        f"{median_of(pairs, 0, cpu_key):.1f}", f"{median_of(pairs, 1, cpu_key):.1f}", f"{added:+.1f}",
        "≤ +15", added <= 15)

    stream_body = lambda model: json.dumps({"model": model, "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]})
    n = 20 if quick else 100
    plain, guarded_ttfb, to_hold = [], [], []
    for _ in range(n):
        p = content_times("127.0.0.1", port, "/v1/chat/completions", stream_body("stream"))
        g = content_times("127.0.0.1", port, "/v1/chat/completions", stream_body("stream-guarded"))
        if not p or not g:
            raise RuntimeError("a stream delivered no text")
        plain.append(p[0][0])
        guarded_ttfb.append(g[0][0])
        # When the unguarded stream had delivered more than the hold-back: the earliest the guarded
        # one can release its first byte.
        to_hold.append(next((t for t, total in p if total > hold), p[-1][0]) - p[0][0])
    ttfb_added = statistics.median(g - p for p, g in zip(plain, guarded_ttfb)) * 1e6
    allowed = statistics.median(to_hold) * 1e6
    row("guardrails stream, c=1", f"time to first text (µs), no policy → a response policy holding back {hold} bytes",
        f"{statistics.median(plain) * 1e6:.0f}", f"{statistics.median(guarded_ttfb) * 1e6:.0f}",
        f"{ttfb_added:+.0f}", f"≤ its hold-back's arrival ({allowed:.0f}) + 500", ttfb_added <= allowed + 500)
    gw.stop()


def fill_token_cache(url, body, n, workers=16):
    """Calls `url` once with each of `n` distinct bearers the API server rejects (each is reviewed
    once, then cached by the gateway). They pass the gateway's local checks (structure, `exp`, `aud`):
    only the signature is wrong, which only the API server can tell."""
    from urllib.parse import urlsplit
    parts, local = urlsplit(url), threading.local()

    def call(i):
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        claims = json.dumps({"sub": f"bench-{i:07d}", "aud": ["portcullis"], "exp": 4102444800}).encode()
        token = f"eyJhbGciOiJSUzI1NiJ9.{base64.urlsafe_b64encode(claims).decode().rstrip('=')}.c2lnbmF0dXJl"
        conn.request("POST", parts.path, body=body, headers={"content-type": "application/json",
                                                           "authorization": f"Bearer {token}"})
        r = conn.getresponse()
        r.read()
        return r.status

    # Since the second hardening pass a credential that fails review is a 401 (never anonymous);
    # the review is cached all the same.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for status in pool.map(call, range(n)):
            if status not in (200, 401):
                raise RuntimeError(f"a token-cache filling call answered {status}")


def token_reviews(metrics_url):
    """TokenReviews the gateway has made, from its metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        return sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                   if line.startswith("portcullis_token_reviews_total"))


# --- streaming client: sees each chunk as it arrives -----------------------------------------

# One keep-alive connection per target, as SDK clients keep theirs: the streaming figures then
# compare with the non-streaming ones (oha also reuses its connections) instead of adding a new
# TCP connection and, for a proxy that forwards `connection: close`, a new upstream one.
_stream_conns = {}


def stream_once(host, port, path, body, retry=True):
    """Returns (time to first data byte, total time, number of reads that delivered a data frame)."""
    payload = body.encode()
    auth = f"{DIRECT_AUTH}\r\n" if path.startswith("/openai/") else ""
    request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{auth}"
               f"content-length: {len(payload)}\r\n\r\n").encode() + payload
    s = _stream_conns.get((host, port))
    if s is None:
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _stream_conns[(host, port)] = s
    start = time.perf_counter()
    s.sendall(request)
    first = None
    frames_reads = 0
    head_done = False
    buf = tail = b""
    while True:
        data = s.recv(65536)
        if not data:
            _stream_conns.pop((host, port), None)
            s.close()
            if retry and not buf:
                # The server closed the idle kept-alive connection: once more on a new one.
                return stream_once(host, port, path, body, retry=False)
            break
        if not head_done:
            buf += data
            if b"\r\n\r\n" not in buf:
                continue
            head_done = True
            data = buf.split(b"\r\n\r\n", 1)[1]
        if b"data:" in data:
            frames_reads += 1
            if first is None:
                first = time.perf_counter() - start
        # The chunked body's last chunk ends the answer; the connection stays open for the next.
        tail = (tail + data)[-16:]
        if tail.endswith(b"\r\n0\r\n\r\n") or tail == b"0\r\n\r\n":
            break
    return first, time.perf_counter() - start, frames_reads


# --- scenarios -----------------------------------------------------------------------------------

def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout


def lua_script(name):
    """The text of a Lua script constant of src/limits.rs (what the gateway loads into the store)."""
    src = (ROOT / "src" / "limits.rs").read_text()
    m = re.search(rf'const {name}: &str = r"\n(.*?)";', src, re.S)
    return m.group(1)


def keepalive_load(url, body, concurrency, seconds):
    """Closed-loop POSTs on kept-alive connections from `concurrency` threads for `seconds`; the
    number answered 200. Enough load to count the store's work per call (not to time the gateway)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    deadline = time.monotonic() + seconds
    done = [0] * concurrency

    def worker(i):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while time.monotonic() < deadline:
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                done[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def store_scenario(args, work, procs, row, quick):
    """The shared store's cost: round trips per call and the store CPU per 1,000 calls with a gateway
    under load, and the calls/s one Redis core sustains with the gateway's scripts (redis-benchmark
    running the admit and settle scripts at saturation). Runs `portcullis serve` on files."""
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        log("store scenario skipped: redis-server/redis-benchmark not installed (make redis)")
        return
    log("scenario: the shared store (Redis)")
    redis_port, sim_port, gw_port, gw_mport = free_port(), free_port(), free_port(), free_port()
    redis = Process(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"], log_path=work / "redis.log")
    procs.append(redis)
    bins = pathlib.Path(args.bin_dir)
    sim = Process([str(bins / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}", "--words", "20"],
                  log_path=work / "sim-store.log")
    procs.append(sim)
    wait_port(redis_port)
    wait_port(sim_port)
    # A route with a calls limit, a token budget and a USD budget: three counters per call, and a
    # settlement (tokens and USD) once the usage is known.
    routes = (
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bench-key\nstringData:\n  apiKey: sk-bench-1\n---\n"
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: limited\nspec:\n"
        "  routeType: llm/v1/chat\n  model:\n    provider: openai\n    name: gpt-4o-mini\n"
        f"    apiBase: http://127.0.0.1:{sim_port}/openai/v1\n    secretRef:\n      name: bench-key\n"
        "  pricing:\n    inputPerMillion: 1\n    outputPerMillion: 1\n"
        "  limits:\n    - renewalPeriod: day\n      calls: 1000000000\n      tokens: 100000000000\n"
        "      usd: 1000000\n")
    (work / "store-routes.yaml").write_text(routes)
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("PORTCULLIS_")}
    gw = Process([str(bins / "portcullis"), "serve", "--config", str(work / "store-routes.yaml"),
                  "--listen", f"127.0.0.1:{gw_port}", "--metrics-listen", f"127.0.0.1:{gw_mport}",
                  "--limits-store", f"redis://127.0.0.1:{redis_port}",
                  # Every call must reach the store to be counted here: no fallback on a busy machine.
                  "--store-timeout", "2s"], env=env, log_path=work / "gateway-store.log")
    procs.append(gw)
    wait_http(f"http://127.0.0.1:{gw_port}/readyz", timeout=60)
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    body = json.dumps({"model": "limited", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
    keepalive_load(url, body, 4, 1)

    def commands():
        stats = {}
        for line in redis_cli(redis_port, "INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([a-z|]+):calls=(\d+)", line)
            if m:
                stats[m.group(1)] = int(m.group(2))
        return stats

    time.sleep(0.5)
    before, cpu_before = commands(), redis.cpu_seconds()
    seconds = 3 if quick else 10
    calls = max(keepalive_load(url, body, 16, seconds), 1)
    time.sleep(0.5)  # settlements run in the background
    after, cpu_after = commands(), redis.cpu_seconds()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw_mport}/metrics", timeout=10).read().decode()
    store_errors = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("portcullis_limits_store_errors_total"))
    # Commands a client sent (scripts and what they run inside are one round trip each).
    trips = sum(after.get(k, 0) - before.get(k, 0) for k in ("evalsha", "eval", "set", "script|load"))
    cpu_ms = (cpu_after - cpu_before) * 1000
    row("shared store (Redis)", "store round trips per call (3 counters: calls, tokens, USD; admit + settle"
        f" when the usage differs from the reservation; {store_errors:.0f} store errors)", "",
        f"{trips / calls:.2f}", "", "≤ 2", trips / calls <= 2.05 and store_errors == 0)
    row("shared store (Redis)", f"store CPU per 1,000 calls (ms), one gateway at c=16 ({calls / seconds:.0f} calls/s)",
        "", f"{cpu_ms / calls * 1000:.1f}", "", "reported")

    # Saturation: the admit and settle scripts alone, as many clients as replicas would be.
    admit_sha = redis_cli(redis_port, "SCRIPT", "LOAD", lua_script("ADMIT_SCRIPT")).strip()
    settle_sha = redis_cli(redis_port, "SCRIPT", "LOAD", lua_script("SETTLE_SCRIPT")).strip()
    n = 20000 if quick else 200000

    def rps(*command):
        out = subprocess.run(["redis-benchmark", "-p", str(redis_port), "-c", "50", "-n", str(n), "-r", "1000",
                              "--csv", *command], capture_output=True, text=True, check=True).stdout
        # "test","rps",... then one line per command
        return float(out.strip().splitlines()[-1].split(",")[1].strip('"'))

    keys = ["portcullis:bench:0:calls:*:__rand_int__", "portcullis:bench:0:tokens:*:__rand_int__",
            "portcullis:bench:0:usd:*:__rand_int__"]
    admit_args = []
    for _ in keys:
        admit_args += ["1000000000000", "1", "1", "86400"]
    admit = rps("EVALSHA", admit_sha, "3", *keys, *admit_args)
    settle = rps("EVALSHA", settle_sha, "2", *keys[1:], "-1", "-1")
    per_core = 1 / (1 / admit + 1 / settle)
    row("shared store (Redis)", "calls/s one Redis core sustains with the gateway's scripts (admit + settle, 3 counters)",
        "", f"{per_core:,.0f}", "", "reported")
    row("shared store (Redis)", "admit script alone / settle script alone (calls/s)", "",
        f"{admit:,.0f} / {settle:,.0f}", "", "reported")
    gw.stop()
    redis.stop()
    sim.stop()


def sequential_us(url, bodies):
    """Each body POSTed in turn on one kept-alive connection; the time of each call (µs)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times = []
    for body in bodies:
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        times.append((time.perf_counter() - t0) * 1e6)
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")
    conn.close()
    return times


def redis_rtt_us(port, n):
    """The median time of one GET round trip to the store, from a raw socket (as little client as
    Python allows: what a lookup's round trip costs, plus Python's share)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"*2\r\n$3\r\nGET\r\n$21\r\nportcullis:cache:none\r\n")
        s.recv(64)
        times.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return statistics.median(times)


# How much further away the far rows move the store (and, for the control, the provider): far
# enough that this VM's slower wake-ups after a long idle stay small beside it.
FAR = 2e-3


class DelayProxy:
    """A TCP proxy to 127.0.0.1:`port` that holds each read from its client `delay` seconds before
    passing it on (answers pass at once): the store that far away, for every command, pipelined or
    not. Threads, not asyncio: its timers have millisecond resolution."""

    def __init__(self, port, delay):
        self.delay, self.target = delay, port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _precise_timers():
        # The kernel's default timer slack (50 µs) would add to every hold.
        try:
            ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
        except (OSError, AttributeError):
            pass

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [client, upstream]
            held = queue.Queue()
            threading.Thread(target=self._read, args=(client, held), daemon=True).start()
            threading.Thread(target=self._hold, args=(held, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _read(self, src, held):
        while data := self._recv(src):
            held.put((time.perf_counter() + self.delay, data))
        held.put((0, b""))

    def _hold(self, held, dst):
        self._precise_timers()
        while (item := held.get())[1]:
            due, data = item
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            if not self._send(dst, data):
                break
        dst.close()

    def _copy(self, src, dst):
        while (data := self._recv(src)) and self._send(dst, data):
            pass
        dst.close()

    @staticmethod
    def _recv(s):
        try:
            return s.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _send(s, data):
        try:
            s.sendall(data)
            return True
        except OSError:
            return False

    def stop(self):
        self.listener.close()
        for s in self.socks:
            s.close()


def metric_total(url, name):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def histogram_reader(url, histogram, labels=""):
    """A reader of the histogram's (sum, count) at `url`; `mean_between` turns two readings into the
    mean of what was observed between them."""
    return lambda: tuple(metric_total(url, f"{histogram}_{part}{labels}") for part in ("sum", "count"))


def mean_between(before, after):
    return (after[0] - before[0]) / max(after[1] - before[1], 1) * 1e6


def cache_scenario(args, work, procs, row, quick):
    """The response cache (issue 24): a hit against the provider called directly and against a live
    call through the gateway, on the per-replica store and on Redis, and what a miss adds over a
    call on a Route that does not cache, with the store nearby and FAR further away (how many
    round trips it waits for). Runs `portcullis serve` on files (no control plane)."""
    log("scenario: the response cache")
    bins = pathlib.Path(args.bin_dir)
    sim_port = free_port()
    sim = Process([str(bins / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}", "--words", "20"],
                  log_path=work / "sim-cache.log")
    procs.append(sim)
    wait_port(sim_port)
    # The control of the far rows: the provider FAR further away, for a Route that does not cache.
    far_sim = DelayProxy(sim_port, FAR)
    route = ("apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\nspec:\n"
             "  routeType: llm/v1/chat\n  model:\n    provider: openai\n    name: gpt-4o-mini\n"
             "    apiBase: http://127.0.0.1:{port}/openai/v1\n    secretRef:\n      name: bench-key\n"
             "  pricing:\n    inputPerMillion: 1\n    outputPerMillion: 1\n{cache}")
    routes = ("apiVersion: v1\nkind: Secret\nmetadata:\n  name: bench-key\nstringData:\n  apiKey: sk-bench-1\n---\n"
              + route.format(name="live", port=sim_port, cache="") + "---\n"
              + route.format(name="live-far", port=far_sim.port, cache="") + "---\n"
              + route.format(name="cached", port=sim_port, cache="  cache:\n    scope: route\n"))
    (work / "cache-routes.yaml").write_text(routes)
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("PORTCULLIS_")}

    def gateway(name, extra):
        port, mport = free_port(), free_port()
        p = Process([str(bins / "portcullis"), "serve", "--config", str(work / "cache-routes.yaml"),
                     "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}", *extra],
                    env=env, log_path=work / f"{name}.log")
        procs.append(p)
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
        p.metrics_url = f"http://127.0.0.1:{mport}/metrics"
        return p, f"http://127.0.0.1:{port}/v1/chat/completions"

    local, local_url = gateway("gateway-cache-local", [])
    chat = lambda model, text="Say hello to the benchmark": json.dumps(
        {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": text}]})
    direct_url = f"http://127.0.0.1:{sim_port}/openai/v1/chat/completions"
    n_c1 = 300 if quick else 3000
    dur = "3s" if quick else "10s"
    for url, body in ((direct_url, chat("gpt-4o-mini")), (local_url, chat("live")), (local_url, chat("cached"))):
        oha(args.oha, url, body, 4, n=500)
    p50 = lambda r: r["latencyPercentiles"]["p50"] * 1e6
    rps = lambda r: r["summary"]["requestsPerSec"]
    hits_before = metric_total(local.metrics_url, "portcullis_cache_hits_total")
    in_gateway = histogram_reader(local.metrics_url, "gen_ai_server_request_duration_seconds", '{route="cached"')
    server_before = in_gateway()
    pairs = paired(args.reps, lambda: oha(args.oha, direct_url, chat("gpt-4o-mini"), 1, n=n_c1),
                   lambda: oha(args.oha, local_url, chat("cached"), 1, n=n_c1),
                   lambda: oha(args.oha, local_url, chat("live"), 1, n=n_c1))
    hit50 = median_of(pairs, 1, p50)
    row("cache hit, c=1, per-replica store", "latency p50 (µs), client to client; gateway: hit (live call)",
        f"{median_of(pairs, 0, p50):.0f}", f"{hit50:.0f} ({median_of(pairs, 2, p50):.0f})",
        f"{median_diff(pairs, p50):+.0f}", "≤ 50", hit50 <= 50)
    server_after = in_gateway()
    hits = metric_total(local.metrics_url, "portcullis_cache_hits_total") - hits_before
    if server_after[1] > server_before[1]:
        per_hit = mean_between(server_before, server_after)
        row("cache hit, c=1, per-replica store", f"time in the gateway per hit, mean (µs; {hits:.0f} hits)", "",
            f"{per_hit:.1f}", "", "≤ 50", per_hit <= 50)
    pairs = paired(max(3, args.reps - 2), lambda: oha(args.oha, direct_url, chat("gpt-4o-mini"), 64, duration=dur),
                   lambda: oha(args.oha, local_url, chat("cached"), 64, duration=dur),
                   lambda: oha(args.oha, local_url, chat("live"), 64, duration=dur))
    direct_rps, hit_rps, live_rps = (median_of(pairs, i, rps) for i in range(3))
    row("cache hits, c=64, per-replica store", "throughput (req/s); gateway: hits (live calls)", f"{direct_rps:.0f}",
        f"{hit_rps:.0f} ({live_rps:.0f})", f"{hit_rps / direct_rps:.2f}× of direct, {hit_rps / live_rps:.2f}× of live",
        "reported")
    local.stop()

    if not shutil.which("redis-server"):
        log("cache scenario on Redis skipped: redis-server not installed (make redis)")
        far_sim.stop()
        sim.stop()
        return
    redis_port = free_port()
    redis = Process(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"], log_path=work / "redis-cache.log")
    procs.append(redis)
    wait_port(redis_port)
    shared, shared_url = gateway("gateway-cache-redis", ["--cache-store", f"redis://127.0.0.1:{redis_port}",
                                                         "--store-timeout", "1s"])
    for body in (chat("live"), chat("cached")):
        oha(args.oha, shared_url, body, 4, n=500)
    pairs = paired(args.reps, lambda: oha(args.oha, direct_url, chat("gpt-4o-mini"), 1, n=n_c1),
                   lambda: oha(args.oha, shared_url, chat("cached"), 1, n=n_c1))
    redis_hit50 = median_of(pairs, 1, p50)
    row("cache hit, c=1, Redis", "latency p50 (µs), client to client", f"{median_of(pairs, 0, p50):.0f}",
        f"{redis_hit50:.0f}", f"{median_diff(pairs, p50):+.0f}", "reported")
    pairs = paired(max(3, args.reps - 2), lambda: oha(args.oha, direct_url, chat("gpt-4o-mini"), 64, duration=dur),
                   lambda: oha(args.oha, shared_url, chat("cached"), 64, duration=dur))
    row("cache hits, c=64, Redis", "throughput (req/s)", f"{median_of(pairs, 0, rps):.0f}",
        f"{median_of(pairs, 1, rps):.0f}", f"{median_of(pairs, 1, rps) / median_of(pairs, 0, rps):.2f}× of direct",
        "reported")
    # A miss: every prompt new, so each call looks up, misses, asks the provider and stores; against
    # the same new prompts on the Route that does not cache (which never touches the store).
    n_miss = 100 if quick else 500
    counter = [0]

    def fresh(model):
        counter[0] += 1
        return [chat(model, f"miss {counter[0]} {i}") for i in range(n_miss)]

    def added(gw, url, model, waits):
        """What a call on `model` adds over the same new prompts on the live Route, at p50 and in the
        mean (medians of paired runs), and the mean of what `waits` (a `histogram_reader`) observed over
        its calls (µs). Means go with means: a call's mean is its wait's mean plus the rest's."""
        before, p50s, means = waits(), [], []
        for i in range(args.reps):
            sides = {}
            for m in (("live", model) if i % 2 == 0 else (model, "live")):
                sides[m] = sequential_us(url, fresh(m))
            p50s.append(statistics.median(sides[model]) - statistics.median(sides["live"]))
            means.append(statistics.mean(sides[model]) - statistics.mean(sides["live"]))
        return statistics.median(p50s), statistics.median(means), mean_between(before, waits())

    lookup = "portcullis_cache_lookup_duration_seconds"
    miss_added, miss_mean, lookup_us = added(shared, shared_url, "cached", histogram_reader(shared.metrics_url, lookup))
    rtt = redis_rtt_us(redis_port, 2000)
    # The store's round trip three ways: the misses' own lookups as the gateway timed them, from a
    # bare Python socket in a tight loop, and a hit on Redis against a hit on the per-replica store
    # (the lookup's GET is all they differ by). On loopback the round trip is smaller than the
    # miss's fixed work (key, entry, translating path, one more wake-up): reported, not judged.
    row("cache miss, c=1, Redis", "latency p50 added over a Route that does not cache (µs); "
        "one store round trip: the misses' lookups as the gateway timed them (mean), from Python, "
        "and Redis hit − local hit",
        "", f"{miss_added:+.0f}", f"lookup {lookup_us:.0f}; Python {rtt:.0f}; hits {redis_hit50 - hit50:.0f}",
        "reported")
    # How many round trips a miss waits for: the same misses with the store FAR further away (a
    # proxy holds each command that long). What a miss adds grows by its lookups' growth once per
    # round trip it waits for; its fixed work does not grow.
    proxy = DelayProxy(redis_port, FAR)
    far, far_url = gateway("gateway-cache-redis-far", ["--cache-store", f"redis://127.0.0.1:{proxy.port}",
                                                       "--store-timeout", "1s"])
    far_added, far_mean, far_lookup_us = added(far, far_url, "cached", histogram_reader(far.metrics_url, lookup))
    far.stop()
    proxy.stop()
    trips = (far_mean - miss_mean) / max(far_lookup_us - lookup_us, 1)
    far_ms = f"{FAR * 1e3:g} ms"
    row(f"cache miss, c=1, Redis {far_ms} further away",
        "latency p50 added (µs); store round trips a miss waits for: the growth of its mean added "
        "over the row above's / the lookups' growth (mean)", "", f"{far_added:+.0f}",
        f"lookup {far_lookup_us:.0f}; {trips:.2f} round trips", "≤ one round trip", trips < 1.5)
    # The control: a live call whose provider is FAR further away grows by its wait the same way
    # (this VM runs a process slower after a long idle), with no cache in the call.
    upstream = "gen_ai_client_operation_duration_seconds"
    near_up = histogram_reader(shared.metrics_url, upstream, '{route="live"')
    before = near_up()
    far_live, far_live_mean, far_up_us = added(shared, shared_url, "live-far",
                                               histogram_reader(shared.metrics_url, upstream, '{route="live-far"'))
    near_up_us = mean_between(before, near_up())
    row(f"live call, c=1, provider {far_ms} further away (control)",
        "latency p50 added over the provider nearby (µs); its mean added / the provider calls' growth "
        "(mean)", "", f"{far_live:+.0f}", f"{far_live_mean / max(far_up_us - near_up_us, 1):.2f}× the wait",
        "reported")
    errors = metric_total(shared.metrics_url, "portcullis_cache_store_errors_total")
    if errors:
        log(f"cache scenario: {errors:.0f} store errors")
    shared.stop()
    redis.stop()
    far_sim.stop()
    sim.stop()
# The pool scenario's offered load, a fraction of the servers' nominal capacity (their real one is a
# little lower: timer rounding per streamed chunk).
LOAD = float(os.environ.get("POOL_LOAD", "0.8"))


def pool_scenario(args, work, procs, row, quick, kubectl, kubeconfig):
    """A self-hosted pool: 4 simulated vLLM-like servers (a running batch of 4 each, 20 ms per output
    token, output lengths log-normal with mean ~50 tokens, so one answer takes ~1 s) under Poisson
    arrivals at 80% (POOL_LOAD) of the pool's capacity. The same arrival times and lengths go once round robin
    straight to the servers (a round-robin Service's choice, without the gateway's hop) and once
    through the gateway's own load-aware picker (an InferencePool backend); time to first token p50/p99."""
    servers, batch, ms_per_token, mean_tokens = 4, 4, 20, 50
    bins = pathlib.Path(args.bin_dir)
    port = free_port()
    ips = [f"127.0.0.{i}" for i in range(2, 2 + servers)]
    sim_port = free_port()
    procs.append(Process([str(bins / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}",
                          "--model-servers", ",".join(f"{ip}:{port}" for ip in ips),
                          "--max-running", str(batch), "--ms-per-token", str(ms_per_token)],
                         log_path=work / "sim-pool.log"))
    wait_port(sim_port)
    # Pods (their IPs set through the status subresource: no kubelet here) of an InferencePool
    # without an endpoint picker: the gateway's own picker. (EndpointSlices refuse loopback addresses.)
    crd = ROOT / "deploy" / "third_party" / "gateway-api-inference-extension" / "inferencepools.yaml"
    kubectl.run("apply", "--server-side", "-f", str(crd))
    kubectl.run("wait", "--for=condition=Established", "crd/inferencepools.inference.networking.k8s.io",
                "--timeout=60s")
    for i, ip in enumerate(ips):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"vllm-{i}", "namespace": "bench", "labels": {"app": "llama"}},
               "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]}}
        kubectl.run("apply", "-f", "-", stdin=json.dumps(pod))
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                             "conditions": [{"type": "Ready", "status": "True"}]}}
        kubectl.run("patch", "pod", f"vllm-{i}", "-n", "bench", "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": "bench"},
            "spec": {"selector": {"matchLabels": {"app": "llama"}}, "targetPorts": [{"number": port}]}}
    route = ("apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: llama\n  namespace: bench\n"
             "spec:\n  routeType: llm/v1/chat\n  model:\n    provider: openai-compatible\n    name: llama\n"
             "    inferencePool: {name: llama}\n")
    # The same servers as 4 equal backends of one Route: the gateway's hop without the picker
    # (its weighted choice spreads calls at random), to tell the picker's effect from the hop's.
    spread = ("apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: spread\n  namespace: bench\n"
              "spec:\n  routeType: llm/v1/chat\n  backends:\n" + "".join(
                  f"  - {{provider: openai-compatible, name: llama, apiBase: 'http://{ip}:{port}/v1'}}\n"
                  for ip in ips))
    kubectl.run("apply", "-f", "-", stdin=json.dumps(pool) + "\n---\n" + route + "---\n" + spread)
    gw_port, gw_mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("PORTCULLIS_")}
    env["KUBECONFIG"] = kubeconfig
    procs.append(Process([str(bins / "portcullis"), "run", "--listen", f"127.0.0.1:{gw_port}",
                          "--metrics-listen", f"127.0.0.1:{gw_mport}", "--namespace", "bench",
                          "--pool-scrape-interval-ms", "50"], env=env, log_path=work / "gateway-pool.log"))
    wait_http(f"http://127.0.0.1:{gw_port}/readyz", timeout=120)
    for r in ("llama", "spread"):
        kubectl.run("wait", "-n", "bench", "--for=condition=Ready", f"route.portcullis.dev/{r}", "--timeout=30s")
    deadline = time.monotonic() + 30
    while kubectl.run("get", "route.portcullis.dev/llama", "-n", "bench", "-o",
                      "jsonpath={.status.backends[0].readyEndpoints}").strip() != str(servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the pool's endpoints never showed in the Route's status")
        time.sleep(0.2)

    # One answer takes mean_tokens * ms_per_token; the pool runs servers * batch at once.
    capacity = servers * batch / (mean_tokens * ms_per_token / 1000)
    rate = LOAD * capacity
    seconds = 20 if quick else 60
    rng = random.Random(25)
    sigma = 1.0  # heavy-ish tail: a few answers are 5-10x the mean, as chat answers are
    mu = math.log(mean_tokens) - sigma * sigma / 2
    arrivals, t = [], 0.0
    while t < seconds:
        t += rng.expovariate(rate)
        arrivals.append((t, max(1, min(1000, round(rng.lognormvariate(mu, sigma))))))

    def call(host, port_, path, model, tokens, i):
        body = json.dumps({"model": model, "stream": True, "max_tokens": tokens,
                           "messages": [{"role": "user", "content": f"question {i}: say something"}]})
        conn = http.client.HTTPConnection(host, port_, timeout=120)
        start = time.perf_counter()
        conn.request("POST", path, body, {"content-type": "application/json"})
        resp = conn.getresponse()
        first = None
        while True:
            line = resp.readline()
            if not line:
                break
            if first is None and line.startswith(b"data:"):
                first = time.perf_counter() - start
        conn.close()
        return resp.status, first

    def run(target):
        """Sends every arrival at its time; `target(i)` is (host, port, path, model)."""
        results = [None] * len(arrivals)
        with concurrent.futures.ThreadPoolExecutor(256) as ex:
            t0 = time.perf_counter()
            futures = []
            for i, (at, tokens) in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                futures.append((i, ex.submit(call, *target(i), tokens, i)))
            for i, f in futures:
                results[i] = f.result()
        ok = [first for status, first in results if status == 200 and first is not None]
        failed = len(results) - len(ok)
        ok.sort()
        q = lambda p: ok[min(len(ok) - 1, int(p * len(ok)))] * 1000
        return q(0.5), q(0.99), failed

    log(f"pool: {len(arrivals)} calls at {rate:.1f}/s ({LOAD:.0%} of {capacity:.1f}/s) over {seconds} s, round robin")
    rr = run(lambda i: (ips[i % servers], port, "/v1/chat/completions", "llama"))
    time.sleep(2)
    log("pool: the same calls through the gateway's load-aware picker")
    aware = run(lambda i: ("127.0.0.1", gw_port, "/v1/chat/completions", "llama"))
    time.sleep(2)
    log("pool: the same calls through the gateway, 4 equal backends (random spread)")
    spread = run(lambda i: ("127.0.0.1", gw_port, "/v1/chat/completions", "spread"))
    what = f"{servers} servers x batch {batch}, Poisson at {LOAD:.0%} of capacity, {len(arrivals)} streamed calls"
    for k, name in ((0, "p50"), (1, "p99")):
        row("self-hosted pool", f"time to first token {name} (ms), {what}; direct = round robin to the servers, "
            "gateway = load-aware pool (added: vs round robin)", f"{rr[k]:.0f}", f"{aware[k]:.0f}",
            f"{aware[k] - rr[k]:+.0f}", "reported")
        row("self-hosted pool", f"time to first token {name} (ms), same calls; direct = through the gateway to "
            "4 equal backends (random spread), gateway = load-aware pool (added: vs that)", f"{spread[k]:.0f}",
            f"{aware[k]:.0f}", f"{aware[k] - spread[k]:+.0f}", "reported")
    row("self-hosted pool", "failed calls (round robin / random spread + load-aware)", f"{rr[2]}",
        f"{spread[2] + aware[2]}", "", "0", rr[2] + spread[2] + aware[2] == 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--oha", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--control-plane", required=True, help="hack/control-plane.sh")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small counts, to check the harness itself")
    ap.add_argument("--keep-idle", action="store_true",
                    help="measure with the machine's halt-poll window as it is (see set_halt_poll)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.md"))
    ap.add_argument("--only", choices=["store", "callgrind", "cache", "mcp", "pool", "guardrails"],
                    help="run only this scenario: store or cache (no control plane), callgrind (per-call counts), "
                         "mcp (chat and MCP tools/call at concurrency 1: the MCP row and the chat row it divides by), "
                         "pool (load-aware picking vs round robin), guardrails (their CPU and stream hold-back)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="LABEL=BINARY",
                    help="with --only callgrind: also count these gateway binaries (an earlier commit's), "
                         "each optionally followed by its flags (\"full=target/release/portcullis --no-pass-through\")")
    ap.add_argument("--bin-dir", default=str(RELEASE),
                    help="the gateway's binaries for the store and pool scenarios (the store rows count the store's work, not the gateway's; the pool rows time queues of hundreds of ms)")
    args = ap.parse_args()
    quick = args.quick
    n_c1 = 300 if quick else 3000
    dur_c64 = "3s" if quick else "10s"
    n_routes = 200 if quick else 5000
    n_streams = 100 if quick else 1000

    work = pathlib.Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    peer_bin = peer_binary()
    peer_name = f"agentgateway ({peer_bin.parent.name.split('-', 1)[1]})" if peer_bin else None
    cp_dir = work / "control-plane"
    procs = []
    rows = []

    def row(scenario, figure, direct, gateway, added, target="", met=None, floor="", vs_floor="", peer=""):
        verdict = "" if met is None else ("yes" if met else "**no**")
        rows.append((scenario, figure, direct, floor, peer, gateway, added, vs_floor, target, verdict))

    stopped = None
    idle_note, restore_idle = set_halt_poll(args.keep_idle)
    if idle_note:
        log(idle_note)
    try:
        if args.only == "store":
            store_scenario(args, work, procs, row, quick)
            raise StopIteration
        if args.only == "cache":
            cache_scenario(args, work, procs, row, quick)
            raise StopIteration
        subprocess.run([args.control_plane, "start", str(cp_dir), str(os.getpid())], check=True)
        kubeconfig = str(cp_dir / "kubeconfig")
        kubectl = Kubectl(args.kubectl, kubeconfig)
        kubectl.run("apply", "-f", str(ROOT / "crds"))
        kubectl.run("wait", "--for=condition=Established", "crd/routes.portcullis.dev",
                    "crd/mcpservers.portcullis.dev", "--timeout=60s")
        kubectl.run("create", "namespace", "bench")
        if args.only == "callgrind":
            callgrind_scenario(args, work, procs, row, quick, kubectl, kubeconfig)
            raise StopIteration
        if args.only == "pool":
            pool_scenario(args, work, procs, row, quick, kubectl, kubeconfig)
            raise StopIteration

        sim_port = free_port()
        sim = Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}", "--words", "20"],
                      log_path=work / "sim.log")
        procs.append(sim)
        stream_sim_port = free_port()
        stream_sim = Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{stream_sim_port}",
                              "--words", "20", "--chunk-delay-ms", "2"], log_path=work / "sim-stream.log")
        procs.append(stream_sim)
        slow_sim_port = free_port()
        slow_sim = Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{slow_sim_port}",
                            "--words", "20", "--chunk-delay-ms", "50"], log_path=work / "sim-slow.log")
        procs.append(slow_sim)
        rec_sim_port = free_port()
        rec_sim = Process([str(RELEASE / "portcullis-sim"), "--listen", f"127.0.0.1:{rec_sim_port}", "--record"],
                          log_path=work / "sim-record.log")
        procs.append(rec_sim)

        def start_floor(name, upstream_port):
            port = free_port()
            p = Process([str(RELEASE / "portcullis-floor"), "--listen", f"127.0.0.1:{port}",
                         "--upstream", f"http://127.0.0.1:{upstream_port}/openai", "--header", DIRECT_AUTH],
                        log_path=work / f"{name}.log")
            procs.append(p)
            wait_port(port)
            return p, port

        def start_peer(name, upstream_port):
            """The peer as an OpenAI proxy to `upstream_port`, at its defaults; (None, None) without one."""
            if peer_bin is None:
                return None, None
            port = free_port()
            config = (ROOT / "bench" / "peer" / "agentgateway.yaml").read_text()
            for fixed in ("127.0.0.1:15000", "127.0.0.1:15020", "127.0.0.1:15021"):
                config = config.replace(fixed, f"127.0.0.1:{free_port()}")
            config = (config.replace("{port}", str(port)).replace("{upstream_port}", str(upstream_port))
                      .replace("{api_key}", DIRECT_AUTH.split()[-1]))
            (work / f"{name}.yaml").write_text(config)
            env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
            p = Process([str(peer_bin), "-f", str(work / f"{name}.yaml")], env=env, log_path=work / f"{name}.log")
            procs.append(p)
            wait_port(port, timeout=60)
            return p, port

        def start_gateway(name, extra=(), env_extra=None):
            port, mport = free_port(), free_port()
            # The shipped defaults are what is measured (log level included): no RUST_LOG.
            env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("PORTCULLIS_")}
            env["KUBECONFIG"] = kubeconfig
            env.update(env_extra or {})
            p = Process([str(RELEASE / "portcullis"), "run", "--listen", f"127.0.0.1:{port}",
                         "--metrics-listen", f"127.0.0.1:{mport}", *extra], env=env, log_path=work / f"{name}.log")
            p.metrics_url = f"http://127.0.0.1:{mport}/metrics"
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=120)
            return p, port

        if args.only == "guardrails":
            guardrails_scenario(args, work, procs, row, quick, kubectl, start_gateway)
            raise StopIteration

        # Idle footprint: a gateway with no routes at all.
        idle_gw, _ = start_gateway("gateway-idle")
        time.sleep(1)
        idle_rss = idle_gw.rss_mib()
        idle_gw.stop()

        base = lambda port: f"http://127.0.0.1:{port}/openai/v1"
        manifests = secret_yaml("bench", "bench-key", "sk-bench-1")
        manifests += "---\n" + route_yaml("bench", "chat", "llm/v1/chat", base(sim_port))
        manifests += "---\n" + route_yaml("bench", "embed", "llm/v1/embeddings", base(sim_port))
        manifests += "---\n" + route_yaml("bench", "stream", "llm/v1/chat", base(stream_sim_port))
        manifests += "---\n" + route_yaml("bench", "slow", "llm/v1/chat", base(slow_sim_port))
        manifests += "---\n" + pool_yaml("bench", "pool", base(sim_port))
        manifests += "---\n" + route_yaml("bench", "budget", "llm/v1/chat", base(sim_port)) + (
            "  limits:\n  - renewalPeriod: day\n    usd: 1000000\n")
        manifests += ("---\napiVersion: portcullis.dev/v1alpha1\nkind: McpServer\nmetadata:\n  name: sim\n"
                      f"  namespace: bench\nspec:\n  url: http://127.0.0.1:{sim_port}/mcp\n")
        kubectl.run("apply", "-f", "-", stdin=manifests)
        gw, gw_port = start_gateway("gateway", ["--namespace", "bench"])
        for r in ("chat", "embed", "stream", "slow", "pool", "budget"):
            kubectl.run("wait", "-n", "bench", "--for=condition=Ready", f"route.portcullis.dev/{r}", "--timeout=30s")

        chat_body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
        direct_chat = f"http://127.0.0.1:{sim_port}/openai/v1/chat/completions"
        gateway_chat = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        floor, floor_port = start_floor("floor", sim_port)
        _, floor_stream_port = start_floor("floor-stream", stream_sim_port)
        floor_chat = f"http://127.0.0.1:{floor_port}/v1/chat/completions"
        peer, peer_port = start_peer("peer", sim_port)
        _, peer_stream_port = start_peer("peer-stream", stream_sim_port)
        peer_chat = peer and f"http://127.0.0.1:{peer_port}/v1/chat/completions"
        # Warm every path (connection pools, allocator).
        for url in (direct_chat, floor_chat, gateway_chat, peer_chat):
            if url:
                oha(args.oha, url, chat_body, 4, n=500)

        def peer_cell(pairs, key, added=None):
            if not peer:
                return ""
            value = median_of(pairs, 3, key)
            return f"{value:.0f}" if added is None else f"{value:.0f} (+{added:.0f})"

        # 1. Non-streaming chat, concurrency 1: direct, floor, gateway (and the peer) in turn.
        log("scenario 1: non-streaming chat, concurrency 1")
        runs = [lambda: oha(args.oha, direct_chat, chat_body, 1, n=n_c1),
                lambda: oha(args.oha, gateway_chat, chat_body, 1, n=n_c1),
                lambda: oha(args.oha, floor_chat, chat_body, 1, n=n_c1)]
        if peer:
            runs.append(lambda: oha(args.oha, peer_chat, chat_body, 1, n=n_c1))
        pairs = paired(args.reps, *runs)
        p50 = lambda r: r["latencyPercentiles"]["p50"] * 1e6
        p99 = lambda r: r["latencyPercentiles"]["p99"] * 1e6
        added50, added99 = median_diff(pairs, p50), median_diff(pairs, p99)
        floor50, floor99 = median_diff(pairs, p50, side=2), median_diff(pairs, p99, side=2)
        for figure, key, added, floor_added in (("p50", p50, added50, floor50), ("p99", p99, added99, floor99)):
            ratio = added / max(floor_added, 1.0)
            peer_added = median_diff(pairs, key, side=3) if peer else None
            target = "≤ 1.5× the floor's" + ("; ≤ the peer's" if peer else "")
            met = ratio <= 1.5 and (peer_added is None or added <= peer_added)
            row("chat, c=1", f"latency {figure} (µs); added vs the floor's added", f"{median_of(pairs, 0, key):.0f}",
                f"{median_of(pairs, 1, key):.0f}", f"{added:.0f}", target, met,
                floor=f"{median_of(pairs, 2, key):.0f} (+{floor_added:.0f})", vs_floor=f"{ratio:.2f}×",
                peer=peer_cell(pairs, key, peer_added))

        # 1b. A proxied MCP tools/call against a proxied chat call, both at concurrency 1.
        log("scenario 1b: MCP tools/call, concurrency 1")
        kubectl.run("wait", "-n", "bench", "--for=condition=Ready", "mcpserver.portcullis.dev/sim", "--timeout=60s")
        mcp_url = f"http://127.0.0.1:{gw_port}/mcp/bench/default"
        init = urllib.request.Request(mcp_url, method="POST", data=json.dumps({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
        }).encode(), headers={"content-type": "application/json", "accept": "application/json, text/event-stream"})
        with urllib.request.urlopen(init, timeout=10) as r:
            session = r.headers["mcp-session-id"]
        call = lambda name: json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                        "params": {"name": name, "arguments": {"text": "hello benchmark"}}})
        direct_mcp = f"http://127.0.0.1:{sim_port}/mcp"
        mcp_header = f"mcp-session-id: {session}"
        oha(args.oha, mcp_url, call("sim_echo"), 4, n=500, header=mcp_header)
        pairs = paired(args.reps,
                       lambda: oha(args.oha, direct_mcp, call("echo"), 1, n=n_c1),
                       lambda: oha(args.oha, mcp_url, call("sim_echo"), 1, n=n_c1, header=mcp_header),
                       lambda: oha(args.oha, direct_chat, chat_body, 1, n=n_c1),
                       lambda: oha(args.oha, gateway_chat, chat_body, 1, n=n_c1))
        mcp_added = median_diff(pairs, p50)
        chat_added = median_diff(pairs, p50, side=3, base=2)
        row("MCP tools/call, c=1", "latency p50 (µs); added vs a proxied chat call's added",
            f"{median_of(pairs, 0, p50):.0f}", f"{median_of(pairs, 1, p50):.0f}", f"{mcp_added:.0f}",
            "≤ 1.5× a chat call's added", mcp_added <= 1.5 * max(chat_added, 1.0),
            vs_floor=f"{mcp_added / max(chat_added, 1.0):.2f}× chat's (+{chat_added:.0f})")
        if args.only == "mcp":
            raise StopIteration

        # 2. Non-streaming chat, closed loop at concurrency 64.
        log("scenario 2: non-streaming chat, concurrency 64")
        def proxy_c64(proc, url):
            def measure():
                before = proc.cpu_seconds()
                r = oha(args.oha, url, chat_body, 64, duration=dur_c64)
                r["cpu_us"] = (proc.cpu_seconds() - before) / max(oha_ok(r), 1) * 1e6
                return r
            return measure

        runs = [lambda: oha(args.oha, direct_chat, chat_body, 64, duration=dur_c64),
                proxy_c64(gw, gateway_chat), proxy_c64(floor, floor_chat)]
        if peer:
            runs.append(proxy_c64(peer, peer_chat))
        pairs = paired(max(3, args.reps - 2), *runs)
        rps = lambda r: r["summary"]["requestsPerSec"]
        gw_rps, floor_rps, direct_rps = median_of(pairs, 1, rps), median_of(pairs, 2, rps), median_of(pairs, 0, rps)
        peer_rps = median_of(pairs, 3, rps) if peer else None
        row("chat, c=64", "throughput (req/s); gateway as a share of direct / of the floor", f"{direct_rps:.0f}",
            f"{gw_rps:.0f}", f"{gw_rps / direct_rps:.2f}× of direct",
            "≥ 0.45× direct, ≥ 0.9× the floor" + (", ≥ the peer" if peer else ""),
            gw_rps >= 0.45 * direct_rps and gw_rps >= 0.9 * floor_rps and (peer_rps is None or gw_rps >= peer_rps),
            floor=f"{floor_rps:.0f} ({floor_rps / direct_rps:.2f}×)", vs_floor=f"{gw_rps / floor_rps:.2f}×",
            peer=f"{peer_rps:.0f} ({peer_rps / direct_rps:.2f}×)" if peer else "")
        row("chat, c=64", "latency p99 (µs)", f"{median_of(pairs, 0, p99):.0f}", f"{median_of(pairs, 1, p99):.0f}",
            f"{median_diff(pairs, p99):.0f}", floor=f"{median_of(pairs, 2, p99):.0f}", peer=peer_cell(pairs, p99))
        cpu_key = lambda r: r["cpu_us"]
        cpu, floor_cpu = median_of(pairs, 1, cpu_key), median_of(pairs, 2, cpu_key)
        row("chat, c=64", "proxy CPU per request (µs)", "", f"{cpu:.1f}", "",
            "≤ 1.5× the floor's" + ("; ≤ the peer's" if peer else ""),
            cpu <= 1.5 * floor_cpu and (not peer or cpu <= median_of(pairs, 3, cpu_key)),
            floor=f"{floor_cpu:.1f}", vs_floor=f"{cpu / floor_cpu:.2f}×",
            peer=f"{median_of(pairs, 3, cpu_key):.1f}" if peer else "")
        if peer:
            row("memory", "RSS after the c=1 and c=64 runs (MiB)", "", f"{gw.rss_mib():.1f}", "",
                floor=f"{floor.rss_mib():.1f}", peer=f"{peer.rss_mib():.1f}")

        # 2b. The same load on a Route with two backends: what the traffic-policy layer costs.
        log("scenario 2b: two-backend Route vs one backend, concurrency 64")
        pool_body = json.dumps({"model": "pool", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})

        def cpu_c64(body):
            before = gw.cpu_seconds()
            r = oha(args.oha, gateway_chat, body, 64, duration=dur_c64)
            return {"cpu": (gw.cpu_seconds() - before) / max(oha_ok(r), 1) * 1e6, "rps": rps(r)}

        pairs = paired(max(3, args.reps - 2), lambda: cpu_c64(chat_body), lambda: cpu_c64(pool_body))
        cpu_key = lambda r: r["cpu"]
        policy_cpu = median_diff(pairs, cpu_key)
        row("two backends, c=64", "gateway CPU per request (µs), one backend → two", f"{median_of(pairs, 0, cpu_key):.1f}",
            f"{median_of(pairs, 1, cpu_key):.1f}", f"{policy_cpu:+.1f}", "≤ +5", policy_cpu <= 5)
        rps_key = lambda r: r["rps"]
        row("two backends, c=64", "throughput (req/s), one backend → two", f"{median_of(pairs, 0, rps_key):.0f}",
            f"{median_of(pairs, 1, rps_key):.0f}", f"{median_of(pairs, 1, rps_key) / median_of(pairs, 0, rps_key):.2f}×")

        # 2c. The cost layer's healthy path: a Route with a USD budget (local store) against one without.
        log("scenario 2c: USD budget vs none, concurrency 64")
        budget_body = json.dumps({"model": "budget", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
        pairs = paired(max(3, args.reps - 2), lambda: cpu_c64(chat_body), lambda: cpu_c64(budget_body))
        cost_cpu = median_diff(pairs, cpu_key)
        row("USD budget, c=64", "gateway CPU per request (µs), no budget → a USD budget",
            f"{median_of(pairs, 0, cpu_key):.1f}", f"{median_of(pairs, 1, cpu_key):.1f}", f"{cost_cpu:+.1f}", "≤ +2",
            cost_cpu <= 2)

        # 2d. Runtime shape: the shipped one (a single-threaded worker per core, each connection and its
        # upstream pool on one thread) against every task on tokio's shared work-stealing runtime.
        log("scenario 2d: runtime shape, a worker per core vs the shared runtime")
        shared_gw, shared_port = start_gateway("gateway-shared", ["--namespace", "bench"], {"PORTCULLIS_WORKERS": "0"})
        shared_chat = f"http://127.0.0.1:{shared_port}/v1/chat/completions"
        oha(args.oha, shared_chat, chat_body, 4, n=500)

        def shape_c64(proc, url):
            def measure():
                before = proc.cpu_seconds()
                r = oha(args.oha, url, chat_body, 64, duration=dur_c64)
                return {"cpu": (proc.cpu_seconds() - before) / max(oha_ok(r), 1) * 1e6, "rps": rps(r)}
            return measure

        pairs = paired(max(3, args.reps - 2), shape_c64(shared_gw, shared_chat), shape_c64(gw, gateway_chat))
        shape_cpu = median_diff(pairs, cpu_key)
        row("runtime shape, c=64", "gateway CPU per request (µs), shared runtime → a worker per core",
            f"{median_of(pairs, 0, cpu_key):.1f}", f"{median_of(pairs, 1, cpu_key):.1f}", f"{shape_cpu:+.1f}",
            "kept if lower", shape_cpu < 0)
        row("runtime shape, c=64", "throughput (req/s), shared runtime → a worker per core",
            f"{median_of(pairs, 0, rps_key):.0f}", f"{median_of(pairs, 1, rps_key):.0f}",
            f"{median_of(pairs, 1, rps_key) / median_of(pairs, 0, rps_key):.2f}×")
        pairs = paired(args.reps, lambda: oha(args.oha, shared_chat, chat_body, 1, n=n_c1),
                       lambda: oha(args.oha, gateway_chat, chat_body, 1, n=n_c1))
        row("runtime shape, c=1", "latency p50 (µs), shared runtime → a worker per core",
            f"{median_of(pairs, 0, p50):.0f}", f"{median_of(pairs, 1, p50):.0f}", f"{median_diff(pairs, p50):+.0f}")
        shared_gw.stop()

        # 3. Streaming chat, 20 chunks, concurrency 1.
        log("scenario 3: streaming chat (20 chunks, 2 ms apart), concurrency 1")
        stream_body = json.dumps({"model": "stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        n_stream = 30 if quick else 200
        stream_pairs, peer_streams = [], []
        for i in range(n_stream):
            d = stream_once("127.0.0.1", stream_sim_port, "/openai/v1/chat/completions", stream_body)
            g = stream_once("127.0.0.1", gw_port, "/v1/chat/completions", stream_body)
            f = stream_once("127.0.0.1", floor_stream_port, "/v1/chat/completions", stream_body)
            if d[0] is None or g[0] is None or f[0] is None:
                raise RuntimeError("a stream delivered no data")
            stream_pairs.append((d, g, f))
            if peer:
                pr = stream_once("127.0.0.1", peer_stream_port, "/v1/chat/completions", stream_body)
                if pr[0] is not None:
                    peer_streams.append(pr[0] - d[0])
        ttfb_added = statistics.median((g[0] - d[0]) * 1e6 for d, g, _ in stream_pairs)
        floor_ttfb_added = statistics.median((f[0] - d[0]) * 1e6 for d, _, f in stream_pairs)
        total_added = statistics.median((g[1] - d[1]) * 1e6 for d, g, _ in stream_pairs)
        separate = min(g[2] for _, g, _ in stream_pairs)
        row("stream, c=1", "time to first byte (µs); added vs 2× the added non-streaming p50",
            f"{statistics.median(d[0] for d, _, _ in stream_pairs) * 1e6:.0f}",
            f"{statistics.median(g[0] for _, g, _ in stream_pairs) * 1e6:.0f}", f"{ttfb_added:.0f}",
            f"≤ 2× {added50:.0f}", ttfb_added <= 2 * max(added50, 1.0),
            floor=f"{statistics.median(f[0] for _, _, f in stream_pairs) * 1e6:.0f} (+{floor_ttfb_added:.0f})",
            vs_floor=f"{ttfb_added / max(floor_ttfb_added, 1.0):.2f}×",
            peer=f"(+{statistics.median(peer_streams) * 1e6:.0f})" if peer_streams else "")
        row("stream, c=1", "total time (µs)", f"{statistics.median(d[1] for d, _, _ in stream_pairs) * 1e6:.0f}",
            f"{statistics.median(g[1] for _, g, _ in stream_pairs) * 1e6:.0f}", f"{total_added:.0f}")
        row("stream, c=1", "reads carrying chunks (min of runs; 21 = every chunk separate)", "",
            f"{separate}", "", "every chunk separate", separate >= 21)
        floor.stop()

        # 3b. The same stream through the Anthropic Messages surface: translated into an OpenAI call and
        # re-framed as Anthropic's events, against the direct OpenAI stream.
        log("scenario 3b: streaming /v1/messages (OpenAI-provider Route), concurrency 1")
        messages_body = json.dumps({"model": "stream", "max_tokens": 256, "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]})
        messages_pairs = []
        for i in range(n_stream):
            d = stream_once("127.0.0.1", stream_sim_port, "/openai/v1/chat/completions", stream_body)
            g = stream_once("127.0.0.1", gw_port, "/v1/messages", messages_body)
            if d[0] is None or g[0] is None:
                raise RuntimeError("a stream delivered no data")
            messages_pairs.append((d, g))
        chat_ttfb_added = ttfb_added
        ttfb_added = statistics.median((g[0] - d[0]) * 1e6 for d, g in messages_pairs)
        total_added = statistics.median((g[1] - d[1]) * 1e6 for d, g in messages_pairs)
        row("/v1/messages stream, c=1", "time to first byte (µs); added vs 2× the added non-streaming p50",
            f"{statistics.median(d[0] for d, _ in messages_pairs) * 1e6:.0f}",
            f"{statistics.median(g[0] for _, g in messages_pairs) * 1e6:.0f}",
            f"{ttfb_added:.0f} ({ttfb_added - chat_ttfb_added:+.0f} vs /v1/chat/completions)",
            f"≤ 2× {added50:.0f}", ttfb_added <= 2 * max(added50, 1.0))
        row("/v1/messages stream, c=1", "total time (µs)",
            f"{statistics.median(d[1] for d, _ in messages_pairs) * 1e6:.0f}",
            f"{statistics.median(g[1] for _, g in messages_pairs) * 1e6:.0f}", f"{total_added:.0f}")

        # 4. Embeddings, concurrency 1.
        log("scenario 4: embeddings, concurrency 1")
        embed_body = json.dumps({"model": "embed", "input": ["the quick brown fox", "jumps over the lazy dog"]})
        pairs = paired(args.reps, lambda: oha(args.oha, f"http://127.0.0.1:{sim_port}/openai/v1/embeddings", embed_body, 1, n=n_c1),
                       lambda: oha(args.oha, f"http://127.0.0.1:{gw_port}/v1/embeddings", embed_body, 1, n=n_c1))
        row("embeddings, c=1", "latency p50 (µs)", f"{median_of(pairs, 0, p50):.0f}", f"{median_of(pairs, 1, p50):.0f}",
            f"{median_diff(pairs, p50):.0f}")
        row("embeddings, c=1", "latency p99 (µs)", f"{median_of(pairs, 0, p99):.0f}", f"{median_of(pairs, 1, p99):.0f}",
            f"{median_diff(pairs, p99):.0f}")
        gw.stop()

        log("scenario 8: guardrails")
        guardrails_scenario(args, work, procs, row, quick, kubectl, start_gateway)

        # 5. Many open streams at once (each ~1 s long), on a fresh process so its peak RSS is this scenario's.
        log(f"scenario 5: {n_streams} concurrent open streams")
        gw5, gw5_port = start_gateway("gateway-streams", ["--namespace", "bench"])
        slow_body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        r = oha(args.oha, f"http://127.0.0.1:{gw5_port}/v1/chat/completions", slow_body, n_streams, n=n_streams)
        peak = gw5.peak_rss_mib()
        completed = oha_ok(r)
        row(f"{n_streams} open streams", "gateway peak RSS (MiB)", "", f"{peak:.1f}", "", "≤ 128", peak <= 128)
        row(f"{n_streams} open streams", "streams completed", "", f"{completed}/{n_streams}", "", "all",
            completed == n_streams)

        # 6a. Route applied -> first successful request.
        log("scenario 6: control plane")
        applied = []
        for i in range(5 if quick else 20):
            name = f"fresh-{i}"
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]})
            t0 = time.perf_counter()
            kubectl.run("apply", "-f", "-", stdin=route_yaml("bench", name, "llm/v1/chat", base(sim_port)))
            while post_status(f"http://127.0.0.1:{gw5_port}/v1/chat/completions", body) != 200:
                time.sleep(0.002)
            applied.append((time.perf_counter() - t0) * 1000)
        p50_applied = statistics.median(applied)
        row("control plane", "Route applied → servable, p50 (ms)", "", f"{p50_applied:.0f}", "", "≤ 300",
            p50_applied <= 300)

        # 6b. Secret rotated -> new key in use.
        kubectl.run("apply", "-f", "-", stdin=route_yaml("bench", "rotate", "llm/v1/chat", base(rec_sim_port)))
        kubectl.run("wait", "-n", "bench", "--for=condition=Ready", "route.portcullis.dev/rotate", "--timeout=30s")
        rot_body = json.dumps({"model": "rotate", "messages": [{"role": "user", "content": "hi"}]})
        rotations = []
        for i in range(3 if quick else 10):
            key = f"sk-rotated-{i}"
            t0 = time.perf_counter()
            kubectl.run("apply", "-f", "-", stdin=secret_yaml("bench", "bench-key", key))
            while True:
                post_status(f"http://127.0.0.1:{gw5_port}/v1/chat/completions", rot_body)
                with urllib.request.urlopen(f"http://127.0.0.1:{rec_sim_port}/_sim/last-authorization") as resp:
                    if resp.read().decode() == f"Bearer {key}":
                        break
                time.sleep(0.002)
            rotations.append((time.perf_counter() - t0) * 1000)
        worst = max(rotations)
        row("control plane", "Secret rotated → new key in use, worst of runs (ms)", "", f"{worst:.0f}", "", "≤ 1000",
            worst <= 1000)
        gw5.stop()

        # 6c. Initial sync and memory with many Routes.
        log(f"scenario 6c: initial sync with {n_routes} Routes")
        kubectl.run("create", "namespace", "many")
        docs = [secret_yaml("many", "bench-key", "sk-many")]
        docs += [route_yaml("many", f"route-{i:05d}", "llm/v1/chat", base(sim_port)) for i in range(n_routes)]
        manifest = work / "many.yaml"
        manifest.write_text("---\n".join(docs))
        kubectl.run("create", "-f", str(manifest))
        t0 = time.perf_counter()
        gw6, gw6_port = start_gateway("gateway-many", ["--namespace", "many"])
        sync_ms = (time.perf_counter() - t0) * 1000
        # Steady state: once the status writes of the initial sync are done and jemalloc's
        # background thread has returned the pages of that burst (its decay is 10 s).
        wait_quiet(gw6.metrics_url)
        time.sleep(12)
        many_rss = gw6.rss_mib()
        many_peak = gw6.peak_rss_mib()
        row("control plane", f"initial sync of {n_routes} Routes, process start → ready (ms)", "", f"{sync_ms:.0f}", "")

        # 6d. Rebuild cost under a burst of Secret churn no Route references (created, then changed).
        n_churn = 50 if quick else 500
        log(f"scenario 6d: {2 * n_churn} unrelated Secret changes with {n_routes} Routes")
        wait_quiet(gw6.metrics_url)
        rebuilds_before, _ = reconcile_totals(gw6.metrics_url)
        cpu_before = gw6.cpu_seconds()
        for round_ in range(2):
            churn = "---\n".join(secret_yaml("many", f"unrelated-{i:04d}", f"v{round_}") for i in range(n_churn))
            kubectl.run("apply", "-f", "-", stdin=churn)
        time.sleep(2)
        rebuilds_after, rebuild_s_after = reconcile_totals(gw6.metrics_url)
        churn_rebuilds = rebuilds_after - rebuilds_before
        churn_cpu_ms = (gw6.cpu_seconds() - cpu_before) * 1000
        row("control plane", f"table rebuilds during {2 * n_churn} unrelated Secret changes", "",
            f"{churn_rebuilds:.0f}", "", "0", churn_rebuilds == 0)
        row("control plane", f"gateway CPU during that churn, {n_routes} Routes (ms)", "", f"{churn_cpu_ms:.0f}", "")
        # One rebuild with every Route, for scale: what each unrelated change would cost if it rebuilt.
        kubectl.run("apply", "-f", "-", stdin=secret_yaml("many", "bench-key", "sk-many-rotated"))
        time.sleep(2)
        rebuilds_final, rebuild_s_final = reconcile_totals(gw6.metrics_url)
        if rebuilds_final > rebuilds_after:
            per_rebuild = (rebuild_s_final - rebuild_s_after) / (rebuilds_final - rebuilds_after) * 1000
            row("control plane", f"one table rebuild with {n_routes} Routes (ms)", "", f"{per_rebuild:.1f}", "")
        # 6e. The lookup stays flat: the same call on a gateway holding every Route.
        many_body = json.dumps({"model": f"route-{n_routes // 2:05d}", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
        many_url = f"http://127.0.0.1:{gw6_port}/v1/chat/completions"
        oha(args.oha, many_url, many_body, 4, n=500)
        pairs = paired(args.reps, lambda: oha(args.oha, direct_chat, chat_body, 1, n=n_c1),
                       lambda: oha(args.oha, many_url, many_body, 1, n=n_c1))
        many_added = median_diff(pairs, p50)
        row(f"chat, c=1, {n_routes} Routes", "added latency p50 (µs), against one Route's (scenario 1)", "",
            f"{median_of(pairs, 1, p50):.0f}", f"{many_added:.0f}", f"≈ {added50:.0f}", many_added <= 1.25 * added50 + 20)
        gw6.stop()

        # 8. Callers: the key and token lookups stay flat as they grow.
        n_keys, n_tokens = (100, 1000) if quick else (1000, 10000)
        log(f"scenario 8: 1 vs {n_keys} API keys, 1 vs {n_tokens} cached ServiceAccount tokens")
        callers = {}
        for ns, count in (("keys-one", 1), ("keys-many", n_keys)):
            kubectl.run("create", "namespace", ns)
            docs = [secret_yaml(ns, "bench-key", "sk-bench-1"), route_yaml(ns, "chat", "llm/v1/chat", base(sim_port))]
            docs += [api_key_yaml(ns, f"caller-{i:05d}", f"pk-bench-{ns}-{i:05d}") for i in range(count)]
            kubectl.run("apply", "-f", "-", stdin="---\n".join(docs))
            kubectl.run("create", "serviceaccount", "caller", "-n", ns)
            token = kubectl.run("create", "token", "caller", "-n", ns, "--audience", "portcullis").strip()
            # Reviews are rate-limited (50 a second by default): lifted here so that filling the
            # cache takes the API server's time, not the limit's.
            proc, port = start_gateway(f"gateway-{ns}", ["--namespace", ns, "--token-review-rate", "100000"])
            kubectl.run("wait", "-n", ns, "--for=condition=Ready", "route.portcullis.dev/chat", "--timeout=30s")
            callers[ns] = (proc, f"http://127.0.0.1:{port}/v1/chat/completions",
                           f"authorization: Bearer pk-bench-{ns}-{count // 2:05d}", f"authorization: Bearer {token}")
        # The many-token side: fill the review cache with rejected token-shaped strings (each reviewed
        # once by the API server, then cached) beside the one valid token.
        fill_token_cache(callers["keys-many"][1], chat_body, n_tokens - 1)
        reviews = token_reviews(callers["keys-many"][0].metrics_url)
        for ns in callers:
            proc, url, key_h, token_h = callers[ns]
            for h in (key_h, token_h):
                oha(args.oha, url, chat_body, 4, n=300, header=h)
        for kind, idx, label in (("API key", 2, f"1 key → {n_keys} keys"),
                                 ("ServiceAccount token", 3, f"1 cached token → {n_tokens}")):
            one, many = callers["keys-one"], callers["keys-many"]
            pairs = paired(args.reps, lambda: oha(args.oha, one[1], chat_body, 1, n=n_c1, header=one[idx]),
                           lambda: oha(args.oha, many[1], chat_body, 1, n=n_c1, header=many[idx]))
            d50 = median_diff(pairs, p50)
            row(f"{kind} caller, c=1", f"latency p50 (µs), {label}", "", f"{median_of(pairs, 0, p50):.0f} → "
                f"{median_of(pairs, 1, p50):.0f}", f"{d50:+.0f}", "flat (≤ +20)", d50 <= 20)

            def caller_c64(side):
                def measure():
                    before = side[0].cpu_seconds()
                    r = oha(args.oha, side[1], chat_body, 64, duration=dur_c64, header=side[idx])
                    return {"cpu": (side[0].cpu_seconds() - before) / max(oha_ok(r), 1) * 1e6}
                return measure

            pairs = paired(max(3, args.reps - 2), caller_c64(one), caller_c64(many))
            dcpu = median_diff(pairs, cpu_key)
            row(f"{kind} caller, c=64", f"gateway CPU per request (µs), {label}", "",
                f"{median_of(pairs, 0, cpu_key):.1f} → {median_of(pairs, 1, cpu_key):.1f}", f"{dcpu:+.1f}",
                "flat (≤ +5, this harness's noise)", dcpu <= 5)
        row("ServiceAccount token caller", f"TokenReviews made (then cached) on the {n_tokens}-token side", "",
            f"{reviews:.0f}", "", f"≥ {n_tokens - 1}", reviews >= n_tokens - 1)
        for proc, *_ in callers.values():
            proc.stop()

        # 7. Per-request work, counted exactly: instructions and allocator calls per proxied call.
        if shutil.which("valgrind") and shutil.which("callgrind_control"):
            log("scenario 7: instructions and allocations per proxied request (callgrind)")
            n_cg = 200 if quick else 1000
            this = RELEASE / "portcullis"
            for path, binary, target in (("pass-through", this, (90, 50)),
                                         ("translating", f"{this} --no-pass-through", None)):
                calls, instructions = callgrind_counts(work, kubeconfig, args.oha, chat_body, n_cg, binary)
                ins, allocs = instructions / n_cg / 1000, calls / n_cg
                row("per request", f"instructions per proxied chat call (callgrind), {path}", "",
                    f"{ins:.0f}k", "", f"≤ {target[0]}k" if target else "≤ 151.6k (before the refactor)",
                    ins <= (target[0] if target else 151.6))
                row("per request", f"allocations (allocator calls) per proxied chat call, {path}", "",
                    f"{allocs:.0f}", "", f"≤ {target[1]}" if target else "< 108.5 (before the refactor)",
                    allocs <= target[1] if target else allocs < 108.5)
        row("memory", "RSS idle (MiB)", "", f"{idle_rss:.1f}", "", "≤ 20", idle_rss <= 20)
        row("memory", f"RSS with {n_routes} Routes, steady (MiB)", "", f"{many_rss:.1f}", "", "≤ 64", many_rss <= 64)
        row("memory", f"peak RSS during the initial sync of {n_routes} Routes (MiB)", "", f"{many_peak:.1f}", "")
        pool_scenario(args, work, procs, row, quick, kubectl, kubeconfig)
        store_scenario(args, work, procs, row, quick)
        cache_scenario(args, work, procs, row, quick)
    except StopIteration:
        pass
    except Exception as e:  # the rows measured so far are still written, with why the run stopped
        import traceback
        traceback.print_exc()
        stopped = f"{type(e).__name__}: {e}"
    finally:
        restore_idle()
        for p in procs:
            p.stop()
        if args.only not in ("store", "cache"):
            subprocess.run([args.control_plane, "stop", str(cp_dir)])

    header = ["scenario", "figure", "direct", "floor", "peer", "gateway", "added", "vs floor", "target", "met"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores"
        f"{' (quick run: small counts)' if quick else ''}; medians of {args.reps} alternating direct/floor/gateway runs.",
        "The floor is bench/floor, a bare reverse proxy on the same hyper/tokio stack (no parsing, no translation);",
        "`vs floor` divides the gateway's figure (or its added latency) by the floor's.",
        (f"The peer is {peer_name}, configured as an OpenAI proxy to the same simulated provider "
         "(bench/peer), measured in the same rotations." if peer_name else
         "No peer column: its binary is not in ~/.cache/portcullis/peers (bench/peer/build.sh builds it)."),
        *([idle_note] if idle_note else []),
        *([f"The run stopped early ({stopped}); the rows below are what it measured."] if stopped else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    if args.only == "pool":
        lines[1:4] = [f"The self-hosted pool scenario alone ({args.bin_dir}): one run each of the same Poisson arrivals "
                      "and answer lengths, round robin, random spread and load-aware.", ""]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


if __name__ == "__main__":
    main()
