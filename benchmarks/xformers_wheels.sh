#!/usr/bin/env bash
# xFormers for the GPU machine (no internet there): the PyPI wheel of xFormers 0.0.35 runs on
# torch >= 2.10 through torch's stable ABI, but its C++ library links libcudart.so.12; a CUDA 13
# torch does not ship that, and without it xFormers refuses every CUDA operator. So the CUDA 12
# runtime comes along as a wheel, and LD_LIBRARY_PATH must name its folder before Python starts.
#   benchmarks/xformers_wheels.sh download DIR   here: the two wheels into DIR (4 MB)
#   benchmarks/xformers_wheels.sh install DIR    there: pip install them; prints the folder of
#                                                libcudart.so.12 for LD_LIBRARY_PATH
set -euo pipefail
cmd=$1; dir=$2
case $cmd in
  download)
    mkdir -p "$dir"
    for p in xformers==0.0.35 nvidia-cuda-runtime-cu12==12.8.90; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$p"
    done ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile "$dir"/xformers-*.whl "$dir"/nvidia_cuda_runtime_cu12-*.whl >&2
    python3 - <<'PY'
import pathlib, site
for root in site.getsitepackages():
    for lib in pathlib.Path(root).glob("nvidia/cuda_runtime/lib/libcudart.so.12"):
        print(lib.parent)
        raise SystemExit
raise SystemExit("libcudart.so.12 not found after install")
PY
    ;;
esac
