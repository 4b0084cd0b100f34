"""`leangpt serve` under load, over loopback only: sequential against 16 and 64 concurrent clients, overload past
--max-queue, and a soak with clients hanging up mid-stream.

The real command serves --model in its own process (its resident memory read from /proc). Every client is
closed-loop: it sends a request to /v1/completions, reads the whole reply, sends the next. Phases, in order:
- warm-up: a few requests of each kind, untimed;
- load: 1 client (sequential), then 16 and 64 concurrent clients, streaming and not: completion tokens/s, time to
  first token (streaming: the first chunk of text) and latency, p50 and p99, and the ratios the targets name
  (16-concurrent over sequential throughput, p99 latency at 64 over 16);
- overload: max_batch + max_queue + 64 requests at once; each must get 200 or 429 (with Retry-After), nothing
  else, none left hanging;
- soak: --soak requests from 16 streaming clients, one request in ten hung up after a few chunks; errors, and the
  server's resident memory after the first tenth (warm-up) and at the end.

Every phase is bounded in requests and time (--phase-seconds, --soak-seconds); each request has a client timeout.

    python bench/bench_serve.py --model CKPT --json-out bench/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from leangpt.machine import describe

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING HENRY:\nOnce more",
           "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;",
           "To be, or not to be", "HAMLET:\nAlas, poor Yorick! I knew him, Horatio: a fellow", "MACBETH:",
           "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him."]


@dataclass
class Result:
    status: int  # HTTP status; 0 for a client-side failure (timeout, connection error)
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    error: str = ""
    hung_up: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    """The real command on a free loopback port; its log goes to a file (a pipe nobody reads would fill and
    block the server)."""
    cmd = [sys.executable, "-m", "leangpt", "serve", "--model", str(args.model), "--port", str(port),
           "--model-name", "bench", "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
           "--log-level", "warning"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    deadline = time.monotonic() + 900  # warm-up compiles every batch size
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("ready"):
                return proc  # warmed up (compiled) too
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server was not ready within 900 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def body(i: int, args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    out = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.new_tokens,
           "temperature": 0.8, "seed": i, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def one_request(client: httpx.AsyncClient, i: int, args: argparse.Namespace, stream: bool,
                      hang_up_after: int | None = None) -> Result:
    """One completion; streamed ones record the first text chunk's time and, with hang_up_after, close the
    connection after that many chunks."""
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body(i, args, False))
            tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return Result(r.status_code, tokens, latency=time.perf_counter() - t0,
                          error="" if r.status_code == 200 else r.text[:200])
        result = Result(0)
        async with client.stream("POST", "/v1/completions", json=body(i, args, True)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                result.error = (await r.aread()).decode()[:200]
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                elif event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"] and result.ttft is None:
                    result.ttft = time.perf_counter() - t0
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    result.hung_up = True
                    break
        result.latency = time.perf_counter() - t0
        return result
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Result(0, latency=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


async def closed_loop(url: str, args: argparse.Namespace, clients: int, total: int, stream: bool,
                      seconds: float, hang_up_every: int = 0, on_done=None) -> tuple[list[Result], float]:
    """`clients` clients sending `total` requests between them (fewer if `seconds` run out); returns the results
    and the wall time."""
    counter = iter(range(total))
    results: list[Result] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        async def loop() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                hang = 3 if hang_up_every and i % hang_up_every == hang_up_every - 1 else None
                results.append(await one_request(client, i, args, stream, hang))
                if on_done is not None:
                    on_done(len(results))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summary(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200 and not r.error]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    latencies = [r.latency for r in ok if not r.hung_up]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok), "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "first_errors": sorted({r.error or f"HTTP {r.status}" for r in results if r not in ok})[:3]}


async def load_phases(url: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in (1, 16, 64):
        for stream in (True, False):
            total = max(args.sequential, clients * args.rounds) if clients > 1 else args.sequential
            results, wall = await closed_loop(url, args, clients, total, stream, args.phase_seconds)
            name = f"{'stream' if stream else 'plain'}_c{clients}"
            out[name] = summary(results, wall)
            print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    for kind in ("stream", "plain"):
        seq, c16, c64 = (out[f"{kind}_c{c}"] for c in (1, 16, 64))
        out[f"{kind}_ratios"] = {
            "throughput_c16_over_sequential": round(c16["tokens_per_s"] / seq["tokens_per_s"], 2),
            "throughput_c64_over_sequential": round(c64["tokens_per_s"] / seq["tokens_per_s"], 2),
            "latency_p99_c64_over_c16": round(c64["latency_p99_s"] / c16["latency_p99_s"], 2)}
    return out


async def overload(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything at once, past rows + queue: each request must end in 200 or 429."""
    n = args.max_batch + args.max_queue + 64
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, i, args, False) for i in range(n)))
        wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {"requests": n, "statuses": statuses, "seconds": round(wall, 2),
            "only_200_and_429": set(statuses) <= {"200", "429"}}


async def soak(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    warm = max(1, args.soak // 10)
    rss: dict[str, float] = {"start_mb": round(rss_mb(pid), 1)}

    def mark(done: int) -> None:
        if done == warm:
            rss["after_warmup_mb"] = round(rss_mb(pid), 1)

    results, wall = await closed_loop(url, args, 16, args.soak, True, args.soak_seconds, hang_up_every=10,
                                      on_done=mark)
    await asyncio.sleep(1)  # the hung-up rows leave at their next step
    rss["end_mb"] = round(rss_mb(pid), 1)
    base = rss.get("after_warmup_mb", rss["start_mb"])
    out = summary(results, wall)
    out.update(rss, hung_up=sum(r.hung_up for r in results),
               rss_growth_after_warmup=round(rss["end_mb"] / base - 1, 4))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint to serve")
    p.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--max-queue", type=int, default=128, help="the server's --max-queue")
    p.add_argument("--sequential", type=int, default=16, help="requests of the sequential phases")
    p.add_argument("--rounds", type=int, default=4, help="requests per client in the concurrent phases")
    p.add_argument("--soak", type=int, default=2000, help="requests of the soak")
    p.add_argument("--phase-seconds", type=float, default=300, help="time limit of each load phase")
    p.add_argument("--soak-seconds", type=float, default=1800, help="time limit of the soak")
    p.add_argument("--request-timeout", type=float, default=300, help="client timeout of one request, seconds")
    p.add_argument("--threads", type=int, default=0, help="the server's OMP_NUM_THREADS (0: as set here); on a "
                   "CPU shared with other jobs, 1 avoids threads waiting on each other")
    p.add_argument("--skip-soak", action="store_true", help="leave out the soak")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    args = p.parse_args()

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    proc = start_server(args, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        record: dict[str, Any] = {"machine": describe(), "loadavg_start": Path("/proc/loadavg").read_text().strip(),
                                  "model": str(args.model), "new_tokens": args.new_tokens,
                                  "max_batch": args.max_batch, "max_queue": args.max_queue,
                                  "server_threads": args.threads or os.environ.get("OMP_NUM_THREADS", "default")}
        for stream in (True, False):  # warm-up, untimed
            asyncio.run(closed_loop(url, args, 4, 8, stream, 120))
        record["rss_after_warmup_mb"] = round(rss_mb(proc.pid), 1)
        record["load"] = asyncio.run(load_phases(url, args))
        record["overload"] = asyncio.run(overload(url, args))
        print(f"overload: {json.dumps(record['overload'])}", file=sys.stderr, flush=True)
        if not args.skip_soak:
            record["soak"] = asyncio.run(soak(url, args, proc.pid))
            print(f"soak: {json.dumps(record['soak'])}", file=sys.stderr, flush=True)
        record["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
        record["server_log_errors"] = log.read_text().count("ERROR")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = json.dumps(record, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
