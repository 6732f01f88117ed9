import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture
def fashion_mnist():
    """Real data for the tests that need it (Debian package dataset-fashion-mnist, installed by .ci/run)."""
    if not (FASHION_MNIST / 'train-images-idx3-ubyte.gz').exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)')
    return 'fashion-mnist'
