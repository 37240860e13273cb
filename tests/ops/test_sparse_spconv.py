"""Parity with spconv 2.3.8 (CPU) on the same weights; spconv is a test-only dependency.

spconv CPU is not thread-safe (wrong values at random with > 1 torch thread), so it runs with one
thread here; its convs are built with bias=False (CPU eval-mode convs with bias assert).
"""
import pytest
import torch

from bevfusion.ops.sparse import SparseTensor, to_spconv2
from bevfusion.ops.sparse import nn as snn

sp = pytest.importorskip("spconv.pytorch")

from test_sparse import _sort_rows, random_tensor  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _sp_input(x: SparseTensor):
    return sp.SparseConvTensor(x.feats, x.coords.contiguous(), list(x.spatial_shape), x.batch_size)


def _copy(ours, theirs):
    with torch.no_grad():
        theirs.weight.copy_(to_spconv2(ours.weight, ours.kernel_size))


def _assert_same(y: SparseTensor, s, tol=1e-4):
    assert tuple(s.spatial_shape) == y.spatial_shape
    c1, f1 = _sort_rows(y.coords, y.feats)
    c2, f2 = _sort_rows(s.indices, s.features)
    assert torch.equal(c1, c2), "active output sites differ from spconv"
    torch.testing.assert_close(f1, f2, rtol=tol, atol=tol)


@pytest.mark.parametrize("dataflow", ["gather", "im2col"])
@pytest.mark.parametrize("ks,dil", [(3, 1), ((1, 3, 5), 1), (3, 2)])
def test_subm_matches_spconv(dataflow, ks, dil):
    torch.manual_seed(0)
    x = random_tensor(shape=(9, 8, 7), cin=4, dtype=torch.float32)
    ours = snn.SubMConv3d(4, 6, ks, padding=1, dilation=dil, impl="cpu", dataflow=dataflow)
    theirs = sp.SubMConv3d(4, 6, ks, padding=1, dilation=dil, bias=False)
    _copy(ours, theirs)
    with torch.no_grad():
        _assert_same(ours(x), theirs(_sp_input(x)))


@pytest.mark.parametrize("dataflow", ["gather", "im2col"])
@pytest.mark.parametrize("ks,st,pad", [(3, 2, 1), (3, 2, (1, 1, 0)), ((1, 1, 3), (1, 1, 2), 0), (2, 2, 0),
                                       ((3, 1, 3), (2, 1, 2), (1, 0, 0))])
def test_conv_and_inverse_match_spconv(dataflow, ks, st, pad):
    torch.manual_seed(0)
    x = random_tensor(shape=(9, 8, 7), cin=4, dtype=torch.float32)
    ours = snn.SparseConv3d(4, 6, ks, stride=st, padding=pad, impl="cpu", dataflow=dataflow)
    theirs = sp.SparseConv3d(4, 6, ks, stride=st, padding=pad, bias=False, indice_key="d")
    inv = snn.SparseInverseConv3d(6, 3, ks, stride=st, padding=pad, impl="cpu", dataflow=dataflow)
    inv_s = sp.SparseInverseConv3d(6, 3, ks, indice_key="d", bias=False)
    _copy(ours, theirs)
    _copy(inv, inv_s)
    with torch.no_grad():
        y, s = ours(x), theirs(_sp_input(x))
        _assert_same(y, s)
        # feed spconv's own output rows into its inverse, ours into ours
        z, t = inv(y), inv_s(s)
        _assert_same(z, t)


def test_encoder_like_stack_matches_spconv():
    """Stem + basic block + down conv + conv_out-style conv, eval-mode BN, both nets on the same weights."""
    torch.manual_seed(0)
    x = random_tensor(shape=(16, 16, 9), batch=2, density=0.15, cin=5, empty=(), dtype=torch.float32)

    def bn(c):
        m = torch.nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)
        with torch.no_grad():
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        return m

    ours = snn.SparseSequential(snn.SubMConv3d(5, 8, 3, padding=1), bn(8), torch.nn.ReLU(), snn.SparseBasicBlock(8),
                                snn.SparseConv3d(8, 16, 3, stride=2, padding=1), bn(16), torch.nn.ReLU(),
                                snn.SparseConv3d(16, 16, (1, 1, 3), stride=(1, 1, 2)), bn(16), torch.nn.ReLU()).eval()
    blk = ours[3]

    class SpBlock(sp.SparseModule):
        def __init__(self):
            super().__init__()
            self.conv1 = sp.SubMConv3d(8, 8, 3, padding=1, bias=False)
            self.conv2 = sp.SubMConv3d(8, 8, 3, padding=1, bias=False)

        def forward(self, t):
            idt = t.features
            o = self.conv1(t)
            o = o.replace_feature(blk.relu(blk.bn1(o.features)))
            o = self.conv2(o)
            return o.replace_feature(blk.relu(blk.bn2(o.features) + idt))

    spb = SpBlock()
    theirs = sp.SparseSequential(sp.SubMConv3d(5, 8, 3, padding=1, bias=False), ours[1], torch.nn.ReLU(), spb,
                                 sp.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False), ours[5], torch.nn.ReLU(),
                                 sp.SparseConv3d(16, 16, (1, 1, 3), stride=(1, 1, 2), bias=False), ours[8],
                                 torch.nn.ReLU()).eval()
    for a, b in ((ours[0], theirs[0]), (blk.conv1, spb.conv1), (blk.conv2, spb.conv2), (ours[4], theirs[4]),
                 (ours[7], theirs[7])):
        _copy(a, b)
    with torch.no_grad():
        y, s = ours(x), theirs(_sp_input(x))
        _assert_same(y, s)
        torch.testing.assert_close(y.to_bev(), s.dense().permute(0, 1, 4, 2, 3).reshape(y.to_bev().shape),
                                   rtol=1e-4, atol=1e-4)
