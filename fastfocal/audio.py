"""Audio file IO: any format libsndfile reads, mixed down to mono and resampled with soxr."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .inputs import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, InputError, amplitude_problem, check_fits

# libsndfile's header report flags a data chunk larger than the file as "data : N (should be M)"
# (WAV, AIFF, CAF, AU; W64 and RF64 through their container size). A WAV's RIFF size alone is
# often wrong in files written by streaming tools and is not checked.
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND|Data Size|riff|Riff size)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
BLOCK = 1 << 20  # frames per read block: long multichannel files never sit in memory at full rate


class AudioError(ValueError):
    """An audio file that is missing, unreadable, truncated, empty or holds NaN/Inf samples."""


def _native(path):
    """A path for soundfile, which encodes a str path as strict UTF-8: the file system's bytes
    open any name (b'caf\\xe9.wav' on Linux); Windows takes str (wide-character open)."""
    return str(path) if os.name == "nt" else os.fsencode(path)


def _open(source, name: str) -> sf.SoundFile:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise AudioError(f"{name}: no such file")
        if p.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if not p.is_file():  # a FIFO or device: opening it would block, or read forever
            raise AudioError(f"{name}: not a regular file")
        source = _native(source)
    try:
        f = sf.SoundFile(source)
    except sf.LibsndfileError as e:
        raise AudioError(f"{name}: cannot read audio ({e.error_string})") from None
    except (OSError, RuntimeError, TypeError) as e:
        raise AudioError(f"{name}: cannot read audio ({e})") from None
    # libsndfile reads a truncated file (or one whose header claims more data) from the part
    # present, silently: its header report is the one place that says so.
    m = _SHORT_CHUNK.search(f.extra_info or "")
    if m:
        f.close()
        raise AudioError(f"{name}: corrupt or truncated audio file: the header says {m[1]}: {int(m[2]):,} bytes, "
                         f"the file holds {int(m[3]):,}")
    return f


def _rate(f: sf.SoundFile, name: str) -> int:
    sr = f.samplerate
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: sample rate {sr:,} Hz is outside the {MIN_SAMPLE_RATE:,}-{MAX_SAMPLE_RATE:,} Hz "
                         "fastfocal reads")
    return sr


def check_peak(sig: np.ndarray, name: str) -> None:
    """NaN/Inf or samples beyond fastfocal.inputs.MAX_AMPLITUDE: an AudioError naming the file (the rule of
    fastfocal.inputs.amplitude_problem)."""
    problem = amplitude_problem(sig)
    if problem is not None:
        raise AudioError(f"{name}: " + (f"{problem} samples" if "NaN" in problem else f"audio {problem}"))


def read_audio(source, target_sr: int = 16000, name: str | None = None) -> np.ndarray:
    """Read a file path or file-like object as float32 mono at `target_sr`.

    Channels are averaged; resampling is soxr HQ, streamed block by block so memory stays
    about the size of the output. Rates outside fastfocal.inputs' [MIN_SAMPLE_RATE,
    MAX_SAMPLE_RATE], and files whose output would not fit in free memory, are refused first.
    """
    name = name or str(source)
    f = _open(source, name)
    with f:
        sr = _rate(f, name)
        try:  # the resampled parts, then their concatenation: twice the float32 output
            check_fits(2 * 4 * -(-f.frames * target_sr // sr), "cpu",
                       f"{name}: {f.frames:,} frames at {sr:,} Hz, as {target_sr:,} Hz audio,",
                       "split the file or free memory")
        except InputError as e:
            raise AudioError(str(e)) from None
        rs = None if sr == target_sr else soxr.ResampleStream(sr, target_sr, 1, dtype="float32", quality="HQ")
        parts = []
        n_in = 0
        try:
            while True:
                x = f.read(BLOCK, dtype="float32", always_2d=True)
                last = len(x) < BLOCK
                n_in += len(x)
                x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
                if not np.isfinite(x).all():
                    raise AudioError(f"{name}: contains NaN or Inf samples")
                parts.append(x if rs is None else rs.resample_chunk(x, last=last))
                if last:
                    break
        except sf.LibsndfileError as e:
            raise AudioError(f"{name}: corrupt audio data ({e.error_string})") from None
        except RuntimeError as e:  # soundfile reports truncated data as a plain RuntimeError
            raise AudioError(f"{name}: corrupt audio data ({e})") from None
    if n_in == 0:
        raise AudioError(f"{name}: contains no samples")
    sig = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return np.ascontiguousarray(sig, dtype=np.float32)


def read_audio_bytes(path, target_sr: int = 16000) -> tuple[np.ndarray, bytes]:
    """Read a file once: (signal, raw bytes), so callers can hash what they decoded."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{path}: no such file")
    if p.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    data = p.read_bytes()
    return read_audio(io.BytesIO(data), target_sr, name=str(path)), data


def audio_info(path) -> tuple[int, int]:
    """(frames, sample rate) from the header alone; a rate read_audio refuses is refused here too."""
    with _open(path, str(path)) as f:
        return f.frames, _rate(f, str(path))


def written_by(path) -> str:
    """The software tag of an existing audio file ("" if none, or not a readable audio file)."""
    try:
        with _open(path, str(path)) as f:
            return f.software or ""
    except AudioError:
        return ""


def software_tag(command: str) -> str:
    """The tag fastfocal's `command` stores in the WAVs it writes (see `written_by_command`)."""
    from .version import __version__

    return f"fastfocal {__version__} {command}"


def written_by_command(path, command: str) -> bool:
    """Whether an existing audio file was written by fastfocal's `command` (any version): its
    software tag (libsndfile may append its own version)."""
    tag = written_by(path).split()
    return tag[:1] == ["fastfocal"] and tag[2:3] == [command]


def write_audio(path, sig, sr: int, subtype: str = "PCM_16", software: str | None = None) -> None:
    """Write a mono (samples,) signal as WAV to a path or binary file; PCM_16 clips to [-1, 1],
    FLOAT keeps values. software: a tag stored in the file's INFO chunk (see `written_by`)."""
    if subtype not in ("PCM_16", "FLOAT"):
        raise ValueError(f"subtype must be PCM_16 or FLOAT, got {subtype!r}")
    if hasattr(sig, "detach"):
        sig = sig.detach().float().cpu().numpy()
    sig = np.asarray(sig, dtype=np.float32)
    if sig.ndim != 1:
        raise ValueError(f"write_audio takes a mono (samples,) signal, got shape {sig.shape}")
    if subtype == "PCM_16":
        sig = np.clip(sig, -1.0, 1.0)
    with sf.SoundFile(path if hasattr(path, "write") else _native(path), "w", sr, 1, subtype, format="WAV") as f:
        if software:
            f.software = software
        f.write(sig)
