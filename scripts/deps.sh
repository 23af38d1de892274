#!/usr/bin/env bash
# Installs into ./.deps/ everything the C tests (and later the Rust GPU tests) need that a fresh
# machine lacks, from PyPI wheels only (no apt, no root):
#
#   .deps/bin/                 cmake, ctest, cpack (and pkg-config when the system has none)
#   .deps/nvidia/cu13/include  cuda.h, cuda_runtime.h (+ crt/ and cccl's nv/ it includes), nvrtc.h
#   .deps/nvidia/nccl/include  nccl.h
#   .deps/lib/                 libnccl.so.2, libnvrtc.so.13 (+ builtins), libcudart.so.13, and
#                              unversioned libnccl.so / libnvrtc.so links
#   .deps/env.sh               `source` it for PATH and the NCCL_EP_DEPS_* variables
#
# Idempotent: each wheel is fetched and unpacked once (a stamp file per pinned version), so a
# re-run takes well under a second. Wheels are extracted (they are zip files), not installed
# into site-packages. Environment:
#   NCCL_EP_DEPS        where to install (default: <repo>/.deps)
#   NCCL_EP_WHEELHOUSE  a folder of already-downloaded wheels to use/fill (default:
#                       $NCCL_EP_DEPS/wheels, emptied after unpacking)
#   PYTHON              the Python with pip (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${NCCL_EP_DEPS:-$ROOT/.deps}"
PY="${PYTHON:-python3}"
WHEELHOUSE="${NCCL_EP_WHEELHOUSE:-$DEPS/wheels}"
OWN_WHEELHOUSE=0
[[ -z "${NCCL_EP_WHEELHOUSE:-}" ]] && OWN_WHEELHOUSE=1

# Pinned versions that are known to work together (the ABI facts were taken with these).
CMAKE_PIN="cmake==4.4.4"
NCCL_PIN="nvidia-nccl-cu13==2.32.3"
CUDART_PIN="nvidia-cuda-runtime==13.5.37"   # cuda.h, cuda_runtime.h, libcudart.so.13
CRT_PIN="nvidia-cuda-crt==13.5.37"          # crt/host_config.h etc. (cuda_runtime.h includes them)
CCCL_PIN="nvidia-cuda-cccl==13.3.5.0.6"     # nv/target (cuda_fp16.h via nccl.h includes it)
NVRTC_PIN="nvidia-cuda-nvrtc==13.5.37"      # libnvrtc.so.13 for the runtime kernel compiler
PKGCONF_PIN="pkgconf==3.0.7.post0"          # only when the machine has no pkg-config

mkdir -p "$DEPS/bin" "$DEPS/lib" "$DEPS/stamps" "$WHEELHOUSE"
fetched=()

# unpack DEST WHEEL: extracts a wheel, keeping the executable bits (zipfile drops them).
unpack() {
  "$PY" - "$1" "$2" <<'EOF'
import os, sys, zipfile
dest, whl = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        # Static archives and device bitcode are not needed by anything here; skip their bulk.
        if info.filename.endswith(("_static.a", ".ltoir", ".bc", "libcudadevrt.a")):
            continue
        path = z.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
EOF
}

# install PIN DEST: download the pinned wheel (no dependencies) and unpack it into DEST, once.
install() {
  local pin="$1" dest="$2" name="${1%%==*}"
  local stamp="$DEPS/stamps/$pin"
  [[ -f "$stamp" ]] && return 0
  local norm="${name//-/_}"
  local whl
  whl="$(ls "$WHEELHOUSE"/"$norm"-"${pin##*==}"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$whl" ]]; then
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --dest "$WHEELHOUSE" "$pin" >&2
    whl="$(ls "$WHEELHOUSE"/"$norm"-"${pin##*==}"-*.whl | head -n1)"
  fi
  mkdir -p "$dest"
  unpack "$dest" "$whl"
  [[ "$OWN_WHEELHOUSE" == 1 ]] && rm -f "$whl"
  touch "$stamp"
  fetched+=("$pin")
}

install "$CMAKE_PIN" "$DEPS/cmake"
for pin in "$NCCL_PIN" "$CUDART_PIN" "$CRT_PIN" "$CCCL_PIN" "$NVRTC_PIN"; do
  install "$pin" "$DEPS"          # all of them unpack under $DEPS/nvidia/{cu13,nccl}/
done

# Tools on one PATH entry. Symlinks work: cmake finds its share/ through /proc/self/exe.
for t in cmake ctest cpack; do
  ln -sfn "../cmake/cmake/data/bin/$t" "$DEPS/bin/$t"
done
PKG_CONFIG_NOTE="system"
if ! command -v pkg-config >/dev/null 2>&1 || [[ "$(command -v pkg-config)" == "$DEPS/bin/pkg-config" ]]; then
  install "$PKGCONF_PIN" "$DEPS/pkgconf"
  ln -sfn ../pkgconf/pkgconf/.bin/pkgconf "$DEPS/bin/pkg-config"
  PKG_CONFIG_NOTE="pkgconf wheel"
fi

# One folder of shared libraries (versioned names as shipped, plus unversioned dev links).
CU="$DEPS/nvidia/cu13"
NC="$DEPS/nvidia/nccl"
for f in "$NC"/lib/libnccl.so.* "$CU"/lib/libnvrtc*.so* "$CU"/lib/libcudart.so.*; do
  [[ -e "$f" ]] && ln -sfn "${f#"$DEPS"/}" "$DEPS/lib/$(basename "$f")"
done
# ln targets above are relative to $DEPS; make them relative to $DEPS/lib.
for l in "$DEPS"/lib/*; do
  t="$(readlink "$l")"
  [[ "$t" == ../* ]] || ln -sfn "../$t" "$l"
done
ln -sfn libnccl.so.2 "$DEPS/lib/libnccl.so"
ln -sfn libnvrtc.so.13 "$DEPS/lib/libnvrtc.so"

for h in "$CU/include/cuda.h" "$CU/include/cuda_runtime.h" "$CU/include/crt/host_config.h" \
         "$CU/include/nv/target" "$NC/include/nccl.h" "$DEPS/lib/libnccl.so.2" \
         "$DEPS/lib/libnvrtc.so.13" "$DEPS/bin/cmake"; do
  [[ -e "$h" ]] || { echo "deps.sh: expected $h after install, it is missing" >&2; exit 1; }
done

cat >"$DEPS/env.sh" <<EOF
# Generated by scripts/deps.sh: source this file.
export PATH="$DEPS/bin:\$PATH"
export NCCL_EP_DEPS="$DEPS"
export NCCL_EP_DEPS_CUDA_INCLUDE="$CU/include"
export NCCL_EP_DEPS_NCCL_INCLUDE="$NC/include"
export NCCL_EP_DEPS_LIB="$DEPS/lib"
EOF

cmake_ver="$("$DEPS/bin/cmake" --version | head -n1 | awk '{print $3}')"
if ((${#fetched[@]})); then what="installed ${#fetched[@]} wheel(s)"; else what="already present"; fi
echo "deps: $what in $DEPS (cmake $cmake_ver, nccl.h 2.32.3, CUDA 13.5 headers, libnccl.so.2, libnvrtc.so.13, pkg-config: $PKG_CONFIG_NOTE)"
