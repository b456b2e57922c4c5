"""`fastfocal serve` over real loopback WebSockets (tiny model, CPU): outputs equal StreamEngine
and offline whatever the message sizes; flush; auth; capacity; bad clients are closed alone;
disconnects free slots; backpressure; slow readers; drain; /healthz and /metrics; the CLI."""
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastfocal.client import ServerError, stream  # noqa: E402
from fastfocal.engine import StreamEngine  # noqa: E402
from fastfocal.server import Server  # noqa: E402
from helpers import assert_close, assert_tokens  # noqa: E402

ROOT = Path(__file__).parent.parent
TIMEOUT = 60  # seconds any one client session may take


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def speech(golden_causal):
    return golden_causal["sig"].astype(np.float32)  # (2, 64000) real speech at 16 kHz


class Running:
    """A Server on 127.0.0.1:<ephemeral> with its event loop in a background thread."""

    def __init__(self, codec, **kw):
        self.server = Server(codec, **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        _, port = self.call(self.server.start("127.0.0.1", 0))
        self.url, self.http = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}"
        self.port = port

    def call(self, coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        try:
            self.call(self.server.stop(drain_timeout=5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def get(self, path, key=None):
        """(status, body) of an HTTP GET."""
        req = urllib.request.Request(self.http + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def health(self):
        return json.loads(self.get("/healthz")[1])

    def wait_open(self, n, what="open streams"):
        """Poll /healthz until n streams are open (bounded)."""
        for _ in range(400):
            if self.health()["open_streams"] == n:
                return
            time.sleep(0.05)
        raise AssertionError(f"{what}: still {self.health()['open_streams']} open, expected {n}")


@contextlib.contextmanager
def serving(codec, **kw):
    r = Running(codec, **kw)
    try:
        yield r
    finally:
        r.close()


async def until(cond, what, timeout=20.0):
    """Poll cond() (bounded in time) until it holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def run(coro, timeout=TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclasses.dataclass
class Reply:
    ready: dict | None
    tokens: np.ndarray
    audio: np.ndarray
    kinds: list  # message kinds in arrival order: "ready", "tokens", "audio", "end", "error"
    error: str | None
    close_code: int | None


async def talk(url, pieces, mode="full", fmt="f32le", flush=True, headers=None, hold=None, go=None, seen=None):
    """Send binary (bytes) or text (str) pieces, then a flush; collect everything until close.
    go / hold: asyncio.Events awaited (bounded) before the first piece / before the flush;
    seen: an Event set when the first tokens arrive."""
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{url}/v1/stream?mode={mode}&format={fmt}", headers=headers)

        async def send():
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                if go is not None:
                    await asyncio.wait_for(go.wait(), TIMEOUT)
                for p in pieces:
                    await (ws.send_str(p) if isinstance(p, str) else ws.send_bytes(p))
                if hold is not None:
                    await asyncio.wait_for(hold.wait(), TIMEOUT)
                if flush:
                    await ws.send_str(json.dumps({"type": "flush"}))

        sender = asyncio.create_task(send())
        ready, toks, audio, kinds, error = None, [], [], [], None
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                kinds.append("audio")
                audio.append(np.frombuffer(msg.data, "<f4"))
            else:
                obj = json.loads(msg.data)
                kinds.append(obj["type"])
                if obj["type"] == "ready":
                    ready = obj
                elif obj["type"] == "tokens":
                    if seen is not None:
                        seen.set()
                    assert obj["index"] == len(toks), "token index is the stream position of the first token"
                    toks.extend(obj["tokens"])
                elif obj["type"] == "error":
                    error = obj["message"]
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        return Reply(ready, np.array(toks, np.int64), np.concatenate(audio) if audio else np.zeros(0, np.float32),
                     kinds, error, ws.close_code)


def split(data: np.ndarray, rng, lo=1, hi=4000, fmt="<f4") -> list[bytes]:
    """data cut into messages of random sizes."""
    out, a = [], 0
    while a < len(data):
        n = int(rng.integers(lo, hi))
        out.append(np.asarray(data[a:a + n]).astype(fmt).tobytes())
        a += n
    return out


def engine_ref(codec, mode, x):
    """(tokens, audio) of StreamEngine driven directly: submit, step while ready, finish."""
    e = StreamEngine(codec, 1, mode=mode)
    sid = e.open()
    e.submit(sid, torch.from_numpy(np.ascontiguousarray(x)))
    outs = []
    while e.ready():
        outs.append(e.step()[sid])
    outs.append(e.finish(sid))
    toks = None if mode == "decode" else torch.cat([o.tokens for o in outs]).numpy()
    audio = None if mode == "encode" else torch.cat([o.audio for o in outs]).float().numpy()
    return toks, audio


def windows(speech, n, rng, lo=4000, hi=16000):
    out = []
    for i in range(n):
        ln = int(rng.integers(lo, hi)) | 1  # never a whole number of chunks
        a = int(rng.integers(0, speech.shape[1] - ln))
        out.append(speech[i % 2, a:a + ln].copy())
    return out


def check_ok(r: Reply):
    assert r.error is None, r.error
    assert r.close_code == 1000
    assert r.kinds[0] == "ready" and r.kinds[-1] == "end" and r.kinds.count("end") == 1


def assert_offline_tokens(name, toks, codec, x):
    """Tokens of the whole chunks equal offline encoding. (The zero-padded flush tail, as in
    StreamEngine.finish and Stream.flush, may differ from offline in its last token.)"""
    n = 4 * (len(x) // 1280)
    assert_tokens(name, toks[:n], codec.sig_to_toks(torch.from_numpy(x))[:n])


def metric(srv, name, **labels):
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- exactness
def test_one_client_bit_exact_and_flush(causal, speech):
    """One stream (every step has batch 1): bytes served == StreamEngine's outputs exactly; the flush
    sends the zero-padded tail (one token per started 20 ms frame), then end, then close 1000."""
    rng = np.random.default_rng(0)
    x = speech[0, 1000:1000 + 9 * 1280 + 333].copy()
    with serving(causal, max_streams=2) as srv:
        r = run(talk(srv.url, split(x, rng)))
        empty = run(talk(srv.url, []))
    check_ok(empty)
    assert empty.kinds == ["ready", "end"]
    check_ok(r)
    ref_t, ref_a = engine_ref(causal, "full", x)
    assert np.array_equal(r.tokens, ref_t) and r.tokens.shape == (-(-len(x) // 320),)
    assert np.array_equal(r.audio, ref_a), "audio bit-identical to StreamEngine"
    assert_offline_tokens("vs offline", r.tokens, causal, x)
    ready = r.ready
    assert (ready["sample_rate_in"], ready["sample_rate_out"], ready["token_rate"], ready["chunk_samples"]) == \
        (16000, 24000, 50, 1280)
    assert ready["codebook_size"] == causal.codebook_size and ready["model"] == causal.name
    # per chunk: tokens then audio; the tail (2 tokens: 333 samples start 2 frames) likewise
    assert r.kinds[1:-1] == ["tokens", "audio"] * 10


def test_sixteen_clients_random_message_sizes(causal, speech):
    """16 concurrent streams (12 full, 4 encode) with random message sizes: tokens equal offline
    and StreamEngine exactly; audio equals StreamEngine (batching differs, so within 1e-5)."""
    rng = np.random.default_rng(1)
    xs = windows(speech, 16, rng)
    modes = ["full"] * 12 + ["encode"] * 4
    with serving(causal, max_streams=16) as srv:
        async def main():
            return await asyncio.gather(*[talk(srv.url, split(x, rng), mode=m) for x, m in zip(xs, modes)])
        replies = run(main())
        steps = metric(srv, "fastfocal_steps_total", mode="full")
    for i, (x, m, r) in enumerate(zip(xs, modes, replies)):
        check_ok(r)
        ref_t, ref_a = engine_ref(causal, m, x)
        assert_tokens(f"client {i} tokens vs StreamEngine", r.tokens, ref_t)
        assert_offline_tokens(f"client {i} tokens vs offline", r.tokens, causal, x)
        if m == "full":
            assert_close(f"client {i} audio", r.audio, ref_a, rel=1e-5)
        else:
            assert r.audio.size == 0 and "audio" not in r.kinds
    total = sum(len(x) // 1280 for x, m in zip(xs, modes) if m == "full")
    assert steps < total, "streams were batched together"


def test_s16le_input(causal, speech):
    rng = np.random.default_rng(2)
    pcm = np.round(speech[1, 3000:3000 + 7 * 1280 + 77] * 32767).astype(np.int16)
    with serving(causal, max_streams=1, modes=("encode",)) as srv:
        r = run(talk(srv.url, split(pcm, rng, fmt="<i2"), mode="encode", fmt="s16le"))
    check_ok(r)
    ref_t, _ = engine_ref(causal, "encode", pcm.astype(np.float32) / 32768)
    assert np.array_equal(r.tokens, ref_t)


def test_decode_mode_uint16_tokens(causal):
    rng = np.random.default_rng(3)
    toks = rng.integers(0, causal.codebook_size, 4 * 11 + 3)
    with serving(causal, max_streams=1, modes=("decode",)) as srv:
        r = run(talk(srv.url, split(toks, rng, 1, 13, fmt="<u2"), mode="decode"))
    check_ok(r)
    assert r.tokens.size == 0 and "tokens" not in r.kinds
    _, ref_a = engine_ref(causal, "decode", toks)
    assert np.array_equal(r.audio, ref_a) and r.audio.shape == (len(toks) * 480,)
    assert_close("vs offline", r.audio, causal.toks_to_sig(torch.from_numpy(toks)), rel=1e-5)


def test_client_module_and_cli(causal, speech, tmp_path):
    from fastfocal import cli
    from fastfocal.audio import read_audio

    wav = ROOT / "tests/data/audio/84-121123-0000.wav"
    with serving(causal, max_streams=2, api_key="sekrit") as srv:
        x = speech[0, :5000]
        res = run(stream(srv.url, x, message=999, api_key="sekrit"))
        assert np.array_equal(res.tokens, engine_ref(causal, "full", x)[0])
        with pytest.raises(ServerError, match="401"):
            run(stream(srv.url, x))
        assert cli.main(["client", str(wav), "--url", srv.url, "--mode", "encode", "--out", str(tmp_path),
                         "--api-key", "sekrit", "--message-ms", "30"]) == 0
        assert cli.main(["client", str(wav), "--url", srv.url, "--out", str(tmp_path / "nokey")]) == 2  # no key
        assert not (tmp_path / "nokey" / "84-121123-0000.npy").exists()
    got = np.load(tmp_path / "84-121123-0000.npy")
    assert got.dtype == np.uint16
    assert_tokens("cli client", got, causal.sig_to_toks(torch.from_numpy(read_audio(wav, 16000))))


# --------------------------------------------------------------------------- access
def test_api_key_401_before_upgrade(causal, speech):
    x = speech[0, :3000].tobytes()
    with serving(causal, max_streams=2, api_key="k1") as srv:
        for headers in (None, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                run(talk(srv.url, [x], headers=headers))
            assert e.value.status == 401
        check_ok(run(talk(srv.url, [x], headers={"Authorization": "Bearer k1"})))
        assert srv.get("/metrics")[0] == 401 and srv.get("/metrics", key="k1")[0] == 200
        assert srv.get("/healthz")[0] == 200  # probes need no key
        assert "fastfocal_errors_total{type=\"unauthorized\"} 4.0" in srv.get("/metrics", key="k1")[1]


def test_over_capacity_503(causal, speech):
    x = speech[0, :3000].tobytes()
    with serving(causal, max_streams=2, modes=("full",)) as srv:
        assert [srv.get("/v1/stream")[0] for _ in range(3)] == [400] * 3  # no upgrade: no slot taken

        async def main():
            async with aiohttp.ClientSession() as s:
                a = await s.ws_connect(f"{srv.url}/v1/stream")
                b = await s.ws_connect(f"{srv.url}/v1/stream")
                for w in (a, b):
                    assert json.loads((await w.receive()).data)["type"] == "ready"
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(f"{srv.url}/v1/stream")
                assert e.value.status == 503
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(f"{srv.url}/v1/stream?mode=decode")  # not served: 400
                assert e.value.status == 400
                await a.close()  # a slot frees; b keeps streaming
                await asyncio.to_thread(srv.wait_open, 1)
                return await asyncio.gather(talk(srv.url, [x]), _finish(b, x))
        fresh, b_kinds = run(main())
        check_ok(fresh)
        assert b_kinds[-1] == "end"
        srv.wait_open(0)
        assert srv.health()["free"] == {"full": 2}


async def _finish(ws, x):
    await ws.send_bytes(x)
    await ws.send_str('{"type": "flush"}')
    kinds = []
    async for m in ws:
        kinds.append("audio" if m.type == aiohttp.WSMsgType.BINARY else json.loads(m.data)["type"])
    assert ws.close_code == 1000
    return kinds


# --------------------------------------------------------------------------- bad clients
def test_bad_audio_closes_that_client_only(causal, speech):
    """NaN from one client, out-of-range samples from another: each gets error + 1008, the
    others' outputs stay exact."""
    rng = np.random.default_rng(4)
    xs = windows(speech, 4, rng, 8000, 14000)
    nan, loud = xs[1].copy(), xs[2].copy()
    nan[5000] = np.nan
    loud[6000] = 9.0
    sends = [xs[0], nan, loud, xs[3]]
    with serving(causal, max_streams=4, modes=("full",)) as srv:
        async def main():
            return await asyncio.gather(*[talk(srv.url, split(x, rng, 500, 3000)) for x in sends])
        replies = run(main())
        srv.wait_open(0)
        metrics = srv.get("/metrics")[1]
    for i in (1, 2):
        r = replies[i]
        assert r.close_code == 1008 and r.kinds[-1] == "error" and "end" not in r.kinds
    assert "NaN" in replies[1].error and "magnitude 9" in replies[2].error
    assert len(replies[1].tokens) <= 5000 // 320 + 1, "nothing after the bad message is processed"
    for i in (0, 3):
        check_ok(replies[i])
        ref_t, ref_a = engine_ref(causal, "full", xs[i])
        assert_tokens(f"client {i}", replies[i].tokens, ref_t)
        assert_close(f"client {i}", replies[i].audio, ref_a, rel=1e-5)
    assert 'fastfocal_errors_total{type="bad_input"} 2.0' in metrics


@pytest.mark.parametrize("mode,fmt,msg,expect", [
    ("full", "f32le", "flush", "malformed"),                     # not JSON
    ("full", "f32le", '["flush"]', "malformed"),
    ("full", "f32le", '{"kind": "flush"}', "malformed"),
    ("full", "f32le", '{"type": "rewind"}', "unknown message type"),
    ("full", "f32le", b"\0\0\0", "odd byte count"),
    ("encode", "s16le", b"\0\0\0", "odd byte count"),
    ("decode", "f32le", np.array([1, 4096], "<u2").tobytes(), "token out of range"),
    ("decode", "f32le", b"\1", "odd byte count"),
    pytest.param("full", "f32le", "[" * 100000, "malformed", id="deeper-than-the-recursion-limit"),
    pytest.param("full", "f32le", '{"type": "' + "\u20ac" * 80 + '"}', "unknown message type",
                 id="close-reason-cut-at-a-character"),
])
def test_malformed_messages_1008(causal, speech, mode, fmt, msg, expect):
    with serving(causal, max_streams=1, modes=(mode,)) as srv:
        good = speech[0, :2000].tobytes() if mode != "decode" else np.arange(8, dtype="<u2").tobytes()
        r = run(talk(srv.url, [good, msg], mode=mode, fmt=fmt, flush=False))
        assert r.close_code == 1008 and r.kinds[-1] == "error" and expect in r.error, r
        srv.wait_open(0)
        check_ok(run(talk(srv.url, [good], mode=mode)))  # the slot is free again


# --------------------------------------------------------------------------- disconnects, pacing
async def raw_ws(port, rcvbuf=None):
    """A hand-made WebSocket client (so it can vanish or stop reading at will)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/stream?mode=full HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return reader, writer


def frame(payload: bytes, opcode: int = 2) -> bytes:
    n, mask = len(payload), os.urandom(4)
    ln = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536
                                          else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
    body = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return bytes([0x80 | opcode]) + ln + mask + body.tobytes()


@pytest.mark.parametrize("when", ["after_upgrade", "mid_stream", "mid_flush", "graceful_close"])
def test_disconnect_frees_the_slot(causal, speech, when):
    x = speech[0, :6 * 1280 + 5]
    with serving(causal, max_streams=1, modes=("full",)) as srv:
        async def main():
            if when == "graceful_close":  # closes without a flush: the pending input is dropped
                async with aiohttp.ClientSession() as s:
                    ws = await s.ws_connect(f"{srv.url}/v1/stream")
                    await ws.send_bytes(x.tobytes())
                    await ws.close()
                return
            reader, writer = await raw_ws(srv.port)
            if when != "after_upgrade":
                writer.write(frame(x.tobytes()))
            if when == "mid_flush":
                writer.write(frame(b'{"type": "flush"}', opcode=1))
            await writer.drain()
            writer.transport.abort()  # no close frame: the TCP connection just goes away

        run(main())
        srv.wait_open(0, when)
        r = run(talk(srv.url, [x.tobytes()]))  # the only slot serves the next client, exactly
    check_ok(r)
    assert np.array_equal(r.tokens, engine_ref(causal, "full", x)[0])


def test_backpressure_bounds_what_is_read(causal, speech):
    """While the engine is busy, a fast sender's socket is read only until max_pending_chunks
    chunks wait; everything arrives once the engine moves again, exactly."""
    x = np.tile(speech[0], 2)[:60 * 1280]
    gate = threading.Event()
    with serving(causal, max_streams=2, modes=("full",), max_pending_chunks=3) as srv:
        async def main():
            go = asyncio.Event()
            task = asyncio.create_task(talk(srv.url, split(x, np.random.default_rng(5), 1280, 1281), go=go))
            await until(lambda: srv.server.conns, "connection registered")
            conn = next(iter(srv.server.conns.values()))
            srv.server.worker.post(gate.wait, 30)  # blocks the engine thread until released
            go.set()
            # the reader stops after 4 one-chunk messages (3 may wait); give it time to overshoot
            await until(lambda: conn.submitted >= 4 * 1280, "4 chunks read")
            await asyncio.sleep(0.3)
            read = conn.submitted
            gate.set()
            return read, await task
        read, r = run(main())
    assert read == 4 * 1280, f"read {read / 1280} chunks while the engine was stalled"
    check_ok(r)
    assert np.array_equal(r.tokens, engine_ref(causal, "full", x)[0])


def test_client_that_stops_reading_is_closed_alone(causal, speech):
    """A client that sends but never reads: its input is taken only while its output fits the
    bounded queue, then nothing can be sent for send_timeout and it is closed (slow_client);
    another client meanwhile gets its stream exactly."""
    chunk = speech[0, :1280].tobytes()
    x = speech[1, :20 * 1280 + 9]
    with serving(causal, max_streams=2, modes=("full",), max_queued=8, close_timeout=1.0, send_timeout=2.0) as srv:
        async def slow():
            reader, writer = await raw_ws(srv.port, rcvbuf=4096)
            await until(lambda: srv.server.conns, "connection registered")
            # a slow link: without this the kernel's autotuned send buffer (MBs) absorbs minutes of output
            conn = next(iter(srv.server.conns.values()))
            conn.request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            try:
                for _ in range(2000):  # a real-time-ish sender; the server gives up after ~50 chunks
                    writer.write(frame(chunk))
                    await asyncio.wait_for(writer.drain(), 20)
                    if metric(srv, "fastfocal_errors_total", type="slow_client"):
                        return True
                    await asyncio.sleep(0.005)
            except (ConnectionError, asyncio.TimeoutError):
                return bool(metric(srv, "fastfocal_errors_total", type="slow_client"))
            finally:
                writer.transport.abort()
            return False

        async def main():
            return await asyncio.gather(slow(), talk(srv.url, split(x, np.random.default_rng(6), 100, 3000)))
        closed, r = run(main())
        srv.wait_open(0)
    assert closed, "the non-reading client was closed with slow_client"
    check_ok(r)
    assert np.array_equal(r.tokens, engine_ref(causal, "full", x)[0])


def test_drain_ends_open_streams(causal, speech):
    """drain (what SIGTERM runs): new streams get 503, open ones get the output of everything
    they sent, then end and 1000."""
    x = speech[0, :5 * 1280 + 100]
    with serving(causal, max_streams=2, modes=("full",)) as srv:
        async def main():
            hold = asyncio.Event()  # never set: the client would stream on; the drain ends it
            task = asyncio.create_task(talk(srv.url, [x.tobytes()], hold=hold))
            await until(lambda: any(c.submitted == len(x) for c in list(srv.server.conns.values())),
                        "input submitted")
            drain = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.server.drain(10), srv.loop))
            await until(lambda: srv.server.draining, "draining")
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await talk(srv.url, [])
            assert e.value.status == 503
            r = await task
            await drain
            return r
        r = run(main())
        assert srv.get("/healthz")[0] == 503 and srv.health()["status"] == "draining"
    check_ok(r)
    ref_t, ref_a = engine_ref(causal, "full", x)
    assert np.array_equal(r.tokens, ref_t) and np.array_equal(r.audio, ref_a)


# --------------------------------------------------------------------------- health, metrics
def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_healthz_and_metrics(causal, speech):
    x = speech[0, :4 * 1280 + 50]
    with serving(causal, max_streams=3, modes=("full", "decode")) as srv, \
            serving(causal, max_streams=1, modes=("encode",)) as other:
        h = srv.health()
        assert h == {"status": "ok", "model": causal.name, "device": "cpu", "dtype": "float32",
                     "modes": ["full", "decode"], "capacity": 3, "open_streams": 0,
                     "streams": {"full": 0, "decode": 0}, "free": {"full": 3, "decode": 3}}
        r = run(talk(srv.url, [x.tobytes()]))
        check_ok(r)
        status, text = srv.get("/metrics")
        m = _samples(text)
        other_m = _samples(other.get("/metrics")[1])  # a second server has its own registry
    assert status == 200
    full = (("mode", "full"),)
    assert m[("fastfocal_steps_total", full)] == 4 and m[("fastfocal_chunks_total", full)] == 4
    assert m[("fastfocal_step_seconds_count", full)] == 4
    assert m[("fastfocal_step_seconds_bucket", (("le", "+Inf"),) + full)] == 4
    assert ("fastfocal_late_steps_total", full) in m
    assert m[("fastfocal_open_streams", full)] == 0 and m[("fastfocal_capacity_streams", full)] == 3
    assert m[("fastfocal_connections_total", full)] == 1
    assert m[("fastfocal_bytes_in_total", ())] == x.nbytes + len('{"type": "flush"}')
    assert m[("fastfocal_bytes_out_total", ())] >= r.audio.nbytes
    assert m[("fastfocal_errors_total", (("type", "bad_input"),))] == 0
    assert ("fastfocal_steps_total", (("mode", "encode"),)) not in m
    assert other_m[("fastfocal_steps_total", (("mode", "encode"),))] == 0
    assert all(name.startswith("fastfocal_") for name, _ in m)


def test_serve_command_sigterm_drains(causal, speech):
    """`fastfocal serve` as a process: prints where it listens, serves, and on SIGTERM ends the
    open stream with end + 1000 and exits 0."""
    env = {**os.environ, "FASTFOCAL_API_KEY": "", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "fastfocal", "serve", "--model", str(ROOT / "tests/data/tiny_causal"),
                          "--device", "cpu", "--port", "0", "--max-streams", "2", "--modes", "full",
                          "--idle-timeout", "0", "--send-timeout", "10"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline and p.poll() is None:
            line = p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, p.poll(), p.stderr.read() if p.poll() is not None else "")
        url = f"ws://127.0.0.1:{m.group(1)}"
        x = speech[0, :3 * 1280 + 7]

        async def main():
            hold, seen = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(talk(url, [x.tobytes()], hold=hold, seen=seen))
            await asyncio.wait_for(seen.wait(), TIMEOUT)  # one message: all of it was submitted
            p.send_signal(signal.SIGTERM)
            return await task
        r = run(main())
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    check_ok(r)
    assert np.array_equal(r.tokens, engine_ref(causal, "full", x)[0])


def test_serve_command_bad_timeout_is_one_line():
    r = subprocess.run([sys.executable, "-m", "fastfocal", "serve", "--model", str(ROOT / "tests/data/tiny_causal"),
                        "--device", "cpu", "--port", "0", "--send-timeout", "-1"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "send_timeout must be a positive number" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.gpu
def test_cuda_engine_thread_with_graphs(speech):
    """On CUDA the engine thread replays graphs captured on the main thread: one stream is
    bit-identical to StreamEngine on the same device; concurrent streams all complete."""
    import fastfocal

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = fastfocal.load(ROOT / "tests/data/tiny_causal", device="cuda", dtype=torch.float32)
    rng = np.random.default_rng(7)
    x = speech[0, :12 * 1280 + 99].copy()
    with serving(codec, max_streams=4, modes=("full",)) as srv:
        r = run(talk(srv.url, split(x, rng)))
        xs = windows(speech, 4, rng)

        async def many():
            return await asyncio.gather(*[talk(srv.url, split(w, rng)) for w in xs])
        replies = run(many())
    check_ok(r)
    e = StreamEngine(codec, 4, mode="full")  # same buckets, so the same batch-1 graph
    sid = e.open()
    e.submit(sid, torch.from_numpy(x))
    outs = []
    while e.ready():
        outs.append(e.step()[sid])
    outs.append(e.finish(sid))
    assert np.array_equal(r.tokens, torch.cat([o.tokens for o in outs]).cpu().numpy())
    assert np.array_equal(r.audio, torch.cat([o.audio for o in outs]).float().cpu().numpy())
    for w, q in zip(xs, replies):
        check_ok(q)
        assert q.tokens.shape == (-(-len(w) // 320),) and q.audio.shape == (-(-len(w) // 320) * 480,)


# --------------------------------------------------------------------------- long messages, slow links, idle peers
def test_one_long_message_is_taken_in_pieces(causal):
    """A decode message of 1,000 chunks is handed to the engine a few chunks at a time: the
    engine's shared input rings stay small (they grew for every slot before), and the audio is
    the engine's on the whole input."""
    from fastfocal import engine as engine_mod

    toks = np.random.default_rng(11).integers(0, causal.codebook_size, 4000).astype("<u2")
    with serving(causal, max_streams=4, modes=("decode",), max_pending_chunks=3) as srv:
        real, pieces = srv.server.worker.submit, []
        srv.server.worker.submit = lambda mode, sid, x: pieces.append(len(x)) or real(mode, sid, x)
        r = run(talk(srv.url, [toks.tobytes()], mode="decode"), timeout=120)
        depth = srv.server.engines["decode"]._ring.shape[0]
    check_ok(r)
    assert sum(pieces) == len(toks) and max(pieces) <= 4 * 4, pieces[:10]  # at most max_pending + 1 chunks
    assert depth <= engine_mod.MAX_RING_CHUNKS, depth


def test_default_pacing_stays_on_the_ring_path(causal, monkeypatch):
    """With the default max_pending_chunks a fast sender's pieces fit the shared rings: no
    per-stream backlog (the slow path kept for input the engine is handed directly)."""
    from fastfocal import engine as engine_mod

    spills = []
    real = engine_mod.StreamEngine._spill
    monkeypatch.setattr(engine_mod.StreamEngine, "_spill", lambda self, *a: spills.append(1) or real(self, *a))
    toks = np.random.default_rng(13).integers(0, causal.codebook_size, 1000).astype("<u2")
    with serving(causal, max_streams=2, modes=("decode",)) as srv:
        r = run(talk(srv.url, [toks.tobytes()], mode="decode"), timeout=120)
    check_ok(r)
    assert not spills, f"{len(spills)} submits went to the backlog"
    assert_close("decode audio", r.audio, engine_ref(causal, "decode", toks.astype(np.int64))[1], rel=1e-5)


def test_reading_client_on_a_slow_link_is_paced_not_dropped(causal, speech):
    """A client sending as fast as it can but reading everything, over a link slower than the
    engine's output: input is taken only while its output fits the queue, so the stream runs
    to the end (it was closed as slow_client)."""
    x = np.tile(speech[0], 2)[:60 * 1280 + 7]
    with serving(causal, max_streams=1, modes=("full",), max_queued=16) as srv:
        async def main():
            reader, writer = await raw_ws(srv.port, rcvbuf=4096)
            await until(lambda: srv.server.conns, "connection registered")
            conn = next(iter(srv.server.conns.values()))
            conn.request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for a in range(0, len(x), 1280):
                writer.write(frame(x[a:a + 1280].tobytes()))
            writer.write(frame(b'{"type": "flush"}', opcode=1))
            frames = []
            while True:  # a slow reader (~2x real time): 4 KiB at a time, 20 ms apart
                head = await asyncio.wait_for(reader.readexactly(2), 30)
                n = head[1] & 0x7F
                if n == 126:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                elif n == 127:
                    n = int.from_bytes(await reader.readexactly(8), "big")
                body = b""
                while len(body) < n:
                    body += await reader.read(min(4096, n - len(body)))
                    await asyncio.sleep(0.02)
                frames.append((head[0] & 0x0F, body))
                if head[0] & 0x0F == 8:  # close
                    writer.transport.abort()
                    return frames
        frames = run(main(), timeout=120)
    texts = [json.loads(b) for op, b in frames if op == 1]
    assert texts[-1]["type"] == "end", texts[-3:]
    assert int.from_bytes(frames[-1][1][:2], "big") == 1000
    toks = [t for m in texts if m["type"] == "tokens" for t in m["tokens"]]
    audio = np.concatenate([np.frombuffer(b, "<f4") for op, b in frames if op == 2])
    ref_t, ref_a = engine_ref(causal, "full", x)
    assert np.array_equal(np.array(toks), ref_t)
    assert_close("audio", audio, ref_a, rel=1e-5)


def test_close_is_seen_while_the_reader_is_parked(causal):
    """A client that sends a long decode message and then closes: the close is looked ahead
    while the message's chunks wait, so the slot is freed at once (it waited for the whole
    backlog to be decoded and sent)."""
    toks = np.random.default_rng(12).integers(0, causal.codebook_size, 8000).astype("<u2")
    with serving(causal, max_streams=1, modes=("decode",), max_pending_chunks=2) as srv:
        async def main():
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(f"{srv.url}/v1/stream?mode=decode")
                await ws.send_bytes(toks.tobytes())
                await ws.receive()  # ready
                await ws.close()
        run(main())
        srv.wait_open(0, "after the close")  # freed: a bounded wait, not a measured duration
        stepped = srv.server.metrics.chunks.labels("decode")._value.get()
    assert stepped < 200, f"{stepped:.0f} of 2000 chunks decoded for a client that had closed"


def test_idle_peer_is_closed_and_frees_its_slot(causal, speech):
    """A peer that connects and sends nothing holds no slot past idle_timeout; a stream that
    sends within it is unaffected."""
    with serving(causal, max_streams=1, modes=("full",), idle_timeout=0.5) as srv:
        async def main():
            reader, writer = await raw_ws(srv.port)
            data = await asyncio.wait_for(reader.read(1 << 16), 10)  # ready, then error + close
            while b'"error"' not in data or data.count(b"\x88") == 0:
                more = await asyncio.wait_for(reader.read(1 << 16), 10)
                if not more:
                    break
                data += more
            writer.transport.abort()
            return data
        data = run(main())
        assert b"no message for 0.5 s" in data
        srv.wait_open(0, "idle peer")
        assert metric(srv, "fastfocal_errors_total", type="idle_client") == 1
        x = speech[0, :3 * 1280 + 11]
        r = run(talk(srv.url, split(x, np.random.default_rng(3), 500, 1500)))
    check_ok(r)


def test_refused_submit_after_flush_is_reported(causal, speech, monkeypatch):
    """The engine refusing a submit (e.g. no memory to take it) ends the stream with that error,
    also when the flush was already read: its output would silently be missing."""
    from fastfocal.inputs import InputError

    x = speech[0, :3 * 1280]
    with serving(causal, max_streams=1, modes=("full",)) as srv:
        real = srv.server.worker.submit
        calls = []

        def submit(mode, sid, piece):
            calls.append(len(piece))
            if len(calls) == 2:
                raise InputError("input rings for 1 stream need 9 GiB, 1 GiB free")
            return real(mode, sid, piece)

        monkeypatch.setattr(srv.server.worker, "submit", submit)
        r = run(talk(srv.url, [x[:1280].tobytes(), x[1280:].tobytes()]))
    assert r.close_code == 1008 and r.kinds[-1] == "error" and "9 GiB" in r.error, r


def test_drain_timeout_closes_what_is_left(causal, speech):
    """drain(timeout): streams still open when it runs out are dropped, so shutdown ends."""
    with serving(causal, max_streams=1, modes=("full",), send_timeout=60.0) as srv:
        async def main():
            reader, writer = await raw_ws(srv.port, rcvbuf=4096)  # never reads
            await until(lambda: srv.server.conns, "connection registered")
            conn = next(iter(srv.server.conns.values()))
            conn.request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for _ in range(40):
                writer.write(frame(speech[0, :1280].tobytes()))
            await until(lambda: conn.stepped >= 3, "steps")
            # drain(1.0) must end on its own timeout: without it the send blocked for the
            # 60 s send_timeout, and this wait (far below it) fails
            await asyncio.wait_for(asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(srv.server.drain(1.0), srv.loop)), 1.0 + srv.server.close_timeout + 20)
            writer.transport.abort()
        run(main())
        assert not srv.server.conns
        assert metric(srv, "fastfocal_errors_total", type="shutdown") == 1
