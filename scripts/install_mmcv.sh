#!/usr/bin/env bash
# Replaces mmcv-lite by mmcv with its compiled ops (RoIAlign, NMS, DeformConv, RoIPool, ...) in the given
# Python environment. Opt-in (`make mmcv`): vitq's detectors run on mmcv-lite with the RoIAlign and NMS
# kernels that vitq provides through torchvision; detectors that need other mmcv ops need this.
#
# The package index carries only mmcv's source, and building it against a recent torch fails twice
# unless handled: mmcv's setup.py imports pkg_resources (setuptools>=77.0.3,<81 and wheel, built
# with --no-build-isolation), and it hard-codes -std=c++17 while torch>=2.14's headers need C++20
# (scripts/cxx20, passed as CXX). The build takes 17 to 26 minutes on 2 cores, so the wheel is kept
# in a user-level cache keyed by the torch and Python versions; later set-ups install it in seconds.
#
# Usage: scripts/install_mmcv.sh [PYTHON]          (default: .venv/bin/python)
# Environment: VITQ_WHEEL_CACHE (default: ${XDG_CACHE_HOME:-~/.cache}/vitq/wheels),
#              MMCV_VERSION (default: 2.1.0; mmdet 3.3.0 needs >=2.0.0rc4,<2.2.0),
#              MAX_JOBS (default: 2), VITQ_REAL_CXX (default: c++).
# A CUDA build (GPU clusters): set MMCV_WITH_CUDA=1; see docs/coco.md.
set -euo pipefail

PY="${1:-.venv/bin/python}"
t0=$(date +%s)
MMCV_VERSION="${MMCV_VERSION:-2.1.0}"
here="$(cd "$(dirname "$0")" && pwd)"

if "$PY" - "$MMCV_VERSION" <<'PYEOF' 2>/dev/null
import sys
import mmcv
import mmcv._ext  # noqa: F401  (the compiled ops; mmcv-lite lacks them)
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
PYEOF
then
  echo "mmcv $MMCV_VERSION with compiled ops is already installed"
  exit 0
fi

key="$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}")')"
cuda_tag=""
if [ "${MMCV_WITH_CUDA:-0}" = "1" ]; then cuda_tag="-cuda"; fi
cache="${VITQ_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vitq/wheels}/${key}${cuda_tag}"
wheel="$(ls "$cache"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"

# Build requirements stay in the environment: mmcv and mmengine import pkg_resources at run time too.
"$PY" -m pip install -q "setuptools>=77.0.3,<81" wheel ninja

if [ -z "$wheel" ]; then
  echo "building mmcv $MMCV_VERSION for $key (no cached wheel in $cache; 17 to 26 minutes on 2 cores)"
  start=$(date +%s)
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  if [ "${MMCV_WITH_CUDA:-0}" = "1" ]; then
    export FORCE_CUDA=1
  else
    export FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=""
  fi
  # --no-cache-dir: pip's own wheel cache is keyed by the source, not by the torch it was built against
  CXX="$here/cxx20" MAX_JOBS="${MAX_JOBS:-2}" MMCV_WITH_OPS=1 \
    "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$tmp" "mmcv==$MMCV_VERSION"
  mkdir -p "$cache"
  built="$(ls "$tmp"/mmcv-*.whl)"
  # Copy then rename, so a concurrent set-up never sees a half-written wheel.
  cp "$built" "$cache/.partial.$$" && mv "$cache/.partial.$$" "$cache/$(basename "$built")"
  wheel="$cache/$(basename "$built")"
  echo "built $wheel in $(( $(date +%s) - start )) s"
else
  echo "installing cached $wheel"
fi

# mmcv-lite and mmcv install the same `mmcv` package: remove the lite one first (pip install mmcv-lite undoes this)
"$PY" -m pip uninstall -q -y mmcv-lite mmcv 2>/dev/null || true
"$PY" -m pip install -q "$wheel"
"$PY" -c 'import mmcv, mmcv._ext; from mmcv.ops import RoIAlign, nms; print("mmcv", mmcv.__version__, "compiled ops ok")'
echo "mmcv ready in $(( $(date +%s) - t0 )) s"
