"""Write two more forgetting-probe texts, from sources other than the default probe, for a second opinion.

    python scripts/make_probe_texts.py --out /tmp/probes
    adapters eval outputs/RUN --probe /tmp/probes/python-reference.txt --probe-only

- ``python-reference.txt``: prose of the Python language reference (``pydoc_data.topics``, in every CPython).
- ``licenses.txt``: licence texts of the installed Python packages (legal English; varies with what is installed).

The default probe (stdlib docstrings, adapters/evaluation/forgetting.py) is what runs after every training run;
these are for checking that a setting chosen by looking at the default probe did not just fit that one text. Passages
are filtered as the default probe's are (prose only, at least 200 characters), deterministic for a given machine.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from adapters.evaluation.forgetting import prose_paragraphs


def python_reference() -> list[str]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    return [p for key in sorted(topics) for p in prose_paragraphs(topics[key], seen)]


def licenses() -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            name = Path(str(f)).name.upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING")):
                try:
                    out += prose_paragraphs(Path(dist.locate_file(f)).read_text(encoding="utf-8"), seen)
                except (OSError, UnicodeDecodeError):
                    continue
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/probes", help="directory to write the .txt files to")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, passages in (("python-reference", python_reference()), ("licenses", licenses())):
        if not passages:
            print(f"{name}: no passages found on this machine; skipped", file=sys.stderr)
            continue
        (out / f"{name}.txt").write_text("\n\n".join(passages) + "\n", encoding="utf-8")
        print(f"{out / f'{name}.txt'}: {len(passages)} passages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
