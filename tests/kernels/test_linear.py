"""Few-row matmul + epilogue kernel against float64: every epilogue part, strided inputs
(conv windows read in place, focal modulation's q), shapes off every tile edge."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, f64, rand

from fastfocal.kernels.linear import linear, linear_ref

# (leading dims, K, N): a batch-1 step's 4 rows, one row, 16+ rows (two row tiles), odd sizes
SHAPES = [((1, 4), 1024, 4096), ((1, 1), 24, 40), ((2, 9), 96, 130), ((37,), 1000, 33)]


def _w(N, K, dtype):
    return rand(N, K, dtype=dtype, device=DEVICE, scale=K ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("part", ["plain", "bias", "gelu", "res", "res_gamma", "clamp", "snake", "mul", "gelu_res_gamma"])
def test_linear(dtype, lead, K, N, part):
    x = rand(*lead, K, dtype=dtype, device=DEVICE)
    w = _w(N, K, dtype)
    kw = dict(bias=None if part == "plain" else rand(N, dtype=dtype, device=DEVICE))
    if "gelu" in part:
        kw["act"] = "gelu"
    if "res" in part:
        kw["res"] = rand(*lead, N, dtype=dtype, device=DEVICE)
    if "gamma" in part:
        kw["gamma"] = rand(N, dtype=dtype, device=DEVICE)
    if part == "clamp":
        kw.update(act="clamp", lo=-0.5, hi=0.7)
    if part == "snake":
        kw.update(act="snake", alpha=(torch.rand(N) * 2 + 0.2).to(DEVICE, dtype))
    if part == "mul":  # q: the first N features of a wider row, as focal modulation passes it
        kw["mul"] = rand(*lead, 2 * N + 3, dtype=dtype, device=DEVICE)[..., :N]
    got = linear(x, w, **kw)
    want = linear_ref(*f64(x, w), **{k: (f64(v)[0] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert got.shape == (*lead, N) and got.dtype == dtype and got.is_contiguous()
    assert_close(part, got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_overlapping_conv_windows_read_in_place(dtype):
    """A strided conv as a matmul over windows that overlap in memory (row stride s*C < K = k*C),
    against the library conv in float64: what the feature extractor passes."""
    B, T, C, k, s, N = 2, 23, 48, 3, 2, 40
    x = rand(B, T, C, dtype=dtype, device=DEVICE)
    w = rand(N, C, k, dtype=dtype, device=DEVICE, scale=(C * k) ** -0.5)
    Tout = (T - k) // s + 1
    win = x.as_strided((B, Tout, k * C), (T * C, s * C, 1))
    got = linear(win, w.permute(0, 2, 1).reshape(N, k * C))  # taps reordered to (k, C)
    want = torch.nn.functional.conv1d(x.double().transpose(1, 2), w.double(), stride=s).transpose(1, 2)
    assert_close("conv windows", got, want, dtype)


def test_weight_without_unit_stride_and_rejected_inputs():
    x = rand(1, 4, 64, device=DEVICE)
    w = _w(64, 96, torch.float32).t()  # (96, 64) view of a transposed weight
    assert_close("transposed weight", linear(x, w), linear_ref(*f64(x, w)))
    assert_close("one row, 1-D", linear(x[0, 0], w), linear_ref(*f64(x[0, 0], w)))  # F.linear's (K,) -> (N,)
    with pytest.raises(ValueError, match="dtypes differ"):
        linear(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight must be \(N, 64\)"):
        linear(x, _w(8, 63, torch.float32))
    with pytest.raises(ValueError, match="res must be"):
        linear(x, _w(8, 64, torch.float32), res=rand(1, 4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="snake needs alpha"):
        linear(x, _w(8, 64, torch.float32), act="snake")


def test_pdl_only_where_it_can_run(monkeypatch):
    """FASTFOCAL_PDL asks for programmatic dependent launch; the interpreter and CPU tensors
    never get it (the interpreter has no grid-dependency ops), and the launchers pass the
    kernel's PDL constexpr and the launch option together: few-row matmuls as 2 (prefetch the
    weights, then wait), everything else as 1."""
    from fastfocal.kernels import _common, linear as lin

    _common.set_pdl(True)
    try:
        assert _common.launch_opts(torch.zeros(1)) == {"PDL": False}
        seen = []

        class Rec:
            def __getitem__(self, grid):
                return lambda *a, **kw: seen.append({k: kw.get(k) for k in ("PDL", "launch_pdl")})

        monkeypatch.setattr(_common, "pdl", lambda t: True)
        monkeypatch.setattr(lin, "_linear_kernel", Rec())
        w = _w(32, 64, torch.float32)
        linear(rand(1, 4, 64, device=DEVICE), w)
        linear(rand(2, 100, 64, device=DEVICE), w)
        assert seen == [{"PDL": 2, "launch_pdl": True}, {"PDL": True, "launch_pdl": True}]
    finally:
        _common.set_pdl(None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_model_sizes(dtype):
    """The batch-1 step's matmuls at their real sizes (compiled tiles, not the interpreter's)."""
    for M, K, N in [(4, 1024, 4096), (4, 4096, 1024), (4, 1024, 3075), (1, 1536, 512), (16, 1024, 1024)]:
        x = rand(M, K, dtype=dtype, device="cuda")
        w, b = _w(N, K, dtype).cuda(), rand(N, dtype=dtype, device="cuda")
        r = rand(M, N, dtype=dtype, device="cuda")
        assert_close(f"{M}x{K}x{N}", linear(x, w, b, "gelu", res=r), linear_ref(*f64(x, w, b), "gelu", res=f64(r)[0]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", [((1, 4), 1024, 3075), ((1, 3), 200, 48), ((2, 9), 96, 130)])
@pytest.mark.parametrize("kind", ["layer_norm", "dyt", "snake"])
@pytest.mark.parametrize("store", [False, True])
def test_norm_prologue(dtype, lead, K, N, kind, store):
    """NORM(x) W^T + b with the norm computed inside the matmul (and stored on the side),
    against the float64 norm then matmul; x carries an offset so a missing mean shows."""
    x = rand(*lead, K, dtype=dtype, device=DEVICE, scale=3.0) + 2.0
    w, b = _w(N, K, dtype), rand(N, dtype=dtype, device=DEVICE)
    if kind == "layer_norm":
        nrm = ("layer_norm", rand(K, dtype=dtype, device=DEVICE), rand(K, dtype=dtype, device=DEVICE), 1e-5)
    elif kind == "dyt":
        nrm = ("dyt", torch.tensor([0.7]).to(DEVICE, dtype))
    else:
        nrm = ("snake", (torch.rand(K) * 2 + 0.2).to(DEVICE, dtype))
    nout = torch.empty_like(x) if store else None
    got = linear(x, w, b, "gelu", norm=nrm, norm_out=nout)
    n64 = tuple(f64(v)[0] if isinstance(v, torch.Tensor) else v for v in nrm)
    assert_close(kind, got, linear_ref(*f64(x, w, b), "gelu", norm=n64), dtype)
    if store:
        from fastfocal.kernels.epilogue import epilogue_ref
        from fastfocal.kernels.norm import norm_ref
        want = norm_ref(f64(x)[0], *n64[1:]) if kind == "layer_norm" else norm_ref(f64(x)[0], alpha=n64[1]) \
            if kind == "dyt" else epilogue_ref(f64(x)[0], None, "snake", alpha=n64[1])
        assert_close(f"{kind} stored", nout, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,k,s,T", [(1, 10, 5, 1280), (48, 3, 2, 23), (40, 2, 2, 8), (24, 3, 2, 2)])
@pytest.mark.parametrize("rows", ["in_order", "indexed", "indexed_starts"])
def test_causal_conv_reads_cache_and_frames_in_place(dtype, C, k, s, T, rows):
    """Windows over [cache rows ‖ x] (fresh rows: x's first frame repeated; given as a mask or
    as the rows' frame counts, fresh where 0), read in place, against the float64 conv of the
    explicitly padded input; the cache is left as it was."""
    from fastfocal.ops import causal_pad
    from fastfocal.kernels.linear import causal_conv

    B, S, N = 3, 5, 36
    x = rand(B, T, C, dtype=dtype, device=DEVICE)
    w = rand(N, C, k, dtype=dtype, device=DEVICE, scale=(C * k) ** -0.5)
    cache = rand(S, k - 1, C, dtype=dtype, device=DEVICE)
    idx = torch.tensor([4, 0, 2], device=DEVICE) if rows.startswith("indexed") else None
    fresh = torch.tensor([False, True, False], device=DEVICE)
    given = torch.tensor([12, 0, 3], device=DEVICE) if rows == "indexed_starts" else fresh
    bias = rand(N, dtype=dtype, device=DEVICE) if rows == "indexed" else None  # the decoder's embedding has one
    before = cache.clone()
    got = causal_conv(x, w.permute(0, 2, 1).reshape(N, k * C), k, s, cache if idx is not None else cache[:B].contiguous(),
                      idx, given, bias)
    rows_c = cache[idx] if idx is not None else cache[:B]
    xp = causal_pad(f64(x)[0], k - 1, f64(rows_c)[0], fresh, True, dim=1)
    want = torch.nn.functional.conv1d(xp.transpose(1, 2), f64(w)[0], None if bias is None else f64(bias)[0],
                                      stride=s).transpose(1, 2)
    assert_close(f"causal conv k={k} s={s}", got, want, dtype)
    assert torch.equal(cache, before)


# Many rows: GEMM tiles. A small forced tile gives several row and column blocks (and K blocks
# on the conv's tap boundaries, or across them) at interpreter-sized shapes.
GEMM_TILES = {"default": None, "small": (32, 32, 32, 4, 1), "wide_k": (64, 16, 64, 4, 1)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", [((3, 50), 96, 80), ((300,), 64, 130)])
@pytest.mark.parametrize("part", ["plain", "gelu_res_gamma", "mul", "snake"])
@pytest.mark.parametrize("tiles", list(GEMM_TILES))
def test_many_rows_take_gemm_tiles(dtype, lead, K, N, part, tiles, monkeypatch):
    import fastfocal.kernels.linear as lin
    monkeypatch.setattr(lin, "GEMM_TILE_OVERRIDE", GEMM_TILES[tiles])
    assert lin.tile(150, N, K, dtype)[0] >= 32  # the GEMM branch, not the few-row slabs
    test_linear(dtype, lead, K, N, part)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [64, 40])  # 64: each 32-wide K block is one tap; 40: blocks straddle taps
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_many_rows_conv_windows(dtype, C, tiles, monkeypatch):
    """The feature extractor at a big batch: overlapping windows and causal windows over
    [cache ‖ frames], both read in place with GEMM tiles, against float64 convs."""
    import fastfocal.kernels.linear as lin
    from fastfocal.ops import causal_pad
    monkeypatch.setattr(lin, "GEMM_TILE_OVERRIDE", GEMM_TILES[tiles])
    B, T, k, s, N = 3, 101, 3, 2, 48
    x = rand(B, T, C, dtype=dtype, device=DEVICE)
    w = rand(N, C, k, dtype=dtype, device=DEVICE, scale=(C * k) ** -0.5)
    wkc = w.permute(0, 2, 1).reshape(N, k * C)
    Tout = (T - k) // s + 1
    got = linear(x.as_strided((B, Tout, k * C), (T * C, s * C, 1)), wkc)
    want = torch.nn.functional.conv1d(f64(x)[0].transpose(1, 2), f64(w)[0], stride=s).transpose(1, 2)
    assert_close("windows", got, want, dtype)
    cache = rand(5, k - 1, C, dtype=dtype, device=DEVICE)
    idx, fresh = torch.tensor([3, 0, 4], device=DEVICE), torch.tensor([False, False, True], device=DEVICE)
    got = lin.causal_conv(x, wkc, k, s, cache, idx, fresh)
    xp = causal_pad(f64(x)[0], k - 1, f64(cache[idx])[0], fresh, True, dim=1)
    want = torch.nn.functional.conv1d(xp.transpose(1, 2), f64(w)[0], stride=s).transpose(1, 2)
    assert got.shape[1] * B > lin.FEW_ROWS
    assert_close("causal windows", got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True], ids=["ln", "ln_gelu"])
@pytest.mark.parametrize("C,N,B,T,s", [(40, 48, 3, 101, 2), (1, 36, 2, 700, 5)])  # FE conv1-like (150 rows), conv0-like
def test_layer_norm_epilogue(dtype, gelu, C, N, B, T, s):
    """The feature extractor's conv, LayerNorm and GELU as one launch (the norm in the epilogue,
    whole rows in one column tile), over [cache ‖ frames] windows and over plain rows (N off a
    power of two), against the float64 conv then norm."""
    import fastfocal.kernels.linear as lin
    from fastfocal.kernels.norm import norm_ref
    from fastfocal.ops import causal_pad

    k = 3 if C > 1 else 10
    x = rand(B, T, C, dtype=dtype, device=DEVICE)
    w = rand(N, C, k, dtype=dtype, device=DEVICE, scale=(C * k) ** -0.5)
    g, b = rand(N, dtype=dtype, device=DEVICE), rand(N, dtype=dtype, device=DEVICE, scale=0.1)
    cache = rand(5, k - 1, C, dtype=dtype, device=DEVICE)
    idx, start = torch.tensor([3, 0, 4][:B], device=DEVICE), torch.tensor([7, 0, 9][:B], device=DEVICE)
    before = cache.clone()
    got = lin.causal_conv(x, w.permute(0, 2, 1).reshape(N, k * C), k, s, cache, idx, start, post_norm=(g, b, 1e-5, gelu))
    xp = causal_pad(f64(x)[0], k - 1, f64(cache[idx])[0], start == 0, True, dim=1)
    conv = torch.nn.functional.conv1d(xp.transpose(1, 2), f64(w)[0], stride=s).transpose(1, 2)
    assert got.shape[0] * got.shape[1] > lin.FEW_ROWS
    assert_close("conv + LN epilogue", got, norm_ref(conv, *f64(g, b), 1e-5, act_gelu=gelu), dtype)
    assert torch.equal(cache, before)
    h = rand(B, 9, 96, dtype=dtype, device=DEVICE)
    wl, bl = rand(130, 96, dtype=dtype, device=DEVICE, scale=96 ** -0.5), rand(130, dtype=dtype, device=DEVICE)
    g, b = rand(130, dtype=dtype, device=DEVICE), rand(130, dtype=dtype, device=DEVICE)
    got = linear(h, wl, bl, act="gelu", post_norm=(g, b, 1e-6, gelu))
    assert_close("linear + LN epilogue", got, linear_ref(*f64(h, wl, bl), act="gelu", post_norm=(*f64(g, b), 1e-6, gelu)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L", [(1, 10), (2, 13), (3, 60)])  # 4 rows, 14 rows, 162 rows (GEMM tiles)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_grouped_conv_windows_read_in_place(dtype, B, L, tiles, monkeypatch):
    """GELU(grouped conv + bias) over a padded time-major signal, windows read in place (WavLM's
    positional conv in a step), against the float64 library conv."""
    import fastfocal.kernels.linear as lin
    monkeypatch.setattr(lin, "GEMM_TILE_OVERRIDE", GEMM_TILES[tiles])
    C, O, G, k = 32, 64, 4, 7
    xp = rand(B, L, C, dtype=dtype, device=DEVICE)
    w = rand(O, C // G, k, dtype=dtype, device=DEVICE, scale=(C // G * k) ** -0.5)
    b = rand(O, dtype=dtype, device=DEVICE)
    got = lin.grouped_windows(xp, w.permute(0, 2, 1).reshape(O, -1), k, G, b, "gelu")
    want = torch.nn.functional.gelu(torch.nn.functional.conv1d(f64(xp)[0].transpose(1, 2), f64(w)[0], f64(b)[0],
                                                               groups=G)).transpose(1, 2)
    assert got.shape == (B, L - k + 1, O)
    assert_close("grouped windows", got, want, dtype)
    with pytest.raises(ValueError, match="groups must divide"):
        lin.grouped_windows(xp, w.permute(0, 2, 1).reshape(O, -1), k, 5, b)


def _stream_ref(sig, w, b, k, replicate=True, gelu=True):
    """float64 (GELU of) the grouped conv + b of whole streams (S, L, C), left-padded by each
    stream's first frame repeated (or zeros): what every streaming step must reproduce."""
    G = sig.shape[2] // w.shape[1]
    first = sig[:, :1].expand(-1, k - 1, -1)
    xp = torch.cat([first if replicate else torch.zeros_like(first), sig], 1)
    y = torch.nn.functional.conv1d(xp.transpose(1, 2), w, b, groups=G).transpose(1, 2)
    return torch.nn.functional.gelu(y) if gelu else y


def _step_streams(conv, want, sig, pos, rows, n, in_order, dtype):
    """One streaming call of `conv(x, idx, start)` on streams `rows` at their positions, checked
    against the whole-stream reference; the positions advance."""
    start = torch.tensor([pos[s] for s in rows], device=DEVICE)
    x = torch.stack([sig[s, pos[s]:pos[s] + n] for s in rows])
    got = conv(x, None if in_order else torch.tensor(rows, device=DEVICE), start)
    ref = torch.stack([want[s, pos[s]:pos[s] + n] for s in rows])
    assert_close(f"rows {rows} at {[pos[s] for s in rows]}", got, ref, dtype)
    for s in rows:
        pos[s] += n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_grouped_conv_over_a_ring(dtype, tiles, monkeypatch):
    """WavLM's positional conv streaming from a ring (`grouped_ring_conv`): streams stepped in
    any order and subsets, at their own positions (fresh, before the ring first wraps, after
    many wraps), rows idx or in order (with the residual), few rows, GEMM tiles (17 x 4 rows)
    and a long run the kernel cannot write itself; every step equals the float64 conv over the
    whole stream."""
    import fastfocal.kernels.linear as lin
    monkeypatch.setattr(lin, "GEMM_TILE_OVERRIDE", GEMM_TILES[tiles])
    S, L, C, O, G, k, T = 18, 80, 32, 32, 2, 7, 4  # O = C: the residual x fits
    R = 16  # >= k - 1 + T: a 4-frame step writes its frames in the kernel
    sig = rand(S, L, C, dtype=dtype, device=DEVICE)
    w = rand(O, C // G, k, dtype=dtype, device=DEVICE, scale=(C // G * k) ** -0.5)
    b = rand(O, dtype=dtype, device=DEVICE)
    want = _stream_ref(*f64(sig, w, b), k)
    wkc = w.permute(0, 2, 1).reshape(O, -1)
    ring = torch.zeros(S, R, C, dtype=dtype, device=DEVICE)
    pos = [0] * S

    def conv(x, idx, start):  # in order: with the residual after the GELU, as WavLM adds it
        if idx is None:
            return lin.grouped_ring_conv(x, wkc, k, G, ring, None, start, b, "gelu_then_res", x) - x
        return lin.grouped_ring_conv(x, wkc, k, G, ring, idx, start, b, "gelu")

    for _ in range(6):
        _step_streams(conv, want, sig, pos, [5], T, False, dtype)  # stream 5 alone: 24 frames, the ring wrapped
    _step_streams(conv, want, sig, pos, [5, 0, 9], T, False, dtype)  # fresh rows beside a wrapped one
    _step_streams(conv, want, sig, pos, [0, 9], 1, False, dtype)  # 1 frame: frames before stream 0's first still read slot 0
    _step_streams(conv, want, sig, pos, list(range(1, S)), T, False, dtype)  # 68 rows: GEMM tiles
    _step_streams(conv, want, sig, pos, [9, 5, 0], 12, False, dtype)  # 12 > R - (k - 1): the frames written after
    _step_streams(conv, want, sig, pos, list(range(S)), T, True, dtype)
    with pytest.raises(ValueError, match="power of two"):
        lin.grouped_ring_conv(sig[:1, :T].contiguous(), wkc, k, G, torch.zeros(1, 12, C, dtype=dtype, device=DEVICE),
                              None, torch.zeros(1, dtype=torch.long, device=DEVICE), b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_ring_conv_with_the_devices_tiles(dtype, monkeypatch):
    """The positional conv's ring form with the tiles a GPU launch picks (the interpreter's own
    choice is whole rows in few programs), at the model's 64 channels a group and K = 2,112, where
    those tiles are capped for registers: 16 x 256 few-row slabs in 16-bit, 32-row GEMM tiles in
    fp32. Each step against the float64 conv over the whole stream."""
    import fastfocal.kernels.linear as lin
    from helpers import device_tiles

    picked = device_tiles(monkeypatch)
    S, L, C, G, k, T = 18, 24, 128, 2, 33, 4
    sig = rand(S, L, C, dtype=dtype, device=DEVICE)
    w = rand(C, C // G, k, dtype=dtype, device=DEVICE, scale=(C // G * k) ** -0.5)
    b = rand(C, dtype=dtype, device=DEVICE)
    want = _stream_ref(*f64(sig, w, b), k)
    wkc = w.permute(0, 2, 1).reshape(C, -1)
    ring = torch.zeros(S, 64, C, dtype=dtype, device=DEVICE)
    pos = [0] * S

    def conv(x, idx, start):
        return lin.grouped_ring_conv(x, wkc, k, G, ring, idx, start, b, "gelu")

    for _ in range(3):
        _step_streams(conv, want, sig, pos, [5, 0], T, False, dtype)  # few rows
    _step_streams(conv, want, sig, pos, list(range(1, S)), T, False, dtype)  # 68 rows: GEMM tiles
    few, many = picked[0], picked[-1]
    assert few[2] == 256 and few[0] <= lin.FEW_ROWS  # 16-bit took 512 uncapped (fp32: 256 either way)
    assert many[0] == (32 if dtype == torch.float32 else 128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("replicate", [True, False])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_causal_conv_over_a_ring(dtype, replicate, tiles, monkeypatch):
    """A dense causal conv (the decoder's embedding: zero padding; or replicating the first
    frame) streaming from a ring (`causal_ring_conv`): streams in any order and subsets, at
    their own positions, fresh and wrapped, rows idx or in order, GEMM tiles, and a long run
    the kernel cannot write itself; every step equals the float64 conv over the whole stream."""
    import fastfocal.kernels.linear as lin
    monkeypatch.setattr(lin, "GEMM_TILE_OVERRIDE", GEMM_TILES[tiles])
    S, L, C, N, k, T, R = 18, 60, 24, 40, 7, 4, 16
    sig = rand(S, L, C, dtype=dtype, device=DEVICE)
    w = rand(N, C, k, dtype=dtype, device=DEVICE, scale=(C * k) ** -0.5)
    b = rand(N, dtype=dtype, device=DEVICE)
    want = _stream_ref(*f64(sig, w, b), k, replicate, gelu=False)
    wkc = w.permute(0, 2, 1).reshape(N, -1)
    ring = rand(S, R, C, dtype=dtype, device=DEVICE)  # whatever a closed stream left: never read before its frames
    pos = [0] * S

    def conv(x, idx, start):
        return lin.causal_ring_conv(x, wkc, k, ring, idx, start, b, replicate)

    for _ in range(5):
        _step_streams(conv, want, sig, pos, [3], T, False, dtype)  # 20 frames: the ring wrapped
    _step_streams(conv, want, sig, pos, [3, 0, 7], T, False, dtype)
    _step_streams(conv, want, sig, pos, [0, 7], 2, False, dtype)  # still before frame k - 1
    _step_streams(conv, want, sig, pos, list(range(1, S)), T, False, dtype)  # 68 rows: GEMM tiles
    _step_streams(conv, want, sig, pos, [7, 3], 13, False, dtype)  # 13 > R - (k - 1): written after the reads
    _step_streams(conv, want, sig, pos, list(range(S)), T, True, dtype)
