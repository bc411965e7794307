#!/usr/bin/env bash
# Sanitizer run: builds ktmoe with AddressSanitizer + UndefinedBehaviorSanitizer
# (meson's b_sanitize=address,undefined) into its own virtual environment and runs the
# kernel test grid under it, on every ISA path this CPU has (the tests parametrize over
# ktmoe.available_isas()). libasan is LD_PRELOADed into the (uninstrumented) python, so
# numpy's and the kernel's allocations get red zones. Every sanitizer report goes to a log
# file under $KTMOE_SAN_LOGS; the script prints the reports and exits 1 if there is any,
# or if a test fails.
#
#   tests/sanitize.sh                      # the kernel grid (see TESTS below)
#   tests/sanitize.sh tests/test_gemm.py   # other test files / pytest arguments
#
# Environment: KTMOE_SAN_ASAN_OPTIONS (appended to ASAN_OPTIONS, later options win, e.g.
# detect_stack_use_after_return=0), KTMOE_SAN_VENV (default /tmp/ktmoe-san-venv, reused when it exists:
# KTMOE_SAN_FRESH=1 rebuilds it), KTMOE_SAN_LOGS (default /tmp/ktmoe-san-logs).
# Needs gcc's libasan / libubsan and network access to PyPI (or a local index) once.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

venv=${KTMOE_SAN_VENV:-/tmp/ktmoe-san-venv}
logs=${KTMOE_SAN_LOGS:-/tmp/ktmoe-san-logs}
TESTS=(tests/test_kernel_vs_reference.py tests/test_quantized.py tests/test_bad_input.py
       tests/test_properties.py tests/test_guard_pages.py)
[ $# -gt 0 ] && TESTS=("$@")

if [ "${KTMOE_SAN_FRESH:-0}" = 1 ] || [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy ml_dtypes pytest pytest-benchmark hypothesis \
        meson-python meson ninja cython
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# a non-editable build with the sanitizers (debugoptimized: -O2 -g, asserts on)
pip install -q --no-build-isolation --no-deps --force-reinstall \
    -Csetup-args=-Db_sanitize=address,undefined -Csetup-args=-Dbuildtype=debugoptimized \
    -Csetup-args=-Db_ndebug=false -Cbuild-dir=build/sanitize .
echo "build: $(( $(date +%s) - start )) s"

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$asan" ] && [ -f "$ubsan" ] || { echo "sanitize.sh: libasan / libubsan not found" >&2; exit 2; }
rm -rf "$logs"; mkdir -p "$logs"
# leaks: CPython and numpy keep allocations alive until exit by design, so leak detection
# is off; every other ASan error stops the process, UBSan reports are logged and counted
export ASAN_OPTIONS="detect_leaks=0:log_path=$logs/asan:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${KTMOE_SAN_ASAN_OPTIONS:+:$KTMOE_SAN_ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$logs/ubsan"
export LD_PRELOAD="$asan $ubsan"
# (from / : in the checkout, `python -c` would import the uncompiled source tree)
(cd / && python -c "import ktmoe; print('sanitized ktmoe', ktmoe.__file__, 'paths', ktmoe.available_isas())")
# the sanitizer must be live: a deliberate read past a numpy array by the kernel library
# (kt_find_bad_id over 16 ids too many) has to give an ASan heap-buffer-overflow report
canary=$(mktemp -d)
(cd / && ASAN_OPTIONS="detect_leaks=0:log_path=$canary/asan" python -c "
import numpy as np
from ktmoe._kernels import _core
a = np.zeros(1000, np.int32)
_core.find_bad_id(a.__array_interface__['data'][0], 'int32', 1016, 4)" 2>/dev/null) || true
if ! grep -qs "heap-buffer-overflow" "$canary"/asan*; then
    echo "sanitize.sh: the ASan canary (read past an array) was not reported: sanitizers are not active" >&2
    exit 2
fi
rm -rf "$canary"
echo "sanitizer canary: reported as expected"
status=0
pytest -q -p no:cacheprovider "${TESTS[@]}" || status=$?
unset LD_PRELOAD

reports=$(find "$logs" -type f | wc -l)
if [ "$reports" -gt 0 ]; then
    echo "sanitize.sh: $reports sanitizer log file(s):"
    for f in "$logs"/*; do echo "== $f"; head -60 "$f"; done
    status=1
else
    echo "sanitize.sh: no sanitizer reports"
fi
echo "sanitize wall time: $(( $(date +%s) - start )) s"
exit $status
