"""The API on CUDA tensors gives the CPU results. Skipped only on machines without a GPU;
every computation here also runs on CPU in the other test files."""

import pytest
import torch

import fastequiv as fe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["auto", "torch", "cuda"])
@pytest.mark.parametrize("group", ["SO3", "O3", "icosahedral"])
def test_random_rotations_on_gpu_equal_the_cpu_stream(backend, group):
    if backend == "cuda" and not fe.build_info()["cuda"]:
        pytest.fail("fastequiv._C was built without CUDA on a machine with a GPU")
    ref = fe.random_rotations(100_003, seed=11, offset=2**32 - 7, group=group, dtype=torch.float64)
    got = fe.random_rotations(100_003, seed=11, offset=2**32 - 7, group=group, dtype=torch.float32,
                              device="cuda", backend=backend)
    torch.testing.assert_close(got.cpu().double(), ref, atol=2e-6, rtol=0)


def test_wigner_D_on_gpu():
    R = fe.random_rotations(1000, seed=1, group="O3", dtype=torch.float64)
    irreps = "2x0e + 1x1o + 1x2e + 1x3o + 1x4e"
    torch.testing.assert_close(fe.wigner_D(irreps, R.cuda()).cpu(), fe.wigner_D(irreps, R))


def test_equivariance_error_and_twirl_loss_on_gpu():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()
    pos = torch.randn(8, 5, 3, dtype=torch.float64)
    y = torch.randn(8, 5, 3, dtype=torch.float64)
    spec = fe.Spec(inputs="position", output="vector")
    cpu = fe.equivariance_error(net, pos, y, spec=spec, samples=4, seed=3)
    gpu = fe.equivariance_error(net.cuda(), pos.cuda(), y.cuda(), spec=spec, samples=4, seed=3)
    for name in ("total", "mean", "equiv", "pct"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name))
    loss, d = fe.twirl_loss(net, pos.cuda(), y.cuda(), spec=spec, samples=2, equiv_weight=0.5, seed=3)
    loss.backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in net.parameters())
