"""Our layouts against vLLM 0.26's own ops, bit for bit (GPU machine with vLLM installed).

gptq_marlin_repack (with and without a row permutation), marlin_permute_scales, marlin_zero_points and
gptq_shuffle (with and without act-order) must produce exactly the words the format core produces.
Run on the device: `source /tmp/vllm-site/activate.sh && python3 -m pytest -q tests/gpu/test_vllm_layouts.py`.
"""

import itertools

import pytest
import torch

from gptq_vllm.formats import bitpack, exllama, marlin

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def vllm_ops():
    return pytest.importorskip("vllm._custom_ops")


@pytest.fixture(scope="module")
def marlin_utils():
    return pytest.importorskip("vllm.model_executor.layers.quantization.utils.marlin_utils")


SHAPES = [(256, 192), (4096, 1024), (1024, 4096 + 64)]


def codes(K, N, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("bits,shape,act", list(itertools.product([4, 8], SHAPES, [False, True])))
def test_marlin_repack_matches_vllm(vllm_ops, bits, shape, act):
    K, N = shape
    q = codes(K, N, bits, K + N + bits)
    qweight = bitpack.pack_rows(q, bits)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K)).to(torch.int32) if act else None
    ours = marlin.repack_gptq(qweight, bits, K, perm)
    empty = torch.empty(0, dtype=torch.int32, device="cuda")
    theirs = vllm_ops.gptq_marlin_repack(qweight.cuda(), perm.cuda() if act else empty, K, N, bits)
    assert torch.equal(ours, theirs.cpu())


@pytest.mark.parametrize("group_size,shape", list(itertools.product([-1, 32, 64, 128], SHAPES)))
def test_marlin_scales_match_vllm(marlin_utils, group_size, shape):
    K, N = shape
    ng = 1 if group_size == -1 else K // group_size
    s = torch.randn(ng, N, dtype=torch.float16)
    theirs = marlin_utils.marlin_permute_scales(s.cuda(), K, N, group_size)
    assert torch.equal(marlin.permute_scales(s, group_size, K), theirs.cpu())


@pytest.mark.parametrize("bits", [4, 8])
def test_marlin_zero_points_match_vllm(marlin_utils, bits):
    K, N, G = 1024, 256, 128
    z = codes(K // G, N, bits, 7)
    theirs = marlin_utils.marlin_zero_points(z.cuda(), K // G, N, bits)
    assert torch.equal(marlin.pack_zeros(z, bits), theirs.cpu())


@pytest.mark.parametrize("bits,act", list(itertools.product([2, 3, 4, 8], [False, True])))
def test_exllama_shuffle_matches_vllm(vllm_ops, bits, act):
    K, N = 512, 256
    q = codes(K, N, bits, 100 + bits)
    qweight = bitpack.pack_rows(q, bits)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(bits)).to(torch.int32) if act else None
    ours = exllama.shuffle(qweight, bits, K, perm)
    theirs = qweight.clone().cuda()
    vllm_ops.gptq_shuffle(theirs, perm.cuda() if act else torch.empty(0, dtype=torch.int32, device="cuda"), bits)
    assert torch.equal(ours, theirs.cpu())
