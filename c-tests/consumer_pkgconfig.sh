#!/usr/bin/env bash
# ctest consumer_pkgconfig: build consumer.c against the installed package with
# `pkg-config --cflags --libs nccl_ep`, check that it links libnccl_ep.so.0 from the prefix, run it.
# usage: consumer_pkgconfig.sh PREFIX WORKDIR CC "WARNING FLAGS" "DEP_INCLUDE_DIRS (;-list)" SOURCE
set -euo pipefail
prefix="$1" work="$2" cc="$3" warn="$4" deps="$5" src="$6"
unset LD_LIBRARY_PATH
mkdir -p "$work"
lib="$prefix/lib"
# the installed layout
[[ "$(readlink "$lib/libnccl_ep.so")" == libnccl_ep.so.0 ]]
[[ "$(readlink "$lib/libnccl_ep.so.0")" == libnccl_ep.so.0.1.0 ]]
[[ -f "$lib/libnccl_ep.so.0.1.0" && -f "$prefix/include/nccl_ep.h" && -f "$prefix/include/nccl_ep_ext.h" ]]
[[ -f "$prefix/include/nccl_ep/ep_enums.h" ]]

export PKG_CONFIG_PATH="$lib/pkgconfig"
pkg-config --exists --print-errors nccl_ep
[[ "$(pkg-config --modversion nccl_ep)" == 0.1.0 ]]
cflags="$(pkg-config --cflags nccl_ep)"
libs="$(pkg-config --libs nccl_ep)"
libdir="$(pkg-config --variable=libdir nccl_ep)"
echo "pkg-config --cflags --libs nccl_ep: $cflags $libs"
extra=()
IFS=';' read -r -a dirs <<<"$deps"
for d in "${dirs[@]}"; do [[ -n "$d" ]] && extra+=("-I$d"); done
# shellcheck disable=SC2086 # flags are word lists
"$cc" -std=c11 $warn $cflags "${extra[@]}" "$src" -o "$work/consumer_pc" $libs "-Wl,-rpath,$libdir"
readelf -d "$work/consumer_pc" | grep -c 'NEEDED.*\[libnccl_ep\.so\.0\]' >/dev/null ||
  { echo "consumer_pc does not record NEEDED libnccl_ep.so.0" >&2; readelf -d "$work/consumer_pc" >&2; exit 1; }
ldd "$work/consumer_pc" | grep -c "libnccl_ep.so.0 => $libdir/libnccl_ep.so.0" >/dev/null ||
  { echo "consumer_pc does not load $libdir/libnccl_ep.so.0" >&2; ldd "$work/consumer_pc" >&2; exit 1; }
"$work/consumer_pc"
