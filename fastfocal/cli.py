"""The `fastfocal` command: encode, decode, roundtrip, info, encode-corpus.

User errors (bad files, bad models, bad tokens) print one line `fastfocal: error: ...` and
exit with status 2; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .audio import AudioError, check_peak, read_audio, software_tag, write_audio, written_by_command
from .codec import Codec
from .config import ConfigError
from .corpus import CorpusError
from .files import atomic_write_all
from .inputs import InputError, token_dtype
from .kernels._common import F32_DOTS, f32_dot, set_f32_dot
from .loading import DEFAULT_MODEL, CheckpointError, open_codec, provenance
from .pipeline import NumericsError
from .version import __version__

PIECE_SECONDS = 30  # encode pushes this much audio per progress step (tokens as in one call)

USER_ERRORS = (AudioError, InputError, ConfigError, CheckpointError, CorpusError, OSError, NumericsError)

OVERWRITE_HELP = "replace existing files that are not this command's earlier outputs (default: refuse)"


class CliError(ValueError):
    """A bad command line or file that stops the command."""


def _error(msg) -> None:
    text = " ".join(str(msg).split()) or type(msg).__name__  # one line, whatever the message holds
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 file name as \udcXX escapes
    print(f"fastfocal: error: {text}", file=sys.stderr)


def load_codec(model: str | None, random_init: str | None, device: str | None, dtype: str) -> Codec:
    return open_codec(model, random_init, device, dtype)


def _codec(args) -> Codec:
    return load_codec(args.model, args.random_init, args.device, args.dtype)


def _out_path(args, src: str, suffix: str, seen: dict[Path, str]) -> Path:
    out = Path(args.out) / (Path(src).stem + suffix)
    if out in seen:
        raise CliError(f"{src}: output {out} would overwrite the output of {seen[out]}")
    if out.exists() and Path(src).exists() and os.path.samefile(out, src):
        raise CliError(f"{src}: output {out} would overwrite the input; pass --out DIR")
    # a file this command did not write (a recording, someone's data) is never replaced silently
    for p in (out, out.with_suffix(".json")) if suffix == ".npy" else (out,):
        if p.exists() and not args.overwrite and not _earlier_output(p, args.command):
            raise CliError(f"{src}: output {p} exists and is not from an earlier `fastfocal {args.command}`; "
                           "pass --overwrite to replace it, or --out DIR")
    seen[out] = src
    return out


def _earlier_output(path: Path, command: str) -> bool:
    """Whether an existing output was written by an earlier run of `command`: a token file or
    sidecar by its sidecar, a WAV by its INFO software tag (libsndfile appends its version)."""
    if command == "encode":
        try:
            meta = json.loads(path.with_suffix(".json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(meta, dict) and {"fastfocal_version", "n_tokens", "source"} <= meta.keys()
    return written_by_command(path, command)


def _write_outputs(src: str, outputs: list[tuple[Path, Callable]]) -> None:
    """`files.atomic_write_all`: a full disk or a crash never leaves a partial output, nor new
    tokens beside an old sidecar; an error names the output."""
    try:
        atomic_write_all(outputs)
    except OSError as e:
        raise CliError(f"{src}: cannot write {e.filename}: {e.strerror or e}") from None


def _print_path(path: Path) -> None:
    """An output's path on stdout; a name stdout's encoding cannot take (not UTF-8) as its bytes."""
    try:
        print(path)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(path) + b"\n")
        sys.stdout.buffer.flush()


def _each(args, fn) -> int:
    """Run fn(path) for every input; report failures one line each, naming the file, and go on."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    failed = 0
    for src in args.inputs:
        try:
            fn(src)
        except USER_ERRORS + (CliError,) as e:
            _error(e if str(src) in str(e) else f"{src}: {e}")
            failed += 1
        except UnicodeError as e:  # a file name or text in another encoding: still one line, naming the file
            _error(f"{src}: {type(e).__name__}: {e}")
            failed += 1
    return 2 if failed else 0


def _read(src: str, codec: Codec) -> np.ndarray:
    sig = read_audio(src, codec.sample_rate_input)
    check_peak(sig, src)  # NaN/Inf or out-of-range samples: an error naming the file
    return sig


def _progress(seconds: float, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=round(seconds), unit="audio-s", desc=desc, dynamic_ncols=True, leave=False,
                disable=quiet or seconds <= PIECE_SECONDS or not sys.stderr.isatty(),
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} audio-s [{elapsed}<{remaining}]")


def encode_tokens(codec: Codec, sig: np.ndarray, bar=None) -> np.ndarray:
    """Tokens of a 16 kHz signal, equal to codec.sig_to_toks(sig). A causal model takes a long
    signal as stream pushes of PIECE_SECONDS, so a progress bar can follow, and a flush that runs
    the partial last chunk at its own length as offline does (`offline_tail`: the streaming
    rule's zero-padded chunk would change its last tokens); a non-causal one attends over the
    whole file in one call."""
    piece = PIECE_SECONDS * codec.sample_rate_input
    if not codec.causal or len(sig) <= piece:
        toks = codec.sig_to_toks(sig).reshape(-1)
        parts = [toks]
    else:
        enc = codec.stream_encoder()
        parts = []
        for a in range(0, len(sig), piece):
            parts.append(enc.push(torch.from_numpy(sig[a:a + piece])).reshape(-1))
            if bar is not None:
                bar.update(round((a + len(sig[a:a + piece])) / codec.sample_rate_input) - bar.n)
        parts.append(enc.flush(offline_tail=True).reshape(-1))
    return torch.cat(parts).cpu().numpy()


def _sidecar(codec: Codec, src: str, n_samples: int, n_tokens: int) -> dict:
    return {
        "model": codec.name,
        **provenance(codec),
        "sample_rate_input": codec.sample_rate_input,
        "sample_rate_output": codec.sample_rate_output,
        "token_rate": codec.token_rate,
        "codebook_size": codec.codebook_size,
        "n_tokens": n_tokens,
        "duration_s": n_samples / codec.sample_rate_input,
        "source": os.path.abspath(src),
    }


def cmd_encode(args) -> int:
    codec = _codec(args)
    seen: dict[Path, str] = {}

    def one(src):
        out = _out_path(args, src, ".npy", seen)
        sig = _read(src, codec)
        with _progress(len(sig) / codec.sample_rate_input, Path(src).name, args.quiet) as bar:
            toks = encode_tokens(codec, sig, bar).astype(token_dtype(codec.codebook_size))
        side = (json.dumps(_sidecar(codec, src, len(sig), len(toks)), indent=1) + "\n").encode()
        _write_outputs(src, [(out, lambda f: np.save(f, toks)), (out.with_suffix(".json"), lambda f: f.write(side))])
        _print_path(out)

    return _each(args, one)


def _npy_header(path: str) -> tuple[np.dtype, tuple]:
    """(dtype, shape) from a .npy header, checked against the file size before anything loads."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    with f:
        try:
            version = np.lib.format.read_magic(f)
            # version 3.0 has 2.0's layout (its header text may be UTF-8)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, EOFError) as e:
            raise CliError(f"{path}: not a token file: no valid .npy header ({e}); token files are the "
                           ".npy files `fastfocal encode` writes") from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in "iu":
        raise CliError(f"{path}: tokens must be an integer array, got {dtype}")
    if len(shape) != 1:
        raise CliError(f"{path}: tokens must have shape (T,), got {shape}")
    need, have = shape[0] * dtype.itemsize, os.path.getsize(path) - offset
    if need > have:
        raise CliError(f"{path}: corrupt or truncated token file: its header declares shape {shape} ({need:,} bytes), "
                       f"the file holds {have:,}")
    return dtype, shape


def read_sidecar(path: str) -> dict:
    """The <stem>.json that `fastfocal encode` wrote beside a token file ({} if none), checked."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (ValueError, OSError, RecursionError) as e:
        raise CliError(f"{side}: sidecar is not readable JSON ({type(e).__name__}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise CliError(f"{side}: sidecar must be a JSON object; fix or remove it")
    for key, kind in (("codebook_size", int), ("model", str), ("weights_hash", str)):
        v = meta.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise CliError(f"{side}: sidecar {key} must be {'an integer' if kind is int else 'a string'}, got {v!r}")
    return meta


def read_tokens(path: str) -> np.ndarray:
    """A 1-D integer token array from a .npy file; the header is checked before loading."""
    _npy_header(path)
    try:
        toks = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CliError(f"{path}: not a readable .npy token file ({e})") from None
    if toks.size == 0:
        raise CliError(f"{path}: token array is empty")
    return toks


def check_tokens_for(path: str, toks: np.ndarray, meta: dict, codec: Codec, force: bool = False) -> np.ndarray:
    """Tokens (int64) checked against the model: codebook, the weights that made them, range."""
    cb = meta.get("codebook_size")
    if cb is not None and cb != codec.codebook_size:
        raise CliError(f"{path}: encoded with a {cb}-token codebook ({meta.get('model')}), model has {codec.codebook_size}")
    made_by, ours = meta.get("weights_hash"), provenance(codec)["weights_hash"]
    if made_by and ours and made_by != ours and not force:
        raise CliError(f"{path}: made by other weights ({meta.get('model')!r}, weights {made_by[:12]}) than "
                       f"{codec.name!r} (weights {ours[:12]}): decode with that model, or pass --force")
    lo, hi = int(toks.min()), int(toks.max())
    if lo < 0 or hi >= codec.codebook_size:
        raise InputError(f"{path}: token out of range [0, {codec.codebook_size}): found values in [{lo}, {hi}]")
    return toks.astype(np.int64)


def cmd_decode(args) -> int:
    """Without --model/--random-init each file is decoded by the model its sidecar names."""
    codecs: dict[str | None, Codec] = {}

    def codec_for(meta: dict) -> Codec:
        key = None if (args.model or args.random_init) else meta.get("model", DEFAULT_MODEL)
        if key not in codecs:
            if key is None or key == DEFAULT_MODEL:
                codecs[key] = _codec(args)
            elif key.startswith("random:"):
                codecs[key] = load_codec(None, key.removeprefix("random:"), args.device, args.dtype)
            else:
                codecs[key] = load_codec(key, None, args.device, args.dtype)
        return codecs[key]

    seen: dict[Path, str] = {}

    def one(src):
        out = _out_path(args, src, ".wav", seen)
        toks, meta = read_tokens(src), read_sidecar(src)
        try:
            codec = codec_for(meta)
        except (CheckpointError, ConfigError) as e:
            raise CliError(f"{src}: the model its sidecar names cannot be loaded ({e}); pass --model") from None
        sig = codec.toks_to_sig(check_tokens_for(src, toks, meta, codec, args.force))
        _write_wav(args, src, out, sig, codec)

    return _each(args, one)


def _write_wav(args, src: str, out: Path, sig, codec: Codec) -> None:
    # soundfile writes a file object through cffi callbacks, which print and drop an OSError (a full
    # disk): the WAV is made in memory (at most the float32 signal's size), then written by Python
    wav = io.BytesIO()
    write_audio(wav, sig, codec.sample_rate_output, "FLOAT" if args.float else "PCM_16", software_tag(args.command))
    _write_outputs(src, [(out, lambda f: f.write(wav.getbuffer()))])
    _print_path(out)


def cmd_roundtrip(args) -> int:
    codec = _codec(args)
    seen: dict[Path, str] = {}

    def one(src):
        out = _out_path(args, src, ".wav", seen)
        sig = codec.sig_to_sig(_read(src, codec))
        _write_wav(args, src, out, sig, codec)

    return _each(args, one)


def cmd_info(args) -> int:
    c = _codec(args)
    lat = f"{c.latency:.0f} ms" if c.latency is not None else "n/a (non-causal)"
    rows = [
        ("model", c.name),
        ("causal", c.causal),
        ("codebook size", c.codebook_size),
        ("parameters", f"{c.num_params:,} ({c.num_params / 1e6:.1f} M)"),
        ("sample rate in", f"{c.sample_rate_input} Hz"),
        ("sample rate out", f"{c.sample_rate_output} Hz"),
        ("token rate", f"{c.token_rate:g} Hz"),
        ("chunk size", f"{c.chunk_size} samples ({1000 * c.chunk_size / c.sample_rate_input:g} ms)" if c.causal else "n/a"),
        ("latency", lat),
        ("device", c.device),
        ("dtype", str(c.dtype).removeprefix("torch.")),
    ]
    if c.dtype == torch.float32:
        rows.append(("float32 dots", f32_dot() if c.device.type == "cuda" else "ieee (CPU)"))
    for k, v in rows:
        print(f"{k + ':':17} {v}")
    return 0


def cmd_encode_corpus(args) -> int:
    from .corpus import encode_corpus

    devices = args.devices.split(",") if args.devices else None
    encode_corpus(
        args.inputs, args.out, model=args.model, random_init=args.random_init, devices=devices, dtype=args.dtype,
        batch_seconds=args.batch_seconds, max_batch=args.max_batch, workers=args.workers,
        prefetch=args.prefetch, fmt=args.format, quiet=args.quiet,
    )
    return 0


def _model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help=f"hub id, model directory or config.json (default {DEFAULT_MODEL})")
    g.add_argument("--random-init", metavar="PRESET", help="random weights for a preset (e.g. 50hz_4k_causal) or config: no download")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32)")
    p.add_argument("--f32-dot", choices=list(F32_DOTS), default=None,
                   help="fp32 on CUDA: ieee (exact, the default) or split tensor-core dots (bf16x3: float32's tokens, "
                        "emulated 100 %%, at tensor-core rates); sets FASTFOCAL_F32_DOT for this run and its workers")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastfocal", description="FocalCodec-Stream: 16 kHz speech <-> 50 Hz tokens <-> 24 kHz speech")
    ap.add_argument("--version", action="version", version=f"fastfocal {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", help="audio files -> <stem>.npy tokens + <stem>.json sidecar")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", default=".", help="output directory (default: current)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown on a terminal for inputs over 30 s)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="<stem>.npy tokens -> <stem>.wav (model: --model, else the one the sidecar names)")
    p.add_argument("inputs", nargs="+", metavar="TOKENS.npy")
    p.add_argument("--out", default=".", help="output directory (default: current)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    _model_args(p)
    p.add_argument("--force", action="store_true", help="decode tokens whose sidecar names other weights than the model's")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("roundtrip", help="audio -> tokens -> audio, written as <stem>.wav")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", default=".", help="output directory (default: current)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    _model_args(p)
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("info", help="print model properties")
    _model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode-corpus", help="directories, globs or manifests -> mirrored .npy tree + manifest.jsonl (resumable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="directory, glob, audio file, or manifest (.jsonl with 'path', .csv with a path column)")
    p.add_argument("--out", required=True, help="output directory")
    _model_args(p, device=False)
    p.add_argument("--devices", default=None, help="comma-separated, e.g. cuda:0,cuda:1 (one process each) or cpu")
    p.add_argument("--batch-seconds", type=float, default=None, help="audio seconds per model call at most (default: from free device memory)")
    p.add_argument("--max-batch", type=int, default=None, help="files per model call at most (default: from free memory; 512 on CUDA, 64 on CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes per device (0: decode inline)")
    p.add_argument("--prefetch", type=int, default=2, help="slot pools decoded ahead of the device (default 2)")
    p.add_argument("--format", default="npy", choices=["npy", "parquet"], help="npy per utterance (default) or parquet shards")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_encode_corpus)
    _serve_commands(sub)
    _export_onnx_command(sub)
    return ap


def _export_onnx_command(sub) -> None:
    """`export-onnx`: the streaming step as ONNX (fastfocal/onnx.py; needs the `onnx` extra)."""
    p = sub.add_parser("export-onnx", help="streaming step -> ONNX model (chunk + state in, outputs + new state out)")
    _model_args(p, device=False)
    for a in p._actions:  # the shared --dtype: the export takes one of its choices
        if a.dest == "dtype":
            a.help = "fp32 (the default and the only one exported: ONNX Runtime's CPU kernels lack bf16/fp16 ops the graph needs)"
    p.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    p.add_argument("--batch", type=int, default=1, help="streams per step (fixed in the graph; default 1)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args) -> int:
    from .onnx import export

    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    codec = load_codec(args.model, args.random_init, "cpu", args.dtype)
    try:
        print(export(codec, args.out, args.mode, args.batch))
    except ImportError as e:
        raise CliError(f"export-onnx needs the onnx extra: pip install 'fastfocal[onnx]' ({e})") from None
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0


def _serve_commands(sub) -> None:
    """`serve` and `client` (fastfocal/server.py, client.py; need the `serve` extra)."""
    p = sub.add_parser("serve", help="WebSocket streaming service on a StreamEngine (see README)")
    _model_args(p)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 with an API key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--max-streams", type=int, default=64, help="stream slots per mode (default 64); beyond: HTTP 503")
    p.add_argument("--modes", default="full,encode,decode", help="modes served, comma-separated (default all)")
    p.add_argument("--api-key", default=os.environ.get("FASTFOCAL_API_KEY"), help="require Authorization: Bearer KEY (default $FASTFOCAL_API_KEY)")
    p.add_argument("--max-pending", type=int, default=8, help="chunks buffered per stream before its socket is not read (default 8)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for open streams (default 30)")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="close a stream that sends nothing for this long with nothing pending (default 60; 0: never)")
    p.add_argument("--send-timeout", type=float, default=30.0,
                   help="close a client that takes none of its output for this long (default 30)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="stream a file to `fastfocal serve`; writes <stem>.npy tokens and/or <stem>.wav")
    p.add_argument("input", metavar="FILE", help="audio file (a .npy of tokens with --mode decode)")
    p.add_argument("--url", default="ws://127.0.0.1:8080", help="server (default ws://127.0.0.1:8080)")
    p.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    p.add_argument("--format", default="f32le", choices=["f32le", "s16le"], help="PCM sent (default f32le)")
    p.add_argument("--realtime", action="store_true", help="pace at real time (default: as fast as the server takes it)")
    p.add_argument("--message-ms", type=float, default=80.0, help="audio per message (default 80)")
    p.add_argument("--out", default=".", help="output directory (default: current)")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    p.add_argument("--api-key", default=os.environ.get("FASTFOCAL_API_KEY"), help="API key (default $FASTFOCAL_API_KEY)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs not written by this command")
    p.set_defaults(func=cmd_client)


def _need_serve_extra(e: ImportError):
    return CliError(f"this command needs the serve extra: pip install 'fastfocal[serve]' ({e})")


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise _need_serve_extra(e) from None
    codec = _codec(args)
    return serve(codec, host=args.host, port=args.port, api_key=args.api_key, drain_timeout=args.drain_timeout,
                 max_streams=args.max_streams, modes=args.modes.split(","), max_pending_chunks=args.max_pending,
                 cuda_graphs=not args.no_graphs, idle_timeout=args.idle_timeout or None, send_timeout=args.send_timeout)


def cmd_client(args) -> int:
    try:
        from .client import ServerError, run_client
    except ImportError as e:
        raise _need_serve_extra(e) from None
    try:
        paths = run_client(args.input, args.url, args.mode, args.out, args.format, args.api_key, args.realtime,
                           args.message_ms, args.float, args.overwrite)
    except (ServerError, OSError) as e:
        raise CliError(f"{args.url}: {e}") from None
    for p in paths:
        _print_path(p)
    return 0


def _stdout_closed() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll: an error on the write end)."""
    try:
        import select

        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (captured), no poll (Windows)
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse already printed them)
        return e.code if isinstance(e.code, int) else 2
    try:
        if getattr(args, "f32_dot", None):  # the environment too: corpus workers are processes
            os.environ["FASTFOCAL_F32_DOT"] = args.f32_dot
            set_f32_dot(args.f32_dot)
        try:
            f32_dot()
        except ValueError as e:  # a bad FASTFOCAL_F32_DOT: one line now, not a traceback mid-run
            raise CliError(str(e)) from None
        return args.func(args)
    except BrokenPipeError as e:
        if not _stdout_closed():  # a socket or file of ours: a real error
            _error(e)
            return 2
        # the reader of our stdout went away (`fastfocal info | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS + (CliError,) as e:
        _error(e)
        return 2
    except UnicodeError as e:  # a name or text in another encoding: one line, naming it (an encode error's object)
        obj = getattr(e, "object", None)
        _error(f"{obj}: {type(e).__name__}: {e}" if isinstance(obj, str) else f"{type(e).__name__}: {e}")
        return 2
    except KeyboardInterrupt:
        print("fastfocal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
