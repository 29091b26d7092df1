"""The format core on CUDA tensors: the plugin converts weights on the GPU at load time."""

import pytest
import torch

from factory import random_weight
from gptq_vllm.formats import act_order, compressed_tensors, gptq, kernel_layout
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.reference import dequantize

pytestmark = pytest.mark.gpu


def to_cuda(w: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(w.codes.cuda(), w.scales.cuda(), w.zeros.cuda(), w.g_idx.cuda(), w.bits, w.group_size, w.sym)


@pytest.mark.parametrize("bits,layout,sym,G,act,K,N", [
    (4, Layout.MARLIN, True, 128, True, 256, 192), (8, Layout.MARLIN, False, 64, False, 200, 100),
    (3, Layout.EXLLAMA, False, 32, True, 256, 96), (2, Layout.EXLLAMA, True, -1, False, 128, 64),
])
def test_gptq_and_kernel_layout_on_cuda_match_cpu(bits, layout, sym, G, act, K, N):
    w = random_weight(bits, G, sym, act, K=K, N=N, zero_min=1)
    t = gptq.pack(w, ZeroFormat.V1)
    cuda_t = gptq.GPTQTensors(*(x.cuda() for x in (t.qweight, t.qzeros, t.scales, t.g_idx)))
    back = gptq.unpack(cuda_t, bits, G, sym, ZeroFormat.V1, in_features=K)
    assert back.codes.is_cuda and torch.equal(back.codes.cpu(), w.codes)
    act_order.check_g_idx(back.g_idx, K, G)
    kw_cpu, kw_gpu = kernel_layout.to_kernel(w, layout), kernel_layout.to_kernel(back, layout)
    for name, value in kw_cpu.tensors("m").items():
        assert torch.equal(kw_gpu.tensors("m")[name].cpu(), value), name
    assert torch.equal(dequantize(kernel_layout.from_kernel(kw_gpu)).cpu(), dequantize(w))


def test_compressed_tensors_on_cuda():
    w = random_weight(4, 64, True, False)
    t = {k: v.cuda() for k, v in compressed_tensors.to_tensors(w, "m").items()}
    back = compressed_tensors.from_tensors(t, "m", 4, 64, True)
    assert torch.equal(back.codes.cpu(), w.codes) and back.zeros.is_cuda
