"""Running KenLM's command-line tools (built by .ci/build_kenlm.sh) in tests; finding them is tests/peers.py's
(`$KENLM_BIN` when set, else `$PATH`, else /usr/local/bin)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from peers import needs, require_binary

needs_lmplz = needs("lmplz")


def kenlm_tool(name: str) -> str:
    """The path of `lmplz` or `query`, or skip (fail under $LMLAB_REQUIRE_PEERS) naming it."""
    return require_binary(name)


def run_lmplz(lines: list[str], order: int, tmp: Path, *extra: str) -> tuple[Path, str]:
    text = tmp / "train.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    arpa = tmp / f"lmplz{order}.arpa"
    with open(text, "rb") as fin, open(arpa, "wb") as fout:
        proc = subprocess.run([kenlm_tool("lmplz"), "-o", str(order), "-S", "100M", "-T", str(tmp), *extra],
                              stdin=fin, stdout=fout, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return arpa, proc.stderr.decode()


def arpa_entries(path: Path) -> dict[str, tuple[float, float]]:
    out, section = {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.endswith("-grams:"):
                section = True
            elif line.startswith("\\"):
                section = False
            elif section and line:
                parts = line.split("\t")
                out[parts[1]] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    return out


def assert_same_arpa(ours: Path, ref: Path, tol: float = 1e-6) -> None:
    a, b = arpa_entries(ours), arpa_entries(ref)
    assert a.keys() == b.keys()
    worst = max(max(abs(a[k][0] - b[k][0]), abs(a[k][1] - b[k][1])) for k in b)
    assert worst < tol, worst
