#!/usr/bin/env bash
# FlashAttention-4 for a Python 3.12 x86-64 GPU machine without internet (the versions that ran on the H100
# with torch 2.11: benchmarks/results/h100-notebook-2026-12-06/NOTES.md). Its cutlass DSL library wheel is 92 MB and a device call carries
# 64 MiB in all, the repository's tracked files included (~11 MiB and growing with results): `download`
# cuts the wheels into three folders of ~32 MB, carried in three calls back to back.
#   benchmarks/fa4_wheels.sh download DIR   here: DIR/a, DIR/b, DIR/c (a third of the big wheel each, small wheels spread)
#   benchmarks/fa4_wheels.sh stash DIR      there, calls 1 and 2 (DIR/a, DIR/b): keep DIR/* in /tmp/fa4-wheels
#   benchmarks/fa4_wheels.sh install DIR    there, call 3 (DIR/c): join the parts and pip install
set -euo pipefail
cmd=$1; dir=$2
case $cmd in
  download)
    mkdir -p "$dir/a" "$dir/b"; tmp=$(mktemp -d)
    for p in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
             nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
             torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "$p"
    done
    mkdir -p "$dir/c"
    big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
    (cd "$dir/a" && split -n 3 "$big" "$(basename "$big").part.")
    mv "$dir/a/$(basename "$big").part.ab" "$dir/b/"; mv "$dir/a/$(basename "$big").part.ac" "$dir/c/"; rm "$big"
    i=0; for w in "$tmp"/*.whl; do mv "$w" "$dir/$(echo a b c | cut -d' ' -f$((i % 3 + 1)))/"; i=$((i + 1)); done ;;
  stash) mkdir -p /tmp/fa4-wheels && cp "$dir"/* /tmp/fa4-wheels/ ;;
  install)
    cp "$dir"/* /tmp/fa4-wheels/ && cd /tmp/fa4-wheels
    for f in *.part.aa; do cat "${f%.aa}".a? > "${f%.part.aa}" && rm "${f%.aa}".a?; done
    python3 -m pip install -q --no-index --no-deps --no-compile *.whl
    python3 -c "import importlib.util as u; assert u.find_spec('flash_attn.cute'), 'flash_attn.cute not importable'" ;;
esac
