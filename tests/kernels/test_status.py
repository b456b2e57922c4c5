"""One-launch per-row error codes against the torch form (status.row_status_ref)."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES

from fastfocal.inputs import MAX_AMPLITUDE
from fastfocal.kernels.status import row_status, row_status_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_audio", [True, False])
def test_row_status_matches_the_torch_codes(dtype, with_audio):
    B = 9
    audio = (torch.randn(B, 1280) * 0.1).to(DEVICE)
    lats = torch.randn(B, 4, 12).to(DEVICE, dtype)
    outs = torch.randn(B, 1920).to(DEVICE, dtype)[:, ::2]  # a strided product
    audio[1, 7] = float("nan")
    audio[2, 1279] = float("inf")
    audio[3, 0] = MAX_AMPLITUDE * 1.5
    audio[4, 5] = -MAX_AMPLITUDE * 1.01
    audio[5, 5] = MAX_AMPLITUDE  # at the limit: fine
    lats[6, 3, 11] = float("nan")
    outs[7, 959] = float("-inf")
    lats[1, 0, 0] = float("inf")  # bad input wins over bad output
    lats[3, 0, 0] = float("nan")  # out of range wins over bad output
    a = audio if with_audio else None
    got = row_status(a, [lats, outs], MAX_AMPLITUDE, B)
    want = row_status_ref(a, [lats, outs], MAX_AMPLITUDE, B)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want.cpu()), f"{got.tolist()} vs {want.tolist()}"
    expect = [0, 1, 1, 2, 2, 0, 3, 3, 0] if with_audio else [0, 3, 0, 3, 0, 0, 3, 3, 0]
    assert got.tolist() == expect


def test_row_status_audio_only_and_no_rows():
    audio = torch.zeros(3, 4000, device=DEVICE)
    audio[2, 3999] = float("nan")  # past the first block
    assert row_status(audio, [], MAX_AMPLITUDE, 3).tolist() == [0, 0, 1]
    assert row_status(audio[:0], [], MAX_AMPLITUDE, 0).numel() == 0


@pytest.mark.parametrize("with_idx", [True, False])
def test_row_status_advances_the_frame_counts(with_idx):
    """The status launch also does the stages' pos[idx] = start + n (each its own n), rows idx or
    in order; the other slots and the codes are untouched."""
    from fastfocal.kernels.status import apply_advances_ref

    B, S = 3, 6
    idx = torch.tensor([4, 0, 2], device=DEVICE) if with_idx else None
    audio = (torch.randn(B, 1280) * 0.1).to(DEVICE)
    audio[1, 3] = float("nan")
    pos = [torch.arange(S if with_idx else B, device=DEVICE) * 10 + j for j in range(4)]
    starts = [torch.tensor([7, 0, 123], device=DEVICE) + j for j in range(4)]
    adv = [(p, idx, s, n) for p, s, n in zip(pos, starts, (4, 4, 1, 8))]
    want = [p.clone() for p in pos]
    apply_advances_ref([(p, idx, s, n) for p, s, n in zip(want, starts, (4, 4, 1, 8))])
    rows = idx.tolist() if with_idx else list(range(B))
    for w, s, n in zip(want, starts, (4, 4, 1, 8)):  # the reference, against plain indexing
        assert w[rows].tolist() == (s + n).tolist()
    got = row_status(audio, [], MAX_AMPLITUDE, B, adv)
    assert torch.equal(got.cpu(), row_status_ref(audio, [], MAX_AMPLITUDE, B).cpu())
    for p, w in zip(pos, want):
        assert torch.equal(p, w), (p.tolist(), w.tolist())
    with pytest.raises(ValueError, match="one slot index"):
        row_status(audio, [], MAX_AMPLITUDE, B, [(pos[0], idx, starts[0], 1), (pos[1], torch.arange(B), starts[1], 1)])
