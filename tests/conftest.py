import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread: the tests' networks are tiny, and on a shared 2-core machine torch's second thread
# stalls in spin-waits (measured: an airbench forward pass ~20x slower with 2 threads under load).
torch.set_num_threads(1)

FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture
def fashion_mnist():
    """Real data for the tests that need it (Debian package dataset-fashion-mnist, installed by .ci/run)."""
    if not (FASHION_MNIST / 'train-images-idx3-ubyte.gz').exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)')
    return 'fashion-mnist'


@pytest.fixture
def float64():
    """Exact arithmetic for equivalence claims: in float32 the recipes' high learning rates amplify
    rounding differences (grouped vs single convs) to ~1e-3 within a few epochs."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)
