"""Streaming state past 2**31 elements: the kernels that index a state tensor by slot must
compute those offsets in 64 bits. At the capacity targets one tensor holds more than that: a
layer's K ring is 3.1 G elements at 6,000 full-duplex streams (16 heads x 508 x 64 a slot), a
512-tap focal ring 13 G at 25,000 decode-only streams, the positional-conv ring 2.1 G from
8,192 streams. An int32 product there wraps and reads (or writes) another stream's state.

Each kernel runs on rows at the last slot of such a tensor and at slot 1, and must give what
it gives on a two-slot copy of those rows, bit for bit. The big tensors are `torch.empty` and
only the used slots are written, so on CPU they cost address space, not memory (the
interpreter works on them in place). A wrapped offset points outside the tensor: the
interpreter then crashes the test's process (checked by loading each kernel's slot index as
int32: every test here fails that way)."""
import math

import pytest
import torch
from conftest import DEVICE
from kernel_checks import assert_equal

from fastfocal.kernels import focal_context as focal_module
from fastfocal.kernels import linear as lin
from fastfocal.kernels.attention import rel_attention
from fastfocal.kernels.focal_context import focal_context, ring_len

DTYPE = torch.bfloat16  # 2 bytes an element: 4.3 GB of address space a big tensor


def slots_past(tail: tuple[int, ...]) -> int:
    """Slots of shape `tail` for the last one to start past element 2**31."""
    return 2 ** 31 // math.prod(tail) + 2


def big_state(tail: tuple[int, ...], g: torch.Generator, S: int | None = None):
    """(S slots of shape `tail`, by default the last past element 2**31; rows [last slot, 1];
    a 2-slot copy of them)."""
    S = S or slots_past(tail)
    state = torch.empty(S, *tail, dtype=DTYPE, device=DEVICE)
    slots = torch.tensor([S - 1, 1], device=DEVICE)
    for s in slots.tolist():
        state[s] = torch.randn(*tail, generator=g).to(DEVICE, DTYPE)
    return state, slots, state[slots].clone()


def rand(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)


def test_attention_rings():
    H, d, R, T = 2, 16, 28, 4
    g = torch.Generator().manual_seed(0)
    kr, slots, kc = big_state((H, R, d), g)
    vr, _, vc = big_state((H, R, d), g)
    p = [rand(8, d, g=g), rand(8, g=g), rand(1, H, 1, 1, g=g), rand(320, H, g=g)]
    start = torch.tensor([1000, 6], device=DEVICE)  # a wrapped ring and one inside its first window
    two = torch.arange(2, device=DEVICE)
    for step in range(2):
        qkv, y = rand(2, T, 3 * H * d, g=g), rand(2, T, H * d, g=g)
        got = rel_attention(qkv, y, *p, H, start, 4, R + 4, 320, 800, kr, vr, slots)
        want = rel_attention(qkv, y, *p, H, start, 4, R + 4, 320, 800, kc, vc, two)
        assert_equal(f"attention step {step}", got, want)
        assert_equal(f"k ring step {step}", kr[slots], kc)
        assert_equal(f"v ring step {step}", vr[slots], vc)
        start = start + T


@pytest.mark.parametrize("form", ["fused", "window-rows"])
def test_focal_rings(form, monkeypatch):
    """The step kernel, and the many-row form (window taps as a GEMM over the rows, then the
    rows kernel); the 512-tap level's ring is the big one."""
    monkeypatch.setattr(focal_module, "WINDOW_ROWS", 1 if form == "window-rows" else 10 ** 9)
    C, T, ks = 8, 4, [14, 18, 512]
    g = torch.Generator().manual_seed(1)
    S = slots_past((C, ring_len(ks[-1])))  # one slot count for the three rings
    rings = [big_state((C, ring_len(k)), g, S) for k in ks]
    slots = rings[0][1]
    ws = [rand(C, 1, k, g=g, scale=k ** -0.5) for k in ks]
    bs = [rand(C, g=g, scale=0.1) for _ in ks]
    start = torch.tensor([5000, 3], device=DEVICE)
    two = torch.arange(2, device=DEVICE)
    for step in range(2):
        h = rand(2, T, 2 * C + 3, g=g)
        ctx, gates = h[..., C:2 * C], h[..., 2 * C:]
        got = focal_context(ctx, gates, ws, bs, True, [r[0] for r in rings], slots, start)
        want = focal_context(ctx, gates, ws, bs, True, [r[2] for r in rings], two, start)
        assert_equal(f"focal step {step}", got, want)
        for lvl, (state, _, compact) in enumerate(rings):
            assert_equal(f"level-{lvl} ring step {step}", state[slots], compact)
        start = start + T


def test_positional_conv_ring():
    """WavLM's positional conv over its time-major ring (S, 256, C), grouped windows in place."""
    C, G, k, T, R = 64, 2, 33, 4, 64
    g = torch.Generator().manual_seed(2)
    ring, slots, compact = big_state((R, C), g)
    wkc = rand(C, k * C // G, g=g, scale=(C // G * k) ** -0.5)
    b = rand(C, g=g)
    start = torch.tensor([700, 9], device=DEVICE)
    two = torch.arange(2, device=DEVICE)
    for step in range(2):
        x = rand(2, T, C, g=g)
        got = lin.grouped_ring_conv(x, wkc, k, G, ring, slots, start, b, "gelu")
        want = lin.grouped_ring_conv(x, wkc, k, G, compact, two, start, b, "gelu")
        assert_equal(f"positional conv step {step}", got, want)
        assert_equal(f"ring step {step}", ring[slots], compact)
        start = start + T
