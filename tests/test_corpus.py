"""encode-corpus: exact batched tokens, mirrored tree, manifest, errors, resume, sharding."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fastfocal import InputError, corpus
from fastfocal.audio import read_audio
from fastfocal.cli import main
from fastfocal.corpus import Item, encode_batch, find_inputs, make_batches

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


def test_make_batches():
    items = [Item(f"/{n}", n, s) for n, s in [("a", 5.0), ("b", 0.9), ("c", 1.0), ("d", 1.0), ("e", 2.5), ("f", 0.5)]]
    got = [[it.rel for it in b] for b in make_batches(items, 4.0, 64)]
    assert got == [["a"], ["e"], ["c", "d", "b", "f"]]
    got = [[it.rel for it in b] for b in make_batches(items, 4.0, 2)]
    assert got == [["a"], ["e"], ["c", "d"], ["b", "f"]]


def test_corpus_tokens_manifest_errors(src, tmp_path, causal):
    out = tmp_path / "out"
    # the four short cuts share one batch: the run really encodes mixed lengths together
    items = [Item(str(p), p.stem, sf.info(p).duration) for p in (src / "ls/cut").iterdir()]
    assert [len(b) for b in make_batches(items, 4.0, 64)] == [4]

    assert encode(src, out, "--workers", "1") == 0
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
    stat = {r: os.stat(out / f"{r}.npy") for r in GOOD}
    capsys.readouterr()

    monkeypatch.chdir(DATA)  # the same model by a relative path is the same model
    assert main(["encode-corpus", str(src), "--out", str(out), "--model", "tiny_causal", "--workers", "0"]) == 0
    assert "encoded 0 files" in capsys.readouterr().err
    assert {r: os.stat(out / f"{r}.npy") for r in GOOD} == stat  # nothing rewritten

    (out / "ls/cut/b.npy").unlink()
    assert encode(src, out) == 0
    new = {r: os.stat(out / f"{r}.npy") for r in GOOD}
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


def test_ray_encoder_class(src, causal):
    from fastfocal.ray import TokenEncoder, load_row

    enc = TokenEncoder(model=TINY, device="cpu")
    paths = [str(src / "ls/cut/a.wav"), str(src / "bad/empty.wav"), str(src / "vb/p287_007.wav")]
    for batch in ({"path": np.array(paths)}, {k: [load_row({"path": p})[k] for p in paths] for k in ("path", "audio", "error")}):
        res = enc(batch)
        assert res["path"] == paths and "contains no samples" in res["error"][1] and res["n_tokens"][1] == 0
        for i in (0, 2):
            assert res["error"][i] == ""
            np.testing.assert_array_equal(res["tokens"][i], causal.sig_to_toks(read_audio(paths[i])).numpy())


def test_ray_pipeline(src, causal):
    pytest.importorskip("ray")
    from fastfocal.ray import encode_paths

    paths = [str(src / "ls/cut/a.wav"), str(src / "ls/cut/d.wav")]
    rows = encode_paths(paths, model=TINY).take_all()
    for r in rows:
        np.testing.assert_array_equal(np.asarray(r["tokens"]), causal.sig_to_toks(read_audio(r["path"])).numpy())
