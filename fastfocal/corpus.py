"""Corpus-scale encoding: many audio files -> token files + manifest, resumable and exact.

Decoding and resampling run in worker processes a few batches ahead of the device. Files are
sorted by length and batched under an audio budget; `encode_batch` gives each file exactly
the tokens `Codec.sig_to_toks` gives it alone (see there), so batching never changes results.
"""
from __future__ import annotations

import csv
import fcntl
import glob
import hashlib
import json
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
from .inputs import InputError, check_audio, token_dtype
from .loading import open_codec, provenance
from .pipeline import Pipeline, check_err

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64", ".rf64"}
SR = 16000


class CorpusError(ValueError):
    """Inputs, outputs or options that stop a corpus run (reported as one line by the CLI)."""


# =========================================================================== exact batched encoding
def encode_batch(codec: Codec, sigs: list[np.ndarray]) -> list[np.ndarray]:
    """Tokens (int64) of each 16 kHz signal, equal to `codec.sig_to_toks(sig)` on it alone.

    Why batching is exact here: in a causal model frame t depends only on samples up to
    320·t, and attention looks ahead only to the end of the frame's own 4-frame chunk. So a
    signal may be zero-padded to whole frames, and rows may share a call as long as no row
    has a partial chunk in it. Rows advance together in chunk-aligned segments (streaming
    state, one slot per row); a row's last partial chunk runs in a call of its own length,
    shared only with rows whose signal ends on the same frame.
    """
    if not codec.causal:  # whole-file attention: any padding changes tokens
        return [codec.sig_to_toks(s).cpu().numpy() for s in sigs]
    cfg, dev = codec.config, codec.device
    hop, cf, seg = cfg.hop_samples, cfg.chunk_frames, codec.segment_frames
    for i, s in enumerate(sigs):  # what sig_to_toks refuses, refused here before any work
        check_audio(torch.from_numpy(np.asarray(s, np.float32)), frame=hop, name=f"signal {i}")
    frames = [-(-len(s) // hop) for s in sigs]
    x = torch.zeros(len(sigs), max(frames) * hop, dtype=torch.float32)
    for i, s in enumerate(sigs):
        x[i, :len(s)] = torch.from_numpy(s)
    x = x.to(dev, codec.dtype)
    pipe = Pipeline(codec.model, "encode", len(sigs))
    parts: list[list[torch.Tensor]] = [[] for _ in sigs]

    def run(rows, a, b):
        idx = torch.tensor(rows, device=dev)
        out = pipe.run_segmented(x[idx, a * hop:b * hop], idx, ["toks"], seg)
        check_err(out["err"], "audio")
        for j, i in enumerate(rows):
            parts[i].append(out["toks"][j])

    t = 0  # frames done by every unfinished row (a multiple of the chunk)
    rows = list(range(len(sigs)))
    with torch.inference_mode():
        while rows:
            rows = [i for i in rows if frames[i] > t]
            tails = [i for i in rows if frames[i] - t < cf]
            for n in sorted({frames[i] for i in tails}):
                run([i for i in tails if frames[i] == n], t, n)
            rows = [i for i in rows if frames[i] - t >= cf]
            if rows:
                end = min(t + seg, min(frames[i] // cf * cf for i in rows))
                run(rows, t, end)
                t = end
    return [torch.cat(p).cpu().numpy() if p else np.zeros(0, np.int64) for p in parts]


# =========================================================================== inputs
@dataclass
class Item:
    path: str  # input file (absolute)
    rel: str  # output name relative to --out, without extension (posix)
    seconds: float = 0.0


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


def find_inputs(inputs: list[str]) -> list[Item]:
    """Expand directories (recursive, by extension), globs, manifests and files.

    Outputs mirror the tree under the common root: a directory argument is its own root.
    """
    found: list[tuple[str, str]] = []  # (file, root)
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTS and f.is_file())
            found += [(os.path.abspath(f), os.path.abspath(p)) for f in files]
        elif p.is_file() and p.suffix.lower() in (".jsonl", ".csv"):
            found += [(os.path.abspath(f), os.path.dirname(os.path.abspath(f))) for f in _read_list(p)]
        elif p.is_file():
            found.append((os.path.abspath(p), os.path.dirname(os.path.abspath(p))))
        elif glob.has_magic(s):
            files = sorted(f for f in glob.glob(s, recursive=True) if os.path.isfile(f))
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
        if f in items:
            continue
        items[f] = Item(f, Path(os.path.relpath(f, root)).with_suffix("").as_posix())
    return sorted(items.values(), key=lambda it: it.rel)


# =========================================================================== output directory
def _atomic_write(path: Path, write) -> None:
    """write(file) to a temp name, then rename: a crash never leaves a truncated output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _output_ok(out: Path, row: dict, checked: dict) -> bool:
    """A manifest row's output is there and whole: an .npy's header, size and the sha256 the row
    records; a parquet shard's size and end magic (read once per shard)."""
    if not isinstance(row["out"], str):
        return False
    p = out / row["out"]
    if p in checked:
        return checked[p]
    ok = False
    try:
        if p.suffix == ".parquet":
            with open(p, "rb") as f:
                size = f.seek(0, 2)
                ok = size >= 12 and f.seek(size - 4) >= 0 and f.read(4) == b"PAR1"
            checked[p] = ok
        else:
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                start = f.tell()
                body = f.seek(0, 2) - start
            n = row.get("n_tokens")
            ok = (len(shape) == 1 and dtype.kind in "iu" and body == shape[0] * dtype.itemsize
                  and (n is None or n == shape[0]) and ("out_sha256" not in row or row["out_sha256"] == _sha256(p)))
    except (OSError, ValueError, EOFError):
        ok = False
    return ok


def _done(out: Path, own: Path) -> set[str]:
    """Files finished by earlier runs: listed in some manifest*.jsonl with their output present
    and whole (0-byte, cut or altered outputs are encoded again). Our own manifest is rewritten
    without entries whose output is gone or bad."""
    done = set()
    checked: dict[Path, bool] = {}
    for mf in sorted(out.glob("manifest*.jsonl")):
        rows = [r for r in _read_jsonl(mf) if _output_ok(out, r, checked)]
        if mf == own:
            last = {r["rel"]: r for r in rows}
            _atomic_write(mf, lambda f: f.write("".join(json.dumps(r) + "\n" for r in last.values()).encode()))
        done |= {r["rel"] for r in rows}
    return done


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
        diff = [k for k in ("model", "weights_hash", "dtype", "codebook_size", "format") if old.get(k) != info[k]]
        if diff:
            raise CorpusError(f"{out} holds output of {', '.join(f'{k}={old.get(k)!r}' for k in diff)}; "
                           f"this run has {', '.join(f'{k}={info[k]!r}' for k in diff)}: use another --out")
        return
    _atomic_write(p, lambda f: f.write((json.dumps(info, indent=1) + "\n").encode()))


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
        _atomic_write(self.out / rel, lambda f: np.save(f, toks.astype(self.dtype)))
        return rel

    def flush(self) -> list[tuple[Item, str]]:
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
        self.n = len(list(out.glob(f"tokens{shard}-*.parquet")))
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
        pa = self.pa
        table = pa.table({
            "rel": [it.rel for it, _ in self.rows],
            "path": [it.path for it, _ in self.rows],
            "tokens": pa.array([t for _, t in self.rows], type=pa.list_(pa.from_numpy_dtype(self.dtype))),
        })
        _atomic_write(self.out / name, lambda f: self.pq.write_table(table, f))
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


def _load(path: str) -> tuple[np.ndarray, str]:
    """(16 kHz mono signal, sha256 of the file); out-of-range audio is refused here."""
    try:
        sha = _sha256(Path(path))
    except OSError as e:
        raise AudioError(f"{path}: cannot read ({e.strerror})") from None
    sig = read_audio(path, SR)
    check_peak(sig, path)
    return sig, sha


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


def make_batches(items: list[Item], batch_seconds: float, max_batch: int) -> list[list[Item]]:
    """Longest first; a batch holds files of similar length, rows x longest <= budget.
    A file longer than the budget goes alone (segments keep its memory bounded)."""
    batches, cur = [], []
    for it in sorted(items, key=lambda it: (-it.seconds, it.rel)):
        if cur and (len(cur) >= max_batch or (len(cur) + 1) * cur[0].seconds > batch_seconds):
            batches.append(cur)
            cur = []
        cur.append(it)
    if cur:
        batches.append(cur)
    return batches


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
    todo = [it for it in items if it.rel not in done]
    stats = {"files": 0, "seconds": 0.0, "skipped": len(items) - len(todo), "errors": 0}
    t0 = time.perf_counter()
    pool, watch = _executor(opts["workers"])
    with open(man_path, "a") as man, open(err_path, "w") as err:

        def fail(it: Item, msg: str):
            err.write(json.dumps({"path": it.path, "rel": it.rel, "error": msg}) + "\n")
            err.flush()
            stats["errors"] += 1

        def record(pairs, meta):
            for it, name in pairs:
                row = {"path": it.path, "rel": it.rel, "out": name, **meta.pop(it.rel), **made_by}
                if name.endswith(".npy"):  # verified on resume (parquet shards: by size and magic)
                    row["out_sha256"] = _sha256(out / name)
                man.write(json.dumps(row) + "\n")
            man.flush()

        def encode(good, sigs):
            """Tokens per file; a batch the model refuses is retried file by file, so one bad
            file lands in errors.jsonl and never fails the others."""
            try:
                return list(zip(good, sigs, encode_batch(codec, sigs)))
            except InputError as e:
                if len(sigs) == 1:
                    fail(good[0], f"{good[0].path}: {e}")
                    meta.pop(good[0].rel, None)
                    return []
            return [r for it, sig in zip(good, sigs) for r in encode([it], [sig])]

        # outputs must not collide: a.wav and a.flac in one folder would both be a.npy
        by_rel: dict[str, Item] = {}
        for it in todo:
            if it.rel in by_rel:
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
        batches = make_batches(probed, opts["batch_seconds"], opts["max_batch"])
        bar = _progress(sum(it.seconds for it in probed), len(probed), opts["quiet"], position)
        meta: dict[str, dict] = {}
        queue: deque = deque()
        nxt = 0
        try:
            while nxt < len(batches) or queue:
                while nxt < len(batches) and len(queue) <= opts["prefetch"]:  # bounded read-ahead
                    queue.append([(it, pool.submit(_load, it.path)) for it in batches[nxt]])
                    nxt += 1
                good, sigs = [], []
                for it, fut in queue.popleft():
                    try:
                        sig, sha = fut.result()
                    except Exception as e:  # one bad file never stops the run
                        fail(it, str(e) if isinstance(e, AudioError) else f"{it.path}: {type(e).__name__}: {e}")
                        continue
                    good.append(it)
                    sigs.append(sig)
                    meta[it.rel] = {"duration": len(sig) / SR, "n_tokens": 0, "sha256": sha}
                for it, sig, toks in (encode(good, sigs) if sigs else []):
                    meta[it.rel]["n_tokens"] = len(toks)
                    name = writer.add(it, toks)
                    if name is not None:
                        record([(it, name)], meta)
                    stats["files"] += 1
                    stats["seconds"] += len(sig) / SR
                record(writer.flush(), meta)
                bar.update(round(sum(it.seconds for it in good)))
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{stats['files'] / el:.1f} files/s, {stats['seconds'] / 3600 / el:.3g} audio-h/s")
            if opts["fmt"] == "parquet":
                record(writer.flush(final=True), meta)
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            for c in watch or ():
                c.close()
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def _device_main(items, out, device, opts, shard, position, q, watch):
    _watch_parent(watch)
    try:
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


def encode_corpus(inputs, out, *, model=None, random_init=None, devices=None, dtype="fp32", batch_seconds=600.0,
                  max_batch=64, workers=4, prefetch=2, fmt="npy", quiet=False) -> dict:
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
    if batch_seconds <= 0 or max_batch < 1 or prefetch < 0:
        raise CorpusError("--batch-seconds must be > 0, --max-batch >= 1, --prefetch >= 0")
    rank, world = _rank_world()
    items = find_inputs(inputs)[rank::world]
    if not devices:
        local = _env_int("LOCAL_RANK", None, 0)
        devices = [f"cuda:{local}" if local is not None and torch.cuda.is_available() else None]
    opts = dict(model=model, random_init=random_init, dtype=dtype, batch_seconds=batch_seconds, max_batch=max_batch,
                workers=workers, prefetch=prefetch, fmt=fmt, quiet=quiet)
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
    total = {k: sum(r[k] for r in results) for k in ("files", "seconds", "skipped", "errors")}
    total["wall_s"] = time.perf_counter() - t0
    total["encode_s"] = max(r["wall_s"] for r in results)  # after model load, slowest device
    if not quiet:
        h = total["seconds"] / 3600
        msg = (f"fastfocal: encoded {total['files']} files ({h:.3g} h of audio) in {total['encode_s']:.1f} s "
               f"({h / max(total['encode_s'], 1e-9):.3g} audio-h/s; {total['wall_s']:.1f} s with model load); "
               f"{total['skipped']} already done; {total['errors']} errors")
        if total["errors"]:
            msg += f" (see {out / 'errors*.jsonl'})" if len(shards) > 1 else f" (see {out / 'errors.jsonl'})"
        print(msg, file=sys.stderr)
    return total
