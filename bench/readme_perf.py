"""Regenerate the README's Performance section from the latest bench/results/e2e-*.md files.

    python bench/readme_perf.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def main():
    parts = []
    for md in sorted((ROOT / "bench" / "results").glob("e2e-*.md")):
        kind = "GPU" if md.stem.startswith("e2e-gpu") else "CPU"
        parts.append(f"#### {kind}: `{md.relative_to(ROOT)}`\n\n" + md.read_text().strip() + "\n")
    if not parts:
        parts = ["No results yet: run `python bench/e2e.py`.\n"]
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:a] + "\n" + "\n".join(parts) + text[b:])
    print(f"updated {readme} from {len(parts)} result file(s)")


if __name__ == "__main__":
    main()
