#!/usr/bin/env bash
# TransformerEngine 2.20.2 (issue 18's peer, strategy packed-te) for a Python 3.12 x86-64 CUDA 13 GPU
# machine without internet. Its core wheel is 277 MB and its PyTorch extension comes as source only,
# so: five parts carried in five device calls back to back, then the extension built there against
# the machine's torch (nvcc 13.0 is there; 33 C++ files).
#   benchmarks/te_wheels.sh download DIR   here: DIR/1 .. DIR/5, each under one call's 64 MiB
#   benchmarks/te_wheels.sh stash DIR/K    there, calls 1-4: keep the part in /tmp/te-wheels
#   benchmarks/te_wheels.sh install DIR/5  there, call 5: join the parts, install, build the extension
set -euo pipefail
cmd=$1; dir=$2
case $cmd in
  download)
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
      transformer-engine==2.20.2 transformer-engine-cu13==2.20.2 nvidia-cudnn-frontend==1.32.0 nvdlfw-inspect==0.2.2 \
      einops pydantic pydantic-core typing-inspection annotated-types wheel
    python3 -m pip download -q --no-deps --no-binary=transformer-engine-torch -d "$tmp" transformer-engine-torch==2.20.2
    (cd "$tmp" && tar cf te.tar ./*.whl ./*.tar.gz && split -n 5 -d te.tar te.tar.part.)
    for k in 1 2 3 4 5; do mkdir -p "$dir/$k" && mv "$tmp/te.tar.part.0$((k - 1))" "$dir/$k/"; done
    rm -rf "$tmp" ;;
  stash) mkdir -p /tmp/te-wheels && cp "$dir"/* /tmp/te-wheels/ ;;
  install)
    mkdir -p /tmp/te-wheels/x && cp "$dir"/* /tmp/te-wheels/ && cd /tmp/te-wheels
    cat te.tar.part.0? | tar xf - -C x && cd x
    for m in einops:einops pydantic:pydantic pydantic_core:pydantic_core typing_inspection:typing_inspection \
             annotated_types:annotated_types wheel:wheel nvdlfw_inspect:nvdlfw_inspect; do  # only what is missing
      python3 -c "import ${m%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --no-deps ./${m##*:}-*.whl
    done
    python3 -m pip install -q --no-index --no-deps ./transformer_engine-*.whl ./transformer_engine_cu13-*.whl \
      ./nvidia_cudnn_frontend-*.whl
    # no prebuilt extension to fetch there: build it (MAX_JOBS compiles at once). cudnn.h, nccl.h and
    # nvtx3 come from torch's nvidia-* wheels, not the toolkit; nccl_ep.h ships with neither (EP off)
    site=$(python3 -c "import nvidia, os; print(list(nvidia.__path__)[0])")
    export CPLUS_INCLUDE_PATH="$(ls -d "$site"/*/include "$site"/*/*/include 2>/dev/null | tr '\n' ':')${CPLUS_INCLUDE_PATH:-}"
    NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch NVTE_WITH_NCCL_EP=0 NVTE_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
      python3 -m pip install --no-index --no-deps --no-build-isolation -v ./transformer_engine_torch-*.tar.gz \
      >/tmp/te-wheels/build.log 2>&1 || { tail -40 /tmp/te-wheels/build.log; exit 1; }
    python3 -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__version__ if hasattr(te, '__version__') else 'ok')" ;;
esac
