"""Record the golden fixtures: compute every value of tests/golden/compute.py and write golden.json
(golden-amx.json on a CPU with AMX: the exact values differ by CPU kind, compute.cpu_kind).

    python tests/golden/record.py                  # everything
    python tests/golden/record.py --only smollm2   # one section, keeping the others as recorded

Run it from a checkout: it imports lmlab from the checkout it lives in, not from an installed copy.
tests/test_golden.py recomputes the same values and demands exact (or 1e-9-relative) agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the checkout's lmlab; tests/ for golden.compute

from golden.compute import SECTIONS, cpu_kind, golden_file  # noqa: E402

GOLDEN = golden_file()  # golden.json, or golden-amx.json when recorded on a CPU with AMX


def dumps(x, indent: str = "") -> str:
    """JSON with one line per list of scalars (readable diffs), floats as repr (exact round trip)."""
    inner = indent + "  "
    if isinstance(x, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in x) + "\n" + indent + "]"
    return json.dumps(x, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(SECTIONS), action="append", help="re-record only this section")
    args = p.parse_args(argv)
    import torch

    import lmlab

    out = json.loads(GOLDEN.read_text()) if args.only and GOLDEN.is_file() else {}
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        out[name] = SECTIONS[name]()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"lmlab from {Path(lmlab.__file__).parent}", file=sys.stderr)
    # bit-exact values hold for one software stack and CPU kind: what they were recorded on
    out["recorded_with"] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                            "cpu_kind": cpu_kind()}
    out = {k: out[k] for k in [*SECTIONS, "recorded_with"] if k in out}
    fd, tmp = tempfile.mkstemp(dir=HERE, prefix=".golden-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dumps(out) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, GOLDEN)
    print(f"wrote {GOLDEN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
