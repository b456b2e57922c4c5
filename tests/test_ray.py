"""fastfocal.ray: the actor class alone, and the Ray Data pipeline on a local 2-CPU Ray cluster."""
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fastfocal.audio import read_audio
from fastfocal.ray import TokenEncoder, load_row

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny_causal")
X16 = read_audio(DATA / "audio" / "84-121123-0000.wav")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ray_src")
    sigs = {"a": X16[:12345], "b": X16[15000:27345], "c": X16[3000:3000 + 1280 * 9], "d": X16[20000:29999], "full": X16}
    paths = {}
    for k, s in sigs.items():
        sf.write(d / f"{k}.wav", s, 16000, subtype="FLOAT")
        paths[k] = str(d / f"{k}.wav")
    (d / "48k.wav").write_bytes((DATA / "audio/p287_007.wav").read_bytes())
    paths["48k"] = str(d / "48k.wav")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    paths["empty"] = str(d / "empty.wav")
    loud = X16[:8000].copy()
    loud[100] = 1e30
    sf.write(d / "loud.wav", loud, 16000, subtype="FLOAT")
    paths["loud"] = str(d / "loud.wav")
    sf.write(d / "short.wav", X16[:100], 16000, subtype="FLOAT")  # reads fine; the model refuses it
    paths["short"] = str(d / "short.wav")
    return paths


BAD = {"empty": "contains no samples", "loud": "audio has samples of magnitude 1e+30",
       "short": "shorter than one 320-sample frame"}


def check(causal, files, paths, tokens, errors):
    for p, toks, err in zip(paths, tokens, errors):
        name = Path(p).stem
        if name in BAD:
            assert BAD[name] in err and p in err and len(toks) == 0, (p, err)
        else:
            assert err == "", (p, err)
            np.testing.assert_array_equal(np.asarray(toks), causal.sig_to_toks(read_audio(p)).numpy(), err_msg=p)


def test_load_row_refuses_out_of_range_audio(files):
    row = load_row({"path": files["loud"], "id": 3})
    assert row["id"] == 3 and len(row["audio"]) == 0 and BAD["loud"] in row["error"]
    row = load_row({"path": files["a"]})
    assert row["error"] == "" and np.array_equal(row["audio"], read_audio(files["a"]))


def test_ray_encoder_class(files, causal):
    enc = TokenEncoder(model=TINY, device="cpu")
    paths = [files[k] for k in ("a", "empty", "48k", "short", "loud", "d")]
    for batch in ({"path": np.array(paths)},
                  {k: [load_row({"path": p})[k] for p in paths] for k in ("path", "audio", "error")}):
        res = enc(batch)
        assert res["path"] == paths and res["n_tokens"].tolist() == [len(t) for t in res["tokens"]]
        check(causal, files, paths, res["tokens"], res["error"])


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (what CI has), started and torn down within a bounded time."""
    ray = pytest.importorskip("ray")  # in the dev extra: runs in CI

    def too_slow(*_):
        raise TimeoutError("the local Ray cluster took over 240 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(240)
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
                 configure_logging=False)
        yield ray
    finally:
        ray.shutdown()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_ray_pipeline_on_a_local_cluster(ray_cluster, files, causal, tmp_path):
    from fastfocal.ray import encode_paths

    paths = [files[k] for k in ("a", "b", "c", "d", "full", "48k", "empty", "short", "loud")]
    ds = encode_paths(paths, model=TINY, batch_size=3)  # several batches: good ones with a bad one, one all bad
    rows = sorted(ds.take_all(), key=lambda r: paths.index(r["path"]))
    assert [r["path"] for r in rows] == paths
    check(causal, files, paths, [r["tokens"] for r in rows], [r["error"] for r in rows])
    assert [int(r["n_tokens"]) for r in rows] == [len(r["tokens"]) for r in rows]

    ds.write_parquet(str(tmp_path / "pq"))  # the documented output
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "pq").to_pylist()
    assert sorted(r["path"] for r in table) == sorted(paths)
    for r in table:
        if Path(r["path"]).stem not in BAD:
            np.testing.assert_array_equal(np.asarray(r["tokens"]), causal.sig_to_toks(read_audio(r["path"])).numpy())


def test_actor_takes_the_drivers_float32_dot_mode():
    """Actors run in their own processes: the mode comes with their constructor arguments."""
    import fastfocal

    try:
        TokenEncoder(model=TINY, device="cpu", f32_dot="bf16x3")
        assert fastfocal.f32_dot() == "bf16x3"
        with pytest.raises(ValueError, match="'bf16'"):
            TokenEncoder(model=TINY, device="cpu", f32_dot="bf16")
    finally:
        fastfocal.set_f32_dot(None)
