#!/usr/bin/env bash
# usage: scripts/install.sh PREFIX [LIB]   (the `make install` recipe; honours DESTDIR)
# Installs LIB (default target/release/libnccl_ep.so) as PREFIX/lib/libnccl_ep.so.X.Y.Z with the
# links libnccl_ep.so.X and libnccl_ep.so, the three headers, lib/pkgconfig/nccl_ep.pc and the
# CMake package lib/cmake/nccl_ep/. The version comes from NCCL_EP_MAJOR/MINOR/PATCH in nccl_ep.h.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${1:?usage: scripts/install.sh PREFIX [LIB]}"
LIB="${2:-$ROOT/target/release/libnccl_ep.so}"
[[ "$PREFIX" = /* ]] || PREFIX="$(pwd)/$PREFIX"
[[ -f "$LIB" ]] || { echo "install: $LIB does not exist (run make build)" >&2; exit 1; }

ver() { sed -n "s/^#define NCCL_EP_$1 \([0-9][0-9]*\).*/\1/p" "$ROOT/include/nccl_ep.h"; }
MAJOR="$(ver MAJOR)" MINOR="$(ver MINOR)" PATCH="$(ver PATCH)"
VERSION="$MAJOR.$MINOR.$PATCH"
SOVERSION="$MAJOR"
if command -v readelf >/dev/null 2>&1; then
  soname="$(readelf -d "$LIB" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
  [[ "$soname" == "libnccl_ep.so.$SOVERSION" ]] ||
    { echo "install: $LIB has SONAME '$soname', expected libnccl_ep.so.$SOVERSION" >&2; exit 1; }
fi

D="${DESTDIR:-}$PREFIX"
install -d "$D/lib" "$D/include/nccl_ep" "$D/lib/pkgconfig" "$D/lib/cmake/nccl_ep"
install -m 0755 "$LIB" "$D/lib/libnccl_ep.so.$VERSION"
ln -sfn "libnccl_ep.so.$VERSION" "$D/lib/libnccl_ep.so.$SOVERSION"
ln -sfn "libnccl_ep.so.$SOVERSION" "$D/lib/libnccl_ep.so"
install -m 0644 "$ROOT/include/nccl_ep.h" "$ROOT/include/nccl_ep_ext.h" "$D/include/"
install -m 0644 "$ROOT/include/nccl_ep/ep_enums.h" "$D/include/nccl_ep/"
subst() {
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@VERSION@|$VERSION|g" -e "s|@SOVERSION@|$SOVERSION|g" \
      -e "s|@MAJOR@|$MAJOR|g" "$1" >"$2"
  chmod 0644 "$2"
}
subst "$ROOT/pkgconfig/nccl_ep.pc.in" "$D/lib/pkgconfig/nccl_ep.pc"
subst "$ROOT/cmake/nccl_epConfig.cmake.in" "$D/lib/cmake/nccl_ep/nccl_epConfig.cmake"
subst "$ROOT/cmake/nccl_epConfigVersion.cmake.in" "$D/lib/cmake/nccl_ep/nccl_epConfigVersion.cmake"
echo "installed nccl_ep $VERSION into $D (lib/libnccl_ep.so.$VERSION, include/, lib/pkgconfig, lib/cmake/nccl_ep)"
