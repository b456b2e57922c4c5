"""`fastfocal serve`: StreamEngine as a WebSocket service (aiohttp), with Prometheus metrics.

    server = Server(codec, max_streams=64)          # one StreamEngine per mode (full/encode/decode)
    await server.start("127.0.0.1", 8080)           # or serve(codec, ...) which blocks and drains on SIGTERM

Protocol (README "Serving over the network"): GET /v1/stream?mode=full|encode|decode&format=f32le|s16le
upgrades to a WebSocket; binary in = PCM (or uint16 tokens in decode mode), text {"type": "flush"}
ends the stream; out = {"type": "ready"}, then per 80 ms chunk {"type": "tokens"} and/or float32
PCM, then {"type": "end"} and close 1000. Errors: {"type": "error"} and close 1008 (client) / 1011.

Threads: the asyncio loop does all network I/O; one engine thread owns every StreamEngine call
(the engine is not thread-safe) and takes commands (open, submit, finish, close) from a queue. It
runs them in arrival order, then steps every engine that has a whole chunk ready, and waits only
when there is nothing to do. Outputs of one step go back to the loop in one callback.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import signal
import threading
import time

import numpy as np
import torch
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .codec import Codec
from .engine import EngineFull, StepResult, StreamEngine, StreamOutput
from .inputs import InputError, amplitude_problem
from .pipeline import ERRORS, MODES as PIPELINE_MODES

log = logging.getLogger("fastfocal.server")

MODES = tuple(PIPELINE_MODES)  # full, encode, decode
FORMATS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}
ERROR_TYPES = ("unauthorized", "over_capacity", "bad_request", "bad_input", "bad_message", "slow_client",
               "idle_client", "stream", "shutdown", "internal")
_END = object()  # output-queue marker: send {"type": "end"} and close 1000


class Metrics:
    """The server's Prometheus metrics, in a private registry (several servers per process in tests)."""

    def __init__(self, modes):
        r = self.registry = CollectorRegistry()
        self.open_streams = Gauge("fastfocal_open_streams", "Open streams", ["mode"], registry=r)
        self.capacity = Gauge("fastfocal_capacity_streams", "Stream slots", ["mode"], registry=r)
        self.connections = Counter("fastfocal_connections", "Accepted stream connections", ["mode"], registry=r)
        self.steps = Counter("fastfocal_steps", "Batched engine steps", ["mode"], registry=r)
        self.chunks = Counter("fastfocal_chunks", "Stream chunks stepped (sum of step batch sizes)", ["mode"],
                              registry=r)
        self.step_seconds = Histogram("fastfocal_step_seconds", "Engine step duration, output copy included",
                                      ["mode"], registry=r,
                                      buckets=(.001, .002, .005, .01, .02, .04, .06, .08, .1, .15, .2, .5, 1.0))
        self.late_steps = Counter("fastfocal_late_steps", "Steps longer than one chunk of audio (80 ms)", ["mode"],
                                  registry=r)
        self.bytes_in = Counter("fastfocal_bytes_in", "WebSocket payload bytes received", registry=r)
        self.bytes_out = Counter("fastfocal_bytes_out", "WebSocket payload bytes sent", registry=r)
        self.errors = Counter("fastfocal_errors", "Errors by type", ["type"], registry=r)
        for m in modes:  # export zeros from the start
            for c in (self.open_streams, self.connections, self.steps, self.chunks, self.late_steps):
                c.labels(m)
            self.step_seconds.labels(m)
        for t in ERROR_TYPES:
            self.errors.labels(t)


def _resolve(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _pack_one(out: StreamOutput):
    """(tokens list | None, float32 LE audio bytes | None, error) of one stream's output."""
    toks = None if out.tokens is None else out.tokens.cpu().tolist()
    audio = None if out.audio is None else out.audio.detach().float().cpu().numpy().astype("<f4", copy=False).tobytes()
    return toks, audio, out.error


def _pack(r: StepResult) -> list:
    """[(sid, tokens, audio bytes, error)] for one step; one device->host copy per output kind."""
    if not len(r):
        return []
    toks = None if r.tokens is None else r.tokens.cpu().numpy()
    audio = None if r.audio is None else r.audio.cpu().numpy().astype("<f4", copy=False)
    return [(sid, None if toks is None else toks[i].tolist(), None if audio is None else audio[i].tobytes(),
             ERRORS.get(code)) for i, (sid, code) in enumerate(zip(r.ids.tolist(), r.errors.tolist()))]


class EngineThread:
    """Owns the engines: runs commands from the event loop in order, steps whatever is ready."""

    def __init__(self, engines: dict[str, StreamEngine], metrics: Metrics, budget_s: float):
        self.engines, self.metrics, self.budget_s = engines, metrics, budget_s
        self._cmds: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fastfocal-engine", daemon=True)
        self.loop = self.deliver = self.failed = None

    def start(self, loop, deliver, failed) -> None:
        self.loop, self.deliver, self.failed = loop, deliver, failed
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- called on the event loop
    def call(self, fn, *args) -> asyncio.Future:
        """Run fn(*args) on the engine thread; the future resolves on the loop."""
        fut = self.loop.create_future()
        self._put((fn, args, fut, None))
        return fut

    def post(self, fn, *args, on_error=None) -> None:
        """Run fn(*args) on the engine thread without a future; on_error(exc) runs on the loop."""
        self._put((fn, args, None, on_error))

    def _put(self, cmd) -> None:
        with self._cv:
            self._cmds.append(cmd)
            self._cv.notify()

    def _to_loop(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    # -- engine thread
    def _ready(self) -> bool:
        return any(e.ready() for e in self.engines.values())

    def _run(self) -> None:
        dev = next(iter(self.engines.values())).device
        if dev.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(dev)
        while True:
            with self._cv:
                while not self._cmds and not self._stop and not self._ready():
                    self._cv.wait()
                if self._stop:  # shutting down: what is queued is dropped (the loop is going away)
                    return
                cmds, self._cmds = self._cmds, collections.deque()
            for fn, args, fut, on_error in cmds:
                try:
                    res, exc = fn(*args), None
                except Exception as e:  # noqa: BLE001 -- handed to the caller
                    res, exc = None, e
                if fut is not None:
                    self._to_loop(_resolve, fut, res, exc)
                elif exc is not None and on_error is not None:
                    self._to_loop(on_error, exc)
            for mode, eng in self.engines.items():
                if eng.ready():
                    self.step(mode)

    def step(self, mode: str) -> None:
        eng = self.engines[mode]
        t0 = time.perf_counter()
        try:
            items = _pack(eng.step_batch())
        except Exception as e:  # noqa: BLE001 -- a bug or device error: fail this engine's streams, keep serving
            log.exception("engine step failed (%s)", mode)
            sids = eng.streams
            for s in sids:
                eng.close(s)
            self._to_loop(self.failed, mode, sids, f"engine step failed: {type(e).__name__}")
            return
        dt = time.perf_counter() - t0
        m = self.metrics
        m.steps.labels(mode).inc()
        m.chunks.labels(mode).inc(len(items))
        m.step_seconds.labels(mode).observe(dt)
        if dt > self.budget_s:
            m.late_steps.labels(mode).inc()
        self._to_loop(self.deliver, mode, items)

    # commands (engine thread)
    def open(self, mode: str) -> int:
        return self.engines[mode].open()

    def submit(self, mode: str, sid: int, x: torch.Tensor) -> None:
        self.engines[mode].submit(sid, x)

    def finish_later(self, mode: str, sid: int) -> asyncio.Future:
        """End a stream: its whole chunks go through the batched steps as they would without a
        flush (one step a turn of the engine loop, so other commands and modes keep running),
        then the tail. The future resolves on the loop with `_pack_one` of the tail."""
        fut = self.loop.create_future()
        self._put((self._finish_when_stepped, (mode, sid, fut), None, None))
        return fut

    def _finish_when_stepped(self, mode: str, sid: int, fut) -> None:
        eng = self.engines[mode]
        try:
            if sid in eng.ready():  # the loop steps it after this turn's commands; look again then
                self._put((self._finish_when_stepped, (mode, sid, fut), None, None))
                return
            res, exc = _pack_one(eng.finish(sid)), None
        except Exception as e:  # noqa: BLE001 -- handed to the caller
            res, exc = None, e
        self._to_loop(_resolve, fut, res, exc)

    def close(self, mode: str, sid: int) -> None:
        try:
            self.engines[mode].close(sid)
        except KeyError:  # already finished or failed
            pass


class _Conn:
    """One WebSocket stream: counters for backpressure, the bounded output queue, the stop reason."""

    def __init__(self, server: Server, request, mode: str, fmt: str, sid: int):
        self.server, self.request, self.mode, self.fmt, self.sid = server, request, mode, fmt, sid
        self.chunk = server.engines[mode].chunk
        self.ws: web.WebSocketResponse | None = None
        self.stopped: asyncio.Future = asyncio.get_running_loop().create_future()
        self.out: collections.deque = collections.deque()
        self.has_out = asyncio.Event()
        self.moved = asyncio.Event()  # a chunk stepped or an output sent: the reader may go on
        self.submitted = 0  # samples (tokens in decode mode) handed to the engine
        self.stepped = 0  # chunks that came back
        self.index = 0  # tokens sent so far
        self.finished = False  # the engine freed the slot (finish or a failed step)
        self.accepting = True  # outputs still wanted (false once closed or failed)
        self.input_error: str | None = None  # a submit the engine refused (reported even after a flush)
        self.active = time.monotonic()  # last message in or out (the idle timeout)
        self.per_chunk = 2 if mode == "full" else 1  # output messages per stepped chunk
        self.task: asyncio.Task | None = None  # the connection's handler

    def pending_chunks(self) -> int:
        return self.submitted // self.chunk - self.stepped

    def room(self) -> int:
        """Chunks more input may complete now: at most max_pending_chunks + 1 wait in the engine,
        and what they will output fits the output queue, so a client that reads is never
        overflowed however fast it sends (reading pauses instead)."""
        srv, pending = self.server, self.pending_chunks()
        return min(srv.max_pending + 1 - pending, (srv.max_queued - len(self.out)) // self.per_chunk - pending)

    def stop(self, kind: str, code: int = 1000, message: str = "", etype: str | None = None) -> None:
        """kind: 'flush' (also drain), 'closed' (client gone) or 'error'. First reason wins."""
        if not self.stopped.done():
            self.stopped.set_result((kind, code, message, etype))
            self.accepting = kind == "flush"
        self.moved.set()

    def abort(self, reason: str) -> None:
        """Shutdown past the drain timeout: drop the connection and end its handler now."""
        log.warning("stream %s/%d: %s", self.mode, self.sid, reason)
        self.server.metrics.errors.labels("shutdown").inc()
        self.accepting = False
        tr = self.request.transport
        if tr is not None:
            tr.abort()
        if self.task is not None:
            self.task.cancel()

    def refused(self, e: Exception) -> None:
        """The engine refused a submit: the stream ends with that error (also if a flush was read)."""
        self.input_error = str(e)
        self.stop("error", 1008, str(e), "bad_input")

    def push(self, item, force: bool = False) -> None:
        if not self.accepting:
            return
        # while flushing, the tail is bounded by the pending input: no overflow check
        if not force and not self.stopped.done() and len(self.out) >= self.server.max_queued:
            self.stop("error", 1008, "output queue full: the client is not reading", "slow_client")
            return
        self.out.append(item)
        self.has_out.set()

    def emit(self, toks, audio) -> None:
        if toks:
            self.push(json.dumps({"type": "tokens", "tokens": toks, "index": self.index}))
            self.index += len(toks)
        if audio:
            self.push(audio)

    def on_chunk(self, toks, audio, err) -> None:
        self.stepped += 1
        self.moved.set()
        if err is not None:
            self.stop("error", *_engine_error(err))
            return
        self.emit(toks, audio)


def _engine_error(err: str) -> tuple[int, str, str]:
    # input is checked before submit, so an input error from the engine is still the client's
    if "input" in err:
        return 1008, err, "bad_input"
    return 1011, err, "stream"


class _ClientFault(Exception):
    def __init__(self, message: str, etype: str):
        super().__init__(message)
        self.etype = etype


class Server:
    """WebSocket front end for StreamEngine: one engine per served mode, one engine thread.

    max_streams: slots per mode (beyond it: HTTP 503). api_key: required as `Authorization:
    Bearer KEY` on /v1/stream and /metrics (HTTP 401 otherwise); /healthz stays open for balancers.
    max_pending_chunks: a connection's input goes to the engine while at most this many chunks
    wait there (a long message in pieces); beyond it the socket is not read (TCP backpressure
    paces fast senders). max_queued: output messages queued for a connection; input is taken only
    while its output fits, so a client that reads is paced, never dropped. send_timeout: a
    connection whose next output message cannot be sent for this long is not reading: error 1008
    and close. idle_timeout: a connection with nothing pending that sends nothing for this long
    is closed (1008; None: never). heartbeat: WebSocket pings at this interval; a peer that
    does not answer is gone (its slot is freed).
    """

    def __init__(self, codec: Codec, max_streams: int = 64, modes=MODES, api_key: str | None = None,
                 max_pending_chunks: int = 8, max_queued: int = 64, max_message_bytes: int = 4 << 20,
                 close_timeout: float = 5.0, cuda_graphs: bool = True, send_timeout: float = 30.0,
                 idle_timeout: float | None = 60.0, heartbeat: float | None = 20.0):
        modes = tuple(dict.fromkeys(modes))
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise InputError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
        for name, v in (("max_pending_chunks", max_pending_chunks), ("max_queued", max_queued),
                        ("max_message_bytes", max_message_bytes)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if max_queued < 4:  # the ready message and one stepped chunk's outputs must fit
            raise InputError(f"max_queued must be at least 4, got {max_queued}")
        for name, v, optional in (("send_timeout", send_timeout, False), ("close_timeout", close_timeout, False),
                                  ("idle_timeout", idle_timeout, True), ("heartbeat", heartbeat, True)):
            if not (v is None and optional) and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise InputError(f"{name} must be a positive number of seconds{' or None' if optional else ''}, got {v!r}")
        self.send_timeout, self.idle_timeout, self.heartbeat = float(send_timeout), idle_timeout, heartbeat
        self.codec, self.api_key, self.max_streams = codec, api_key or None, max_streams
        self.max_pending, self.max_queued, self.max_message_bytes = max_pending_chunks, max_queued, max_message_bytes
        self.close_timeout = close_timeout
        self.engines = {m: StreamEngine(codec, max_streams, mode=m, cuda_graphs=cuda_graphs) for m in modes}
        self.metrics = Metrics(modes)
        for m in modes:
            self.metrics.capacity.labels(m).set(max_streams)
        self.worker = EngineThread(self.engines, self.metrics, codec.chunk_size / codec.sample_rate_input)
        self.conns: dict[tuple[str, int], _Conn] = {}
        self.draining = False
        self.runner: web.AppRunner | None = None
        self._idle: asyncio.Event | None = None
        tr = codec.token_rate
        self.info = {"sample_rate_in": codec.sample_rate_input, "sample_rate_out": codec.sample_rate_output,
                     "token_rate": int(tr) if float(tr).is_integer() else tr, "codebook_size": codec.codebook_size,
                     "chunk_samples": codec.chunk_size, "chunk_tokens": codec.chunk_size // codec.config.token_hop,
                     "model": codec.name}

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/stream", self._stream)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        """Start the engine thread and listen; returns the bound (host, port) (port 0: any free)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.worker.start(asyncio.get_running_loop(), self._deliver, self._engine_failed)
        self.runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        h, p = self.runner.addresses[0][:2]
        return h, p

    async def drain(self, timeout: float = 30.0) -> None:
        """No new streams; every open one is flushed (its pending input run, then end + 1000)."""
        self.draining = True
        if self._idle is None:  # never started
            return
        for c in list(self.conns.values()):
            c.stop("flush", 1000, "server draining")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain: %d streams still open after %.0f s: closing them", len(self.conns), timeout)
            for c in list(self.conns.values()):
                c.abort("server shutting down: drain timeout")
            try:
                await asyncio.wait_for(self._idle.wait(), self.close_timeout + 1.0)
            except asyncio.TimeoutError:
                log.warning("drain: %d streams did not close", len(self.conns))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        await self.drain(drain_timeout)
        if self.runner is not None:
            await self.runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    # ------------------------------------------------------------------ HTTP endpoints
    def _authorized(self, request) -> bool:
        if self.api_key is None:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    def _refuse(self, status: int, message: str, etype: str) -> web.Response:
        self.metrics.errors.labels(etype).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"type": "error", "message": message}, status=status, headers=headers)

    async def _healthz(self, request) -> web.Response:
        streams = {m: 0 for m in self.engines}
        for m, _ in self.conns:
            streams[m] += 1
        body = {"status": "draining" if self.draining else "ok", "model": self.codec.name,
                "device": str(self.codec.device), "dtype": str(self.codec.dtype).removeprefix("torch."),
                "modes": list(self.engines), "capacity": self.max_streams, "open_streams": sum(streams.values()),
                "streams": streams, "free": {m: self.max_streams - n for m, n in streams.items()}}
        return web.json_response(body, status=503 if self.draining else 200)

    async def _metrics(self, request) -> web.Response:
        if not self._authorized(request):
            return self._refuse(401, "missing or wrong API key", "unauthorized")
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _stream(self, request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._refuse(401, "missing or wrong API key (Authorization: Bearer KEY)", "unauthorized")
        mode, fmt = request.query.get("mode", "full"), request.query.get("format", "f32le")
        if mode not in self.engines:
            return self._refuse(400, f"mode must be one of {list(self.engines)}, got {mode!r}", "bad_request")
        if fmt not in FORMATS:
            return self._refuse(400, f"format must be one of {list(FORMATS)}, got {fmt!r}", "bad_request")
        if self.draining:
            return self._refuse(503, "server is draining", "over_capacity")
        if not web.WebSocketResponse().can_prepare(request).ok:
            return self._refuse(400, "expected a WebSocket upgrade", "bad_request")
        fut = self.worker.call(self.worker.open, mode)
        try:
            sid = await asyncio.shield(fut)
        except EngineFull:
            return self._refuse(503, f"all {self.max_streams} {mode} streams are open", "over_capacity")
        except asyncio.CancelledError:  # the slot opens anyway: free it
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or
                                  self.worker.post(self.worker.close, mode, f.result()))
            raise
        if self.draining:
            self.worker.post(self.worker.close, mode, sid)
            return self._refuse(503, "server is draining", "over_capacity")
        conn = _Conn(self, request, mode, fmt, sid)
        conn.task = asyncio.current_task()
        self.conns[(mode, sid)] = conn
        self._idle.clear()
        self.metrics.open_streams.labels(mode).inc()
        try:
            ws = conn.ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, compress=False,
                                                 timeout=self.close_timeout, heartbeat=self.heartbeat)
            await ws.prepare(request)
            self.metrics.connections.labels(mode).inc()
            await self._session(conn)
            return ws
        finally:
            del self.conns[(mode, sid)]
            if not self.conns:
                self._idle.set()
            self.metrics.open_streams.labels(mode).dec()
            if not conn.finished:
                self.worker.post(self.worker.close, mode, sid)

    # ------------------------------------------------------------------ one stream
    async def _session(self, conn: _Conn) -> None:
        conn.push(json.dumps({"type": "ready", **self.info, "mode": conn.mode, "format": conn.fmt}), force=True)
        writer = asyncio.create_task(self._write(conn))
        reader = asyncio.create_task(self._read(conn))
        try:
            kind, code, message, etype = await conn.stopped
            reader.cancel()
            if kind == "flush":
                err = await self._flush(conn)
                if err is None:
                    try:  # the writer sends what is queued, then end, and closes 1000
                        await asyncio.wait_for(asyncio.shield(writer), self.close_timeout + 30.0)
                        return
                    except asyncio.TimeoutError:
                        err = 1008, "client stopped reading", "slow_client"
                kind, (code, message, etype) = "error", err
            if kind == "error":
                self.metrics.errors.labels(etype or "internal").inc()
                writer.cancel()
                await self._close_with_error(conn, code, message)
        finally:
            reader.cancel()
            writer.cancel()

    async def _flush(self, conn: _Conn):
        """Run the stream's tail (StreamEngine.finish) and queue it and end; None or (code, message, type)."""
        try:
            toks, audio, err = await asyncio.shield(self.worker.finish_later(conn.mode, conn.sid))
        except Exception:  # noqa: BLE001
            log.exception("finish failed")
            return 1011, "internal error", "internal"
        conn.finished = True
        if conn.input_error is not None:  # refused before the flush was run: its output is missing
            return 1008, conn.input_error, "bad_input"
        if err is not None:
            return _engine_error(err)
        conn.emit(toks, audio)
        conn.push(_END, force=True)
        return None

    async def _close_with_error(self, conn: _Conn, code: int, message: str) -> None:
        ws = conn.ws

        async def send():
            if not ws.closed:
                await ws.send_str(json.dumps({"type": "error", "message": message}))
                # at most 123 bytes in a close frame, cut at a character
                await ws.close(code=code, message=message.encode()[:120].decode("utf-8", "ignore").encode())

        try:
            await asyncio.wait_for(send(), self.close_timeout)
        except Exception:  # noqa: BLE001 -- not reading, or gone: drop the connection
            tr = conn.request.transport
            if tr is not None:
                tr.abort()

    async def _read(self, conn: _Conn) -> None:
        """Messages in, one at a time. A message's input goes to the engine in pieces of what
        `conn.room()` allows; while there is none the socket is not read, except for one
        message looked ahead, so a close (or a vanished peer) is seen at once."""
        ws = conn.ws
        recv = None  # the message looked ahead (a task on ws.receive())
        try:
            while not conn.stopped.done():
                if recv is None:
                    recv = asyncio.ensure_future(ws.receive())
                msg = await self._next_message(conn, recv)
                recv = None
                if msg is None:
                    return
                conn.active = time.monotonic()
                if msg.type == WSMsgType.BINARY:
                    self.metrics.bytes_in.inc(len(msg.data))
                    try:
                        x = self._decode(conn, msg.data)
                    except _ClientFault as e:
                        conn.stop("error", 1008, str(e), e.etype)
                        return
                    a = 0
                    while a < x.numel():
                        room = conn.room()
                        if room < 1:  # wait for steps or sends, watching the socket for a close
                            if recv is None:
                                recv = asyncio.ensure_future(ws.receive())
                            if not await self._wait_room(conn, recv):
                                return
                            continue
                        n = min(x.numel() - a, room * conn.chunk - conn.submitted % conn.chunk)
                        conn.submitted += n
                        self.worker.post(self.worker.submit, conn.mode, conn.sid, x[a:a + n], on_error=conn.refused)
                        a += n
                elif msg.type == WSMsgType.TEXT:
                    self.metrics.bytes_in.inc(len(msg.data))
                    try:
                        obj = json.loads(msg.data)
                    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
                        obj = None
                    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                        conn.stop("error", 1008, 'malformed message: expected JSON {"type": "flush"}', "bad_message")
                    elif obj["type"] == "flush":
                        conn.stop("flush")
                    else:
                        conn.stop("error", 1008, f"unknown message type {obj['type'][:40]!r}", "bad_message")
                    return
                else:  # CLOSE, CLOSING, CLOSED, ERROR: the client is gone; pending input is dropped
                    conn.stop("closed")
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("reader failed")
            conn.stop("error", 1011, "internal error", "internal")
        finally:
            if recv is not None:
                recv.cancel()

    async def _next_message(self, conn: _Conn, recv: asyncio.Future):
        """recv's message, or None once the stream stopped or sat idle past idle_timeout (stopped
        then): idle is nothing pending in the engine, nothing queued to send, no message."""
        while True:
            left = None
            if self.idle_timeout is not None:
                left = self.idle_timeout - (time.monotonic() - conn.active)
                if left <= 0:
                    if conn.pending_chunks() <= 0 and not conn.out:
                        conn.stop("error", 1008, f"no message for {self.idle_timeout:g} s", "idle_client")
                        return None
                    conn.active, left = time.monotonic(), self.idle_timeout  # busy: not idle yet
            # asyncio.wait cancels neither future: `stopped` stays the connection's
            await asyncio.wait({recv, conn.stopped}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if conn.stopped.done():
                return None
            if recv.done():
                return recv.result()

    async def _wait_room(self, conn: _Conn, recv: asyncio.Future) -> bool:
        """Wait until conn.room() > 0; False when the stream stopped meanwhile, or the message
        looked ahead says the client is gone (then stopped 'closed')."""
        while conn.room() < 1:
            if conn.stopped.done():
                return False
            if recv.done() and recv.result().type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                conn.stop("closed")
                return False
            conn.moved.clear()
            waits = {asyncio.ensure_future(conn.moved.wait())}
            if not recv.done():
                waits.add(recv)
            done, rest = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in rest:
                if w is not recv:
                    w.cancel()
        return not conn.stopped.done()

    def _decode(self, conn: _Conn, data: bytes) -> torch.Tensor:
        """Checked engine input from one binary message (numpy, before anything is submitted)."""
        if conn.mode == "decode":
            if len(data) % 2:
                raise _ClientFault(f"odd byte count: {len(data)} bytes are not whole uint16 tokens", "bad_input")
            t = np.frombuffer(data, "<u2")
            if t.size and int(t.max()) >= self.codec.codebook_size:
                raise _ClientFault(f"token out of range [0, {self.codec.codebook_size}): got {int(t.max())}",
                                   "bad_input")
            return torch.from_numpy(t.astype(np.int64))
        dt = FORMATS[conn.fmt]
        if len(data) % dt.itemsize:
            raise _ClientFault(f"odd byte count: {len(data)} bytes are not whole {conn.fmt} samples", "bad_input")
        raw = np.frombuffer(data, dt)
        if conn.fmt == "s16le":
            return torch.from_numpy(raw.astype(np.float32) * np.float32(1 / 32768))  # exact: a power of two
        x = raw.astype(np.float32)  # a writable, native-order copy
        problem = amplitude_problem(x)
        if problem is not None:
            raise _ClientFault(f"audio {problem}", "bad_input")
        return torch.from_numpy(x)

    async def _write(self, conn: _Conn) -> None:
        ws = conn.ws
        try:
            while True:
                if not conn.out:
                    conn.has_out.clear()
                    await conn.has_out.wait()
                    continue
                item = conn.out.popleft()
                conn.moved.set()  # room in the queue: the reader may take more input
                if item is _END:
                    await ws.send_str('{"type": "end"}')
                    await ws.close(code=1000)
                    return
                send = ws.send_bytes(item) if isinstance(item, bytes) else ws.send_str(item)
                try:  # a full socket buffer blocks the send: the client is not reading
                    await asyncio.wait_for(send, self.send_timeout)
                except asyncio.TimeoutError:
                    conn.stop("error", 1008, f"client stopped reading (nothing sent for {self.send_timeout:g} s)",
                              "slow_client")
                    return
                conn.active = time.monotonic()
                self.metrics.bytes_out.inc(len(item))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 -- connection reset or closing: the client is gone
            conn.stop("closed")

    # ------------------------------------------------------------------ engine thread callbacks (on the loop)
    def _deliver(self, mode: str, items: list) -> None:
        for sid, toks, audio, err in items:
            c = self.conns.get((mode, sid))
            if c is not None:  # else: disconnected since
                c.on_chunk(toks, audio, err)

    def _engine_failed(self, mode: str, sids: list[int], message: str) -> None:
        for sid in sids:
            c = self.conns.get((mode, sid))
            if c is not None:
                c.finished = True
                c.stop("error", 1011, message, "internal")


def serve(codec: Codec, host: str | None = None, port: int = 8080, api_key: str | None = None,
          drain_timeout: float = 30.0, **kwargs) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Without an API key the default host is loopback."""
    host = host or ("0.0.0.0" if api_key else "127.0.0.1")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can open streams", host)
    server = Server(codec, api_key=api_key, **kwargs)  # builds the engines (CUDA graphs) before listening

    async def main():
        h, p = await server.start(host, port)
        print(f"fastfocal: serving {codec.name} on http://{h}:{p} (modes {','.join(server.engines)}, "
              f"{server.max_streams} streams each, {codec.device}, {str(codec.dtype).removeprefix('torch.')})",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"fastfocal: draining {len(server.conns)} streams", flush=True)
        await server.stop(drain_timeout)

    asyncio.run(main())
    return 0
