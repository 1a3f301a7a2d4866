#!/usr/bin/env python3
"""`make soak`: mixed traffic against one gateway for a long time, with its RSS sampled.

Traffic: plain and streaming chat, embeddings, streams the client abandons after the first chunk,
oversized bodies (413), invalid JSON (400) and unknown routes (404), from several threads at once;
and hostile shapes: bodies of many tiny JSON values (413 before parsing), junk and expired JWTs
(401, or served as anonymous when a review is refused by the rate cap), and bodies that trickle
in from their own threads (408 at the body deadline).
Passes when every answer is the one expected for its kind and the RSS after warm-up stays flat.
Not part of CI: 30 minutes by default (`--minutes N`).
"""

import argparse
import base64
import http.client
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the benchmark's process and kubectl helpers)

BODY_LIMIT = 64 * 1024


def request(port, method, path, body=None, read_all=True, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token() if callable(token) else token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        if read_all:
            resp.read()
        else:
            resp.readline()  # the first chunk, then walk away mid-stream
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def chat(model, stream=False):
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


JUNK = iter(range(1 << 62))


def junk_jwt(expired=False):
    """A JWT for the gateway's audience, unique each time; the API server rejects its signature."""
    exp = int(time.time()) + (-3600 if expired else 3600)
    claims = {"aud": ["portcullis"], "exp": exp, "sub": f"junk-{next(JUNK)}"}
    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2lnbmF0dXJl"


def many(item):
    """A chat body just under the body limit made of one tiny JSON value repeated."""
    n = (BODY_LIMIT - 100) // (len(item) + 1)
    return json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x"}]})[:-1] \
        + ', "extra": [' + ",".join([item] * n) + "]}"


def trickle(port, stop, counts, unexpected, lock):
    """Bodies that arrive a byte at a time; the gateway must end each at its body deadline (408)."""
    while not stop.is_set():
        status = 0
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\n"
                          b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
                s.settimeout(0.5)
                answer = b""
                for _ in range(120):
                    try:
                        answer = s.recv(64)
                        break
                    except socket.timeout:
                        s.sendall(b" ")
                if answer.startswith(b"HTTP/1.1 "):
                    status = int(answer[9:12])
        except OSError:
            status = 0
        with lock:
            counts["trickle"] = counts.get("trickle", 0) + 1
            if status != 408:
                key = f"trickle: {status}"
                unexpected[key] = unexpected.get(key, 0) + 1


KINDS = [
    # name, expected statuses, (method, path, body, read_all[, token])
    ("chat", {200}, ("POST", "/v1/chat/completions", chat("chat"), True)),
    ("stream", {200}, ("POST", "/v1/chat/completions", chat("stream", True), True)),
    ("cancelled", {200}, ("POST", "/v1/chat/completions", chat("stream", True), False)),
    ("embeddings", {200}, ("POST", "/v1/embeddings", json.dumps({"model": "embed", "input": ["a", "b"]}), True)),
    ("mlflow", {200}, ("POST", "/gateway/chat/invocations",
                       json.dumps({"messages": [{"role": "user", "content": "hi"}]}), True)),
    ("oversized", {413}, ("POST", "/v1/chat/completions", chat("x" * (2 * BODY_LIMIT)), True)),
    ("invalid", {400}, ("POST", "/v1/chat/completions", '{"model": "chat", "messages": [', True)),
    ("unknown", {404}, ("POST", "/v1/chat/completions", chat("no-such-route"), True)),
    ("zeros", {413}, ("POST", "/v1/chat/completions", many("0"), True)),
    ("tiny-objects", {413}, ("POST", "/v1/chat/completions", many('{"a":0}'), True)),
    ("junk-jwt", {200, 401}, ("POST", "/v1/chat/completions", chat("chat"), True, junk_jwt)),
    ("expired-jwt", {401}, ("POST", "/v1/chat/completions", chat("chat"), True,
                            lambda: junk_jwt(expired=True))),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--tricklers", type=int, default=4)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--control-plane", required=True)
    ap.add_argument("--bin-dir", default=str(bench.RELEASE))
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin_dir)
    duration = args.minutes * 60
    warmup = min(120.0, max(10.0, duration * 0.2))
    interval = min(10.0, max(1.0, duration / 60))

    work = pathlib.Path(tempfile.mkdtemp(prefix="portcullis-soak-"))
    cp_dir = work / "control-plane"
    procs = []
    ok = True
    try:
        subprocess.run([args.control_plane, "start", str(cp_dir), str(os.getpid())], check=True)
        kubeconfig = str(cp_dir / "kubeconfig")
        kubectl = bench.Kubectl(args.kubectl, kubeconfig)
        kubectl.run("apply", "-f", str(bench.ROOT / "crds"))
        kubectl.run("wait", "--for=condition=Established", "crd/routes.portcullis.dev", "--timeout=60s")
        kubectl.run("create", "namespace", "soak")
        sim_port = bench.free_port()
        procs.append(bench.Process([str(bin_dir / "portcullis-sim"), "--listen", f"127.0.0.1:{sim_port}",
                                    "--words", "20", "--chunk-delay-ms", "2"], log_path=work / "sim.log"))
        base = f"http://127.0.0.1:{sim_port}/openai/v1"
        manifests = bench.secret_yaml("soak", "bench-key", "sk-soak")
        for name, route_type in [("chat", "llm/v1/chat"), ("stream", "llm/v1/chat"), ("embed", "llm/v1/embeddings")]:
            manifests += "---\n" + bench.route_yaml("soak", name, route_type, base)
        kubectl.run("apply", "-f", "-", stdin=manifests)

        port, mport = bench.free_port(), bench.free_port()
        env = {**os.environ, "KUBECONFIG": kubeconfig, "RUST_LOG": "warn"}
        gw = bench.Process([str(bin_dir / "portcullis"), "run", "--listen", f"127.0.0.1:{port}",
                            "--metrics-listen", f"127.0.0.1:{mport}", "--namespace", "soak",
                            "--body-limit", str(BODY_LIMIT), "--body-timeout", "3",
                            "--token-review-rate", "20"], env=env, log_path=work / "gateway.log")
        procs.append(gw)
        bench.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
        for name in ["chat", "stream", "embed"]:
            kubectl.run("wait", "-n", "soak", "--for=condition=Ready", f"route.portcullis.dev/{name}", "--timeout=60s")

        counts = {name: 0 for name, _, _ in KINDS}
        counts["trickle"] = 0
        unexpected = {}
        lock = threading.Lock()
        stop = threading.Event()

        def worker(seed):
            i = seed
            while not stop.is_set():
                name, expected, (method, path, body, read_all, *token) = KINDS[i % len(KINDS)]
                i += 1
                status = request(port, method, path, body, read_all, token[0] if token else None)
                with lock:
                    counts[name] += 1
                    if status not in expected:
                        key = f"{name}: {status}"
                        unexpected[key] = unexpected.get(key, 0) + 1

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(args.threads)]
        threads += [threading.Thread(target=trickle, args=(port, stop, counts, unexpected, lock), daemon=True)
                    for _ in range(args.tricklers)]
        for t in threads:
            t.start()
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < duration:
            time.sleep(interval)
            samples.append((time.monotonic() - started, gw.rss_mib()))
            bench.log(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:6.1f} MiB  requests {sum(counts.values())}")
        stop.set()
        for t in threads:
            t.join(timeout=60)

        after = [rss for t, rss in samples if t >= warmup]
        if len(after) < 6:
            after = [rss for _, rss in samples[len(samples) // 2:]]
        third = max(1, len(after) // 3)
        baseline = statistics.median(after[:third])
        final = statistics.median(after[-third:])
        flat = final <= baseline * 1.15 + 4
        print(f"soak: {args.minutes:g} min, {sum(counts.values())} requests: "
              + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"soak: RSS after warm-up {baseline:.1f} MiB, at the end {final:.1f} MiB, "
              f"peak {gw.peak_rss_mib():.1f} MiB: {'flat' if flat else 'GROWING'}")
        if unexpected:
            print(f"soak: unexpected answers: {unexpected}")
        ok = flat and not unexpected and gw.proc.poll() is None
    finally:
        for p in procs:
            p.stop()
        subprocess.run([args.control_plane, "stop", str(cp_dir)])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
