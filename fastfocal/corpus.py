"""Corpus-scale encoding: many audio files -> token files + manifest, resumable and exact.

Decoding and resampling run in worker processes ahead of the device. Files join a pool of
streaming-state slots as others leave (`SlotEncoder`, continuous batching sized from free device
memory), and each file gets exactly the tokens `Codec.sig_to_toks` gives it alone (see `_Plan`),
so batching never changes results.
"""
from __future__ import annotations

import csv
import fcntl
import fnmatch
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import AudioError, audio_info, check_peak, read_audio
from .codec import Codec
from .files import atomic_write
from .inputs import InputError, available_bytes, check_audio, token_dtype
from .kernels import _common
from .loading import open_codec, provenance
from .pipeline import ERR_NONFINITE_OUTPUT, NumericsError, Pipeline, check_err

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64", ".rf64"}
SR = 16000
POOL_PER_ROW = 4  # slots per row of a full call


class CorpusError(ValueError):
    """Inputs, outputs or options that stop a corpus run (reported as one line by the CLI)."""


# =========================================================================== exact continuous batching
class _Plan:
    """Which rows run next, decided from lengths alone, so calls can be queued back to back on
    the device without waiting for results.

    Why this is exact: in a causal model frame t depends only on samples up to 320·t, and
    attention looks ahead only to the end of the frame's own 4-frame chunk; each slot keeps its
    own position. So a row may advance by any whole number of chunks in any call, next to rows
    at other positions, and its last partial chunk (the tail: 1..chunk-1 frames) runs in a call
    of exactly that length. A row's whole chunks are cut into pieces of `seg` frames plus the
    binary digits of the rest (seg/2, seg/4, ... one chunk), taken in any order; a call runs
    one piece size for the rows that owe it. Rows owing the same size meet even when their
    lengths differ, so calls stay full while files join and leave.
    """

    def __init__(self, slots: int, rows: int, seg: int, chunk: int):
        self.slots, self.rows, self.seg, self.chunk = slots, rows, seg, chunk
        self.call_frames = rows * seg  # activation budget of one call
        sizes = [seg]
        while sizes[-1] > chunk:
            sizes.append(sizes[-1] // 2)
        self.sizes = sizes + list(range(chunk - 1, 0, -1))  # whole-chunk pieces, then tails
        self.owe: dict[int, dict[int, None]] = {b: {} for b in self.sizes}  # size -> slots (FIFO)
        self.left: dict[int, list[int]] = {}  # slot -> [seg pieces, residual chunks (bits), tail frames]
        self.free = list(range(slots - 1, -1, -1))

    def add(self, frames: int) -> int:
        slot = self.free.pop()
        whole, tail = divmod(frames, self.chunk)
        big, bits = divmod(whole, self.seg // self.chunk)
        self.left[slot] = [big, bits, tail]
        if big:
            self.owe[self.seg][slot] = None
        for b in self.sizes[1:]:
            if b >= self.chunk and bits & (b // self.chunk):
                self.owe[b][slot] = None
        if not big and not bits:
            self.owe[tail][slot] = None
        return slot

    def _cap(self, b: int) -> int:
        return self.rows if b == self.seg else max(1, min(self.slots, self.call_frames // b))

    def _ready(self, b: int, n: int) -> bool:
        # full enough: a digit is owed by about half the pool, each tail length by a quarter
        # (bars tuned on a simulated 2-15 s corpus, calls costing 5 ms + per-frame time)
        want = self.rows if b == self.seg else self.rows * 3 // 2 if b >= self.chunk else self.rows * 3 // 4
        return n >= max(1, min(self._cap(b), want))

    def ready(self) -> bool:
        return any(self._ready(b, len(s)) for b, s in self.owe.items() if s)

    def next_call(self, force: bool) -> tuple[int, list[int], list[int]] | None:
        """(frames, slots, slots now free) of the next call and marks it done; None when no
        call is full and not `force` (the caller had better add rows first) or nothing is owed."""
        cands = [(min(len(s), self._cap(b)) * b, b) for b, s in self.owe.items() if s]
        full = [c for c in cands if self._ready(c[1], len(self.owe[c[1]]))]
        if not (full or (force and cands)):
            return None
        _, b = max(full or cands)
        owing = self.owe[b]
        slots = [s for s, _ in zip(owing, range(self._cap(b)))]
        freed = []
        for s in slots:
            left = self.left[s]
            if b == self.seg:
                left[0] -= 1
                if not left[0]:
                    del owing[s]
            elif b >= self.chunk:
                left[1] &= ~(b // self.chunk)
                del owing[s]
            else:
                left[2] = 0
                del owing[s]
            if not left[0] and not left[1]:
                if left[2] and s not in self.owe[left[2]]:
                    self.owe[left[2]][s] = None
                elif not left[2]:
                    del self.left[s]
                    self.free.append(s)
                    freed.append(s)
        return b, slots, freed


@dataclass(eq=False)
class _Row:
    key: object
    name: str
    sig: torch.Tensor  # on the device, zero-padded to whole frames, in the model's input dtype
    pos: int = 0  # frames launched
    pending: int = 0  # launched calls not yet collected
    launched: bool = False  # all of its calls launched
    err: int = 0
    parts: list = None


def _pow2_chunks(frames: int, chunk: int) -> int:
    """The largest chunk * 2^k <= frames (at least one chunk)."""
    n = max(1, frames // chunk)
    return chunk * (1 << (n.bit_length() - 1))


class SlotEncoder:
    """Continuous batching of whole files over a pool of streaming-state slots.

    One `Pipeline` of `slots` rows is allocated once; `add` puts a file in a free slot (reset in
    place), `step` runs one call (see `_Plan`: rows at different positions, one piece size per
    call, at most `rows` x `segment_frames` frames) and returns the files it finished as
    (key, tokens or exception). Tokens equal `Codec.sig_to_toks` on each file alone. On CUDA the
    next call is queued before the previous one's tokens are read back (pinned, non-blocking),
    so the device never waits for the host's bookkeeping. Memory is bounded by the pool: a long
    file only holds its slot for longer.
    """

    def __init__(self, codec: Codec, slots: int, rows: int | None = None, segment_frames: int | None = None):
        if not codec.causal:
            raise ValueError("SlotEncoder needs a causal model (non-causal attention sees the whole file)")
        cfg = codec.config
        self.codec, self.hop, self.dev = codec, cfg.hop_samples, codec.device
        self.cuda = self.dev.type == "cuda"
        seg = _pow2_chunks(segment_frames or codec.segment_frames, cfg.chunk_frames)
        self.plan = _Plan(slots, max(1, min(rows or slots, slots)), seg, cfg.chunk_frames)
        self.pipe = Pipeline(codec.model, "encode", slots)
        self.by_slot: dict[int, _Row] = {}
        self.inflight: deque = deque()
        self.to_reset: list[int] = []
        self.stats = {"calls": 0, "row_calls": 0, "frames": 0, "model_s": 0.0, "fp32_files": 0}
        self.recomputed: dict = {}  # id(key) -> key of files recomputed in float32 (float16 overflowed)

    @property
    def free(self) -> int:
        return len(self.plan.free)

    @property
    def busy(self) -> bool:
        return bool(self.by_slot or self.inflight)

    def ready(self) -> bool:
        """A full call is waiting (else adding rows first makes fuller calls)."""
        return self.plan.ready()

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        # pageable host->device copies synchronize the stream: pin, copy without blocking
        return t.pin_memory().to(self.dev, non_blocking=True) if self.cuda else t

    def add(self, key, sig, name: str = "audio") -> None:
        """Queue one 16 kHz signal; InputError (nothing queued) for what sig_to_toks refuses."""
        x, one = check_audio(torch.from_numpy(np.ascontiguousarray(sig, np.float32)), frame=self.hop, name=name)
        if not one:
            raise InputError(f"{name} must be one signal (n,), got shape {tuple(x.shape)}")
        x = x[0]
        if not self.plan.free:
            raise RuntimeError("no free slot: step() until one is")
        frames = -(-x.shape[0] // self.hop)
        padded = torch.zeros(frames * self.hop, dtype=torch.float32)
        padded[:x.shape[0]] = x
        slot = self.plan.add(frames)
        self.to_reset.append(slot)
        self.by_slot[slot] = _Row(key, name, self._up(padded).to(self.codec.dtype), parts=[])

    def step(self, force: bool = True) -> list[tuple[object, np.ndarray | Exception]]:
        """Run the next call (a full one; with `force`, the best there is) and return the files
        finished by earlier calls. With nothing to run, returns everything still in flight."""
        call = self.plan.next_call(force)
        if call is not None:
            self._launch(*call)
        done = []
        while len(self.inflight) > (call is not None):
            done += self._collect(self.inflight.popleft())
        return done

    def _launch(self, frames: int, slots: list[int], freed: list[int]) -> None:
        if self.to_reset:
            self.pipe.reset(self._up(torch.tensor(self.to_reset)))
            self.to_reset = []
        rows = [self.by_slot[s] for s in slots]
        h = self.hop
        x = torch.stack([r.sig[r.pos * h:(r.pos + frames) * h] for r in rows])
        idx = self._up(torch.tensor(slots))
        if self.cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
        else:
            t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe.run(x, idx)
        if self.cuda:
            t1.record()
            toks, err = out["toks"].to("cpu", non_blocking=True), out["err"].to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            toks, err, done = out["toks"], out["err"], None
            self.stats["model_s"] += time.perf_counter() - t0
            t0 = t1 = None
        self.inflight.append((rows, toks, err, done, t0, t1))
        for r in rows:
            r.pos += frames
            r.pending += 1
        for s in freed:
            self.by_slot.pop(s).launched = True
        self.stats["calls"] += 1
        self.stats["row_calls"] += len(rows)
        self.stats["frames"] += len(rows) * frames

    def _collect(self, call) -> list[tuple[object, np.ndarray | Exception]]:
        rows, toks, err, done, t0, t1 = call
        if done is not None:
            done.synchronize()
            self.stats["model_s"] += t0.elapsed_time(t1) / 1000
        toks, err = toks.numpy().copy(), err.numpy()
        out = []
        for j, r in enumerate(rows):
            r.parts.append(toks[j])
            r.err = max(r.err, int(err[j]))
            r.pending -= 1
            if r.launched and not r.pending:
                try:
                    if r.err == ERR_NONFINITE_OUTPUT and self.codec.dtype == torch.float16:
                        # overflowed in float16: the file alone again, in float32 (as sig_to_toks
                        # recomputes an overflowed row; its float16 run is not repeated)
                        res = self.codec.sig_to_toks_float32(r.sig, r.name).cpu().numpy()
                        self.stats["fp32_files"] += 1
                        self.recomputed[id(r.key)] = r.key
                    else:
                        check_err(torch.tensor([r.err]), r.name, self.codec.dtype)
                        res = np.concatenate(r.parts)
                except (InputError, NumericsError) as e:
                    res = e
                out.append((r.key, res))
        return out


def encode_batch(codec: Codec, sigs: list[np.ndarray], errors: bool = False) -> list:
    """Tokens (int64) of each 16 kHz signal, equal to `codec.sig_to_toks(sig)` on it alone
    (`SlotEncoder` slots sized from free memory as encode-corpus sizes them; see `_Plan` for why
    batching is exact). errors: a signal the model refuses (shorter than a frame, NaN latents...)
    gives its exception in its place instead of raising, so one file never fails a batch."""
    out: list = [None] * len(sigs)
    todo = []
    for i, s in enumerate(sigs):  # what sig_to_toks refuses, refused here before any work
        try:
            check_audio(torch.from_numpy(np.asarray(s, np.float32)), frame=codec.config.hop_samples, name=f"signal {i}")
            todo.append(i)
        except InputError as e:
            if not errors:
                raise
            out[i] = e
    if not codec.causal:  # whole-file attention: any padding changes tokens
        for i in todo:
            try:
                out[i] = codec.sig_to_toks(sigs[i]).cpu().numpy()
            except (InputError, NumericsError) as e:
                if not errors:
                    raise
                out[i] = e
        return out
    if todo:
        size = pool_size(codec, [len(sigs[i]) / SR for i in todo])
        enc = SlotEncoder(codec, size["slots"], size["rows"], min(size["segment_frames"], codec.segment_frames))
        waiting = deque(todo)
        while waiting or enc.busy:
            while waiting and enc.free:
                i = waiting.popleft()
                enc.add(i, sigs[i], f"signal {i}")
            for i, t in enc.step():
                out[i] = t
    for i, t in enumerate(out):
        if isinstance(t, Exception) and not errors:
            raise t
    return out


def pool_size(codec: Codec, seconds: list[float], batch_seconds: float | None = None,
              max_batch: int | None = None) -> dict:
    """Slots, rows per call and piece length for a corpus: from free device memory and the
    length distribution. A quarter of the slots run in a full call; the others hold rows
    waiting for their digit or tail calls (fewer, fuller calls). Defaults cap a call at 512 rows
    on CUDA and 64 on CPU."""
    cfg, hop = codec.config, codec.config.hop_samples
    frames = sorted(-(-int(s * SR) // hop) for s in seconds) or [1]
    seg = min(512, max(64, _pow2_chunks(frames[len(frames) // 2], cfg.chunk_frames)))
    cuda = codec.device.type == "cuda"
    mean_sig = sum(frames) / len(frames) * hop * torch.finfo(codec.dtype).bits // 8
    slot_b = Pipeline.bytes_per_slot(codec.model, "encode") + mean_sig
    row_b = Pipeline.activation_bytes_for(cfg, codec.dtype, 1, seg)
    budget = available_bytes(codec.device) * (0.6 if cuda else 0.25)
    rows = int(budget // (POOL_PER_ROW * slot_b + row_b))
    if batch_seconds:
        rows = min(rows, int(batch_seconds * SR / hop) // seg)
    rows = max(1, min(rows, max_batch or (512 if cuda else 64), len(frames)))
    return {"slots": max(1, min(POOL_PER_ROW * rows, len(frames))), "rows": rows, "segment_frames": seg}


# =========================================================================== inputs
@dataclass
class Item:
    path: str  # input file (absolute)
    rel: str  # output name relative to --out, without extension (posix)
    seconds: float = 0.0
    real: str = ""  # its resolved path: what resume matches finished files by


def _read_list(p: Path) -> list[Path]:
    """Audio paths from a .jsonl ("path" key) or .csv ("path" column); relative to the list's folder."""
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise CorpusError(f"{p}: cannot read manifest ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p}: manifest is not UTF-8 text (at byte offset {e.start})") from None
    paths = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{p}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise CorpusError(f"{p}:{n}: no \"path\" string")
            paths.append(row["path"])
    else:
        rows = csv.DictReader(text.splitlines())
        if "path" not in (rows.fieldnames or []):
            raise CorpusError(f"{p}: CSV has no 'path' column (columns: {rows.fieldnames})")
        paths = [r["path"] for r in rows if r.get("path")]
    return [Path(q) if os.path.isabs(q) else p.parent / q for q in paths]


def _walk(top: str):
    """(folder, sorted file names) under top, following symlinked folders, each real folder once:
    a link to an ancestor would otherwise repeat the tree until the kernel's link limit."""
    seen = set()
    for d, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield d, sorted(files)


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), but `**` walks with `_walk`: symlinked folders are
    followed as a directory input follows them, with the same cycle protection."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return glob.glob(pattern)
    i = next(k for k, c in enumerate(parts) if glob.has_magic(c))
    base = str(Path(*parts[:i])) if i else os.curdir
    return [os.path.join(d, f) for d, files in _walk(base) for f in files
            if _match(parts[i:], (*Path(os.path.relpath(d, base)).parts, f))]


def _match(pat: tuple, names: tuple) -> bool:
    """glob's rules, one path component at a time: `**` is any number of folders; wildcards do
    not match hidden names (a leading '.') unless the pattern component starts with '.'."""
    if not pat:
        return not names
    if pat[0] == "**":
        return _match(pat[1:], names) or (bool(names) and not names[0].startswith(".") and _match(pat, names[1:]))
    return (bool(names) and (not names[0].startswith(".") or pat[0].startswith("."))
            and fnmatch.fnmatchcase(names[0], pat[0]) and _match(pat[1:], names[1:]))


def find_inputs(inputs: list[str]) -> list[Item]:
    """Expand directories (recursive, by extension, following symlinked folders), globs,
    manifests and files. A file reached twice (two names, a symlink) is taken once, by its
    first name.

    Outputs mirror the tree under the common root: a directory argument is its own root.
    """
    found: list[tuple[str, str]] = []  # (file, root)
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files = [os.path.join(d, f) for d, names in _walk(s) for f in names
                     if Path(f).suffix.lower() in AUDIO_EXTS and os.path.isfile(os.path.join(d, f))]
            found += [(os.path.abspath(f), os.path.abspath(p)) for f in files]
        elif p.is_file() and p.suffix.lower() in (".jsonl", ".csv"):
            found += [(os.path.abspath(f), os.path.dirname(os.path.abspath(f))) for f in _read_list(p)]
        elif p.is_file():
            found.append((os.path.abspath(p), os.path.dirname(os.path.abspath(p))))
        elif glob.has_magic(s):
            files = sorted(f for f in _glob(s) if os.path.isfile(f))
            if not files:
                raise CorpusError(f"{s}: glob matches no files")
            found += [(os.path.abspath(f), os.path.dirname(os.path.abspath(f))) for f in files]
        else:
            raise CorpusError(f"{s}: no such file, directory or glob")
    if not found:
        raise CorpusError("no audio files found in the inputs")
    root = os.path.commonpath([r for _, r in found])
    items = {}
    for f, _ in found:
        real = os.path.realpath(f)
        if real not in items:
            items[real] = Item(f, Path(os.path.relpath(f, root)).with_suffix("").as_posix(), real=real)
    return sorted(items.values(), key=lambda it: it.rel)


# =========================================================================== output directory
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return [r for r in rows if isinstance(r, dict) and "rel" in r and "out" in r]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_or_none(path: str) -> str | None:
    try:
        return _sha256(Path(path))
    except OSError:
        return None


def _output_ok(out: Path, row: dict, checked: dict) -> bool:
    """A manifest row's output is there and whole: an .npy's header, size and the sha256 the row
    records; a parquet shard readable and holding the row's file (its paths read once per shard)."""
    if not isinstance(row["out"], str) or not isinstance(row.get("path"), str):
        return False
    p = out / row["out"]
    if p.suffix == ".parquet":
        if p not in checked:
            try:
                import pyarrow.parquet as pq

                checked[p] = set(pq.read_table(p, columns=["path"]).column("path").to_pylist())
            except Exception:  # missing, cut, not parquet, or written without a path column
                checked[p] = set()
        return _text(row["path"]) in checked[p]
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            start = f.tell()
            body = f.seek(0, 2) - start
    except (OSError, ValueError, EOFError):
        return False
    n = row.get("n_tokens")
    return (len(shape) == 1 and dtype.kind in "iu" and body == shape[0] * dtype.itemsize
            and (n is None or n == shape[0]) and ("out_sha256" not in row or row["out_sha256"] == _sha256(p)))


def _text(s: str) -> str:
    """s as valid UTF-8 text for a parquet string column: a file name that is not UTF-8 (its
    bytes kept as surrogates) gets backslash escapes (the manifest keeps the exact name)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _done(out: Path, own: Path) -> dict[str, dict]:
    """Files finished by earlier runs, by the real path of their source: listed in some
    manifest*.jsonl with their output present and whole (0-byte, cut or altered outputs are
    encoded again). Matching by source, not by output name, keeps a file's name when the set
    of inputs (and so their common root) changes. Our own manifest is rewritten without
    entries whose output is gone or bad, one entry per source."""
    done = {}
    checked: dict[Path, set] = {}
    for mf in sorted(out.glob("manifest*.jsonl")):
        rows = [r for r in _read_jsonl(mf) if _output_ok(out, r, checked)]
        if mf == own:
            last = {r["path"]: r for r in rows}
            atomic_write(mf, lambda f: f.write("".join(json.dumps(r) + "\n" for r in last.values()).encode()))
        for r in rows:  # a source finished in several runs (shard layouts change): the newest row
            k = os.path.realpath(r["path"])
            if k not in done or _row_time(r) >= _row_time(done[k]):
                done[k] = r
    return done


def _row_time(r: dict) -> int:
    """When a manifest row was written (rows of older runs carry none: oldest)."""
    t = r.get("done_ns")
    return t if isinstance(t, int) else -1


def _check_info(out: Path, codec: Codec, fmt: str) -> None:
    """info.json records the model, weights and dtype; resuming with another model or other
    weights would mix token spaces, with another dtype mix slightly different tokens."""
    info = {"model": codec.name, "codebook_size": codec.codebook_size, "token_rate": codec.token_rate,
            "sample_rate_input": codec.sample_rate_input, "sample_rate_output": codec.sample_rate_output,
            "format": fmt, "token_dtype": token_dtype(codec.codebook_size).name, **provenance(codec)}
    p = out / "info.json"
    if p.is_file():
        try:
            old = json.loads(p.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):
            old = {}
        old = old if isinstance(old, dict) else {}
        diff = [k for k in ("model", "weights_hash", "dtype", "f32_dot", "codebook_size", "format")
                if old.get(k) != info.get(k)]
        if diff:
            raise CorpusError(f"{out} holds output of {', '.join(f'{k}={old.get(k)!r}' for k in diff)}; "
                           f"this run has {', '.join(f'{k}={info.get(k)!r}' for k in diff)}: use another --out")
        return
    atomic_write(p, lambda f: f.write((json.dumps(info, indent=1) + "\n").encode()))


_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_temp_files(out: Path) -> int:
    """Remove temporary outputs (.<name>.tmp<pid>) left by runs that died."""
    n = 0
    for d, _, files in os.walk(out):
        for name in files:
            m = _TMP.match(name)
            if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
                Path(d, name).unlink(missing_ok=True)
                n += 1
    return n


def _lock(out: Path, shard: str):
    """Hold <out>/.lock<shard> for the run: a second run on the same shard is refused."""
    path = out / f".lock{shard}"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise CorpusError(f"{out} is being written by another encode-corpus run (pid {holder} holds {path}); "
                          "wait for it to finish or use another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


class _NpyWriter:
    def __init__(self, out: Path, dtype):
        self.out, self.dtype = out, dtype

    def add(self, it: Item, toks: np.ndarray) -> str:
        rel = it.rel + ".npy"
        atomic_write(self.out / rel, lambda f: np.save(f, toks.astype(self.dtype)))
        return rel

    def flush(self, final: bool = False) -> list[tuple[Item, str]]:
        return []


class _ParquetWriter:
    """Rows buffered into shards tokens-<shard>-<n>.parquet; a file's manifest entry is
    written only once its shard is on disk."""

    def __init__(self, out: Path, dtype, shard: str, rows_per_file: int = 10000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.pq = pa, pq
        self.out, self.dtype, self.shard, self.rows_per_file = out, dtype, shard, rows_per_file
        self.rows: list[tuple[Item, np.ndarray]] = []
        # after the highest shard there: counting them would reuse a number when one is missing
        shard_name = re.compile(rf"tokens{re.escape(shard)}-(\d+)\.parquet")
        self.n = 1 + max((int(m[1]) for p in out.glob("tokens*.parquet") if (m := shard_name.fullmatch(p.name))),
                         default=-1)
        self.ready: list[tuple[Item, str]] = []

    def add(self, it: Item, toks: np.ndarray) -> str | None:
        self.rows.append((it, toks.astype(self.dtype)))
        if len(self.rows) >= self.rows_per_file:
            self._write()
        return None

    def _write(self) -> None:
        if not self.rows:
            return
        name = f"tokens{self.shard}-{self.n:05d}.parquet"
        while (self.out / name).exists():  # never replace a shard: its files are "done" in some manifest
            self.n += 1
            name = f"tokens{self.shard}-{self.n:05d}.parquet"
        pa = self.pa
        table = pa.table({
            "rel": [_text(it.rel) for it, _ in self.rows],
            "path": [_text(it.path) for it, _ in self.rows],
            "tokens": pa.array([t for _, t in self.rows], type=pa.list_(pa.from_numpy_dtype(self.dtype))),
        })
        atomic_write(self.out / name, lambda f: self.pq.write_table(table, f))
        self.ready += [(it, name) for it, _ in self.rows]
        self.rows, self.n = [], self.n + 1

    def flush(self, final: bool = False) -> list[tuple[Item, str]]:
        if final:
            self._write()
        ready, self.ready = self.ready, []
        return ready


# =========================================================================== worker-side
def _probe(path: str) -> float | str:
    """Duration in seconds from the header, or an error message."""
    try:
        frames, sr = audio_info(path)
    except AudioError as e:
        return str(e)
    except Exception as e:  # a probe must never stop the run
        return f"{path}: {type(e).__name__}: {e}"
    if frames <= 0:
        return f"{path}: contains no samples"
    return frames / sr


def _stat(path: str) -> dict:
    """Size and mtime of a source: a resume re-reads only files whose stat changed."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load(path: str) -> tuple[np.ndarray, dict]:
    """(16 kHz mono signal, the source's sha256, size and mtime); out-of-range audio is refused here."""
    try:
        ident = _stat(path)  # before reading: an edit while we read shows on the next resume
        ident["sha256"] = _sha256(Path(path))
    except OSError as e:
        raise AudioError(f"{path}: cannot read ({e.strerror})") from None
    sig = read_audio(path, SR)
    check_peak(sig, path)
    return sig, ident


def _source_state(path: str, row: dict) -> tuple[str, dict | None]:
    """Whether a finished file's source is the one its tokens were made from: ("same", None) for
    an equal size and mtime, ("touched", new stat) when the stat changed but the sha256 did not
    (recorded, so the next resume does not hash it again), ("edited", None) otherwise. Rows of runs
    that recorded no stat count as the same (hashing a whole corpus to resume is too dear)."""
    if "size" not in row or "mtime_ns" not in row:
        return "same", None
    try:
        st = _stat(path)
    except OSError:
        return "edited", None  # gone or unreadable now: the encode attempt reports it
    if st["size"] == row["size"] and st["mtime_ns"] == row["mtime_ns"]:
        return "same", None
    if st["size"] == row["size"] and row.get("sha256") == _sha256_or_none(path):
        return "touched", st
    return "edited", None


def _watch_parent(conn) -> None:
    """Exit when the process that made us dies (its end of `conn` closes), even by kill -9.
    Workers hold the forkserver's and resource tracker's pipes open, so once they are gone
    those two exit as well."""

    def wait():
        try:
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=wait, daemon=True, name="fastfocal-parent-watch").start()


class _Inline:
    """Executor stand-in for --workers 0: run at submit time in this process."""

    def submit(self, fn, *a):
        fut = Future()
        try:
            fut.set_result(fn(*a))
        except Exception as e:
            fut.set_exception(e)
        return fut

    def map(self, fn, xs, chunksize=1):
        return map(fn, xs)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _executor(workers: int):
    """(pool, pipe end the workers watch: closing or dying closes it)."""
    if workers <= 0:
        return _Inline(), None
    # forkserver: workers fork from a clean single-threaded server (never from a process
    # holding OpenMP/CUDA threads), and import the package once there, not once per worker.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fastfocal.corpus"])
    r, w = ctx.Pipe(duplex=False)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_watch_parent, initargs=(r,))
    return pool, (r, w)


# =========================================================================== one shard on one device
def _progress(total_s: float, n_files: int, quiet: bool, position: int):
    from tqdm import tqdm

    return tqdm(
        total=round(total_s), unit="audio-s", position=position, dynamic_ncols=True,
        disable=quiet or not sys.stderr.isatty(),
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} audio-s [{elapsed}<{remaining}{postfix}]",
        desc=f"encode {n_files} files",
    )


def run_shard(items: list[Item], out: Path, device, opts: dict, shard: str = "", position: int = 0) -> dict:
    """Encode `items` on one device. Writes <out>/manifest<shard>.jsonl and errors<shard>.jsonl."""
    codec = open_codec(opts["model"], opts["random_init"], device, opts["dtype"])
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, shard)
    try:
        return _run_locked(items, out, codec, opts, shard, position)
    finally:
        lock.close()


def _run_locked(items: list[Item], out: Path, codec: Codec, opts: dict, shard: str, position: int) -> dict:
    _check_info(out, codec, opts["fmt"])
    _clean_temp_files(out)
    made_by = provenance(codec)
    dtype = token_dtype(codec.codebook_size)
    if opts["fmt"] == "parquet":
        writer = _ParquetWriter(out, dtype, shard)
    else:
        writer = _NpyWriter(out, dtype)
    man_path, err_path = out / f"manifest{shard}.jsonl", out / f"errors{shard}.jsonl"
    done = _done(out, man_path)
    todo, edited, touched = [], 0, []
    for it in items:
        row = done.get(it.real)
        state, st = ("new", None) if row is None else _source_state(it.path, row)
        if state == "edited":
            it.rel = row["rel"]  # encoded again under the name it was given
            edited += 1
        elif state == "touched":
            touched.append({**row, **st, "done_ns": time.time_ns()})
        if state in ("new", "edited"):
            todo.append(it)
    taken = {r["rel"]: r for r in done.values()}  # output names held by files earlier runs finished
    stats = {"files": 0, "seconds": 0.0, "skipped": len(items) - len(todo), "errors": 0, "edited": edited}
    t0 = time.perf_counter()
    pool, watch = _executor(opts["workers"])
    with open(man_path, "a") as man, open(err_path, "w") as err:
        if touched:  # their new stat, so the next resume compares it without hashing them again
            man.write("".join(json.dumps(r) + "\n" for r in touched))
            man.flush()

        def fail(it: Item, msg: str):
            err.write(json.dumps({"path": it.path, "rel": it.rel, "error": msg}) + "\n")
            err.flush()
            stats["errors"] += 1

        def record(pairs, meta):
            for it, name in pairs:
                row = {"path": it.path, "rel": it.rel, "out": name, **meta.pop(it.rel), **made_by,
                       "done_ns": time.time_ns()}
                if name.endswith(".npy"):  # verified on resume (parquet shards: by size and magic)
                    row["out_sha256"] = _sha256(out / name)
                man.write(json.dumps(row) + "\n")
            man.flush()

        # outputs must not collide: a.wav and a.flac in one folder would both be a.npy
        by_rel: dict[str, Item] = {}
        for it in todo:
            old = taken.get(it.rel)
            if old is not None and os.path.realpath(old["path"]) == it.real:
                by_rel[it.rel] = it  # edited since its tokens were made: encoded again, same name
            elif old is not None and old.get("sha256") is not None and old["sha256"] == _sha256_or_none(it.path):
                stats["skipped"] += 1  # the same file (its bytes), moved since
            elif old is not None:
                fail(it, f"{it.path}: same output name as {old['path']}, encoded by an earlier run into {out}")
            elif it.rel in by_rel:
                fail(it, f"{it.path}: same output name as {by_rel[it.rel].path}")
            else:
                by_rel[it.rel] = it
        todo = list(by_rel.values())
        probed = []
        for it, r in zip(todo, pool.map(_probe, [it.path for it in todo], chunksize=16)):
            if isinstance(r, str):
                fail(it, r)
            else:
                it.seconds = r
                probed.append(it)
        # longest first: a long file never runs alone at the end
        probed.sort(key=lambda it: (-it.seconds, it.rel))
        bar = _progress(sum(it.seconds for it in probed), len(probed), opts["quiet"], position)
        meta: dict[str, dict] = {}
        enc = None
        if probed and codec.causal:
            size = pool_size(codec, [it.seconds for it in probed], opts["batch_seconds"], opts["max_batch"])
            enc = SlotEncoder(codec, size["slots"], size["rows"], size["segment_frames"])
            stats.update(size)
        # decoded ahead: a few pools' worth of files, at most ~2 GiB of float32 audio in flight
        ahead_files = (opts["prefetch"] + 1) * (enc.plan.slots if enc else 1)
        ahead_s = float(1 << 29) / SR
        queue: deque = deque()
        nxt, queued_s = 0, 0.0

        def finish(it: Item, toks, recomputed: bool = False) -> None:
            if isinstance(toks, Exception):  # the model refused this file (e.g. NaN latents): only it fails
                fail(it, f"{it.path}: {toks}")
                meta.pop(it.rel, None)
                return
            meta[it.rel]["n_tokens"] = len(toks)
            if recomputed or (enc is not None and enc.recomputed.pop(id(it), None) is not None):
                meta[it.rel]["recomputed_fp32"] = True  # float16 overflowed on this file
            if recomputed:  # the slot encoder counts its own (its stats join these at the end)
                stats["fp32_files"] = stats.get("fp32_files", 0) + 1
            stats["files"] += 1
            stats["seconds"] += meta[it.rel]["duration"]
            name = writer.add(it, toks)
            if name is not None:
                record([(it, name)], meta)
            bar.update(it.seconds)
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{stats['files'] / el:.1f} files/s, {stats['seconds'] / 3600 / el:.3g} audio-h/s")

        def admit() -> None:
            nonlocal queued_s
            it, fut = queue.popleft()
            queued_s -= it.seconds
            try:
                sig, ident = fut.result()
            except Exception as e:  # one bad file never stops the run
                fail(it, str(e) if isinstance(e, AudioError) else f"{it.path}: {type(e).__name__}: {e}")
                return
            meta[it.rel] = {"duration": len(sig) / SR, "n_tokens": 0, **ident}
            try:
                if enc is None:  # non-causal: whole-file attention, one file at a time
                    before = codec.fp32_rows
                    finish(it, codec.sig_to_toks(sig).cpu().numpy(), codec.fp32_rows > before)
                else:
                    enc.add(it, sig)
            except InputError as e:
                fail(it, f"{it.path}: {e}")
                meta.pop(it.rel, None)

        try:
            while nxt < len(probed) or queue or (enc and enc.busy):
                while nxt < len(probed) and len(queue) < ahead_files and (not queue or queued_s < ahead_s):
                    queue.append((probed[nxt], pool.submit(_load, probed[nxt].path)))
                    queued_s += probed[nxt].seconds
                    nxt += 1
                if enc is None:
                    admit()
                    continue
                while enc.free and queue and queue[0][1].done():
                    admit()
                if enc.free and queue and not enc.ready():
                    admit()  # wait for the decoders: a fuller pool makes fuller calls
                    continue
                for it, toks in enc.step(force=True):
                    finish(it, toks)
                record(writer.flush(), meta)
            record(writer.flush(final=opts["fmt"] == "parquet"), meta)
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            for c in watch or ():
                c.close()
    if enc is not None:
        stats.update(enc.stats)
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def _device_main(items, out, device, opts, shard, position, q, watch):
    _watch_parent(watch)
    try:
        _common.set_f32_dot(opts["f32_dot"])
        q.put(run_shard(items, Path(out), device, opts, shard, position))
    except Exception as e:  # reported by the parent as one line
        q.put({"error": f"{device}: {e}"})


# =========================================================================== entry point
def _env_int(name: str, default, lo: int) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise CorpusError(f"{name}={v!r} is not an integer") from None
    if n < lo:
        raise CorpusError(f"{name}={n} must be >= {lo}")
    return n


def _rank_world() -> tuple[int, int]:
    """torchrun's RANK and WORLD_SIZE, checked (a rank outside the world would encode nothing)."""
    rank, world = _env_int("RANK", 0, 0), _env_int("WORLD_SIZE", 1, 1)
    if rank >= world:
        raise CorpusError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks are 0 .. {world - 1})")
    return rank, world


def encode_corpus(inputs, out, *, model=None, random_init=None, devices=None, dtype="fp32", batch_seconds=None,
                  max_batch=None, workers=4, prefetch=2, fmt="npy", quiet=False) -> dict:
    """Encode every audio file under `inputs` into `out`. Returns counts and timings.

    Sharding: torchrun's RANK/WORLD_SIZE take every WORLD_SIZE-th file; within a rank, several
    --devices take every n-th file, one process each. Each shard keeps its own
    manifest.<k>.jsonl and errors.<k>.jsonl (a single shard: manifest.jsonl, errors.jsonl).
    """
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CorpusError("--format parquet needs pyarrow: pip install pyarrow") from None
    if batch_seconds is not None and not (math.isfinite(batch_seconds) and batch_seconds > 0):  # nan, inf: never a size
        raise CorpusError(f"--batch-seconds must be a finite number > 0, got {batch_seconds!r}")
    if max_batch is not None and max_batch < 1:
        raise CorpusError(f"--max-batch must be >= 1, got {max_batch!r}")
    if prefetch < 0:
        raise CorpusError(f"--prefetch must be >= 0, got {prefetch!r}")
    rank, world = _rank_world()
    items = find_inputs(inputs)[rank::world]
    if not devices:
        local = _env_int("LOCAL_RANK", None, 0)
        devices = [f"cuda:{local}" if local is not None and torch.cuda.is_available() else None]
    opts = dict(model=model, random_init=random_init, dtype=dtype, batch_seconds=batch_seconds, max_batch=max_batch,
                workers=workers, prefetch=prefetch, fmt=fmt, quiet=quiet,
                f32_dot=_common.f32_dot())  # set_f32_dot's say reaches spawned device processes too
    n = len(devices)
    shards = [("" if world * n == 1 else f".{rank * n + k}") for k in range(n)]
    out = Path(out)
    t0 = time.perf_counter()
    if n == 1:
        results = [run_shard(items, out, devices[0], opts, shards[0])]
    else:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        q = ctx.Queue()
        r, w = ctx.Pipe(duplex=False)  # device processes exit if this one dies
        procs = [ctx.Process(target=_device_main, args=(items[k::n], str(out), d, opts, shards[k], k, q, r))
                 for k, d in enumerate(devices)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        r.close()
        w.close()
        results = []
        while len(results) < n:
            try:
                results.append(q.get(timeout=1))
            except queue_mod.Empty:
                break
        bad = [r["error"] for r in results if "error" in r]
        if len(results) < n:
            bad.append(f"a device process died (exit codes {[p.exitcode for p in procs]})")
        if bad:
            raise CorpusError("; ".join(bad))
    total = {k: sum(r.get(k, 0) for r in results) for k in ("files", "seconds", "skipped", "errors", "calls",
                                                            "row_calls", "frames", "model_s", "fp32_files", "edited")}
    total.update({k: results[0][k] for k in ("slots", "rows", "segment_frames") if k in results[0]})
    total["wall_s"] = time.perf_counter() - t0
    total["encode_s"] = max(r["wall_s"] for r in results)  # after model load, slowest device
    if not quiet:
        h = total["seconds"] / 3600
        msg = (f"fastfocal: encoded {total['files']} files ({h:.3g} h of audio) in {total['encode_s']:.1f} s "
               f"({h / max(total['encode_s'], 1e-9):.3g} audio-h/s; {total['wall_s']:.1f} s with model load); "
               f"{total['skipped']} already done; {total['errors']} errors")
        if total["edited"]:
            msg += f"; {total['edited']} edited since an earlier run and encoded again"
        if total["errors"]:
            msg += f" (see {out / 'errors*.jsonl'})" if len(shards) > 1 else f" (see {out / 'errors.jsonl'})"
        if total["fp32_files"]:
            n = total["fp32_files"]
            msg += (f"; {n} file{'s' if n != 1 else ''} overflowed float16 and {'were' if n != 1 else 'was'} "
                    "recomputed in float32 (\"recomputed_fp32\" in the manifest)")
        print(msg, file=sys.stderr)
    return total
