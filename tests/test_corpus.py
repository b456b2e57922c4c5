"""encode-corpus: exact batched tokens, mirrored tree, manifest, errors, resume, sharding."""
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fastfocal import InputError, corpus
from fastfocal.audio import read_audio
from fastfocal.cli import main
from fastfocal.corpus import SlotEncoder, encode_batch, find_inputs

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny_causal")
X16 = read_audio(DATA / "audio" / "84-121123-0000.wav")
X48 = read_audio(DATA / "audio" / "p287_007.wav")
GOOD = ["ls/84-121123-0000", "vb/p287_007", "ls/cut/a", "ls/cut/b", "ls/cut/c", "ls/cut/d", "long"]
BAD = {"bad/corrupt": "cannot read audio", "bad/empty": "contains no samples"}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    for sub in ("ls/cut", "vb", "bad"):
        (d / sub).mkdir(parents=True)
    (d / "ls/84-121123-0000.wav").write_bytes((DATA / "audio/84-121123-0000.wav").read_bytes())
    (d / "vb/p287_007.wav").write_bytes((DATA / "audio/p287_007.wav").read_bytes())  # 48 kHz PCM16
    sf.write(d / "ls/cut/a.wav", X16[:12345], 16000, subtype="FLOAT")
    sf.write(d / "ls/cut/b.flac", X16[15000:27345], 16000)  # same length as a, other speech
    sf.write(d / "ls/cut/c.wav", X16[3000:3000 + 1280 * 9], 16000, subtype="FLOAT")  # whole chunks
    sf.write(d / "ls/cut/d.wav", X16[20000:29999], 16000, subtype="FLOAT")
    sf.write(d / "long.wav", np.concatenate([X16, X48]), 16000, subtype="FLOAT")  # longer than the budget
    (d / "bad/corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    sf.write(d / "bad/empty.wav", np.zeros(0, np.float32), 16000)
    (d / "notes.txt").write_text("not audio")
    return d


def audio_path(src: Path, rel: str) -> Path:
    return next(p for p in src.rglob(Path(rel).name + ".*") if p.with_suffix("").relative_to(src).as_posix() == rel)


def encode(src, out, *extra) -> int:
    return main(["encode-corpus", str(src), "--out", str(out), "--model", TINY, "--batch-seconds", "4",
                 "--workers", "0", "--quiet", *extra])


def check_tokens(causal, src, out, rels):
    for rel in rels:
        got = np.load(out / f"{rel}.npy")
        assert got.dtype == np.uint16
        want = causal.sig_to_toks(read_audio(audio_path(src, rel))).numpy()
        np.testing.assert_array_equal(got, want, err_msg=rel)


def test_encode_batch_is_exact(causal, monkeypatch):
    lengths = [320, 333, 639, 640, 1280, 1280 * 3 + 5, 12345, 12345, 30000, 33440]
    sigs = [X16[o:o + n] for o, n in zip([0, 5, 9, 11, 100, 700, 0, 4000, 2000, 0], lengths)]
    for seg in (2048, 8):  # one segment, and many chunk-aligned segments per file
        monkeypatch.setattr(causal, "segment_frames", seg)
        got = encode_batch(causal, sigs)
        for s, g in zip(sigs, got):
            np.testing.assert_array_equal(g, causal.sig_to_toks(s).numpy(), err_msg=f"len {len(s)} seg {seg}")
    assert not np.array_equal(got[6], got[7])  # equal lengths, different speech
    with pytest.raises(InputError, match=r"signal 1 .*shorter than one 320-sample frame"):
        encode_batch(causal, [sigs[0], X16[:319]])
    # errors=True (the Ray actor): the refused signal's exception in its place, the others encoded
    got = encode_batch(causal, [sigs[4], X16[:319], sigs[6]], errors=True)
    assert isinstance(got[1], InputError) and "shorter than one 320-sample frame" in str(got[1])
    np.testing.assert_array_equal(got[0], causal.sig_to_toks(sigs[4]).numpy())
    np.testing.assert_array_equal(got[2], causal.sig_to_toks(sigs[6]).numpy())


@pytest.fixture(scope="module")
def many(causal):
    """30 signals of varied lengths (1 frame .. ~3 s, every tail length) and their tokens alone."""
    rng = np.random.default_rng(7)
    speech = np.concatenate([X16, X48])
    lengths = [320, 640, 960, 1280, 1281, 2559] + list(rng.integers(321, 48000, 24))
    sigs = []
    for n in lengths:
        o = int(rng.integers(0, len(speech) - n))
        sigs.append(speech[o:o + n].copy())
    return sigs, [causal.sig_to_toks(s).numpy() for s in sigs]


@pytest.mark.parametrize("slots, rows, seg", [(1, 1, 64), (3, 2, 16), (6, 6, 8), (9, 3, 64), (30, 8, 32)])
def test_slot_encoder_random_join_order_is_exact(causal, many, slots, rows, seg):
    """Files join free slots in random order as others leave, rows at different positions share
    calls, calls are forced or not at random: every file's tokens equal sig_to_toks alone."""
    sigs, want = many
    rng = np.random.default_rng(slots * 100 + rows)
    todo = list(rng.permutation(len(sigs)))
    enc = SlotEncoder(causal, slots, rows, seg)
    got = {}
    while todo or enc.busy:
        while enc.free and todo and rng.random() < 0.8:
            i = int(todo.pop())
            enc.add(i, sigs[i])
        for k, toks in enc.step(force=not (enc.free and todo) or rng.random() < 0.5):
            assert k not in got
            got[k] = toks
    assert sorted(got) == list(range(len(sigs)))
    for i, (g, w) in enumerate(zip((got[i] for i in range(len(sigs))), want)):
        np.testing.assert_array_equal(g, w, err_msg=f"file {i} ({len(sigs[i])} samples), pool {slots}/{rows}/{seg}")
    if slots > 1:  # calls really were shared
        assert enc.stats["row_calls"] > 1.5 * enc.stats["calls"]
    assert enc.stats["frames"] == sum(-(-len(s) // 320) for s in sigs)


def test_plan_cuts_every_file_into_exact_pieces():
    """Pure scheduling: each file's calls cover its frames once, in whole chunks with the tail
    last; no call exceeds its row or frame budget; calls are shared."""
    rng = np.random.default_rng(3)
    frames = [int(f) for f in rng.integers(1, 900, 400)]
    plan = corpus._Plan(slots=32, rows=8, seg=128, chunk=4)
    pieces: dict[int, list[int]] = {}
    slot_of: dict[int, int] = {}
    todo, calls = list(range(len(frames))), 0
    while todo or plan.left:
        while plan.free and todo:
            i = todo.pop()
            s = plan.add(frames[i])
            slot_of[s], pieces[i] = i, []
        call = plan.next_call(force=not (plan.free and todo))
        if call is None:
            continue
        b, slots, freed = call
        calls += 1
        assert len(set(slots)) == len(slots) and len(slots) <= max(plan.rows if b == 128 else 32, 1)
        assert b * len(slots) <= plan.call_frames or b < 4
        for s in slots:
            pieces[slot_of[s]].append(b)
        for s in freed:
            del slot_of[s]
    for i, f in enumerate(frames):
        p = pieces[i]
        assert sum(p) == f, (f, p)
        assert all(b % 4 == 0 for b in p[:-1]) and (p[-1] == f % 4 if f % 4 else p[-1] % 4 == 0), (f, p)
    assert calls < sum(map(len, pieces.values())) / 4  # at least 4 files per call on average


def test_pool_size_from_memory_and_lengths(causal, monkeypatch):
    got = corpus.pool_size(causal, [8.0] * 1000)
    assert got == {"slots": 256, "rows": 64, "segment_frames": 256}  # CPU cap; median 400 frames
    assert corpus.pool_size(causal, [8.0] * 10)["slots"] == 10  # never more slots than files
    assert corpus.pool_size(causal, [8.0] * 1000, batch_seconds=20, max_batch=64)["rows"] == 3  # 1000 frames / 256
    per = 4 * (corpus.Pipeline.bytes_per_slot(causal.model, "encode") + 400 * 320 * 4) \
        + corpus.Pipeline.activation_bytes_for(causal.config, causal.dtype, 1, 256)
    monkeypatch.setattr(corpus, "available_bytes", lambda dev: int(per * 5 / 0.25))
    assert corpus.pool_size(causal, [8.0] * 1000)["rows"] == 5  # free memory bounds it


def test_corpus_tokens_manifest_errors(src, tmp_path, causal):
    out = tmp_path / "out"
    total = corpus.encode_corpus([str(src)], out, model=TINY, workers=1, quiet=True)  # default batching
    assert total["files"] == len(GOOD) and total["row_calls"] > 2 * total["calls"]  # files shared calls
    check_tokens(causal, src, out, GOOD)
    npys = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert npys == sorted(f"{r}.npy" for r in GOOD)  # mirrored tree, nothing for bad files or notes.txt
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["rel"] for r in rows) == sorted(GOOD)
    for r in rows:
        p = audio_path(src, r["rel"])
        assert r["path"] == str(p) and r["out"] == r["rel"] + ".npy"
        assert r["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert r["duration"] == len(read_audio(p)) / 16000
        assert r["n_tokens"] == len(np.load(out / r["out"]))
    errs = {json.loads(line)["rel"]: json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()}
    assert set(errs) == set(BAD)
    for rel, msg in BAD.items():
        assert msg in errs[rel] and str(src / rel) in errs[rel]
    info = json.loads((out / "info.json").read_text())
    assert info["model"] == TINY and info["codebook_size"] == 4096 and info["token_dtype"] == "uint16"


def ident(out, rel):
    """What a rewrite (temp file + rename) changes; reads change only atime, so stat() alone is flaky."""
    st = os.stat(out / f"{rel}.npy")
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_resume_and_atomic_outputs(src, tmp_path, causal, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = np.save

    def save_then_crash(f, arr):  # write half a file, then die, while writing c.npy
        if ".c.npy" in f.name:
            f.write(b"\x93NUMPY partial")
            raise OSError("disk died")
        real_save(f, arr)

    monkeypatch.setattr(corpus.np, "save", save_then_crash)
    assert encode(src, out) == 2  # the crash stops the run ...
    assert not (out / "ls/cut/c.npy").exists()  # ... and leaves no truncated c.npy
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(corpus.np, "save", real_save)

    assert main(["encode-corpus", str(src), "--out", str(out), "--model", TINY, "--workers", "0"]) == 0
    check_tokens(causal, src, out, GOOD)
    stat = {r: ident(out, r) for r in GOOD}
    capsys.readouterr()

    monkeypatch.chdir(DATA)  # the same model by a relative path is the same model
    assert main(["encode-corpus", str(src), "--out", str(out), "--model", "tiny_causal", "--workers", "0"]) == 0
    assert "encoded 0 files" in capsys.readouterr().err
    assert {r: ident(out, r) for r in GOOD} == stat  # nothing rewritten

    (out / "ls/cut/b.npy").unlink()
    assert encode(src, out) == 0
    new = {r: ident(out, r) for r in GOOD}
    assert [r for r in GOOD if new[r] != stat[r]] == ["ls/cut/b"]
    check_tokens(causal, src, out, ["ls/cut/b"])
    rels = [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(rels) == sorted(GOOD)  # one entry per file, the stale one dropped


def test_rank_and_device_sharding(src, tmp_path, causal, monkeypatch):
    items = [it.rel for it in find_inputs([str(src)])]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert encode(src, tmp_path / "r") == 0
    rows = [json.loads(line)["rel"] for line in (tmp_path / "r" / "manifest.1.jsonl").read_text().splitlines()]
    assert sorted(rows) == sorted(set(items[1::2]) - set(BAD))
    assert not (tmp_path / "r" / "manifest.jsonl").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    out = tmp_path / "d"
    assert encode(src, out, "--devices", "cpu,cpu") == 0  # one spawned process per device
    per = [[json.loads(line)["rel"] for line in (out / f"manifest.{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    assert sorted(per[0] + per[1]) == sorted(GOOD) and per[0] and per[1]
    check_tokens(causal, src, out, GOOD)


def test_inputs_globs_and_lists(src, tmp_path):
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"path": str(src / "ls/cut/a.wav")}) + "\n" + json.dumps({"path": "rel/x.wav"}) + "\n")
    (tmp_path / "rel").mkdir()
    sf.write(tmp_path / "rel/x.wav", X16[:3000], 16000)
    (tmp_path / "list.csv").write_text(f"id,path\n1,{src / 'vb/p287_007.wav'}\n")
    got = find_inputs([str(tmp_path / "list.jsonl"), str(tmp_path / "list.csv"), str(src / "ls/cut/*.flac")])
    root = os.path.commonpath([str(src), str(tmp_path)])
    want = [src / "ls/cut/a.wav", tmp_path / "rel/x.wav", src / "vb/p287_007.wav", src / "ls/cut/b.flac"]
    assert sorted((it.path, it.rel) for it in got) == sorted(
        (str(p), Path(os.path.relpath(p, root)).with_suffix("").as_posix()) for p in want)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "a.wav"}) + "\n")
    for argv, match in [([str(tmp_path / "bad.jsonl")], 'bad.jsonl:1: no "path" string'),
                        ([str(tmp_path / "*.nothing")], "glob matches no files"),
                        ([str(tmp_path / "missing_dir")], "no such file, directory or glob")]:
        with pytest.raises(ValueError, match=match):
            find_inputs(argv)


def test_corpus_user_errors(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "info.json").write_text(json.dumps({"model": "some/other", "codebook_size": 65536, "format": "npy"}))
    assert encode(src, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds output of model='some/other'" in err[0] and "use another --out" in err[0]
    assert not list(out.rglob("*.npy"))


def test_parquet(src, tmp_path, causal, capsys):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert encode(src, tmp_path / "p", "--format", "parquet") == 2
        assert "--format parquet needs pyarrow" in capsys.readouterr().err
        return
    out = tmp_path / "p"
    assert encode(src, out, "--format", "parquet") == 0
    table = pq.read_table(out / "tokens-00000.parquet").to_pylist()
    assert sorted(r["rel"] for r in table) == sorted(GOOD)
    for r in table:
        want = causal.sig_to_toks(read_audio(r["path"])).numpy()
        np.testing.assert_array_equal(np.array(r["tokens"]), want)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["rel"] for r in rows) == sorted(GOOD) and {r["out"] for r in rows} == {"tokens-00000.parquet"}
    assert encode(src, out, "--format", "parquet") == 0  # resumed: nothing new
    assert sorted(p.name for p in out.glob("*.parquet")) == ["tokens-00000.parquet"]


# ----------------------------------------------------------------------------- bad audio (issues 9.1, 9.4)
def _bad_audio(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    sf.write(d / "good.wav", X16, 16000, subtype="FLOAT")
    sf.write(d / "good2.wav", X16[::-1].copy(), 16000, subtype="FLOAT")
    loud = X16.copy()
    loud[4000] = 1e30
    sf.write(d / "loud.wav", loud, 16000, subtype="FLOAT")
    sf.write(d / "pcm.wav", X16, 16000, subtype="PCM_16")
    raw = (d / "pcm.wav").read_bytes()
    (d / "cut.wav").write_bytes(raw[:len(raw) // 2])
    i = raw.index(b"data")
    (d / "huge.wav").write_bytes(raw[:i + 4] + (0xFFFFFFF0).to_bytes(4, "little") + raw[i + 8:])
    (d / "pcm.wav").unlink()
    return {"loud": "audio has samples of magnitude 1e+30", "cut": "corrupt or truncated audio file",
            "huge": "corrupt or truncated audio file: the header says data: 4,294,967,280 bytes"}


def test_bad_audio_goes_to_errors_never_to_the_manifest(tmp_path, causal):
    bad = _bad_audio(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["encode-corpus", str(tmp_path / "src"), "--out", str(out), "--model", TINY, "--workers", "1",
                 "--quiet"]) == 0
    errs = {json.loads(line)["rel"]: json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()}
    assert set(errs) == set(bad)
    for rel, msg in bad.items():
        assert errs[rel].startswith(str(tmp_path / "src" / f"{rel}.wav")) and msg in errs[rel], errs[rel]
    rows = [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(rows) == ["good", "good2"] and sorted(p.name for p in out.glob("*.npy")) == ["good.npy", "good2.npy"]
    check_tokens(causal, tmp_path / "src", out, ["good", "good2"])


def test_a_file_the_model_refuses_never_fails_its_batch(tmp_path, causal, monkeypatch):
    _bad_audio(tmp_path / "src")
    marked = X16[::-1].copy()
    marked[100] = 7.5  # a legal sample value the fake model below refuses
    sf.write(tmp_path / "src" / "good2.wav", marked, 16000, subtype="FLOAT")
    real = corpus.Pipeline.run

    def refuses_marked(self, x, idx, stages=None):  # the model giving one row NaN latents
        out = real(self, x, idx, stages)
        out["err"] = torch.where((x == 7.5).any(1), 3, out["err"]).to(out["err"].dtype)
        return out

    monkeypatch.setattr(corpus.Pipeline, "run", refuses_marked)
    out = tmp_path / "out"
    assert encode(tmp_path / "src", out, "--batch-seconds", "100") == 0
    errs = {json.loads(line)["rel"]: json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()}
    assert errs["good2"].startswith(f"{tmp_path / 'src' / 'good2.wav'}: the model produced NaN/Inf from audio")
    assert [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()] == ["good"]
    check_tokens(causal, tmp_path / "src", out, ["good"])


# ----------------------------------------------------------------------------- provenance (issue 8.7)
def test_provenance_and_resume_with_other_dtype_or_weights(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from fastfocal import load
    from fastfocal.version import __version__

    model = tmp_path / "m"
    shutil.copytree(TINY, model)
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "a.wav", X16, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    argv = ["encode-corpus", str(src), "--out", str(out), "--model", str(model), "--workers", "0", "--quiet"]
    assert main(argv) == 0
    h = load(model, device="cpu").weights_hash
    made_by = {"fastfocal_version": __version__, "dtype": "float32", "device": "cpu", "weights_hash": h}
    info = json.loads((out / "info.json").read_text())
    assert {k: info[k] for k in made_by} == made_by
    row = json.loads((out / "manifest.jsonl").read_text())
    assert {k: row[k] for k in made_by} == made_by
    assert row["out_sha256"] == hashlib.sha256((out / "a.npy").read_bytes()).hexdigest()

    assert main(argv + ["--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype='float32'" in err[0] and "dtype='bfloat16'" in err[0] and "use another --out" in err[0]
    assert "f32_dot" not in info  # exact float32
    info["f32_dot"] = "bf16x3"  # as a CUDA run with split dots records it
    (out / "info.json").write_text(json.dumps(info))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "f32_dot='bf16x3'" in err[0] and "f32_dot=None" in err[0], err
    del info["f32_dot"]
    (out / "info.json").write_text(json.dumps(info))
    sd = load_file(str(model / "model.safetensors"))
    sd["decoder.head.proj.bias"] = sd["decoder.head.proj.bias"] + 0.01  # same name, other weights
    save_file(sd, str(model / "model.safetensors"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"weights_hash={h!r}" in err[0]
    assert [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()] == [row]  # untouched


# ----------------------------------------------------------------------------- edge cases (issue 9.5)
@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 is outside WORLD_SIZE=2 (ranks are 0 .. 1)"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
])
def test_bad_rank_env(src, tmp_path, capsys, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert encode(src, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastfocal: error: {match}"]


def test_non_utf8_manifest(tmp_path, capsys):
    (tmp_path / "list.jsonl").write_bytes(b'{"path": "caf\xe9.wav"}\n')
    assert encode(tmp_path / "list.jsonl", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastfocal: error: {tmp_path / 'list.jsonl'}: manifest is not UTF-8 text (at byte offset 13)"]


def test_resume_verifies_outputs_and_cleans_stale_temp_files(src, tmp_path, causal):
    import subprocess
    import sys

    out = tmp_path / "out"
    assert encode(src, out) == 0
    stat = {r: ident(out, r) for r in GOOD}
    (out / "ls/cut/a.npy").write_bytes(b"")  # 0 bytes
    raw = (out / "ls/cut/b.npy").read_bytes()
    (out / "ls/cut/b.npy").write_bytes(b"\x93NUMPX" + raw[6:])  # header corrupt
    raw = bytearray((out / "ls/cut/c.npy").read_bytes())
    raw[-1] ^= 1  # one token changed: header and size fine, sha256 not
    (out / "ls/cut/c.npy").write_bytes(bytes(raw))
    stat = {r: ident(out, r) for r in GOOD}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "ls" / f".x.npy.tmp{int(dead.stdout)}"
    live = out / "ls" / f".y.npy.tmp{os.getpid()}"  # a live process's temp file stays
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert encode(src, out) == 0
    new = {r: ident(out, r) for r in GOOD}
    assert sorted(r for r in GOOD if new[r] != stat[r]) == ["ls/cut/a", "ls/cut/b", "ls/cut/c"]
    check_tokens(causal, src, out, GOOD)
    assert not stale.exists() and live.exists()
    rels = [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(rels) == sorted(GOOD)


def test_concurrent_runs_on_one_out_are_refused(src, tmp_path, capsys, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holding the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        assert encode(src, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fastfocal: error: {out} is being written by another encode-corpus run (pid 4242 holds "
                       f"{out / '.lock'}); wait for it to finish or use another --out"]
        assert not list(out.rglob("*.npy"))
        monkeypatch.setenv("RANK", "1")  # another shard has its own lock
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert encode(src, out) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert encode(src, out) == 0  # released: the run goes ahead


def _descendants(pid: int) -> set[int]:
    kids, frontier = set(), {pid}
    while frontier:
        new = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) in frontier:
                    new.add(int(d))
        frontier = new - kids
        kids |= new
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill9_leaves_no_children(tmp_path):
    import signal
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        sf.write(src / f"f{i:02d}.wav", np.roll(X48, 97 * i), 16000, subtype="FLOAT")
    p = subprocess.Popen([sys.executable, "-m", "fastfocal", "encode-corpus", str(src), "--out", str(tmp_path / "out"),
                          "--model", TINY, "--workers", "2", "--batch-seconds", "4", "--quiet"])
    seen: set[int] = set()
    try:
        for _ in range(600):  # until the resource tracker, the forkserver and a worker exist
            seen |= _descendants(p.pid)
            if len(seen) >= 4 or p.poll() is not None:
                break
            time.sleep(0.1)
        assert p.poll() is None and len(seen) >= 4, "the run ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for _ in range(100):  # children notice within moments; allow 10 s
            left = [c for c in seen if _running(c)]
            if not left:
                break
            time.sleep(0.1)
        assert not left, {c: Path(f"/proc/{c}/cmdline").read_bytes()[:120] for c in left}
    finally:
        p.kill()
        for c in seen:  # only what this test started (and is still a python process)
            if _running(c) and b"python" in Path(f"/proc/{c}/cmdline").read_bytes():
                os.kill(c, signal.SIGKILL)


def _overflowing_fp16(causal):
    """float16 (on CPU only in tests: the loaders refuse it there) with the first conv's weights
    x1e5: LayerNorm follows that conv, so fp32 barely moves, but loud audio overflows fp16."""
    import copy

    from fastfocal.codec import Codec

    m = copy.deepcopy(causal.model)
    with torch.no_grad():
        m.encoder.feature_extractor.layers[0].conv.weight.mul_(1e5)
    return Codec(m.half(), "half")


LOUD, QUIET = X16[:20000] * np.float32(0.9 / np.abs(X16[:20000]).max()), X16[:20000] * np.float32(1e-3)


def test_fp16_files_that_overflow_are_recomputed_alone(causal, monkeypatch):
    """Batched float16 encoding: a file that overflows gets the tokens sig_to_toks gives it
    alone (its rows in float32, in one float32 run: float16 is not run again); the quiet file
    sharing its calls keeps its float16 tokens."""
    import copy

    import fastfocal.codec as codec_mod
    from fastfocal.codec import Codec

    half = _overflowing_fp16(causal)
    m = half.model
    loud, quiet = LOUD, QUIET
    runs = []
    real = codec_mod.run_offline
    monkeypatch.setattr(codec_mod, "run_offline", lambda model, *a, **k: runs.append(next(model.parameters()).dtype)
                        or real(model, *a, **k))
    enc = SlotEncoder(half, 2, 2, 16)
    for k, s in (("loud", loud), ("quiet", quiet)):
        enc.add(k, s)
    got = {}
    while enc.busy:
        got.update(enc.step())
    assert enc.stats["fp32_files"] == 1 and [*enc.recomputed.values()] == ["loud"]
    assert runs == [torch.float32] and half.fp32_rows == 1
    alone = Codec(copy.deepcopy(m), "alone")
    np.testing.assert_array_equal(got["loud"], alone.sig_to_toks(loud).numpy())
    assert alone.fp32_rows == 1  # alone it overflows too, and is recomputed the same way
    np.testing.assert_array_equal(got["quiet"], alone.sig_to_toks(quiet).numpy())
    assert alone.fp32_rows == 1


def test_fp16_overflow_is_marked_in_the_manifest(tmp_path, causal, monkeypatch, capsys):
    half = _overflowing_fp16(causal)
    monkeypatch.setattr(corpus, "open_codec", lambda *a, **k: half)
    (tmp_path / "src").mkdir()
    sf.write(tmp_path / "src" / "loud.wav", LOUD, 16000, subtype="FLOAT")
    sf.write(tmp_path / "src" / "quiet.wav", QUIET, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    assert main(["encode-corpus", str(tmp_path / "src"), "--out", str(out), "--model", TINY, "--workers", "0"]) == 0
    assert "1 file overflowed float16 and was recomputed in float32" in capsys.readouterr().err
    rows = {json.loads(line)["rel"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert rows["loud"].get("recomputed_fp32") is True and "recomputed_fp32" not in rows["quiet"]
    assert rows["loud"]["dtype"] == "float16"
    check_tokens(half, tmp_path / "src", out, ["loud", "quiet"])


def test_device_processes_get_the_float32_dot_mode(tmp_path, monkeypatch):
    """Device shards run in spawned processes: encode_corpus hands them set_f32_dot's say."""
    import fastfocal
    from fastfocal import corpus

    seen = []
    monkeypatch.setattr(corpus, "run_shard", lambda items, out, device, opts, shard, *a: seen.append(opts) or
                        {"files": 0, "seconds": 0.0, "skipped": 0, "errors": 0, "wall_s": 0.0})
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "a.wav", X16[:16000], 16000, subtype="FLOAT")
    try:
        fastfocal.set_f32_dot("tf32x3")
        corpus.encode_corpus([str(src)], tmp_path / "out", model=TINY, workers=0, quiet=True)
    finally:
        fastfocal.set_f32_dot(None)
    assert seen and seen[0]["f32_dot"] == "tf32x3"


# ----------------------------------------------------------------------------- review findings F5, F7-F10
@pytest.mark.parametrize("flags, match", [
    (["--batch-seconds", "nan"], "--batch-seconds must be a finite number > 0, got nan"),
    (["--batch-seconds", "inf"], "--batch-seconds must be a finite number > 0, got inf"),
    (["--batch-seconds", "0"], "--batch-seconds must be a finite number > 0, got 0.0"),
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--prefetch", "-1"], "--prefetch must be >= 0, got -1"),
])
def test_bad_size_flags_are_one_line(src, tmp_path, capsys, flags, match):
    assert encode(src, tmp_path / "out", *flags) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fastfocal: error: {match}"]


def _symlinked_tree(d: Path) -> Path:
    """corpus/spk1/a.wav, corpus/spk2 -> ../elsewhere/spk2 (b.wav), a link back up the tree
    (corpus/spk1/up -> ..) and a second name for a.wav."""
    (d / "corpus/spk1").mkdir(parents=True)
    (d / "elsewhere/spk2").mkdir(parents=True)
    sf.write(d / "corpus/spk1/a.wav", X16[:3200], 16000)
    sf.write(d / "elsewhere/spk2/b.wav", X16[3200:6400], 16000)
    (d / "corpus/spk2").symlink_to("../elsewhere/spk2")
    (d / "corpus/spk1/up").symlink_to("..")
    (d / "corpus/spk1/a2.wav").symlink_to("a.wav")
    return d / "corpus"


def test_symlinked_folders_and_cycles(tmp_path):
    """A directory input skipped symlinked folders while the same tree as a glob followed them,
    and a link to an ancestor gave one file 41 times. Both follow links, each real folder once,
    each file once (by its first name)."""
    top = _symlinked_tree(tmp_path)
    want = [(str(top / "spk1/a.wav"), "spk1/a"), (str(top / "spk2/b.wav"), "spk2/b")]
    for inp in (str(top), str(top / "**" / "*.wav"), str(top / "**")):
        assert [(it.path, it.rel) for it in find_inputs([inp])] == want, inp
    assert find_inputs([str(top), str(top / "spk1/a2.wav")]) == find_inputs([str(top)])  # a second name: once
    assert [it.rel for it in find_inputs([str(top / "spk1/a2.wav"), str(top)])] == ["spk1/a2", "spk2/b"]  # first name


def test_recursive_glob_matches_as_glob_does(tmp_path):
    """Without symlinks, `**` patterns give glob.glob's files: hidden names only where the
    pattern names them, `**` as zero or more folders."""
    import glob

    for f in ("a.wav", "x/b.wav", "x/y/c.wav", "x/y/c.flac", ".h/d.wav", "x/.e.wav", "x/.h/f.wav", "x1/g.wav"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    for pat in ("**/*.wav", "**", "x*/**/*.wav", "x/**/c.*", "**/.h/*.wav", "**/.*.wav", "x/**", "**/y/*"):
        want = sorted(f for f in glob.glob(str(tmp_path / pat), recursive=True) if os.path.isfile(f))
        got = sorted(f for f in corpus._glob(str(tmp_path / pat)) if os.path.isfile(f))
        assert got == want, pat


def test_parquet_shards_are_numbered_after_the_highest(tmp_path, causal):
    """Shards were numbered by counting them: with one missing, the next number was an existing
    shard's, which was then overwritten while the manifest still counted its files as done."""
    pq = pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()

    def run():
        return corpus.encode_corpus([str(src)], out, model=TINY, workers=0, quiet=True, fmt="parquet")

    def shards():
        return {p.name: pq.read_table(p).column("rel").to_pylist() for p in sorted(out.glob("*.parquet"))}

    sf.write(src / "a.wav", X16[:16000], 16000, subtype="FLOAT")
    run()
    sf.write(src / "b.wav", X48[:16000], 16000, subtype="FLOAT")
    run()
    assert shards() == {"tokens-00000.parquet": ["a"], "tokens-00001.parquet": ["b"]}
    (out / "tokens-00000.parquet").unlink()
    assert run()["files"] == 1
    assert shards() == {"tokens-00001.parquet": ["b"], "tokens-00002.parquet": ["a"]}
    rows = {r["rel"]: r["out"] for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert rows == {"a": "tokens-00002.parquet", "b": "tokens-00001.parquet"}
    # a shard replaced by another (valid) one: its files are no longer done
    (out / "tokens-00001.parquet").write_bytes((out / "tokens-00002.parquet").read_bytes())
    t = run()
    assert (t["files"], t["skipped"]) == (1, 1)
    assert shards()["tokens-00003.parquet"] == ["b"]
    b = pq.read_table(out / "tokens-00003.parquet").to_pylist()[0]
    np.testing.assert_array_equal(np.array(b["tokens"]), causal.sig_to_toks(read_audio(src / "b.wav")).numpy())
    assert run()["files"] == 0


def test_resume_matches_files_by_source_when_the_corpus_grows(tmp_path, causal):
    """Names are relative to the common folder of all files found; a file added in a sibling
    folder moved it, and every file was encoded again under a new name. Done files are now
    matched by their source and keep their names; only new files are encoded."""
    import shutil

    src, out = tmp_path / "in", tmp_path / "out"
    (src / "spk1").mkdir(parents=True)
    (src / "spk2").mkdir()
    sf.write(src / "spk1/a.wav", X16[:16000], 16000, subtype="FLOAT")

    def run(inp):
        return corpus.encode_corpus([inp], out, model=TINY, workers=0, quiet=True)

    pattern = str(src / "**" / "*.wav")
    assert run(pattern)["files"] == 1  # the only file: its folder is the root, the output a.npy
    before = ident(out, "a")
    sf.write(src / "spk2/b.wav", X48[:16000], 16000, subtype="FLOAT")
    t = run(pattern)
    assert (t["files"], t["skipped"]) == (1, 1)
    assert ident(out, "a") == before and not (out / "spk1").exists()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["path"], r["out"]) for r in rows) == [(str(src / "spk1/a.wav"), "a.npy"),
                                                           (str(src / "spk2/b.wav"), "spk2/b.npy")]
    check_tokens(causal, src, out, ["spk2/b"])
    assert run(pattern)["files"] == 0
    # another file under a name an earlier run gave: an error, the earlier output kept
    other = tmp_path / "other"
    (other / "spk2").mkdir(parents=True)
    sf.write(other / "spk2/b.wav", X16[5000:21000], 16000, subtype="FLOAT")
    b_before = ident(out, "spk2/b")
    t = run(str(other))
    assert (t["files"], t["errors"]) == (0, 1) and ident(out, "spk2/b") == b_before
    err = json.loads((out / "errors.jsonl").read_text())
    assert err["error"] == f"{other / 'spk2/b.wav'}: same output name as {src / 'spk2/b.wav'}, encoded by an earlier run into {out}"
    # the same bytes moved elsewhere, under the same name: done
    shutil.copy(src / "spk2/b.wav", other / "spk2/b.wav")
    t = run(str(other))
    assert (t["files"], t["skipped"], t["errors"]) == (0, 1, 0)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_resume_encodes_sources_edited_since(tmp_path, causal, fmt):
    """A source rewritten in place after its tokens were made was skipped on resume (matched by
    path alone), so the output kept the old audio's tokens. Now a changed size or mtime is
    checked against the sha256: edited files are encoded again under their old name, touched
    ones stay done."""
    if fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "spk1").mkdir(parents=True)
    sf.write(src / "spk1/a.wav", X16[:16000], 16000, subtype="FLOAT")
    sf.write(src / "spk1/b.wav", X16[16000:30000], 16000, subtype="FLOAT")
    pattern = str(src / "**" / "*.wav")

    def run():
        return corpus.encode_corpus([pattern], out, model=TINY, workers=0, quiet=True, fmt=fmt)

    def tokens():  # rel -> tokens, from wherever the manifest's last row per source points
        rows = {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
        got = {}
        for r in rows.values():
            if fmt == "npy":
                got[r["rel"]] = np.load(out / r["out"])
            else:
                t = pq.read_table(out / r["out"]).to_pylist()
                got[r["rel"]] = np.array(next(x["tokens"] for x in t if x["path"] == r["path"]))
        return got

    assert run()["files"] == 2
    first = tokens()
    st = os.stat(src / "spk1/b.wav")
    os.utime(src / "spk1/b.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    new_a = X48[:20000]
    sf.write(src / "spk1/a.wav", new_a, 16000, subtype="FLOAT")  # edited in place
    (src / "spk2").mkdir()
    sf.write(src / "spk2/c.wav", X48[20000:30000], 16000, subtype="FLOAT")  # moves the common root
    t = run()
    assert (t["files"], t["skipped"], t["edited"], t["errors"]) == (2, 1, 1, 0)
    got = tokens()
    assert sorted(got) == ["a", "b", "spk2/c"]  # a keeps its name
    np.testing.assert_array_equal(got["a"], causal.sig_to_toks(new_a).numpy())
    assert not np.array_equal(got["a"], first["a"])
    np.testing.assert_array_equal(got["b"], first["b"])
    hashed = []
    real = corpus._sha256_or_none
    corpus._sha256_or_none = lambda path: hashed.append(path) or real(path)
    try:
        t = run()
    finally:
        corpus._sha256_or_none = real
    assert (t["files"], t["edited"]) == (0, 0)
    assert hashed == []  # the touched file's new stat was recorded: not hashed on every resume


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_edited_source_is_encoded_once_when_the_shard_layout_changes(tmp_path, causal, monkeypatch, fmt):
    """A file encoded by a one-shard run, edited, then resumed as shard 0 of 2: the newest row of
    the file (any manifest) decides. With parquet the stale row of manifest.jsonl won (manifests
    were merged in name order), so the file was edited again on every run and a shard was added
    each time."""
    if fmt == "parquet":
        pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    sf.write(src / "a.wav", X16[:16000], 16000, subtype="FLOAT")
    sf.write(src / "b.wav", X16[16000:30000], 16000, subtype="FLOAT")

    def run():
        return corpus.encode_corpus([str(src)], out, model=TINY, workers=0, quiet=True, fmt=fmt)

    assert run()["files"] == 2
    sf.write(src / "a.wav", X48[:20000], 16000, subtype="FLOAT")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    t = run()
    assert (t["files"], t["edited"]) == (1, 1)
    for _ in range(2):
        t = run()
        assert (t["files"], t["edited"], t["skipped"]) == (0, 0, 1)


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_file_names_that_are_not_utf8_are_encoded(tmp_path, causal, fmt):
    """A readable b'caf\\xe9.wav' went to errors.jsonl with a UnicodeEncodeError."""
    import shutil

    if fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    shutil.copy(DATA / "audio/84-121123-0000.wav", src / os.fsdecode(b"caf\xe9.wav"))
    sf.write(src / "zz.wav", X48[:16000], 16000, subtype="FLOAT")
    t = corpus.encode_corpus([str(src)], out, model=TINY, workers=1, quiet=True, fmt=fmt)
    assert (t["files"], t["errors"]) == (2, 0), (out / "errors.jsonl").read_text()
    want = causal.sig_to_toks(X16).numpy()
    rows = {r["rel"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == {os.fsdecode(b"caf\xe9"), "zz"}
    if fmt == "npy":
        np.testing.assert_array_equal(np.load(out / os.fsdecode(b"caf\xe9.npy")), want)
    else:  # parquet text is UTF-8: the name's odd byte as an escape (the manifest keeps it exactly)
        table = {r["rel"]: r for r in pq.read_table(out / "tokens-00000.parquet").to_pylist()}
        assert table["caf\\xe9"]["path"] == str(src) + "/caf\\xe9.wav"
        np.testing.assert_array_equal(np.array(table["caf\\xe9"]["tokens"]), want)
    assert corpus.encode_corpus([str(src)], out, model=TINY, workers=0, quiet=True, fmt=fmt)["skipped"] == 2
