#!/usr/bin/env bash
# make sanitize: build the C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer in
# its own tree (build/sanitize/: a copy of the sources; the normal in-place build is not
# touched) and run the CPU tests against it, with libasan preloaded into the (uninstrumented)
# Python. Any ASan report or UBSan finding fails the run (halt_on_error). A separate target,
# not part of `make test`: the build takes ~5-10 min on 2 cores and the tests run ~3x slower.
#
#   scripts/sanitize.sh [pytest args...]     (default: the CPU op and layer tests)
#   PY=path/to/python  SANITIZE_JOBS=2       (the venv's python; parallel compile jobs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/sanitize"
TREE="$OUT/tree"
CXX_REAL="${CXX_REAL:-g++}"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

# the sources and the tests, not the in-place extension or caches (cp -p keeps the times, so
# the build in $OUT/tmp stays incremental between runs)
rm -rf "$TREE"
mkdir -p "$TREE"
cp -a "$ROOT/csrc" "$ROOT/pysparse" "$ROOT/tests" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$TREE/"
find "$TREE" \( -name '*.so' -o -name '*.o' \) -delete
find "$TREE" -name '__pycache__' -prune -exec rm -rf {} +

# One compiler wrapper for every step (distutils uses CC, torch's ninja build CXX, the ISA
# units and the link too), so no object escapes the sanitizers whatever flags the build adds.
cat > "$OUT/cxx" <<WRAP
#!/bin/sh
exec $CXX_REAL $SAN "\$@"
WRAP
chmod +x "$OUT/cxx"

echo "sanitize: building pysparse._C with ASan + UBSan in $TREE (MAX_JOBS=${SANITIZE_JOBS:-2})"
(cd "$TREE" && CC="$OUT/cxx" CXX="$OUT/cxx" LDSHARED="$OUT/cxx -shared" MAX_JOBS="${SANITIZE_JOBS:-2}" \
  "$PY" setup.py -q build_ext --inplace --build-temp "$OUT/tmp")

SO="$(ls "$TREE"/pysparse/_C*.so)"
if [ "$(nm -D "$SO" | grep -c __asan_report)" = 0 ]; then  # (grep -q would SIGPIPE nm under pipefail)
  echo "sanitize: $SO carries no ASan instrumentation (the wrapper was not used?)" >&2
  exit 1
fi

LIBASAN="$($CXX_REAL -print-file-name=libasan.so)"
LIBUBSAN="$($CXX_REAL -print-file-name=libubsan.so)"
if [ "$#" -eq 0 ]; then
  set -- tests/test_int8_linear.py tests/test_bsr_linear.py tests/test_int8_conv2d.py tests/test_compact_conv2d.py \
    tests/test_cpu_dispatch.py tests/test_layer_configs.py tests/test_ops_hypothesis.py tests/test_save_load.py \
    tests/test_concurrency.py -k "not faster_than_one"
fi
echo "sanitize: running $* with LD_PRELOAD=$LIBASAN"
# detect_leaks=0: CPython and torch keep allocations to exit by design (LeakSanitizer would
# report them all); everything else halts at the first finding.
cd "$TREE"
LD_PRELOAD="$LIBASAN $LIBUBSAN" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:verify_asan_link_order=0:strict_init_order=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
PYTHONPATH="$TREE" PYTHONDONTWRITEBYTECODE=1 \
  "$PY" -m pytest -q -x -p no:cacheprovider "$@"
echo "sanitize: clean"
