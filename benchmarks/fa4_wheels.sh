#!/usr/bin/env bash
# FlashAttention-4 for a Python 3.12 x86-64 GPU machine without internet (the versions that ran on the H100
# with torch 2.11: benchmarks/results/h100-notebook-2026-12-06/NOTES.md). Its cutlass DSL library wheel is 92 MB and a
# device call carries 64 MiB in all, the repository's tracked files included (~10 MiB): `download` unpacks
# that wheel and packs it again with xz (~64 MB), cut in two halves carried in two calls back to back (the
# machine stays warm for seconds only between calls: start the second at once).
#   benchmarks/fa4_wheels.sh download DIR   here: DIR/a (half the big library), DIR/b (the other half, the small wheels)
#   benchmarks/fa4_wheels.sh stash DIR      there, call 1 (DIR/a): keep DIR/a in /tmp/fa4-wheels
#   benchmarks/fa4_wheels.sh install DIR    there, call 2 (DIR/b): join the halves, unpack, pip install the rest
set -euo pipefail
cmd=$1; dir=$2
big=nvidia_cutlass_dsl_libs_cu13
case $cmd in
  download)
    mkdir -p "$dir/a" "$dir/b"; tmp=$(mktemp -d)
    for p in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
             nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
             torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "$p"
    done
    # a wheel is a zip of what site-packages receives: its files, repacked with xz, are a third smaller
    mkdir "$tmp/lib" && (cd "$tmp/lib" && python3 -m zipfile -e "$tmp"/$big-*.whl . && tar cf - . | xz -9 -T0) \
      > "$tmp/$big.tar.xz"
    (cd "$dir/a" && split -n 2 "$tmp/$big.tar.xz" "$big.tar.xz.part.")
    mv "$dir/a/$big.tar.xz.part.ab" "$dir/b/"; rm -r "$tmp/lib" "$tmp/$big".* "$tmp"/$big-*.whl
    mv "$tmp"/*.whl "$dir/b/" ;;
  stash) mkdir -p /tmp/fa4-wheels && cp "$dir"/* /tmp/fa4-wheels/ ;;
  install)
    cp "$dir"/* /tmp/fa4-wheels/ && cd /tmp/fa4-wheels
    site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cat $big.tar.xz.part.a? | xz -d | tar xf - -C "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile *.whl
    python3 -c "import importlib.util as u; assert u.find_spec('flash_attn.cute'), 'flash_attn.cute not importable'" ;;
esac
