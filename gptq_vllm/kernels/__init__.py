"""GEMM kernels of the plugin.

ops        the `mygptq` torch custom ops (schemas, fake implementations, CPU reference, CUDA dispatch)
selection  the one function that picks a layout and kernel for a layer
cuda       loader of the compiled CUDA extension (imported lazily by the ops' CUDA path only)

Importing this package imports nothing; `gptq_vllm.register()` imports `ops`.
"""
