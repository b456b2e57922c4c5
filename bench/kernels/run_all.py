"""Every kernel benchmark in one command; rows appended to bench/results/kernels.jsonl.

    python bench/kernels/run_all.py [--quick] [--dtypes bfloat16 float32] [--no-compile] [--only attention norm]
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BENCHES = ["focal_context", "attention", "linear", "norm", "epilogue", "modulate", "bsq", "convnext"]


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=BENCHES)
    args, rest = ap.parse_known_args(argv)
    failed = []
    for name in args.only or BENCHES:
        t = time.time()
        mod = importlib.import_module(f"bench_{name}")
        try:
            mod.main(name, mod.cases, mod.make, rest)
        except Exception as e:  # one broken bench must not hide the others' numbers
            print(f"[{name}] FAILED: {type(e).__name__}: {e}")
            failed.append(name)
        print(f"[{name}] {time.time() - t:.0f} s")
    if failed:
        print("failed:", " ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
