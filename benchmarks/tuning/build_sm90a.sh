#!/usr/bin/env bash
# Builds gptq_vllm/_C.so for the GPU machine (sm_90a, torch 2.11.0+cu130) on a machine without a GPU or CUDA
# toolkit, from pip wheels: nvcc 13.0 and the CUDA headers, the headers and libraries of the device's torch wheel,
# CUTLASS from the pinned nvidia-cutlass.  Sources and nvcc flags come from gptq_vllm/kernels/build.py, as in
# setup.py; the defines are the ones torch's extension build adds.  Objects are kept per source and rebuilt when the
# source or a header under csrc/ is newer, so a changed kernel family costs only its own files.
#   bash benchmarks/tuning/build_sm90a.sh OUT.so          (about 35 minutes from scratch on 2 cores)
#   JOBS=N (default: cores)  TOOLS=dir (downloads and extracted wheels, default ~/.cache/gptq-vllm-sm90a)
#   OBJ=dir (objects, default build/sm90a)
# The library goes to the device compressed (xz: ~8 MB) and is used there as gptq_vllm/_C.so.
set -euo pipefail
out=${1:?usage: build_sm90a.sh OUT.so}
root=$(cd "$(dirname "$0")/../.." && pwd)
tools=${TOOLS:-$HOME/.cache/gptq-vllm-sm90a}
obj=${OBJ:-$root/build/sm90a}
jobs=${JOBS:-$(nproc)}
py=${PYTHON:-python3}

# nvcc 13.0.88 with the CUDA 13.0 headers it was released with; cuBLAS / cuSPARSE / cuSOLVER only for the headers
# that ATen's CUDA context includes (the versions torch 2.11.0+cu130 requires).
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
        nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66
        nvidia-cutlass==4.2.0.0 torch==2.11.0)
if [[ ! -f $tools/ready ]]; then
  mkdir -p "$tools/whl" "$tools/x"
  echo "downloading the toolchain wheels (about 1.4 GB) ..."
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$tools/whl" "${wheels[@]}"
  for w in "$tools"/whl/*.whl; do
    case $w in
      */torch-*) unzip -q -o "$w" 'torch/include/*' 'torch/lib/*' -d "$tools/x" ;;
      */nvidia_cublas-*|*/nvidia_cusparse-*|*/nvidia_cusolver-*) unzip -q -o "$w" 'nvidia/cu13/include/*' -d "$tools/x" ;;
      *) unzip -q -o "$w" -d "$tools/x" ;;
    esac
  done
  ln -sf libcudart.so.13 "$tools/x/nvidia/cu13/lib/libcudart.so"
  touch "$tools/ready"
fi
cu=$tools/x/nvidia/cu13
torch_inc=$tools/x/torch/include
cutlass=$tools/x/cutlass_library/source

# build.py's nvcc flags (first line) and sources (one per line), loaded by path as setup.py does.
mapfile -t build_info < <(cd "$root" && $py -c "
import importlib.util, os
spec = importlib.util.spec_from_file_location('b', 'gptq_vllm/kernels/build.py')
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
print(' '.join(b.NVCC_FLAGS))
print('\n'.join(os.path.relpath(s) for s in b.sources()))")
read -r -a nvcc_flags <<< "${build_info[0]}"
sources=("${build_info[@]:1}")

# This machine's Python headers stand in for the device's 3.12: ops.cpp includes Python.h, but the library is
# loaded with torch.ops.load_library, which calls no module init.
defs=(-DTORCH_EXTENSION_NAME=gptq_vllm_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1)
incs=(-I"$root/csrc" -I"$cutlass/include" -I"$cutlass/tools/util/include" -isystem "$torch_inc"
      -isystem "$torch_inc/torch/csrc/api/include" -isystem "$($py -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
      -isystem "$cu/include" -isystem "$cu/include/cccl")
mkdir -p "$obj"
newest_header=$(find "$root/csrc" \( -name '*.h' -o -name '*.hpp' -o -name '*.cuh' \) -printf '%T@\n' | sort -n | tail -1)

compile() {  # one translation unit -> $obj/<name>.o, unless up to date
  local src=$1 o=$obj/$(basename "$1").o
  if [[ -f $o && $o -nt $root/$src ]] && (( $(stat -c %Y "$o") > ${newest_header%.*} )); then return; fi
  case $src in
    *.cpp) g++ -c "$root/$src" -o "$o" -fPIC -O3 -std=c++17 "${defs[@]}" "${incs[@]}" ;;
    *.cu) PATH=$cu/bin:$PATH nvcc -c "$root/$src" -o "$o" "${defs[@]}" "${incs[@]}" --compiler-options -fPIC \
            "${nvcc_flags[@]}" -gencode=arch=compute_90a,code=sm_90a ;;
  esac
  echo "built $src"
}
pids=()
for src in "${sources[@]}"; do
  while (( $(jobs -rp | wc -l) >= jobs )); do wait -n; done
  compile "$src" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed compile stops here
objs=()
for src in "${sources[@]}"; do objs+=("$obj/$(basename "$src").o"); done
g++ -shared -o "$out" "${objs[@]}" -L"$tools/x/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda \
  -ltorch_cuda -L"$cu/lib" -lcudart
echo "linked $out ($(du -h "$out" | cut -f1))"
