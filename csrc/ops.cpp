// Registers the kernels as torch ops in our own namespace `mygptq_cuda` (schemas here, CUDA kernels below;
// fake implementations are registered from Python in gptq_vllm/kernels/cuda.py).
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(mygptq_cuda, m) {
  m.def("marlin_gemm(Tensor a, Tensor qweight, Tensor scales, Tensor? qzeros, Tensor? g_idx_sorted, int bits, "
        "int group_size, Tensor? perm=None) -> Tensor");
  m.def("_marlin_set_config(int sb, int cs, int slices, int dense_min_m, int tile_rows=0, int wgmma=0, "
        "int a_buffers=0, int solo=0) -> ()", &gptq_vllm::marlin_set_config);
  m.def("sm90a_code_runs() -> bool", &gptq_vllm::sm90a_code_runs);
  m.def("hopper_gemm(Tensor a, Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, int config, "
        "int decomposition=0, int splits=1, Tensor? perm=None) -> Tensor");
  m.def("hopper_configs() -> str[]", &gptq_vllm::hopper_configs);
  m.def("hopper_tile_offsets(int bits) -> Tensor", &gptq_vllm::hopper_tile_offsets);
  m.def("exllama_gemm(Tensor a, Tensor qweight, Tensor? qzeros, Tensor scales, Tensor? g_idx_sorted, int bits, "
        "int group_size) -> Tensor");
  m.def("marlin_repack(Tensor qweight, Tensor? perm, int bits, int size_k, int size_n) -> Tensor");
  m.def("exllama_shuffle(Tensor qweight, Tensor? perm, int bits, int size_k) -> Tensor");
  m.def("marlin_widen(Tensor qweight, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(mygptq_cuda, CUDA, m) {
  m.impl("marlin_gemm", &gptq_vllm::marlin_gemm);
  m.impl("exllama_gemm", &gptq_vllm::exllama_gemm);
  m.impl("hopper_gemm", &gptq_vllm::hopper_gemm);
  m.impl("marlin_repack", &gptq_vllm::marlin_repack);
  m.impl("exllama_shuffle", &gptq_vllm::exllama_shuffle);
  m.impl("marlin_widen", &gptq_vllm::marlin_widen);
}

// Lets `import gptq_vllm._C` succeed too (the loader uses torch.ops.load_library).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "gptq_vllm CUDA kernels (torch.ops.mygptq_cuda)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
