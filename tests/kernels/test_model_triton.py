"""The whole codec on the Triton kernels (interpreted on CPU) against the upstream golden
vectors, and the backend switch in fastfocal.ops."""
import numpy as np
import pytest
import torch
from conftest import DEVICE

from fastfocal import ops
from helpers import GOLDEN_REL, assert_close, assert_tokens

T = torch.from_numpy
# Golden checks: GOLDEN_REL where measured (CPU: reference ops and interpreted kernels); the compiled
# GPU kernels keep assert_close's 1e-4 until a GPU run measures them.
GOLDEN = GOLDEN_REL if DEVICE == "cpu" else 1e-4


def test_backend_switch(monkeypatch):
    import fastfocal.kernels.norm as kn

    x = torch.randn(3, 12, device=DEVICE)
    w, b = torch.ones(12, device=DEVICE), torch.zeros(12, device=DEVICE)
    calls = []
    real = kn.norm
    monkeypatch.setattr(kn, "norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTFOCAL_BACKEND", "torch")
    ops.layer_norm(x, w, b, 1e-5)
    assert not calls, "FASTFOCAL_BACKEND=torch must use the reference"
    monkeypatch.setenv("FASTFOCAL_BACKEND", "triton")
    ops.layer_norm(x, w, b, 1e-5)
    assert calls, "FASTFOCAL_BACKEND=triton must use the kernel"
    monkeypatch.setenv("FASTFOCAL_BACKEND", "auto")
    assert ops.use_triton(x) == x.is_cuda
    monkeypatch.setenv("FASTFOCAL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTFOCAL_BACKEND"):
        ops.layer_norm(x, w, b, 1e-5)


@pytest.mark.parametrize("name", ["causal", "noncausal"])
def test_golden_offline(request, triton_backend, name, monkeypatch):
    """Causal: the focal layers' 200-frame runs take the long-run form (every level as a GEMM)."""
    from fastfocal.kernels import focal_context as fc

    codec, g = request.getfixturevalue(name), request.getfixturevalue(f"golden_{name}")
    runs, real = [], fc.focal_context_long
    monkeypatch.setattr(fc, "focal_context_long", lambda *a, **k: runs.append(a[0].shape[1]) or real(*a, **k))
    lats = codec.sig_to_lats(T(g["sig"]))
    assert runs == ([200] * 3 if name == "causal" else []), runs
    assert_close("lats", lats, g["lats"], rel=GOLDEN)
    assert_tokens("toks", codec.lats_to_toks(lats), g["toks"], lats=g["lats"])
    rec = codec.codes_to_sig(codec.lats_to_codes(lats))
    n = g["rec_sig"].shape[1]
    assert_close("rec_sig", rec[:, :n], g["rec_sig"], rel=GOLDEN)


@pytest.mark.parametrize("focal_rows", [False, True], ids=["focal-fused", "focal-rows"])
def test_golden_streaming(causal, golden_causal, triton_backend, focal_rows, monkeypatch):
    """focal-rows: every step's focal layers in the many-row form (window GEMM + rows kernel),
    which the default takes from 64 rows; the first 12 chunks only (the interpreter runs it at
    ~6 s a step), against the golden outputs' prefixes (streaming is causal)."""
    from fastfocal.kernels import focal_context as fc

    monkeypatch.setattr(fc, "WINDOW_ROWS", 1 if focal_rows else 10 ** 9)
    g = golden_causal
    s = causal.stream(batch_size=2)
    toks, audio = [], []
    n = 12 * 1280 if focal_rows else g["sig"].shape[1]
    for a in range(0, n, 1280):
        t, y = s.push(T(g["sig"][:, a:a + 1280]))
        toks.append(t)
        audio.append(y)
    if not focal_rows:
        t, y = s.flush()
        toks.append(t)
        audio.append(y)
    toks, audio = torch.cat(toks, 1), torch.cat(audio, 1)
    assert toks.shape[1] >= 40 if focal_rows else toks.shape[1] == g["stream_toks"].shape[1]
    assert_tokens("stream_toks", toks, g["stream_toks"][:, :toks.shape[1]])
    assert_close("stream_rec_sig", audio, g["stream_rec_sig"][:, :audio.shape[1]], rel=GOLDEN)


def test_few_row_steps_fuse_epilogues_and_norms(causal, golden_causal, triton_backend, monkeypatch):
    """Batch-1 streaming steps on the few-row matmul kernel (epilogues, modulation and pre-norms
    inside it) against the same steps on separate matmul + epilogue + norm launches: same
    audio and tokens, and far fewer epilogue/norm launches."""
    import fastfocal.kernels.epilogue as ke
    import fastfocal.kernels.modulate as km
    import fastfocal.kernels.norm as kn

    calls = {"side": 0}
    for mod, name in ((ke, "epilogue"), (kn, "norm"), (km, "modulate")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: calls.__setitem__("side", calls["side"] + 1) or _r(*a, **k))
    sig = T(golden_causal["sig"][:1, :1280 * 4])
    runs = {}
    for rows in (0, 16):
        monkeypatch.setattr(ops, "SKINNY_ROWS", rows)
        calls["side"] = 0
        s = causal.stream(batch_size=1)
        outs = [s.push(sig[:, a:a + 1280]) for a in range(0, sig.shape[1], 1280)]
        runs[rows] = (torch.cat([t for t, _ in outs], 1), torch.cat([y for _, y in outs], 1), calls["side"])
    (t0, y0, n0), (t1, y1, n1) = runs[0], runs[16]
    assert torch.equal(t1, t0)
    assert_close("audio", y1, y0, rel=1e-5)
    # and both against the upstream's streaming outputs (a mistake the two forms share, in a
    # kernel they both launch, would pass the comparison above)
    g = golden_causal
    assert_tokens("stream_toks", t1, g["stream_toks"][:1, :t1.shape[1]])
    assert_close("stream_rec_sig", y1, g["stream_rec_sig"][:1, :y1.shape[1]], rel=GOLDEN)
    assert n1 < n0 / 3, f"{n1} epilogue/norm/modulate launches with the fused kernel, {n0} without"


def test_many_rows_on_the_gemm_kernel(causal, golden_causal, triton_backend, monkeypatch):
    """LARGE_GEMM: an offline run (thousands of rows a Linear) on the matmul kernel with GEMM
    tiles (epilogues fused, conv windows read in place) against the golden vectors, and a
    6-stream engine (24 rows) against the same steps on matmul + separate epilogue passes;
    no matmul's epilogue pass is left."""
    import fastfocal.kernels.epilogue as ke
    import fastfocal.kernels.linear as kl
    import fastfocal.kernels.modulate as km
    from fastfocal.engine import StreamEngine

    seen = {"side": 0, "rows": 0, "post_norm": 0}
    for mod, name in ((ke, "epilogue"), (km, "modulate")):  # a matmul's epilogue pass writes its output in place
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: seen.__setitem__("side", seen["side"] + ("out" in k))
                            or _r(*a, **k))
    real_launch = kl._launch
    monkeypatch.setattr(kl, "_launch", lambda x, w, out, M, *a, **k: seen.update(rows=max(seen["rows"], M),
                                                                                post_norm=seen["post_norm"] + (k.get("post", 0) > 0))
                        or real_launch(x, w, out, M, *a, **k))
    g = golden_causal
    monkeypatch.setattr(ops, "LARGE_GEMM", True)
    lats = causal.sig_to_lats(T(g["sig"]))
    assert_close("lats", lats, g["lats"], rel=GOLDEN)
    assert_tokens("toks", causal.lats_to_toks(lats), g["toks"], lats=g["lats"])
    rec = causal.codes_to_sig(causal.lats_to_codes(lats))
    assert_close("rec_sig", rec[:, :g["rec_sig"].shape[1]], g["rec_sig"], rel=GOLDEN)
    # the feature extractor's LayerNorm + GELU in the conv kernel's epilogue where the convs have many windows
    assert seen["rows"] > 1000 and seen["side"] == 0 and seen["post_norm"] > 0, seen
    x = g["sig"][:1, :1280 * 2].repeat(6, 0) * np.linspace(0.5, 1.0, 6, dtype=np.float32)[:, None]
    runs = {}
    for large in (False, True):
        monkeypatch.setattr(ops, "LARGE_GEMM", large)
        seen.update(side=0, rows=0, post_norm=0)
        e = StreamEngine(causal, 6)
        ids = [e.open() for _ in range(6)]
        e.submit_batch(ids, x)
        steps = [e.step_batch() for _ in range(2)]
        runs[large] = (steps, dict(seen), [c.clone() for c in e.states["encoder"].fe_caches])
    (s0, n0, c0), (s1, n1, c1) = runs[False], runs[True]
    for a, b in zip(s0, s1):
        assert torch.equal(a.tokens, b.tokens) and np.array_equal(a.errors, b.errors)
        assert_close("engine audio", b.audio, a.audio, rel=1e-5)
    for i, (a, b) in enumerate(zip(c0, c1)):  # tokens alone rarely show a stale conv cache: compare the caches
        assert_close(f"feature-extractor cache {i}", b, a, rel=1e-5)
    assert n1["rows"] > 16 and n1["side"] == 0 and n0["side"] > 0 and n0["post_norm"] == 0 < n1["post_norm"], (n0, n1)


def test_positional_conv_ring_in_the_encoder(data_dir, golden_causal, triton_backend, monkeypatch):
    """The encoder with its positional conv on the ring kernel (8 groups of 16 channels, so the
    kernel takes it; 16 taps, so the 32-slot ring wraps within the test): two streams stepped
    at different positions through slot indices give the frames the whole signal gives in one
    offline call on the reference ops, and the kernel ran on every step."""
    import json

    import fastfocal
    import fastfocal.kernels.linear as kl

    cfg = json.loads((data_dir / "tiny_causal" / "config.json").read_text())
    cfg["encoder_config"].update(conv_pos=16, conv_pos_groups=8)
    enc = fastfocal.random_init(cfg, seed=3, device=DEVICE).model.encoder
    calls = []
    real = kl.grouped_ring_conv
    monkeypatch.setattr(kl, "grouped_ring_conv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    sig = T(golden_causal["sig"][:2, :1280 * 11]).to(DEVICE) * torch.tensor([[1.0], [0.7]], device=DEVICE)
    with torch.inference_mode():
        monkeypatch.setenv("FASTFOCAL_BACKEND", "torch")
        whole = enc(sig, enc.init_state(2, DEVICE, torch.float32))
        monkeypatch.setenv("FASTFOCAL_BACKEND", "triton")
        st = enc.init_state(3, DEVICE, torch.float32)
        got = [[], []]
        for i in range(11):  # stream 0 on slot 2 runs 3 chunks ahead of stream 1 on slot 0
            rows = [0] if i < 3 else [0, 1]
            n = {0: i, 1: i - 3}
            x = torch.stack([sig[r, 1280 * n[r]:1280 * (n[r] + 1)] for r in rows])
            y = enc(x, st, torch.tensor([2, 0][:len(rows)], device=DEVICE))
            for j, r in enumerate(rows):
                got[r].append(y[j])
    assert_close("stream 0", torch.cat(got[0]), whole[0])
    assert_close("stream 1", torch.cat(got[1]), whole[1, :8 * 4])
    assert len(calls) == 11, calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_full_size_triton_vs_torch(monkeypatch, dtype):
    import fastfocal

    codec = fastfocal.random_init("50hz_4k_causal", seed=0, device="cuda", dtype=dtype)
    sig = (torch.randn(2, 16000 * 6, generator=torch.Generator().manual_seed(0)) * 0.1).cuda()
    monkeypatch.setenv("FASTFOCAL_BACKEND", "torch")
    lats_ref = codec.sig_to_lats(sig).float()
    toks_ref = codec.sig_to_toks(sig)
    monkeypatch.setenv("FASTFOCAL_BACKEND", "auto")
    lats = codec.sig_to_lats(sig).float()
    toks = codec.sig_to_toks(sig)
    agree = (toks == toks_ref).float().mean().item()
    assert agree > (0.999 if dtype == "float32" else 0.85), f"token agreement {agree:.4f}"
    assert_close("lats", lats, lats_ref, rel=1e-3 if dtype == "float32" else 0.1)
    # streaming on the kernels equals offline on the kernels
    s = codec.stream_encoder(batch_size=2)
    st = torch.cat([s.push(sig[:, a:a + 1280]) for a in range(0, sig.shape[1], 1280)], 1)
    assert (st == toks).float().mean().item() > (0.999 if dtype == "float32" else 0.9)


@pytest.mark.gpu
def test_gpu_step_under_cuda_graph():
    """A batched encoder step with every kernel captured in a CUDA graph and replayed."""
    import fastfocal
    from fastfocal.pipeline import Pipeline

    codec = fastfocal.random_init("50hz_4k_causal", seed=0, device="cuda", dtype="bfloat16")
    m = codec.model
    B = 8
    enc, comp = Pipeline(m, "encode", B + 1).states.values()
    enc2, comp2 = Pipeline(m, "encode", B + 1).states.values()
    idx = torch.arange(B, device="cuda")
    x = torch.zeros(B, 1280, device="cuda", dtype=torch.bfloat16)

    def step(st_e, st_c):
        return ops.bsq_quantize(m.compressor(m.encoder(x, st_e, idx), st_c, idx))[0]

    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # compile outside the graph; then start the state over
                step(enc, comp)
        torch.cuda.current_stream().wait_stream(s)
        enc.reset()
        comp.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(enc, comp)
        enc.reset()
        comp.reset()
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x.copy_(torch.randn(B, 1280, generator=g) * 0.1)
            graph.replay()
            want = step(enc2, comp2)
            assert (out == want).float().mean().item() > 0.99


@pytest.mark.gpu
def test_gpu_pdl_session_equals_plain_launches():
    """FASTFOCAL_PDL: a full-duplex session's CUDA-graph steps with programmatic dependent
    launch (each kernel waits for the previous one itself, matmuls prefetch weights first) give
    bit for bit what plain launches give, on the same weights and audio."""
    import fastfocal
    from fastfocal.kernels import _common

    if torch.cuda.get_device_capability()[0] < 9 or _common.gdc_wait is None:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+ and a Triton with it")
    codec = fastfocal.random_init("50hz_4k_causal", seed=0, device="cuda", dtype="bfloat16")
    sig = (torch.randn(2, 1280 * 12, generator=torch.Generator().manual_seed(3)) * 0.1).cuda()
    got = {}
    try:
        for on in (False, True):
            _common.set_pdl(on)
            assert _common.pdl(sig) == on
            s = codec.stream(batch_size=2)
            outs = [s.push(sig[:, a:a + 1280]) for a in range(0, sig.shape[1], 1280)]
            got[on] = [torch.cat(o, 1) for o in zip(*outs)]
    finally:
        _common.set_pdl(None)
    for name, a, b in zip(("tokens", "audio"), got[False], got[True]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decompressor_from_tokens(causal, golden_causal, monkeypatch, backend):
    """Tokens go straight into in_proj (signed sums of weight columns) and give what codes give."""
    monkeypatch.setenv("FASTFOCAL_BACKEND", backend)
    toks = T(golden_causal["toks"][:, :40]).to(DEVICE)
    with torch.inference_mode():
        a = causal.model.decompressor(ops.bsq_codes(toks, causal.code_dim, torch.float32))
        b = causal.model.decompressor(toks)
    assert_close("qfeats from codes vs golden", a, golden_causal["qfeats"][:, :40], rel=GOLDEN)  # causal: the prefix
    assert_close("qfeats from tokens", b, a, rel=1e-6)
    if backend == "torch":
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compressor_quantize_in_one_pass(causal, golden_causal, monkeypatch, backend):
    """compressor(..., quantize=True) gives what bsq_quantize(compressor(...)) gives."""
    monkeypatch.setenv("FASTFOCAL_BACKEND", backend)
    feats = T(golden_causal["feats"][:, :40]).to(DEVICE)
    with torch.inference_mode():
        lats = causal.model.compressor(feats)
        toks, codes = ops.bsq_quantize(lats)
        l2, t2, c2 = causal.model.compressor(feats, quantize=True)
    g = golden_causal
    assert_close("lats vs golden", lats, g["lats"][:, :40], rel=GOLDEN)  # causal: the prefix
    assert_tokens("toks vs golden", toks, g["toks"][:, :40], lats=g["lats"][:, :40])
    assert torch.equal(l2, lats) and torch.equal(t2, toks) and torch.equal(c2, codes)


@pytest.mark.gpu
@pytest.mark.parametrize("C,groups,k", [(1024, 16, 128), (1024, 1024, 512)])  # WavLM's pos conv, a focal level
def test_gpu_fp32_convs_are_not_tf32(C, groups, k):
    """cuDNN may run fp32 convs in TF32 (PyTorch's default allows it: ~1e-3 relative error);
    fastfocal's fp32 is the exact path, so its convs must stay within fp32 rounding."""
    from fastfocal.kernels._common import grouped_conv1d

    g = torch.Generator().manual_seed(C + k)
    x = torch.randn(2, C, 300 + k, generator=g)
    w = torch.randn(C, C // groups, k, generator=g) / (C // groups * k) ** 0.5
    b = torch.randn(C, generator=g)
    want = torch.nn.functional.conv1d(x.double(), w.double(), b.double(), groups=groups)
    got = grouped_conv1d(x.cuda(), w.cuda(), b.cuda(), groups).cpu().double()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-6, f"relative error {err:.2e}: TF32?"


def test_ieee_cudnn_convs_restores_the_flag():
    from fastfocal.kernels._common import ieee_cudnn_convs

    c = torch.backends.cudnn
    new_api = hasattr(getattr(c, "conv", None), "fp32_precision")  # torch >= 2.9; else the legacy flag

    def flag():
        return c.conv.fp32_precision if new_api else c.allow_tf32

    before = flag()
    with pytest.raises(ZeroDivisionError):
        with ieee_cudnn_convs():
            assert flag() == ("ieee" if new_api else False)
            1 / 0
    assert flag() == before


@pytest.mark.parametrize("form", ["stream-fused", "stream-rows", "offline"])
def test_the_devices_tiles_under_the_interpreter(causal, golden_causal, triton_backend, form, monkeypatch):
    """The matmul and focal kernels with the tiles a GPU launch picks (narrow few-row slabs and
    register-capped K blocks; focal channel tiles of 16 with 64-slot ring reads, the rows form's
    4 x 64, the long form's 64 x 64 x 32), not the interpreter's whole tiles, against the golden
    outputs: a streaming prefix with the focal window in the fused step kernel or in the rows
    form, and an offline run (the long form)."""
    import fastfocal.kernels.focal_context as fc
    from helpers import device_tiles

    picked = device_tiles(monkeypatch)
    g = golden_causal
    if form == "offline":  # its matmuls are the library's (LARGE_GEMM off); the focal layers take the long form
        runs, long = [], fc.focal_context_long
        monkeypatch.setattr(fc, "focal_context_long", lambda *a, **k: runs.append(a[0].shape[1]) or long(*a, **k))
        lats = causal.sig_to_lats(T(g["sig"]))
        assert runs == [200] * 3, runs
        assert_close("lats", lats, g["lats"], rel=GOLDEN)
        assert_tokens("toks", causal.lats_to_toks(lats), g["toks"], lats=g["lats"])
    else:
        monkeypatch.setattr(fc, "WINDOW_ROWS", 1 if form == "stream-rows" else 10 ** 9)
        s = causal.stream(batch_size=2)
        outs = [s.push(T(g["sig"][:, a:a + 1280])) for a in range(0, 2 * 1280, 1280)]  # the interpreter: ~20 s a step
        toks, audio = torch.cat([t for t, _ in outs], 1), torch.cat([y for _, y in outs], 1)
        assert toks.shape[1] >= 4 and audio.shape[1] > 0
        assert_tokens("stream_toks", toks, g["stream_toks"][:, :toks.shape[1]])
        assert_close("stream_rec_sig", audio, g["stream_rec_sig"][:, :audio.shape[1]], rel=GOLDEN)
        # the device's tiles are pipelined (stages > 1); every interpreter tile has 1 stage
        assert picked and all(t[4] > 1 for t in picked), picked


def test_short_noncausal_decode_on_the_kernels(noncausal, triton_backend, monkeypatch):
    """A few tokens through the non-causal decompressor on the kernels: its upscale output is a
    transposed view, and the next block's pre-norm (inside the few-row matmul) must still write
    a contiguous normalised copy; equal to the reference path."""
    toks = torch.randint(0, noncausal.codebook_size, (1, 4), generator=torch.Generator().manual_seed(3))
    got = noncausal.toks_to_qfeats(toks)
    monkeypatch.setenv("FASTFOCAL_BACKEND", "torch")
    assert_close("qfeats", got, noncausal.toks_to_qfeats(toks))
