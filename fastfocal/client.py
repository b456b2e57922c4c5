"""Client for `fastfocal serve`: stream a file (or an array) over the WebSocket protocol.

    res = asyncio.run(stream("ws://127.0.0.1:8080", samples, mode="full"))   # res.tokens, res.audio
    run_client("speech.wav", "ws://127.0.0.1:8080", out="rec/")             # writes rec/speech.npy + .wav
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import aiohttp
import numpy as np
from yarl import URL

from .audio import read_audio, software_tag, write_audio, written_by_command
from .files import atomic_write
from .inputs import InputError, _as_numpy, _check_range, _piece_values, amplitude_problem, token_dtype

MODES = ("full", "encode", "decode")
WIRE_TOKEN_LIMIT = 1 << 16  # decode mode sends tokens as uint16: larger values would wrap


class ServerError(RuntimeError):
    """The server refused the connection or closed the stream with an error."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Result:
    tokens: np.ndarray | None  # int64 (T,), modes full/encode
    audio: np.ndarray | None  # float32 (N,) at ready["sample_rate_out"], modes full/decode
    ready: dict


def stream_url(url: str, mode: str = "full", fmt: str = "f32le") -> URL:
    """ws://host:port (or http://...) -> ws://host:port/v1/stream?mode=...&format=..."""
    u = URL(url)
    if u.scheme in ("http", "https"):
        u = u.with_scheme("ws" if u.scheme == "http" else "wss")
    if u.path in ("", "/"):
        u = u.with_path("/v1/stream")
    return u.update_query(mode=mode, format=fmt)


def _array(data, name: str) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data
    try:
        if hasattr(data, "detach"):  # a torch.Tensor: the project's conversion (bf16/fp16, uint widths)
            return np.asarray(_as_numpy(data, name))
        return np.asarray(data)
    except (ValueError, TypeError) as e:  # ragged lists, odd objects
        raise InputError(f"{name} must be a numeric array, got {type(data).__name__} ({e})") from None


def _one_row(x: np.ndarray, name: str, what: str) -> np.ndarray:
    """(n,), (n, 1) or (1, n) -> (n,); anything else is refused."""
    if x.ndim == 2 and 1 in x.shape:
        return x.reshape(-1)
    if x.ndim != 1:
        raise InputError(f"{name} must be {what}, got shape {x.shape}")
    return x


def check_audio_input(data, name: str = "audio") -> np.ndarray:
    """Audio for one stream as a 1-D float32 array, or an InputError: the server takes mono 16 kHz
    float PCM, and the wire carries bare samples, so a wrong array would be served silently as garbage
    (stereo interleaved as mono of twice the length, integer PCM scaled by 32768 and clipped,
    NaN cast to 0 in s16le)."""
    x = _array(data, name)
    if x.ndim == 2 and min(x.shape) > 1:
        ax = 1 if x.shape[0] >= x.shape[1] else 0  # channels are the short axis
        raise InputError(f"{name} has {x.shape[ax]} channels (shape {x.shape}): the server takes mono 16 kHz "
                         f"audio; mix down first (x.mean({ax}))")
    x = np.ascontiguousarray(_piece_values(_one_row(x, name, "mono: (samples,), (samples, 1) or (1, samples)"),
                                           name, None))  # float32, or the project's integer-PCM message
    problem = amplitude_problem(x)  # the rule the server and the file readers apply
    if problem is not None:
        raise InputError(f"{name} {problem}")
    return x


def check_token_input(data, codebook_size: int | None = None, name: str = "tokens") -> np.ndarray:
    """Tokens for one stream as a 1-D int64 array of codebook indices, or an InputError."""
    x = _one_row(_array(data, name), name, "1-D: (T,), (T, 1) or (1, T)")
    if x.dtype.kind not in "iu":
        raise InputError(f"{name} must be integer codebook indices, got {x.dtype}")
    x = x.astype(np.int64)
    if x.size:
        _check_range(int(x.min()), int(x.max()), min(codebook_size or WIRE_TOKEN_LIMIT, WIRE_TOKEN_LIMIT), f"{name}: ")
    return x


def encode_pcm(x: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return np.clip(np.round(np.asarray(x, np.float64) * 32768), -32768, 32767).astype("<i2").tobytes()
    return np.asarray(x, "<f4").tobytes()


async def stream(url: str, data: np.ndarray, mode: str = "full", fmt: str = "f32le", api_key: str | None = None,
                 realtime: bool = False, message: int = 1280, session: aiohttp.ClientSession | None = None) -> Result:
    """Send data (16 kHz float samples, or tokens in decode mode) in messages of `message` samples
    (tokens), then flush; collect the tokens and audio until the server's end."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if message < 1:
        raise InputError(f"message size must be positive, got {message}")
    # checked before connecting: nothing unchecked goes on the wire
    data = check_token_input(data) if mode == "decode" else check_audio_input(data)
    own = session is None
    session = session or aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        try:
            ws = await session.ws_connect(stream_url(url, mode, fmt), headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as e:
            raise ServerError(f"server refused the stream: HTTP {e.status} {e.message}") from None
        except aiohttp.ClientError as e:
            raise ServerError(f"cannot connect: {e}") from None
        async with ws:
            first = await ws.receive()
            if first.type != aiohttp.WSMsgType.TEXT:
                raise ServerError(f"expected the ready message, got {first.type.name}", ws.close_code)
            ready = json.loads(first.data)
            if ready.get("type") == "error":
                raise ServerError(ready.get("message", "error"), ws.close_code)
            rate = ready["token_rate"] if mode == "decode" else ready["sample_rate_in"]
            if mode == "decode":  # the codebook is known from here: checked before the first message
                data = check_token_input(data, ready["codebook_size"])
            sender = asyncio.create_task(_send(ws, data, mode, fmt, message, rate if realtime else None))
            try:
                toks, audio = await _receive(ws)
            finally:
                sender.cancel()
                try:
                    await sender
                except (asyncio.CancelledError, ConnectionError, aiohttp.ClientError, RuntimeError):
                    pass
    finally:
        if own:
            await session.close()
    return Result(np.array(toks, np.int64) if mode != "decode" else None,
                  np.concatenate(audio) if mode != "encode" else None, ready)


async def _send(ws, data, mode, fmt, message, rate) -> None:
    t0 = time.perf_counter()
    for a in range(0, len(data), message):
        piece = data[a:a + message]
        if rate:  # real time: a piece goes out when its last sample would have been captured
            await asyncio.sleep(max(0.0, t0 + (a + len(piece)) / rate - time.perf_counter()))
        await ws.send_bytes(np.asarray(piece, "<u2").tobytes() if mode == "decode" else encode_pcm(piece, fmt))
    await ws.send_str(json.dumps({"type": "flush"}))


async def _receive(ws):
    toks: list[int] = []
    audio = [np.zeros(0, np.float32)]
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            audio.append(np.frombuffer(msg.data, "<f4"))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            obj = json.loads(msg.data)
            kind = obj.get("type")
            if kind == "tokens":
                if obj["index"] != len(toks):
                    raise ServerError(f"tokens out of order: index {obj['index']}, expected {len(toks)}")
                toks.extend(obj["tokens"])
            elif kind == "end":
                return toks, audio
            elif kind == "error":
                try:  # the close frame follows: read it for the code
                    await asyncio.wait_for(ws.receive(), 10)
                except asyncio.TimeoutError:
                    pass
                raise ServerError(obj.get("message", "error"), ws.close_code)
    raise ServerError(f"connection closed before the end of the stream (code {ws.close_code})", ws.close_code)


def read_tokens(path) -> np.ndarray:
    try:
        toks = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy token file ({e})") from None
    if toks.dtype.kind not in "iu" or toks.ndim != 1:
        raise InputError(f"{path}: tokens must be a 1-D integer array, got {toks.dtype} {toks.shape}")
    return toks.astype(np.int64)


def _targets(path, out: Path, mode: str, overwrite: bool) -> dict[str, Path]:
    """The outputs <stem>.npy / <stem>.wav, checked before anything is streamed: never the input
    itself, and never an existing file this command did not write unless `overwrite` (`--out .`
    beside x.wav would otherwise replace the recording with its reconstruction)."""
    stem = Path(path).stem
    kinds = {"full": ("npy", "wav"), "encode": ("npy",), "decode": ("wav",)}[mode]
    targets = {k: out / f"{stem}.{k}" for k in kinds}
    for kind, p in targets.items():
        if not p.exists():
            continue
        if Path(path).exists() and os.path.samefile(p, path):
            raise InputError(f"{path}: output {p} would overwrite the input; pass --out DIR")
        ours = kind == "wav" and written_by_command(p, "client")
        if not (overwrite or ours):
            raise InputError(f"{path}: output {p} exists and is not from an earlier `fastfocal client`; "
                             "pass --overwrite to replace it, or --out DIR")
    return targets


def run_client(path, url: str, mode: str = "full", out=".", fmt: str = "f32le", api_key: str | None = None,
               realtime: bool = False, message_ms: float = 80.0, float_wav: bool = False,
               overwrite: bool = False) -> list[Path]:
    """Stream one file (audio; a .npy of tokens in decode mode); write <stem>.npy and/or <stem>.wav."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    out = Path(out)
    targets = _targets(path, out, mode, overwrite)
    if mode == "decode":
        data, msg = read_tokens(path), max(1, round(message_ms / 20))
    else:
        data, msg = read_audio(path, 16000), max(1, round(message_ms * 16))
    try:
        res = asyncio.run(stream(url, data, mode, fmt, api_key, realtime, msg))
    except InputError as e:  # name the file: the CLI shows this one line
        raise InputError(f"{path}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if res.tokens is not None:
        toks = res.tokens.astype(token_dtype(res.ready["codebook_size"]))
        atomic_write(targets["npy"], lambda f: np.save(f, toks))
        written.append(targets["npy"])
    if res.audio is not None:
        atomic_write(targets["wav"], lambda f: write_audio(f, res.audio, res.ready["sample_rate_out"],
                                                       "FLOAT" if float_wav else "PCM_16",
                                                       software=software_tag("client")))
        written.append(targets["wav"])
    return written
