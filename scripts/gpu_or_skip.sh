#!/usr/bin/env bash
# Runs the command if an NVIDIA GPU is present; otherwise exits 77 (ctest's "skipped").
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "skipped: no NVIDIA GPU"
  exit 77
fi
exec "$@"
