#!/usr/bin/env bash
# ctest consumer_cmake: configure consumer_cmake/ (find_package(nccl_ep CONFIG REQUIRED)) against
# the installed package, build, check that it links libnccl_ep.so.0 from the prefix, run it.
# usage: consumer_cmake.sh PREFIX WORKDIR CMAKE CC "WARNING FLAGS" "DEP_INCLUDE_DIRS (;-list)" SOURCE_DIR
set -euo pipefail
prefix="$1" work="$2" cmake="$3" cc="$4" warn="$5" deps="$6" src="$7"
unset LD_LIBRARY_PATH
rm -rf "$work"
"$cmake" -S "$src/consumer_cmake" -B "$work" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" \
  -DCMAKE_C_FLAGS="$warn" -DCMAKE_C_STANDARD=11 "-Dnccl_ep_EXTRA_INCLUDE_DIRS=$deps"
"$cmake" --build "$work"
exe="$work/consumer"
readelf -d "$exe" | grep -c 'NEEDED.*\[libnccl_ep\.so\.0\]' >/dev/null ||
  { echo "consumer does not record NEEDED libnccl_ep.so.0" >&2; readelf -d "$exe" >&2; exit 1; }
ldd "$exe" | grep -c "libnccl_ep.so.0 => $prefix/lib/libnccl_ep.so.0" >/dev/null ||
  { echo "consumer does not load $prefix/lib/libnccl_ep.so.0" >&2; ldd "$exe" >&2; exit 1; }
"$exe"
# a version the package cannot satisfy must be refused
if "$cmake" -S "$src/consumer_cmake" -B "$work-v9" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" \
     "-Dnccl_ep_EXTRA_INCLUDE_DIRS=$deps" -DNCCL_EP_WANT=9.0 >/dev/null 2>&1; then
  echo "find_package(nccl_ep 9.0) unexpectedly succeeded" >&2; exit 1
fi
echo "consumer_cmake: ok"
