"""Serving load: N concurrent WebSocket clients over loopback against `fastfocal serve` (run in its
own process), each streaming speech at real time in 80 ms messages (one chunk each), starts
staggered over one chunk. Per chunk, latency = its message sent -> its output received (audio
in modes full/decode, tokens in encode). Reports p50/p90/p99/max, the server's late steps
(> 80 ms, from /metrics), mean batch, throughput (audio seconds served per wall second) and
errors; appends one JSON line per N to bench/results/serve_load.jsonl.

    python bench/serve_load.py --model tests/data/tiny_causal --device cpu --clients 1 8 32
    python bench/serve_load.py --random-init 50hz_4k_causal --dtype bf16 --device cuda --clients 16 64 128 256
    python bench/serve_load.py --url ws://host:8080 --clients 8      # an already running server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from stream_latency import RESULTS, machine, pct  # noqa: E402

ROOT = Path(__file__).parent.parent
CHUNK, RATE = 1280, 16000


def start_server(args, max_streams: int) -> tuple[subprocess.Popen, str]:
    model = ["--random-init", args.random_init] if args.random_init else ["--model", args.model]
    cmd = [sys.executable, "-m", "fastfocal", "serve", *model, "--dtype", args.dtype, "--port", "0",
           "--max-streams", str(max_streams), "--modes", args.mode]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "FASTFOCAL_API_KEY": ""}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600  # CUDA-graph capture of every bucket happens before listening
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            sys.exit(f"server exited with {p.returncode}")
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if m:
            print(line.strip())
            return p, f"ws://{m.group(1)}:{m.group(2)}"
    p.kill()
    sys.exit("server did not start")


def scrape(http: str) -> dict:
    with urllib.request.urlopen(http + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("fastfocal_steps_total", "fastfocal_late_steps_total", "fastfocal_chunks_total",
                          "fastfocal_step_seconds_sum", "fastfocal_errors_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def client(session, url, x, mode, realtime, delay, lat, errors) -> int:
    """One stream; appends per-chunk latencies (s) to lat; returns chunks received."""
    await asyncio.sleep(delay)
    n = len(x) // CHUNK
    sent: list[float] = []
    try:
        ws = await session.ws_connect(f"{url}/v1/stream?mode={mode}", max_msg_size=0)
    except aiohttp.ClientError as e:
        errors.append(f"connect: {e}")
        return 0

    async def send():
        t0 = time.perf_counter()
        for k in range(n):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (k + 1) * CHUNK / RATE - time.perf_counter()))
            sent.append(time.perf_counter())
            await ws.send_bytes(x[k * CHUNK:(k + 1) * CHUNK].tobytes())
        await ws.send_str('{"type": "flush"}')

    sender = asyncio.create_task(send())
    got = 0
    try:
        async for msg in ws:
            now = time.perf_counter()
            if msg.type == aiohttp.WSMsgType.BINARY:
                if mode != "encode":
                    if got < n:
                        lat.append(now - sent[got])
                    got += 1
            else:
                obj = json.loads(msg.data)
                if obj["type"] == "tokens" and mode == "encode":
                    if got < n:
                        lat.append(now - sent[got])
                    got += 1
                elif obj["type"] == "error":
                    errors.append(obj["message"])
    finally:
        sender.cancel()
    if ws.close_code != 1000:
        errors.append(f"closed with {ws.close_code}")
    return min(got, n)


async def load(url, xs, mode, realtime) -> tuple[list[float], int, list[str], float]:
    lat: list[float] = []
    errors: list[str] = []
    rng = random.Random(0)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        got = await asyncio.gather(*[client(s, url, x, mode, realtime, rng.uniform(0, CHUNK / RATE), lat, errors)
                                     for x in xs])
        wall = time.perf_counter() - t0
    return lat, sum(got), errors, wall


def inputs(args, n: int) -> list[np.ndarray]:
    """n streams of args.seconds each: the speech file looped, each from another offset."""
    if args.mode == "decode":
        rng = np.random.default_rng(0)  # tokens below 2048 fit every codebook
        return [rng.integers(0, 2048, int(args.seconds * 50)).astype("<u2") for _ in range(n)]
    from fastfocal.audio import read_audio

    sig = read_audio(args.audio, RATE).astype("<f4")
    total = int(args.seconds * RATE)
    sig = np.tile(sig, -(-2 * total // len(sig)))
    return [sig[(i * 7919) % total:][:total].copy() for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--model", default=str(ROOT / "tests/data/tiny_causal"))
    g.add_argument("--random-init", metavar="PRESET")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per client (default 10)")
    ap.add_argument("--max-streams", type=int, help="server slots (default: the largest --clients)")
    ap.add_argument("--audio", default=str(ROOT / "tests/data/audio/84-121123-0000.wav"))
    ap.add_argument("--fast", action="store_true", help="send as fast as the server reads (default: real time)")
    ap.add_argument("--threads", type=int, help="server OMP_NUM_THREADS (CPU)")
    ap.add_argument("--url", help="use this running server instead of starting one")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.jsonl"))
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, args.max_streams or max(args.clients))
    http = url.replace("ws://", "http://").replace("wss://", "https://")
    if args.mode == "decode":
        global CHUNK, RATE  # noqa: PLW0603 -- decode messages are 4 tokens at 50 per second
        CHUNK, RATE = 4, 50
    try:
        with urllib.request.urlopen(http + "/healthz", timeout=10) as r:
            health = json.loads(r.read())
        rows = []
        for n in args.clients:
            xs = inputs(args, n)
            before = scrape(http)
            lat, chunks, errors, wall = asyncio.run(load(url, xs, args.mode, not args.fast))
            after = scrape(http)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            ms = [v * 1e3 for v in lat] or [float("nan")]
            steps = d.get("fastfocal_steps_total", 0.0)
            row = {"bench": "serve_load", **machine(), "server": health.get("device"), "model": health.get("model"),
                   "dtype": health.get("dtype"), "mode": args.mode, "server_threads": args.threads, "clients": n, "seconds": args.seconds,
                   "realtime": not args.fast, "chunks": chunks,
                   "latency_ms": {"p50": round(pct(ms, .5), 2), "p90": round(pct(ms, .9), 2),
                                  "p99": round(pct(ms, .99), 2), "max": round(max(ms), 2)},
                   "steps": int(steps), "late_steps": int(d.get("fastfocal_late_steps_total", 0)),
                   "mean_batch": round(d.get("fastfocal_chunks_total", 0) / steps, 2) if steps else None,
                   "step_ms_mean": round(1e3 * d.get("fastfocal_step_seconds_sum", 0) / steps, 2) if steps else None,
                   "throughput_rt": round(chunks * CHUNK / RATE / wall, 2),
                   "errors": len(errors) + int(d.get("fastfocal_errors_total", 0)), "error_examples": errors[:3],
                   "command": "python bench/serve_load.py " + " ".join(sys.argv[1:])}
            rows.append(row)
            lm = row["latency_ms"]
            print(f"N={n:4d}  latency p50 {lm['p50']:7.2f} ms  p99 {lm['p99']:7.2f} ms  max {lm['max']:7.2f}  "
                  f"late steps {row['late_steps']}/{row['steps']}  batch {row['mean_batch']}  "
                  f"step {row['step_ms_mean']} ms  throughput {row['throughput_rt']}x real time  "
                  f"errors {row['errors']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"appended {len(rows)} rows to {args.out}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
