#!/usr/bin/env bash
# The project's GPU runs, stage by stage, on the GPU machine once vLLM 0.26 is staged there with
# ../shared/device (three calls; docs/plugin.md). Logs and JSON go under $OUT.
#   bash benchmarks/device_suite.sh install tests       # kernels, layouts vs vLLM, plugin TP 1, vllm serve
#   bash benchmarks/device_suite.sh kernels quantize    # kernel grid vs cuBLAS/Marlin/Machete, quantizer speed
#   bash benchmarks/device_suite.sh hopper-sweep        # every Hopper GEMM config (input of benchmarks/pick_hopper.py)
#   bash benchmarks/device_suite.sh hopper-pick         # its table into selection.py (before kernels / e2e / tests)
#   bash benchmarks/device_suite.sh load                # converted vs source load time in vLLM
#   bash benchmarks/device_suite.sh e2e                 # offline generation tok/s, mygptq vs in-tree gptq
#   bash benchmarks/device_suite.sh e2e-3bit            # the same for a 3-bit model beside the 4-bit one (issue 14)
#   bash benchmarks/device_suite.sh e2e-act             # the same for an act-order model (converted) vs in-tree on it
#   bash benchmarks/device_suite.sh install tp2         # on two GPUs: plugin TP 2 == TP 1
#   bash benchmarks/device_suite.sh row-spread          # tuning: the Marlin atom's bank conflicts (benchmarks/tuning/row_spread)
set -uo pipefail
: "${OUT:?set OUT to a directory for logs}"
source /tmp/vllm-site/activate.sh || exit 1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1 VLLM_DISABLE_COMPILE_CACHE=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE '[a-z][0-9]{2,4}' | head -1 | tr A-Z a-z)
SWEEP_JSON="hopper-sweep-${GPU:-gpu}-$(date +%F)${PART:+-$PART}.json"  # PART: one of several SHAPES calls
status=0
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    install)  # our kernels built here for sm_90 (CUTLASS from .whl/ when carried; a carried gptq_vllm/_C.so is
              # used as is), then an editable install (vLLM finds the entry point)
      { { ls gptq_vllm/_C*.so > /dev/null 2>&1 \
          || { { ! ls .whl/nvidia_cutlass-*.whl > /dev/null 2>&1 \
                 || python -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl; } \
               && python setup.py build_ext --inplace; }; } \
        && GPTQ_VLLM_NO_CUDA=1 python -m pip install --no-deps --no-build-isolation -e .; } \
        > "$OUT/install.log" 2>&1 \
        && python -c "from gptq_vllm.kernels import cuda; assert cuda.available(), cuda.load_error()" \
        || { tail -30 "$OUT/install.log"; exit 1; } ;;
    tests)
      python -m pytest -q -p no:cacheprovider tests/gpu tests/test_plugin_serve.py 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -8 || status=1 ;;
    kernels)
      OUT_JSON="$OUT/kernels.json" python benchmarks/kernels.py > "$OUT/kernels.log" 2>&1 || status=1
      grep -E "^\|" "$OUT/kernels.log" | tail -70
      # large M: dequantize + cuBLAS against the skinny kernel (the DENSE_MIN_M choice)
      SWEEP=1 MS=128,256 NO_VLLM=1 python benchmarks/kernels.py > "$OUT/kernels-dense-sweep.log" 2>&1 || status=1
      grep "M=" "$OUT/kernels-dense-sweep.log" | tail -16 ;;
    hopper-sweep)  # kept in /tmp too, for hopper-pick in a later call on the same machine.  The 8 shapes take ~10
                   # minutes (H100): past a 600 s call, run it per half, e.g. SHAPES=8b.qkv,8b.o,8b.gate_up,8b.down PART=a
      SWEEP=hopper OUT_JSON="$OUT/$SWEEP_JSON" python benchmarks/kernels.py > "$OUT/hopper-sweep.log" 2>&1 || status=1
      cp "$OUT/$SWEEP_JSON" /tmp/ 2>/dev/null
      grep "M=" "$OUT/hopper-sweep.log" | tail -60 ;;
    hopper-pick)  # the selection table from the committed sweeps it was made from (selection.py names them), this
                  # machine's sweeps of today (every PART) replacing their points, written into selection.py (which
                  # comes back under $OUT)
      today=(/tmp/hopper-sweep-${GPU:-gpu}-$(date +%F)*.json)
      python benchmarks/pick_hopper.py --committed "${today[@]}" --write > "$OUT/hopper-pick.log" 2>&1 || status=1
      cp gptq_vllm/kernels/selection.py "$OUT/"
      tail -3 "$OUT/hopper-pick.log" ;;
    quantize)
      python benchmarks/quantize_speed.py --out /tmp/qspeed > "$OUT/quantize-8b.log" 2>&1 || status=1
      python benchmarks/quantize_speed.py --out /tmp/qspeed-70b --layer-only 70b > "$OUT/quantize-70b.log" 2>&1 || status=1
      cp /tmp/qspeed/quantize_speed-*.json /tmp/qspeed-70b/quantize_speed-*.json "$OUT/" 2>/dev/null
      tail -25 "$OUT/quantize-8b.log" "$OUT/quantize-70b.log" ;;
    load)
      python benchmarks/load_time.py --out "$OUT" > "$OUT/load_time.log" 2>&1 || status=1
      tail -25 "$OUT/load_time.log" ;;
    e2e)
      python benchmarks/e2e_throughput.py --out "$OUT" > "$OUT/e2e.log" 2>&1 || status=1
      tail -40 "$OUT/e2e.log" ;;
    e2e-3bit)
      python benchmarks/e2e_throughput.py --methods mygptq,mygptq-3bit,fp16 --out "$OUT/e2e-3bit" \
        > "$OUT/e2e-3bit.log" 2>&1 || status=1
      tail -40 "$OUT/e2e-3bit.log" ;;
    e2e-act)
      python benchmarks/e2e_throughput.py --methods mygptq-act,gptq-act,mygptq --out "$OUT/e2e-act" \
        > "$OUT/e2e-act.log" 2>&1 || status=1
      tail -40 "$OUT/e2e-act.log" ;;
    row-spread)  # ROW_SPREAD_SO=path: a library built elsewhere (else a JIT build here)
      python benchmarks/tuning/row_spread/measure.py "$OUT/row-spread-${GPU:-gpu}-$(date +%F).json" ${ROW_SPREAD_SO:-} \
        > "$OUT/row-spread.log" 2>&1 || status=1
      grep "M=" "$OUT/row-spread.log" | tail -32 ;;
    tp2)
      python -m pytest -q -p no:cacheprovider tests/gpu/test_plugin_gpu.py -rA 2>&1 | tee "$OUT/tp2.log" | tail -8 || status=1 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
