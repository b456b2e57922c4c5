"""Every kernel configuration the launchers use compiles for an H100 (sm_90) down to SASS, on
any machine: triton ships ptxas. Catches what the interpreter cannot (types the compiler
rejects, unsupported ops, register spills show in the printed table)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_kernels_compile_for_sm90(pdl):
    """pdl: as FASTFOCAL_PDL=1 launches them; the script also fails a kernel whose PTX lacks the
    grid-dependency wait (or a few-row matmul whose weight prefetch does not come before it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("sm90_compile.py")
    out = subprocess.run([sys.executable, str(script), "--quick", "--arch", "90"] + (["--pdl"] if pdl else []),
                         capture_output=True, text=True, env=env, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "FAIL" not in out.stdout
