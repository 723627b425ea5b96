#!/usr/bin/env bash
# Build KenLM's `lmplz` and `query` from the PyPI `kenlm` sdist, and install the `kenlm` Python
# module, for the n-gram parity tests (tests/test_ngram.py, tests/test_arpa.py). Idempotent: a second run that
# finds both in place does nothing. apt-get and the install into $KENLM_BIN run as root, or through sudo;
# the build takes a few minutes on 2 cores. .ci/setup-tests.sh runs it.
#
#   bash .ci/build_kenlm.sh            # puts lmplz and query in $KENLM_BIN (default /usr/local/bin)
set -euo pipefail
KENLM_VERSION="${KENLM_VERSION:-0.3.0}"
KENLM_BIN="${KENLM_BIN:-/usr/local/bin}"
WORK="${KENLM_BUILD_DIR:-${TMPDIR:-/tmp}/lmlab-kenlm-build}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"  # the interpreter the tests run under
pip() { "$PYTHON" -m pip "$@"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# (lmplz --help exits 1, so look for its usage text: that proves it runs and finds its libraries)
have_bins() { [ -x "$KENLM_BIN/lmplz" ] && [ -x "$KENLM_BIN/query" ] && { "$KENLM_BIN/lmplz" --help 2>&1 || true; } | grep -q discount_fallback; }
have_module() { "$PYTHON" -c "import kenlm" >/dev/null 2>&1; }

if have_bins && have_module; then
  echo "kenlm: lmplz, query and the Python module are already installed"
  exit 0
fi

# Build dependencies from Debian (KenLM's CMakeLists asks for these four Boost components).
PKGS="build-essential cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev
      libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

mkdir -p "$WORK"
SDIST="$WORK/kenlm-$KENLM_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PYTHON" -c "import setuptools, wheel" 2>/dev/null || pip install -q setuptools wheel
  # --no-build-isolation: preparing metadata must not build cmake from source (2 cores, ~15 min).
  pip download -q --no-deps --no-binary kenlm --no-build-isolation -d "$WORK" "kenlm==$KENLM_VERSION"
fi

if ! have_module; then
  pip install -q "$SDIST"
fi

if ! have_bins; then
  SRC="$WORK/kenlm-$KENLM_VERSION"
  [ -d "$SRC" ] || tar -xzf "$SDIST" -C "$WORK"
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=6 >/dev/null
  cmake --build "$SRC/build" --target lmplz query -j "$(nproc)"
  if mkdir -p "$KENLM_BIN" 2>/dev/null && [ -w "$KENLM_BIN" ]; then
    install -m 0755 "$SRC/build/bin/lmplz" "$SRC/build/bin/query" "$KENLM_BIN/"
  else
    as_root install -d "$KENLM_BIN"
    as_root install -m 0755 "$SRC/build/bin/lmplz" "$SRC/build/bin/query" "$KENLM_BIN/"
  fi
fi

have_bins && have_module
echo "kenlm: lmplz and query in $KENLM_BIN, and the kenlm Python module"
