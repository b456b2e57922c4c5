"""Ray Data path: decode on CPU tasks, encode on a pool of device actors.

    import fastfocal.ray as ffr
    ds = ffr.encode_paths(paths, model="lucadellalib/focalcodec_50hz_4k_causal", num_gpus=4)
    ds.write_parquet("/data/tokens")  # columns: path, tokens, n_tokens, duration, error

or build the pipeline yourself: `ds.map(ffr.load_row)` then
`ds.map_batches(ffr.TokenEncoder, fn_constructor_kwargs={...}, batch_size=64, num_gpus=1, concurrency=4)`.
Tokens equal `Codec.sig_to_toks` per file (`fastfocal.corpus.encode_batch`: continuous batching
within each batch). Multi-node: `ray start --head` on one machine, `ray start --address HEAD:6379`
on the others, then call `ray.init(address="auto")` and `encode_paths(..., num_gpus=N)` on the
head (N = GPUs in the cluster). `ray` is optional and
imported only inside `encode_paths`; the row function and the actor class need no ray.
"""
from __future__ import annotations

import numpy as np

from .audio import AudioError, check_peak, read_audio
from .corpus import SR, encode_batch
from .inputs import token_dtype
from .kernels._common import f32_dot as f32_dot_now, set_f32_dot
from .loading import open_codec


def load_row(row: dict) -> dict:
    """CPU stage: add "audio" (16 kHz float32) and "error" ("" when fine) to a row with "path".
    Unreadable files and out-of-range audio (NaN/Inf, beyond ±8) get an error, as in encode-corpus."""
    try:
        audio, error = read_audio(row["path"], SR), ""
        check_peak(audio, row["path"])
    except AudioError as e:
        audio, error = np.zeros(0, np.float32), str(e)
    return {**row, "audio": audio, "error": error}


class TokenEncoder:
    """Actor for `map_batches`: a batch with "path" (and optionally "audio"/"error" from
    `load_row`) -> columns path, tokens, n_tokens, duration, error."""

    def __init__(self, model: str | None = None, random_init: str | None = None, device: str | None = None,
                 dtype: str = "fp32", arrow: bool = False, f32_dot: str | None = None):
        if f32_dot is not None:  # the driver's float32 dot mode (an actor's process has its own)
            set_f32_dot(f32_dot)
        self.codec = open_codec(model, random_init, device, dtype)
        self.dtype = token_dtype(self.codec.codebook_size)
        # arrow: a pyarrow table with tokens as list<uint>; numpy columns would become fixed-shape
        # tensors in batches of equal lengths and ragged ones elsewhere, which write_parquet cannot join
        self.arrow = arrow

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        if "audio" in batch:
            rows = [(np.asarray(a, np.float32), str(e)) for a, e in zip(batch["audio"], batch["error"])]
        else:
            rows = [(r["audio"], r["error"]) for r in map(load_row, ({"path": p} for p in paths))]
        good = [i for i, (a, e) in enumerate(rows) if not e]
        toks = [np.zeros(0, self.dtype)] * len(paths)
        errs = [e for _, e in rows]
        # a file the model refuses (shorter than a frame, NaN latents) is an error row, not a failed batch
        for i, t in zip(good, encode_batch(self.codec, [rows[i][0] for i in good], errors=True) if good else []):
            if isinstance(t, Exception):
                errs[i] = f"{paths[i]}: {t}"
            else:
                toks[i] = t.astype(self.dtype)
        out = {
            "path": paths,
            "tokens": toks,
            "n_tokens": np.array([len(t) for t in toks], np.int64),
            "duration": np.array([len(a) / SR for a, _ in rows], np.float64),
            "error": errs,
        }
        if not self.arrow:
            return out
        import pyarrow as pa

        out["tokens"] = pa.array(toks, type=pa.list_(pa.from_numpy_dtype(self.dtype)))
        return pa.table(out)


def encode_paths(paths, model: str | None = None, random_init: str | None = None, dtype: str = "fp32",
                 num_gpus: int = 0, num_cpu_actors: int = 1, batch_size: int = 64, f32_dot: str | None = None):
    """A lazy ray.data.Dataset of tokens for `paths`: one actor per GPU (or `num_cpu_actors`
    CPU actors when num_gpus is 0). f32_dot: the actors' float32 dot mode (default: this
    process's, `fastfocal.f32_dot()`)."""
    try:
        import ray
    except ImportError:
        raise ImportError("fastfocal.ray needs ray: pip install 'ray[data]'") from None
    ds = ray.data.from_items([{"path": str(p)} for p in paths]).map(load_row)
    return ds.map_batches(
        TokenEncoder,
        fn_constructor_kwargs={"model": model, "random_init": random_init, "dtype": dtype,
                               "device": "cuda" if num_gpus else "cpu", "arrow": True,
                               "f32_dot": f32_dot or f32_dot_now()},
        batch_size=batch_size,
        num_gpus=1 if num_gpus else 0,
        concurrency=num_gpus or num_cpu_actors,
        batch_format="numpy",
    )
