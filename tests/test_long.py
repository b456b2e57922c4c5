"""Long inputs: causal encoding memory grows O(T·window), not O(T²)."""
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import resource, torch, fastfocal
    c = fastfocal.load({model!r}, device="cpu")
    sig = torch.randn(1, 10 * 60 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    toks = c.sig_to_toks(sig)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(toks.shape[1], (r1 - r0) // 1024)
    """
)


def test_ten_minutes_in_bounded_memory(data_dir):
    # 30,000 frames: a T x T bias alone would take 30000² x 4 heads x 4 B = 14 GB
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(model=str(data_dir / "tiny_causal"))],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
    )
    assert out.returncode == 0, out.stderr
    n_tok, extra_mb = map(int, out.stdout.split())
    assert n_tok == 30000
    assert extra_mb < 1024, f"encoding 10 min took {extra_mb} MB beyond the model"
