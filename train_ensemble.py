"""train_ensemble.py: fast training of M-member deep ensembles, from independent (β=0) to joint (β=1).

    python train_ensemble.py --beta 1 --members 3          # CIFAR-10, three members, joint training
    torchrun --nproc_per_node 4 train_ensemble.py --members 16 --beta 1   # the members sharded over 4 GPUs

All M members train in one vectorized "wide" network: every layer holds the members' weights stacked
along its first axis and runs as one grouped convolution / batched matmul, so one forward pass gives
every member's logits. The objective (SPEC.md) is

    Σ_j (1 − β)·CE(y, p_j) + β·M·CE(y, p̄)

which at β = 0 gives each member exactly the gradient it would get training alone (tested), and at
β = 1 is the ensemble's own loss ("joint training", Jeffares et al. 2023, arXiv 2301.11323).

Any of it can be sharpness-aware: `--rho ρ` trains every member with SAM (each member perturbed by
its own radius ρ), and `--flat-ratio r` adds SharpBalance (Lu et al. 2024), which gives each member SAM
only on the examples that the other members select.

The default recipe is airbench94 (Jordan 2024, arXiv 2404.00498). Measured so far (CPU, 2026-11-22):
one half-width airbench member reaches 93.75% on Fashion-MNIST in 4 epochs (347 s, 2 cores); four-member
MLP ensembles show learner collusion (β = 1: test DIV 78x, ensemble accuracy 0.882 vs 0.893 at β = 0).
CIFAR-10 and GPU timings are not measured yet. All figures and their commands: README.md.
"""

#############################################
#              Hyperparameters              #
#############################################

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# One recipe per architecture. SGD hyperparameters are decoupled as in airbench: `lr` is the step per
# 1024 examples (loss summed over the batch, divided by the Nesterov gain 1 + 1/(1 − momentum)), and
# `weight_decay` is the fraction of the weights removed per 1024 examples, independent of `lr`.
RECIPES = {
    'airbench': dict(
        epochs=9.9,             # airbench94's schedule: 9.9 epochs reach 94.0% on CIFAR-10
        batch_size=1024,
        lr=11.5,                # per 1024 examples
        momentum=0.85,          # Nesterov
        weight_decay=0.0153,    # per 1024 examples
        label_smoothing=0.2,
        bias_scaler=64.0,       # BatchNorm biases learn 64x faster (no weight decay boost)
        lookahead=True,         # Lookahead-style weight averaging from epoch 3, every 5 steps
        whiten_bias_epochs=3,   # the whitening conv's bias trains for 3 epochs, then freezes
    ),
    'resnet18': dict(
        epochs=16, batch_size=512, lr=8.0, momentum=0.9, weight_decay=0.005, label_smoothing=0.1,
        bias_scaler=1.0, lookahead=False, whiten_bias_epochs=0,
    ),
    'mlp': dict(
        epochs=8, batch_size=256, lr=4.0, momentum=0.9, weight_decay=0.005, label_smoothing=0.0,
        bias_scaler=1.0, lookahead=False, whiten_bias_epochs=0,
    ),
    # Transformers take Adam: Fashion-MNIST 5,000 images, 1,000 validation, width 1, 6 epochs, 2026-11-23:
    # sgd lr 0.5 / 1 / 2 / 4 / 8 / 16 reached validation accuracy 0.667 / 0.658 / 0.681 / 0.712 / 0.740 / 0.479,
    # Adam (no weight decay) lr 1e-3 / 3e-3 0.770 / 0.787.
    'vit': dict(
        optimizer='adam', epochs=10, batch_size=256, lr=3e-3, momentum=0.9, weight_decay=0.0, label_smoothing=0.1,
        bias_scaler=1.0, lookahead=False, whiten_bias_epochs=0,
    ),
}
VIT_DIM = 64                    # the ViT's token width at --width 1 (its MLPs are 4x wider)


def vit_dim(width):
    return max(1, round(VIT_DIM * width))
# Regression (an mlp on a table) overrides the mlp recipe: tables are small, so more epochs of smaller
# batches, and a lower lr, since squared errors of heavy-tailed targets spike where cross-entropy saturates.
# Bike sharing (tools/export_bikeshare.py), 4-member 64-64 mlp, 1,000 validation hours, 2026-11-23: lr 0.25,
# 0.5, 1, 2 gave validation RMSE 39.1, 36.0, 33.9, 32.0 at beta 0, and at beta 1 38.1, 35.0, 33.2, diverged.
REGRESSION_RECIPE = dict(RECIPES['mlp'], epochs=30, batch_size=128, lr=1.0)
# A user's own module (train(cfg, model=...)): nothing is known of it, so AdamW at its usual default.
OWN = 'own'                     # its --arch; its data given as tensors is --dataset 'tensors'
OWN_RECIPE = dict(RECIPES['mlp'], optimizer='adam', epochs=10, batch_size=128, lr=1e-3, weight_decay=0.0)
ADAM_LR = 1e-3                  # plain Adam(W) learning rate when --optimizer adam and no --lr
# Lookahead: from epoch 3, every 5 steps, the weights move to an EMA of themselves; training ends on the
# EMA, once, as in airbench94. (Snapping to it at every epoch end instead, as this file did before,
# discards the steps since the last update; measured on 10,000 Fashion-MNIST images, airbench width
# 0.25, 9.9 epochs of 19 steps, seeds 0-2: test accuracy 0.8972 vs 0.8984, within the seeds' spread.)
LOOKAHEAD = dict(start_epoch=3, every=5, decay_base=0.95, decay_pow=3.0)
LR_SCHEDULE = dict(start=0.2, peak=0.23, end=0.07)  # fraction of lr at step 0, peak position, end
BN_MOMENTUM = 0.4               # airbench's BatchNorm keeps 60% of the old running statistics
LOGIT_SCALE = 1 / 9             # airbench multiplies its logits by a fixed 1/9
TRANSLATE = 2                   # random-crop padding (pixels, reflect) when augmenting
EVAL_BATCH = 2000
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}   # --precision: autocast dtype
# added to each member's gradient norm before SAM divides by it (a zero gradient stays put)
SAM_EPS = 1e-12
# nats (or squared target stds) per example: an objective or test loss above this is divergence
DIVERGED_LOSS = 1e4
MAX_MEMBER_PARAMETERS = 2**31   # a model spec describing more is refused before anything is allocated (8 GiB fp32)
LOG_CHUNK = 2**22                # the training log reduces its steps' logits in chunks of about this many values
# SharpBalance's scoring pass holds at most this many per-sample gradient floats (512 MB)
PER_SAMPLE_GRAD_FLOATS = 2**27

FORMAT = 'deep-ensembles/1'     # safetensors metadata 'format' of every checkpoint this toolkit writes


def _spectral():
    """spectral.py, needed only by --param spectral and --optimizer muon (this file works copied alone)."""
    try:
        import spectral
    except ImportError:
        raise EnsembleError('--param spectral and --optimizer muon need spectral.py beside train_ensemble.py') from None
    return spectral


def make_console(quiet=False, stderr=False):
    """rich's console, never wrapping a line (a path in a log stays whole); with rich not installed (this
    file copied alone), plain lines without markup."""
    try:
        from rich.console import Console
    except ImportError:
        return PlainConsole(quiet, stderr)
    return Console(quiet=quiet, stderr=stderr, soft_wrap=True)


class PlainConsole:
    """The few console methods training uses, as plain print()s."""
    is_terminal = False

    def __init__(self, quiet=False, stderr=False):
        self.quiet, self.file = quiet, sys.stderr if stderr else sys.stdout

    def print(self, text='', **_):
        if not self.quiet:
            print(re.sub(r'\[/?[a-z ]*\]', '', str(text)), file=self.file)


class EnsembleError(Exception):
    """A user-facing error: the command line prints its message on one line and exits non-zero."""


#############################################
#                 Data                      #
#############################################

DATASETS = ('cifar10', 'cifar100', 'fashion-mnist', 'mnist', 'synthetic', 'synthetic-regression')
TENSORS = 'tensors'   # the --dataset of a run trained on the user's own tensors (train(cfg, data=...))
TASKS = ('classification', 'regression')
DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
CSV_TEST_FRACTION = 0.2   # a .csv is one table: this fixed share of its rows (a seeded choice) is the test split
DATA_ORDER_SEED = 12345   # the fixed order validation splits, shards and subsets are taken from
MAX_TARGET = 1e18         # regression targets above this: their squared error overflows float32 (3.4e38)
MIN_TARGET_STD = 1e-15    # nor can a target vary by less: float32 then cannot resolve its errors


@dataclass
class Data:
    """A dataset on any device: uint8 NCHW images and int64 labels (classification), or float32 (N, D)
    features and (N, T) real targets (regression). num_classes is K, or the number of targets T."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    task: str = 'classification'

    def split(self, name):
        if name not in ('train', 'val', 'test'):
            raise EnsembleError(f"unknown split '{name}': use train, val or test")
        x, y = getattr(self, f'x_{name}'), getattr(self, f'y_{name}')
        if x is None:
            raise EnsembleError(f"this data has no '{name}' split (train with --val-size N to hold one out)")
        return x, y

    def to(self, device):
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device)
        return Data(**moved)


def _read_idx_gz(path):
    import gzip
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _as_nchw(x):
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise EnsembleError(f'images must be uint8, got {x.dtype}')
    if x.ndim == 3:                                    # (N, H, W) grayscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)                    # NHWC -> NCHW
    if x.ndim != 4:
        raise EnsembleError(f'images must be (N, H, W), NHWC or NCHW, got shape {x.shape}')
    return torch.from_numpy(np.ascontiguousarray(x))


@functools.lru_cache(maxsize=2)   # tests and sweeps ask for the same seed again and again
def _synthetic(seed, n_train=50000, n_test=10000, num_classes=10):
    """CIFAR-shaped, learnable, deterministic: each class is a smooth random colour pattern; an image
    is its class pattern, a weaker distractor pattern from another class, and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    # Class patterns are faint (~0.3 of the noise per pixel): the task needs the whole image, not one pixel.
    templates = 0.3 * F.interpolate(torch.randn(num_classes, 3, 8, 8, generator=g), size=32, mode='bicubic')

    def make(n):
        y = torch.randint(num_classes, (n,), generator=g)
        distractor = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
        xs = []
        for i in range(0, n, 5000):
            yi, di = y[i:i + 5000], distractor[i:i + 5000]
            img = templates[yi] + 0.7 * templates[di] + torch.randn(len(yi), 3, 32, 32, generator=g)
            xs.append((128 + 40 * img).clamp(0, 255).to(torch.uint8))
        return torch.cat(xs), y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return x_train, y_train, x_test, y_test, num_classes


@functools.lru_cache(maxsize=2)
def _synthetic_regression(seed, n_train=4000, n_test=1000, features=8):
    """Tabular, learnable, noisy, deterministic: 8 standard normal features, a nonlinear target of five of
    them (a sine, a product, a square, a linear term) plus noise, in units far from standardized (mean 50,
    scale 10), so that a member that did not map its outputs back to the targets' units would be far off."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        x = torch.randn(n, features, generator=g)
        f = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 - x[:, 4]
        return x, (50 + 10 * (f + 0.3 * torch.randn(n, generator=g))).unsqueeze(1)

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    return x_train, y_train, x_test, y_test, 1


def _download(name, data_dir, download=True):
    """torchvision download, cached as a uint8 safetensors file in data_dir. download=False (the readers of
    runs, whose data_dir comes from a config.json) only reads what is there and creates nothing."""
    from safetensors.torch import load_file, save_file
    cache = Path(data_dir) / f'{name}.safetensors'
    if cache.exists():
        t = load_file(cache)
        return t['x_train'], t['y_train'], t['x_test'], t['y_test']
    tried = [f'{cache}']
    if name == 'fashion-mnist' and DEBIAN_FASHION_MNIST.exists():
        d = DEBIAN_FASHION_MNIST
        return (_as_nchw(_read_idx_gz(d / 'train-images-idx3-ubyte.gz')),
                torch.from_numpy(_read_idx_gz(d / 'train-labels-idx1-ubyte.gz').astype(np.int64)),
                _as_nchw(_read_idx_gz(d / 't10k-images-idx3-ubyte.gz')),
                torch.from_numpy(_read_idx_gz(d / 't10k-labels-idx1-ubyte.gz').astype(np.int64)))
    if name == 'fashion-mnist':
        tried.append(f'{DEBIAN_FASHION_MNIST} (Debian package dataset-fashion-mnist)')
    if not download:
        raise EnsembleError(f"dataset '{name}' is not there: tried {'; '.join(tried)}. train_ensemble.py downloads "
                            'it into its --data-dir; or pass --dataset')
    try:
        import torchvision
        cls = {'cifar10': torchvision.datasets.CIFAR10, 'cifar100': torchvision.datasets.CIFAR100,
               'fashion-mnist': torchvision.datasets.FashionMNIST, 'mnist': torchvision.datasets.MNIST}[name]
        sets = [cls(str(data_dir), train=train, download=True) for train in (True, False)]
    except Exception as e:  # noqa: BLE001 - any failure here means "could not get the data"
        tried.append(f'a torchvision download into {data_dir}/ ({type(e).__name__}: {str(e).splitlines()[0][:120]})')
        hint = ("sudo apt-get install dataset-fashion-mnist, or " if name == 'fashion-mnist' else '')
        raise EnsembleError(f"could not load dataset '{name}': tried {'; '.join(tried)}. "
                            f"Fix: {hint}download it on a machine with internet into --data-dir "
                            f"(currently {data_dir}), or pass a .npz file") from None
    x = [_as_nchw(np.asarray(s.data)) for s in sets]
    y = [torch.as_tensor(np.asarray(s.targets), dtype=torch.int64) for s in sets]
    t = dict(x_train=x[0], y_train=y[0], x_test=x[1], y_test=y[1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: save_file(t, tmp))
    return x[0], y[0], x[1], y[1]


def _checked_table(path, x_train, y_train, x_test, y_test):
    """Regression arrays as float32 tensors, after every check that would otherwise fail later or silently:
    (N, D) numeric features, one target row per example (1-D targets become (N, 1)), all finite."""
    out = []
    for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
        for name, a, ndim in ((f'x_{split}', x, (2,)), (f'y_{split}', y, (1, 2))):
            real = (np.issubdtype(a.dtype, np.number) and not np.iscomplexobj(a)) or a.dtype == bool
            if a.ndim not in ndim or not real or (a.ndim == 2 and a.shape[1] == 0):
                raise EnsembleError(f'{path}: {name} must be a {" or ".join(f"{d}-D" for d in ndim)} array of real '
                                    f'numbers (regression: features (N, D), targets (N,) or (N, T), D and T at least '
                                    f'1), got {a.dtype} {a.shape}')
            if not np.isfinite(a.astype(np.float64)).all():
                raise EnsembleError(f'{path}: {name} holds NaN or infinite values; fill or drop them first')
            if np.abs(a.astype(np.float64)).max(initial=0) > np.finfo(np.float32).max:
                raise EnsembleError(f'{path}: {name} holds values beyond float32 (about 3.4e38), which training '
                                    'uses; rescale them')
        _check_target_scale(path, f'y_{split}', y.astype(np.float64))
        if len(y) != len(x) or len(y) == 0:
            raise EnsembleError(f'{path}: x_{split} holds {len(x)} rows and y_{split} {len(y)} targets; '
                                'they must match and not be empty')
        out += [torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y.reshape(len(y), -1), dtype=torch.float32)]
    if out[2].shape[1] != out[0].shape[1] or out[3].shape[1] != out[1].shape[1]:
        raise EnsembleError(f'{path}: train has {out[0].shape[1]} features and {out[1].shape[1]} targets, test '
                            f'{out[2].shape[1]} and {out[3].shape[1]}; they must match')
    return (*out, out[1].shape[1])


def _check_target_scale(path, name, y):
    """Targets whose squared error float32 can hold: the loss is measured in their units (overflow above
    about 1.8e19) and trained in units of their spread (a spread below ~1e-15 underflows)."""
    top, spread = float(np.abs(y).max(initial=0)), y.std(0)
    if top > MAX_TARGET:
        raise EnsembleError(f'{path}: {name} reaches {top:.3g}; squared errors of such targets overflow float32 '
                            f'(they must stay below {MAX_TARGET:g}): rescale them (e.g. to thousands)')
    if ((spread > 0) & (spread < MIN_TARGET_STD)).any():
        raise EnsembleError(f'{path}: {name} varies by only {spread[spread > 0].min():.3g}; float32 cannot resolve '
                            f'errors at that scale (spread at least {MIN_TARGET_STD:g}): rescale them')


def _read_csv(path, target=None):
    """A numeric table with a header row as regression arrays: `target` (default: the last column) is
    the target, every other column a feature, and a fixed CSV_TEST_FRACTION of the rows the test split."""
    import csv
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:   # -sig: a byte-order mark is not part of a name
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EnsembleError(f'cannot read {path}: {e}') from None
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    header = [h.strip() for h in header]
    if len(header) < 2 or len(rows) < 2:
        raise EnsembleError(f'{path}: a .csv needs a header row, at least two columns and two rows')
    target = header[-1] if target is None else target
    if target not in header:
        raise EnsembleError(f"{path}: no column '{target}' (--target); the columns are {', '.join(header)}")
    table = np.empty((len(rows), len(header)))
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise EnsembleError(f'{path}: line {i + 2} has {len(row)} fields, the header {len(header)}')
        for j, cell in enumerate(row):
            try:
                table[i, j] = float(cell)
            except ValueError:
                raise EnsembleError(f"{path}: line {i + 2}, column '{header[j]}' is not a number ({cell!r}); "
                                    'encode categories as numbers (e.g. one-hot) first') from None
    t = header.index(target)
    x, y = np.delete(table, t, axis=1), table[:, t]
    test = torch.randperm(len(rows), generator=torch.Generator().manual_seed(DATA_ORDER_SEED))[
        :max(1, round(CSV_TEST_FRACTION * len(rows)))]
    is_test = np.zeros(len(rows), dtype=bool)
    is_test[test.numpy()] = True
    return dict(x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test], y_test=y[is_test])


def _class_ranks(y):
    """Each example's rank among the examples of its class, in the given order."""
    rank = torch.empty(len(y), dtype=torch.int64)
    for c in torch.unique(y):
        where = (y == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return rank


def _balanced_order(y, seed):
    """A fixed permutation that interleaves the classes, so that every prefix is class-balanced."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    rank = _class_ranks(y[perm])
    return perm[torch.from_numpy(np.lexsort((y[perm].numpy(), rank.numpy())))]


def _checked_arrays(path, x_train, y_train, x_test, y_test):
    """An .npz's arrays as tensors, after every check that would otherwise fail later or silently:
    uint8 images of one shape, 1-D integer labels, one per image, every class 0..K-1 in the training set."""
    x_train, x_test = _as_nchw(x_train), _as_nchw(x_test)
    for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise EnsembleError(f'{path}: y_{split} must be a 1-D array of integer labels, got {y.dtype} {y.shape} '
                                '(real-valued targets: pass --task regression)')
        if len(y) != len(x) or len(y) == 0:
            raise EnsembleError(f'{path}: x_{split} holds {len(x)} images and y_{split} {len(y)} labels; '
                                'they must match and not be empty')
        if y.min() < 0:
            raise EnsembleError(f'{path}: y_{split} holds a negative label ({y.min()}); labels are 0..K-1')
    if x_test.shape[1:] != x_train.shape[1:]:
        raise EnsembleError(f'{path}: test images are {tuple(x_test.shape[1:])}, training images '
                            f'{tuple(x_train.shape[1:])}; they must match')
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    missing = sorted(set(range(num_classes)) - set(np.unique(y_train).tolist()))
    if missing:
        raise EnsembleError(f'{path}: labels run 0..{num_classes - 1} but the training set has no image of class '
                            f'{", ".join(map(str, missing[:10]))}{"..." if len(missing) > 10 else ""}; '
                            'relabel the classes as 0..K-1')
    return (x_train, torch.as_tensor(y_train.astype(np.int64)), x_test, torch.as_tensor(y_test.astype(np.int64)),
            num_classes)


def load_data(name, data_dir='data', seed=0, val_size=0, shard=None, subset=None, device='cpu', download=True,
              task='classification', target=None, classes=None):
    """Load a dataset as tensors on `device`: uint8 NCHW images and labels, or (regression) float features
    and targets.

    name: a name from DATASETS, a path to a .npz file, or (regression) a .csv file whose column `target`
    (default: the last) is the target. `seed` only affects synthetic data.
    val_size: hold out that many training examples (a fixed choice, class-balanced for labels) as a validation split.
    shard: (i, n) keeps the i-th of n disjoint parts of the training set (class-balanced for labels).
    subset: keep at most that many training and test examples (class-balanced for labels).
    classes: keep only the examples of these classes, first (labels keep their ids; num_classes is the dataset's).
    """
    if task not in TASKS:
        raise EnsembleError(f"unknown task '{task}': use {' or '.join(TASKS)}")
    regression, name = task == 'regression', str(name)
    tabular = name.endswith('.csv') or name == 'synthetic-regression'
    if tabular != regression and not name.endswith('.npz'):
        raise EnsembleError(f"dataset '{name}' is for regression: pass --task regression" if tabular else
                            f"dataset '{name}' is for classification; --task regression needs synthetic-regression, "
                            'a .csv table, or a .npz of features and real targets')
    if name.endswith(('.npz', '.csv')) and not Path(name).exists():
        raise EnsembleError(f'dataset file {name} does not exist')
    if name.endswith('.csv'):
        x_train, y_train, x_test, y_test, num_classes = _checked_table(name, **_read_csv(name, target))
    elif name.endswith('.npz'):
        try:
            with np.load(name, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
        except Exception as e:  # noqa: BLE001 - a bad file raises KeyError, ValueError, BadZipFile, EOFError...
            raise EnsembleError(f'cannot read {name}: needs a .npz with arrays x_train, y_train, x_test, y_test '
                                f'({type(e).__name__}: {e})') from None
        x_train, y_train, x_test, y_test, num_classes = (_checked_table if regression
                                                         else _checked_arrays)(name, **arrays)
    elif name == 'synthetic-regression':
        x_train, y_train, x_test, y_test, num_classes = _synthetic_regression(seed)
    elif name == 'synthetic':   # i.i.d. examples: a subset can simply be generated smaller
        sizes = (dict(n_train=min(50000, subset), n_test=min(10000, subset)) if subset and not (val_size or shard)
                 else {})
        x_train, y_train, x_test, y_test, num_classes = _synthetic(seed, **sizes)
    elif name == TENSORS:
        raise EnsembleError("dataset 'tensors' was given to train(cfg, data=...) in Python; a reader of the run needs "
                            'those tensors too: pass your own logits to analyze.py\'s functions')
    elif name in DATASETS:
        x_train, y_train, x_test, y_test = _download(name, data_dir, download)
        num_classes = 100 if name == 'cifar100' else 10
    else:
        raise EnsembleError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)} or a path to a .npz file"
                            + (' or a .csv file' if regression else ''))

    return prepared_data(name, x_train, y_train, x_test, y_test, num_classes, task, val_size, shard, subset, classes,
                         device)


def prepared_data(name, x_train, y_train, x_test, y_test, num_classes, task='classification', val_size=0, shard=None,
                  subset=None, classes=None, device='cpu'):
    """The splits a run sees, from a dataset's checked tensors: its classes, then a validation split, a
    shard and a subset of the training set (load_data's arguments)."""
    regression = task == 'regression'
    if classes is not None:
        x_train, y_train, x_test, y_test = _keep_classes(name, classes, num_classes, x_train, y_train, x_test, y_test)

    def fixed_order(y):   # the same for every run; class-balanced in every prefix for labels
        if regression:
            return torch.randperm(len(y), generator=torch.Generator().manual_seed(DATA_ORDER_SEED))
        return _balanced_order(y, seed=DATA_ORDER_SEED)

    order = fixed_order(y_train)
    x_val = y_val = None
    if val_size:
        if not 0 < val_size < len(y_train):
            raise EnsembleError(f'--val-size must be between 1 and {len(y_train) - 1}, got {val_size}')
        val_idx, order = order[:val_size], order[val_size:]
        x_val, y_val = x_train[val_idx], y_train[val_idx]
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise EnsembleError(f'--shard i/n needs 0 <= i < n, got {i}/{n}')
        deal = torch.arange(len(order)) if regression else _class_ranks(y_train[order])   # round-robin (per class)
        order = order[deal % n == i]
    if subset:
        order = order[:subset]
        test_order = fixed_order(y_test)[:subset]
        x_test, y_test = x_test[test_order], y_test[test_order]
    if len(order) == 0:
        raise EnsembleError(f'no training examples are left of {name} after --val-size {val_size}, --shard '
                            f'{"/".join(map(str, shard)) if shard else None}, --examples {subset}: '
                            'ask for fewer parts or more data')
    x_train, y_train = x_train[order], y_train[order]
    return Data(name, x_train, y_train, x_test, y_test, num_classes, x_val, y_val, task).to(device)


def tensor_data(tensors, cfg, own_model, device='cpu'):
    """The user's own (x_train, y_train, x_test, y_test) as the Data a run trains on, with cfg's splits.
    For a network of this toolkit they must be what a .npz holds (uint8 images and labels; for regression
    features and targets); for the user's own module any inputs it takes (float or uint8, any shape), with
    integer labels 0..K-1 or (regression) real targets."""
    if not (isinstance(tensors, (tuple, list)) and len(tensors) == 4 and all(map(torch.is_tensor, tensors))):
        raise EnsembleError('data= takes four tensors: (x_train, y_train, x_test, y_test)')
    x_train, y_train, x_test, y_test = (t.detach().cpu() for t in tensors)
    regression = cfg.task == 'regression'
    if not own_model:   # the same checks as a .npz file's
        arrays = dict(x_train=x_train.numpy(), y_train=y_train.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())
        checked = (_checked_table if regression else _checked_arrays)('data=', **arrays)
    else:
        for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
            if len(x) != len(y) or len(y) == 0 or x.shape[1:] != x_train.shape[1:]:
                raise EnsembleError(f'data=: x_{split} holds {len(x)} examples of shape {tuple(x.shape[1:])} '
                                    f'and y_{split} {len(y)}; they must match, not be empty, and share one '
                                    'input shape')
            if not regression and (y.dim() != 1 or y.is_floating_point() or y.min() < 0):
                raise EnsembleError(f'data=: y_{split} must be 1-D integer labels 0..K-1 (real-valued targets: '
                                    'task=regression)')
            if regression and not (y.is_floating_point() and torch.isfinite(y).all()):
                raise EnsembleError(f'data=: y_{split} must be finite real targets for task=regression')
        if regression:
            y_train, y_test = y_train.float().view(len(y_train), -1), y_test.float().view(len(y_test), -1)
        k = y_train.size(1) if regression else int(max(y_train.max(), y_test.max())) + 1
        checked = (x_train, y_train if regression else y_train.long(), x_test,
                   y_test if regression else y_test.long(), k)
    return prepared_data(TENSORS, *checked, cfg.task, cfg.val_size, parse_shard(cfg.shard) if cfg.shard else None,
                         cfg.subset, cfg.classes, device)


def _keep_classes(name, classes, num_classes, x_train, y_train, x_test, y_test):
    """Only the examples whose label is in `classes`, with their labels unchanged."""
    if not classes or any(not 0 <= c < num_classes for c in classes) or len(set(classes)) != len(classes):
        raise EnsembleError(f'--classes must name distinct classes of {name}, 0 to {num_classes - 1}, got '
                            f'{classes}')
    keep = torch.tensor(sorted(classes))
    train, test = torch.isin(y_train, keep), torch.isin(y_test, keep)
    return x_train[train], y_train[train], x_test[test], y_test[test]


def load_run_data(config, device='cpu', download=True, **overrides):
    """The data a run was trained on, from its config (config.json or a Config); overrides win.
    download=False for readers of a run directory: nothing is fetched or created where its config says."""
    config = {**(asdict(config) if isinstance(config, Config) else config), **overrides}
    if not config.get('dataset'):
        raise EnsembleError('no dataset is known for this model: pass --dataset')
    shard = config.get('shard')
    seed = config.get('data_seed')
    return load_data(config['dataset'], config.get('data_dir', 'data'),
                     seed=config.get('seed', 0) if seed is None else seed, val_size=config.get('val_size', 0),
                     shard=parse_shard(shard) if shard else None, subset=config.get('subset'),
                     classes=config.get('classes'), device=device, download=download,
                     task=config.get('task') or 'classification', target=config.get('target'))


@torch.no_grad()
def training_images(x_uint8, normalize, dtype=None, pad=0, channels_last=False):
    """The training set as the network's first layer (`normalize`, fixed) sees it, converted once per
    run instead of once per step: standardized, stored in `dtype` (what autocast would cast it to),
    reflect-padded by `pad` pixels for random crops, in channels_last layout when asked."""
    x = normalize(to_float_images(x_uint8, dtype)).to(dtype or torch.get_default_dtype())
    if pad:
        x = F.pad(x, (pad,) * 4, mode='reflect')
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augment_batch(padded, idx, flip, shifts, size):
    """Images `idx` of the padded training set, each cropped at its (row, column) offset in the (2, B)
    `shifts` and mirrored where `flip`, as ONE gather: no boolean-mask indexing, which would make the
    host wait for the GPU ten times a step. Mirroring is folded into the column index, since a
    reflect-padded mirror image is the mirror of the padded image. The batch keeps the set's layout."""
    n, (h, w), width = len(idx), size, padded.size(-1)
    rows = shifts[0].view(n, 1) + torch.arange(h, device=padded.device)
    cols = shifts[1].view(n, 1) + torch.arange(w, device=padded.device)
    cols = torch.where(flip.view(n, 1), width - 1 - cols, cols)
    nhwc = padded.permute(0, 2, 3, 1)   # index the spatial axes with the channels innermost
    out = nhwc[idx.view(n, 1, 1), rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    return out if padded.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


#############################################
#            Network Components             #
#############################################
# Every layer is written for M members at once. Its parameters are the members' parameters stacked
# along the first axis: a conv weight is (M·C_out, C_in, k, k), a BatchNorm holds M·C channels, a
# linear weight is (M·out, in). A layer whose input is the shared image (the first one) is an ordinary
# conv/linear with M times the outputs; later layers are grouped (groups = M). With M = 1 every class
# below is an ordinary nn.Conv2d / nn.BatchNorm2d / nn.Linear, which is what load_member returns and
# what rebasin.py traces.

class Normalize(nn.Module):
    """Per-channel standardization of [0, 1] images (statistics (C, 1, 1)), or per-feature standardization
    of (B, D) features (statistics (D,)): checkpoints take raw inputs and need nothing else."""

    def __init__(self, mean, std, images=True):
        super().__init__()
        shape = (-1, 1, 1) if images else (-1,)
        self.register_buffer('mean', torch.tensor(mean).view(shape))
        self.register_buffer('std', torch.tensor(std).view(shape))

    def forward(self, x):
        return (x - self.mean) / self.std


class TargetScale(nn.Module):
    """Regression's last layer, fixed: each member's T outputs from standardized units back to the targets'
    (mean + std·z), so a checkpoint predicts in original units. Shapes (T,), shared by all members."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean))
        self.register_buffer('std', torch.tensor(std))

    def forward(self, z):
        return (z.view(z.size(0), -1, self.mean.numel()) * self.std + self.mean).flatten(1)


class Conv(nn.Conv2d):
    def __init__(self, c_in, c_out, kernel_size=3, members=1, shared_input=False, padding='same',
                 bias=False, stride=1):
        groups = 1 if shared_input else members
        super().__init__(c_in * groups, c_out * members, kernel_size, stride=stride, padding=padding,
                         bias=bias, groups=groups)


class DiracConv(Conv):
    """airbench's conv: identity-initialized in its first C_in outputs (an implicit residual)."""

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        if self.groups == 1 and w.size(0) == self.out_channels:   # init runs per member (M = 1)
            nn.init.dirac_(w[:min(w.size(0), w.size(1))])


class BatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: no learned scale, high momentum, tiny eps."""

    def __init__(self, channels, members=1):
        super().__init__(channels * members, eps=1e-12, momentum=BN_MOMENTUM)
        self.weight.requires_grad = False


class Linear(nn.Linear):
    def __init__(self, d_in, d_out, members=1, shared_input=False, bias=True):
        super().__init__(d_in, d_out * members, bias=bias)
        self.groups = 1 if shared_input else members   # blocks of the input, one per member
        self.d_out = d_out

    def forward(self, x):
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        # One batched matmul over the members, reading each member's block of x in place (a strided
        # view: no copy of the activations, which einsum made in both passes). Leading axes (a
        # transformer's tokens) are folded into the batch.
        m, lead = self.groups, x.shape[:-1]
        x = x.reshape(-1, x.size(-1))
        y = torch.bmm(x.view(x.size(0), m, -1).transpose(0, 1), self.weight.view(m, self.d_out, -1).transpose(1, 2))
        y = y.transpose(0, 1).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


class LayerNorm(nn.Module):
    """LayerNorm over each member's own block of the last axis (M·d features: M LayerNorms of d)."""

    def __init__(self, d, members=1, eps=1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(members * d))
        self.bias = nn.Parameter(torch.zeros(members * d))

    def forward(self, x):
        shape = x.shape
        x = F.layer_norm(x.reshape(*shape[:-1], -1, self.d), (self.d,), eps=self.eps)
        return (x.reshape(shape) * self.weight + self.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens (B, T, M·d) plus fixed 2-D sine-cosine positions (SimpleViT,
    Beyer et al. 2022): a buffer of (T, d) that every member adds to its own block."""

    def __init__(self, c_in, d, patch, image_size, members=1):
        super().__init__()
        self.conv = Conv(c_in, d, patch, members, shared_input=True, padding=0, bias=True, stride=patch)
        side = image_size // patch
        y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing='ij')
        omega = 1 / 10000 ** (torch.arange(d // 4) / max(d // 4 - 1, 1))
        angles = [x.flatten()[:, None] * omega, y.flatten()[:, None] * omega]
        pos = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
        self.register_buffer('pos', F.pad(pos, (0, d - pos.size(1))))   # (T, d); d not a multiple of 4: zeros

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)   # (B, T, M·d)
        b, t, _ = tokens.shape
        return (tokens.view(b, t, -1, self.pos.size(1)) + self.pos[:, None]).view(b, t, -1)


class Attention(nn.Module):
    """Multi-head self-attention for M members at once: member m's H heads are heads mH..(m+1)H − 1 of one
    attention over M·H heads. Each member's projections are stored per head, queries, keys and values as
    (H, head dim, d) and the output as (d, H, head dim), so that a permutation of the heads, and of the
    query/key and value dimensions within them, can each name an axis (ViT.permutation_table). Keys have no
    bias: it adds q·b to every score of a query alike, which the softmax ignores, so its gradient is zero and
    Adam would turn the rounding noise in it into full-size steps."""

    def __init__(self, d, heads, members=1):
        super().__init__()
        self.heads, self.members, dh = heads, members, d // heads
        for name in ('q', 'k', 'v'):
            setattr(self, f'{name}_weight', nn.Parameter(torch.empty(members * heads, dh, d)))
        self.q_bias = nn.Parameter(torch.zeros(members * heads, dh))
        self.v_bias = nn.Parameter(torch.zeros(members * heads, dh))
        self.out_weight = nn.Parameter(torch.empty(members * d, heads, dh))
        self.out_bias = nn.Parameter(torch.zeros(members * d))
        bound = 1 / math.sqrt(d)   # nn.Linear's default, fan-in d for every projection
        for w in (self.q_weight, self.k_weight, self.v_weight, self.out_weight):
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x):
        b, t, _ = x.shape
        m, h = self.members, self.heads
        x = x.view(b, t, m, -1)

        def project(w, bias=None):   # (B, M·H, T, head dim)
            y = torch.einsum('btmd,mhed->bmhte', x, w.view(m, h, *w.shape[1:]))
            return (y if bias is None else y + bias.view(m, h, 1, -1)).reshape(b, m * h, t, -1)

        o = F.scaled_dot_product_attention(project(self.q_weight, self.q_bias), project(self.k_weight),
                                           project(self.v_weight, self.v_bias))
        w = self.out_weight.view(m, -1, h, o.size(-1))
        return torch.einsum('bmhte,mdhe->btmd', o.view(b, m, h, t, -1), w).reshape(b, t, -1) + self.out_bias


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU MLP of 4d."""

    def __init__(self, d, heads, members=1):
        super().__init__()
        self.norm1, self.attn = LayerNorm(d, members), Attention(d, heads, members)
        self.norm2, self.fc1, self.fc2 = LayerNorm(d, members), Linear(d, 4 * d, members), Linear(4 * d, d, members)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


class ViT(nn.Sequential):
    """A small ViT (SimpleViT: sine-cosine positions, mean-pooled tokens, pre-norm blocks). A Sequential,
    like every network here; it also names its own permutations for rebasin.py, since tracing cannot
    see inside the heads."""

    def permutation_table(self, per_head=True):
        """(table, buffers, within) for rebasin.spec_from_table, for one member: the residual stream's
        permutation 'R' shared by every block; per block i the MLP's hidden units 'M<i>', the heads 'H<i>',
        and within each head its own reordering of the query/key dimensions 'QK<i>' (queries and keys alike,
        so the scores stay) and of the value dimensions 'V<i>' (values and the output projection); with
        per_head False, one query/key and one value reordering shared by the block's heads."""
        table, within = {}, {}
        for i, layer in enumerate(self):
            if isinstance(layer, PatchEmbed):
                table.update({f'{i}.conv.weight': ('R', None, None, None), f'{i}.conv.bias': ('R',),
                              f'{i}.pos': (None, 'R')})
            elif isinstance(layer, Block):
                heads, qk, v, mlp = f'H{i}', f'QK{i}', f'V{i}', f'M{i}'
                within.update({qk: heads, v: heads} if per_head else {})
                for norm in ('norm1', 'norm2'):
                    table.update({f'{i}.{norm}.weight': ('R',), f'{i}.{norm}.bias': ('R',)})
                for name, dims in (('q', qk), ('k', qk), ('v', v)):
                    table[f'{i}.attn.{name}_weight'] = (heads, dims, 'R')
                table.update({f'{i}.attn.q_bias': (heads, qk), f'{i}.attn.v_bias': (heads, v)})
                table.update({f'{i}.attn.out_weight': ('R', heads, v), f'{i}.attn.out_bias': ('R',),
                              f'{i}.fc1.weight': (mlp, 'R'), f'{i}.fc1.bias': (mlp,), f'{i}.fc2.weight': ('R', mlp),
                              f'{i}.fc2.bias': ('R',)})
            elif isinstance(layer, LayerNorm):
                table.update({f'{i}.weight': ('R',), f'{i}.bias': ('R',)})
            elif isinstance(layer, Linear):
                table.update({f'{i}.weight': (None, 'R'), f'{i}.bias': (None,)})
        return table, [k for k in table if k.endswith('.pos')], within


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class ConvGroup(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, members):
        super().__init__()
        self.conv1 = DiracConv(c_in, c_out, kernel_size, members)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(c_out, members)
        self.conv2 = DiracConv(c_out, c_out, kernel_size, members)
        self.norm2 = BatchNorm(c_out, members)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, members):
        super().__init__()
        self.conv1 = Conv(c_in, c_out, 3, members, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out * members)
        self.conv2 = Conv(c_out, c_out, 3, members, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out * members)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv(c_in, c_out, 1, members, stride=stride, padding=0),
                                          nn.BatchNorm2d(c_out * members))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


#############################################
#            Network Definition             #
#############################################

# One builder per architecture: the layers after the fixed input normalization, with M members side by
# side (each layer holds the members' weights stacked on its first axis), from the spec's own settings.

def airbench_layers(spec, c, k, m):
    widths = [_scaled(64, spec), _scaled(256, spec), _scaled(256, spec)]
    whiten_width = 2 * c * 2 * 2
    whiten = Conv(c, whiten_width, 2, m, shared_input=True, padding=0, bias=True)
    whiten.weight.requires_grad = False   # computed from the data (init_member), never trained
    layers = [whiten, nn.GELU()]
    for c_in, c_out in zip([whiten_width] + widths[:-1], widths):
        layers.append(ConvGroup(c_in, c_out, spec['kernel_size'], m))
    return layers + [nn.AdaptiveMaxPool2d(1), nn.Flatten(), Linear(widths[-1], k, m, bias=False), Mul(LOGIT_SCALE)]


def resnet18_layers(spec, c, k, m):
    widths = [_scaled(64, spec), _scaled(128, spec), _scaled(256, spec), _scaled(512, spec)]
    layers = [Conv(c, widths[0], 3, m, shared_input=True, padding=1), nn.BatchNorm2d(widths[0] * m), nn.ReLU()]
    c_in = widths[0]
    for i, c_out in enumerate(widths):
        for stride in ((1 if i == 0 else 2), 1):
            layers.append(BasicBlock(c_in, c_out, stride, m))
            c_in = c_out
    return layers + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(c_in, k, m)]


def mlp_layers(spec, c, k, m):
    d_in, layers = c * spec['image_size'] ** 2, [nn.Flatten()]
    for i, h in enumerate(spec['hidden']):
        layers += [Linear(d_in, h, m, shared_input=(i == 0)), nn.ReLU()]
        d_in = h
    layers.append(Linear(d_in, k, m, shared_input=not spec['hidden']))
    if spec.get('task') == 'regression':
        layers.append(TargetScale(spec['target_mean'], spec['target_std']))
    return layers


def vit_layers(spec, c, k, m):
    d = vit_dim(spec['width'])
    layers = [PatchEmbed(c, d, spec['patch_size'], spec['image_size'], m)]
    layers += [Block(d, spec['heads'], m) for _ in range(spec['depth'])]
    return layers + [TokenMean(), LayerNorm(d, m), Linear(d, k, m)]


def _scaled(channels, spec):
    return max(1, round(channels * spec['width']))


def whiten_first_layer(net, x_float):
    """airbench: the frozen first conv whitens the data's 2x2 patches (airbench94)."""
    with torch.no_grad():
        net[1].weight.copy_(whitening_weights(net[0](x_float)))


def freeze_whitening_bias(net, epoch, cfg):
    """airbench: the whitening conv's bias trains for the first whiten_bias_epochs epochs only."""
    net[1].bias.requires_grad = epoch < cfg.whiten_bias_epochs


def vit_problem(settings):
    d = vit_dim(settings['width'])
    if d % settings['heads']:
        return f"--heads {settings['heads']} must divide the ViT's token width {d} (64 x --width {settings['width']:g})"
    if settings.get('image_size', 0) % settings['patch_size']:
        return f"--patch-size {settings['patch_size']} must divide the image size {settings['image_size']}"
    return None


@dataclass(frozen=True)
class Arch:
    """One architecture: its builder, its recipe, its own settings (Config options with their defaults, which
    its model spec records; REQUIRED: a spec must have it), and optional hooks."""
    layers: Callable                    # (spec, in_channels, num_classes, members) -> layers after Normalize
    recipe: dict                        # the training defaults (RECIPES)
    help: str
    settings: dict                      # {Config option: default in a spec without it, or REQUIRED}
    container: type = nn.Sequential     # what holds the layers (the ViT's knows its permutations)
    init: Optional[Callable] = None     # (member, float images) -> None: initialization from the data
    each_epoch: Optional[Callable] = None   # (wide network, epoch, cfg) -> None, as each training epoch begins
    problem: Optional[Callable] = None  # (settings, with image_size when known) -> why it cannot be built, or None
    tasks: tuple = ('classification',)
    not_matrices: Optional[str] = None  # why its weights do not read as matrices (--param spectral and muon need them)
    tiny: dict = field(default_factory=dict)   # the smallest settings worth a run (tests train every entry so)


REQUIRED = object()
ARCHS = {
    'airbench': Arch(airbench_layers, RECIPES['airbench'], 'airbench94 (the default; --width, --kernel-size)',
                     dict(width=1.0, kernel_size=3), init=whiten_first_layer, each_epoch=freeze_whitening_bias,
                     tiny=dict(width=1 / 16)),
    'resnet18': Arch(resnet18_layers, RECIPES['resnet18'], 'ResNet-18 (--width)', dict(width=1.0),
                     tiny=dict(width=1 / 16)),
    'mlp': Arch(mlp_layers, RECIPES['mlp'], "an MLP (--hidden; regression's default and only one)",
                dict(hidden=REQUIRED), tasks=TASKS, tiny=dict(hidden=[16])),
    'vit': Arch(vit_layers, RECIPES['vit'], 'a small SimpleViT (--width, --depth, --heads, --patch-size)',
                dict(width=1.0, depth=REQUIRED, heads=REQUIRED, patch_size=REQUIRED), container=ViT,
                problem=vit_problem, not_matrices='its attention weights are per head (3-D)',
                tiny=dict(width=0.25, depth=1, heads=2, patch_size=8)),
}


BRANCHES = 'branches'   # a model spec's arch for networks side by side, their probabilities averaged


class Branches(nn.Module):
    """Networks side by side whose probabilities are averaged, as one model: a partially zipped merge
    (rebasin.py merge --method zip --partial K) keeps its later layers as branches. Its logits are the log
    of the averaged probabilities, (B, members·K) member-major like every network here."""

    def __init__(self, nets, members=1):
        super().__init__()
        self.branches, self.members = nn.ModuleList(nets), members

    def forward(self, x):
        log_p = torch.stack([F.log_softmax(net(x).view(len(x), self.members, -1), -1) for net in self.branches])
        return (torch.logsumexp(log_p, 0) - math.log(len(self.branches))).flatten(1)


def branches_spec(base, count):
    """The model spec of `count` networks of spec `base` averaged (its input and output are the base's)."""
    shared = {k: base[k] for k in ('in_channels', 'image_size', 'num_classes', 'mean', 'std', 'task') if k in base}
    return dict(arch=BRANCHES, base=base, count=count, **shared)


def arch_settings(spec):
    """The spec's settings of its architecture, with the defaults of those an older spec lacks."""
    return {k: spec.get(k, default) for k, default in ARCHS[spec['arch']].settings.items()}


def build_model(spec, members=1):
    """The network a model spec describes, with `members` members side by side.

    spec: dict with arch (an ARCHS entry) and its settings, in_channels, image_size, num_classes, mean, std.
    Input: float images in [0, 1], (B, C, H, W). Output: (B, members·num_classes) logits, member-major;
    member_logits splits them. A regression spec (task 'regression', mlp only) takes (B, D) features
    (in_channels D, image_size 1) and ends in TargetScale(target_mean, target_std): its num_classes
    outputs are in the targets' units.
    """
    if spec['arch'] == BRANCHES:
        return Branches([build_model(spec['base'], members) for _ in range(spec['count'])], members)
    if spec['arch'] not in ARCHS:
        raise EnsembleError(f"unknown architecture '{spec['arch']}': use {', '.join(ARCHS)}")
    arch = ARCHS[spec['arch']]
    spec = {**spec, **arch_settings(spec)}
    normalize = Normalize(spec['mean'], spec['std'], images=spec.get('task') != 'regression')
    return arch.container(normalize, *arch.layers(spec, spec['in_channels'], spec['num_classes'], members))


def architecture(spec):
    """A model spec without its data statistics (input mean and std): two members with the same
    architecture can be compared, interpolated and merged even when trained on different data."""
    return {k: v for k, v in spec.items() if k not in ('mean', 'std', 'target_mean', 'target_std')}


def input_shape(spec):
    """The shape of one input a model spec takes: (C, H, W) images, or (D,) features for regression."""
    if spec.get('task') == 'regression':
        return (spec['in_channels'],)
    return (spec['in_channels'], spec['image_size'], spec['image_size'])


class StackedMembers(nn.Module):
    """M copies of a user's own module as one network, like build_model's wide ones: every parameter and
    buffer stacked on a leading member axis (so SAM, Lookahead and per-member norms treat it alike), and
    outputs (B, M·K), member-major. The members run in one call, vectorized by torch.func.vmap, where the
    module allows it (checked on an example batch in train mode); else (e.g. a module with data-dependent
    control flow) in a loop over the members, each on its own slice of the stacked weights."""

    def __init__(self, modules, example):
        super().__init__()
        from torch.func import stack_module_state
        params, buffers = stack_module_state(modules)
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterList(params.values())
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f'buffer{i}', b)
        self.template = [copy.deepcopy(modules[0]).to('meta')]   # the structure only (a list: not a submodule)
        self.vectorized = self._vectorizes(example)

    def member_state(self, j):
        """Member j's state dict, under the names of the user's module."""
        return {**{n: p[j].detach() for n, p in zip(self.param_names, self.stacked)},
                **{n: getattr(self, f'buffer{i}')[j] for i, n in enumerate(self.buffer_names)}}

    def _vectorizes(self, example):
        saved = {k: v.clone() for k, v in self.state_dict().items()}   # a train-mode probe moves BatchNorm statistics
        try:
            with torch.no_grad():
                self.train().forward(example, vectorized=True)
            return True
        except Exception:  # noqa: BLE001 - whatever vmap refuses (in-place updates, .item(), control flow)
            return False
        finally:
            self.load_state_dict(saved)

    def forward(self, x, vectorized=None):
        from torch.func import functional_call, vmap
        module = self.template[0].train(self.training)
        params = dict(zip(self.param_names, self.stacked))
        buffers = {n: getattr(self, f'buffer{i}') for i, n in enumerate(self.buffer_names)}
        if self.vectorized if vectorized is None else vectorized:
            out = vmap(lambda p, b: functional_call(module, (p, b), (x,)), randomness='different')(params, buffers)
        else:
            out = torch.stack([functional_call(module, ({n: p[j] for n, p in params.items()},
                                                        {n: b[j] for n, b in buffers.items()}), (x,))
                               for j in range(len(self.stacked[0]))])
        return out.transpose(0, 1).flatten(1)


def own_members(make_member, seeds, example, states=None):
    """StackedMembers of make_member(seed) for each seed (then loaded with `states`, when given)."""
    modules = []
    for j, seed in enumerate(seeds):
        torch.manual_seed(seed)   # a factory that does not seed itself still gives each member its own start
        module = make_member(seed)
        if not isinstance(module, nn.Module):
            raise EnsembleError(f'model= must return an nn.Module for a seed, got {type(module).__name__}')
        if states is not None:
            module.load_state_dict(states[j])
        modules.append(module)
    return nn.Sequential(nn.Identity(), StackedMembers(modules, example))   # [0]: no fixed input layer


def own_spec(cfg, data, module, vectorized):
    """The model spec of a user's own module: what it is, not how to build it (its factory does that)."""
    spec = dict(arch=OWN, module=f'{type(module).__module__}.{type(module).__qualname__}', task=cfg.task,
                input_shape=list(data.x_train.shape[1:]), num_classes=data.num_classes, vectorized=vectorized)
    if cfg.task == 'regression':   # errors are trained in units of the targets' spread
        std = data.y_train.std(0)
        spec['target_std'] = torch.where(std > 0, std, torch.ones(())).tolist()
    return spec


def check_model_spec(spec, source):
    """Refuse a model spec (from a checkpoint's metadata or a config.json) that would not build, or would
    build a member of more than MAX_MEMBER_PARAMETERS, before anything is allocated (counted on the meta device)."""
    def bad(why):
        return EnsembleError(f'{source}: its model spec {why}; the file was not written by this toolkit or was edited')
    if isinstance(spec, dict) and spec.get('arch') == OWN:
        raise EnsembleError(f"{source} holds a member of your own module {spec.get('module')}: rebuild it with "
                            'make_member(seed).load_state_dict(safetensors.torch.load_file(path))')
    if isinstance(spec, dict) and spec.get('arch') == BRANCHES:
        if not isinstance(spec.get('count'), int) or not 1 <= spec['count'] <= 64:
            raise bad(f"needs 'count' as an integer from 1 to 64, got {spec.get('count')!r}")
        base = check_model_spec(spec.get('base'), source)
        if base.get('arch') == BRANCHES or spec != branches_spec(base, spec['count']):
            raise bad("is a branches spec whose input or output differ from its 'base'")
        return spec
    if not isinstance(spec, dict) or spec.get('arch') not in ARCHS:
        raise bad(f"has no known 'arch' ({', '.join(ARCHS)})")
    for key in ('in_channels', 'image_size', 'num_classes'):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise bad(f"needs '{key}' as a positive integer, got {spec.get(key)!r}")
    settings = arch_settings(spec)
    missing = [k for k, v in settings.items() if v is REQUIRED]
    if missing:
        raise bad(f"needs '{missing[0]}'")
    try:
        checked_options(settings, source)
    except EnsembleError as e:
        raise bad(f'has a setting of the wrong type ({e})') from None
    wrong = out_of_range(settings)
    problem = ARCHS[spec['arch']].problem and ARCHS[spec['arch']].problem({**settings,
                                                                           'image_size': spec['image_size']})
    if wrong or problem:
        raise bad(f"needs '{wrong[0]}' {wrong[1]}, got {wrong[2]!r}" if wrong else f'cannot be built: {problem}')
    sizes = dict(mean=spec['in_channels'], std=spec['in_channels'])
    if spec.get('task', 'classification') not in TASKS:
        raise bad(f"has an unknown 'task' {spec.get('task')!r}")
    if spec.get('task') == 'regression':
        if 'regression' not in ARCHS[spec['arch']].tasks or spec['image_size'] != 1:
            raise bad('is a regression spec that is not an mlp on features (image_size 1)')
        sizes.update(target_mean=spec['num_classes'], target_std=spec['num_classes'])
    for key, size in sizes.items():
        if not (isinstance(spec.get(key), list) and len(spec[key]) == size and all(map(_finite, spec[key]))):
            raise bad(f"needs '{key}' as {size} finite numbers, got {spec.get(key)!r}")
    with torch.device('meta'):
        count = sum(p.numel() for p in build_model(spec).parameters())
    if count > MAX_MEMBER_PARAMETERS:
        raise bad(f'describes {count:,} parameters per member, over the limit of {MAX_MEMBER_PARAMETERS:,}')
    return spec


def member_logits(net, x, members):
    """(M, B, K) logits of every member for a batch of images."""
    out = net(x)
    return out.view(out.size(0), members, -1).transpose(0, 1)


def split_members(wide_state, member_state):
    """The wide state dict cut into M single-member state dicts. A tensor shaped like the single member's
    is shared by all members (input normalization, BatchNorm step counts); the others are chunked."""
    members = None
    for key, t in wide_state.items():
        if t.shape != member_state[key].shape:
            members = t.shape[0] // member_state[key].shape[0]
            break
    members = members or 1
    return [{key: (t if t.shape == member_state[key].shape else t.chunk(members)[j]).clone()
             for key, t in wide_state.items()} for j in range(members)]


def stack_members(states, wide_state):
    """The inverse of split_members: M single-member state dicts as one wide state dict. A tensor the wide
    network holds once (input statistics, a ViT's positions) must be the same in every member: members
    whose shared tensors differ (e.g. a ViT aligned by rebasin.py, its positions permuted) are refused."""
    stacked = {}
    for key, t in wide_state.items():
        if t.shape != states[0][key].shape:
            stacked[key] = torch.cat([s[key] for s in states])
            continue
        if states[0][key].is_floating_point() and any(not torch.equal(s[key], states[0][key]) for s in states[1:]):
            raise EnsembleError(f"the members differ in '{key}', which a wide network holds once for all of them: "
                                'they cannot be trained side by side (start them from one run, or train them apart)')
        stacked[key] = states[0][key]
    return stacked


#############################################
#            Initialization                 #
#############################################

def whitening_weights(x_float, kernel_size=2, eps=5e-4):
    """airbench's frozen first layer: the eigenvectors of the 2x2 patch covariance, scaled to whiten,
    and their negations (so the GELU after it passes both signs)."""
    c = x_float.size(1)
    patches = x_float.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)
    patches = patches.transpose(1, 3).reshape(-1, c * kernel_size ** 2).double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    w = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).view(-1, c, kernel_size, kernel_size)
    return torch.cat([w, -w]).float()


def init_member(spec, seed, x_train=None):
    """One member, initialized from its own seed (and, for airbench, the whitening of the data)."""
    torch.manual_seed(seed)
    net = build_model(spec, members=1)
    init = ARCHS[spec['arch']].init
    if init is not None:
        init(net, to_float_images(x_train[:5000].cpu()))
    return net


#############################################
#          The ensemble objective           #
#############################################

@dataclass(frozen=True)
class Combiner:
    """One way to make an ensemble of members: its prediction from the members' (M, B, K) outputs (and
    their log_softmax, for classification), the task it serves, and its help. Its DIV is always the mean
    member loss minus the ensemble's loss, ≥ 0 for each entry here (Jensen; for 'mean' exactly the
    members' variance around f̄)."""
    predict: Callable
    task: str
    help: str


COMBINERS = {
    'prob': Combiner(lambda logits, log_p: torch.logsumexp(log_p, 0) - math.log(logits.size(0)), 'classification',
                     "averages probabilities, p̄ = mean_j p_j (the default)"),
    # The normalized geometric mean of the probabilities is this one too: averaging log-probabilities or
    # logits gives the same softmax (each member's normalizer is a constant per example).
    'logit': Combiner(lambda logits, log_p: F.log_softmax(logits.mean(0), -1), 'classification',
                      'averages logits, p̄ = softmax(mean_j z_j): the normalized geometric mean of the p_j, so '
                      'averaging log-probabilities is this combiner too'),
    'mean': Combiner(lambda logits, log_p: logits.mean(0), 'regression', "averages outputs (regression's only one)"),
}
DEFAULT_COMBINER = {'classification': 'prob', 'regression': 'mean'}


def combiners_for(task):
    return [name for name, c in COMBINERS.items() if c.task == task]


def combine(logits, combiner, member_log_probs=None):
    """The ensemble's prediction from (M, B, K) member outputs by a COMBINERS entry: the log of its
    probabilities (classification) or its output (regression). member_log_probs: log_softmax(logits),
    when the caller has it already."""
    if combiner not in COMBINERS:
        raise EnsembleError(f"unknown combiner '{combiner}': use {', '.join(COMBINERS)}")
    entry = COMBINERS[combiner]
    if entry.task == 'classification' and member_log_probs is None:
        member_log_probs = F.log_softmax(logits, -1)
    return entry.predict(logits, member_log_probs)


def member_and_ensemble_losses(logits, y, combiner, label_smoothing=0.0, scale=None, ensemble=True, log_p=None):
    """The one place member and ensemble losses are computed (the objective, the training log and the
    evaluation call it): member losses (M, B), and with `ensemble` the ensemble's loss (B,) and prediction.
    Cross-entropy (smoothed as trained), or for a regression combiner the squared error (in units of
    `scale`, the targets' std, when given). log_p: log_softmax(logits), when the caller has it."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # bf16 in, fp32 (or fp64) math
    if COMBINERS[combiner].task == 'regression':
        member = squared_error(logits, y, scale)
        if not ensemble:
            return member, None, None
        prediction = combine(logits, combiner)
        return member, squared_error(prediction, y, scale), prediction
    log_p = F.log_softmax(logits, -1) if log_p is None else log_p
    member = cross_entropy(log_p, y, label_smoothing)
    if not ensemble:
        return member, None, None
    prediction = combine(logits, combiner, log_p)
    return member, cross_entropy(prediction, y, label_smoothing), prediction


def cross_entropy(log_probs, y, label_smoothing=0.0):
    """Per-example cross-entropy of log-probabilities (..., B, K) against labels, with label smoothing."""
    nll = -log_probs.gather(-1, y.expand(log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)


def squared_error(outputs, y, scale=None):
    """Per-example squared error of outputs (..., B, T) against targets (B, T), the mean over the T
    targets, each first divided by its `scale` (the targets' std: the standardized error regression
    trains on; None: in the targets' units)."""
    error = outputs - y if scale is None else (outputs - y) / scale
    return error.pow(2).mean(-1)


def ensemble_terms(logits, y, combiner, label_smoothing=0.0):
    """Member losses (M, B), the ensemble's loss (B,) and DIV = mean member loss − ensemble loss (B,):
    cross-entropy, or for the combiner 'mean' squared error (where DIV = mean_j (f_j − f̄)², exactly)."""
    member, ensemble, _ = member_and_ensemble_losses(logits, y, combiner, label_smoothing)
    return member, ensemble, member.mean(0) - ensemble


def ensemble_objective(logits, y, beta, combiner, label_smoothing=0.0, weights=None, scale=None):
    """Σ_j (1 − β)·L_j + β·M·L(ensemble), summed over the batch, and the terms it is made of:
    (member losses (M, B), ensemble loss (B,)). L is the cross-entropy (smoothed as trained), or for the
    combiner 'mean' the squared error in units of `scale` (the targets' std). At β = 0 the ensemble term
    is not built at all (its loss is None): independent members cost no more than one member each.

    weights: (M, B) per-member example weights (bagging's bootstrap counts); the ensemble term is
    weighted by their mean over members.
    """
    member_loss, ensemble, _ = member_and_ensemble_losses(logits, y, combiner, label_smoothing, scale, beta != 0)
    per_example = (member_loss if weights is None else weights * member_loss).sum(0)
    if beta != 0:
        ensemble_weight = beta * logits.size(0) * (1 if weights is None else weights.mean(0))
        per_example = (1 - beta) * per_example + ensemble_weight * ensemble
    return per_example.sum(), (member_loss, ensemble)


class TrainingLog:
    """An epoch's training-set figures, unsmoothed: summed objective, ensemble loss (CE, or squared error
    in the targets' units), correct ensemble predictions (0 for regression) and DIV.
    Each step only keeps its (detached) logits and labels; they are reduced in
    chunks of about LOG_CHUNK values, on the device, so the loop never waits for the log. One pass over
    many steps costs a third of one pass per step (CPU, MLP on Fashion-MNIST, M = 1: 9 ms vs 28 ms an epoch).
    With several ranks (MemberBlock) a chunk gathers every rank's logits once, and the objective's shares
    are summed at the end: the steps themselves communicate nothing for the log."""

    def __init__(self, combiner, block=None):
        self.combiner, self.sums, self.pending = combiner, None, []
        self.block = block or MemberBlock(1)

    def add(self, objective, logits, y):
        self.pending.append((objective.detach(), logits.detach(), y))
        if len(self.pending) * logits[0].numel() * self.block.members >= LOG_CHUNK:   # the same step on every rank
            self.reduce()

    @torch.no_grad()
    def reduce(self):
        if not self.pending:
            return
        objectives, logits, y = zip(*self.pending)
        self.pending = []
        logits, y = self.block.gather(torch.cat(logits, dim=1)), torch.cat(y)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        regression = COMBINERS[self.combiner].task == 'regression'
        log_p = None if regression else logits - logits.logsumexp(-1, keepdim=True)   # log_softmax, 4x faster on a CPU
        member_loss, ensemble_loss, prediction = member_and_ensemble_losses(logits, y, self.combiner, log_p=log_p)
        correct = (torch.zeros(()) if regression else (prediction.argmax(-1) == y).sum()).to(ensemble_loss)
        sums = torch.stack([torch.stack(objectives).sum().to(ensemble_loss.dtype), ensemble_loss.sum(), correct,
                            (member_loss.mean(0) - ensemble_loss).sum()])
        self.sums = sums if self.sums is None else self.sums + sums

    def totals(self):
        """(objective, ensemble loss, correct, DIV) summed over the epoch, as Python floats (waits for the device)."""
        self.reduce()
        if self.sums is None:
            return [0.0] * 4
        sums = self.sums.tolist()
        sums[0] = self.block.sum(self.sums[:1]).item()   # the objective's shares, from every rank
        return sums


#############################################
#               Checkpoints                 #
#############################################
# safetensors only (no pickle). Every write goes to a temporary file in the same directory and is
# renamed into place, so a killed run never leaves a half-written file.

# Test hook: TRAIN_ENSEMBLE_KILL_AT='NAME:before|after:N' kills this process (SIGKILL) at the N-th write
# of the file NAME, just before or just after its rename (tests/test_recovery.py).
KILL_AT = os.environ.get('TRAIN_ENSEMBLE_KILL_AT', '').split(':')
_writes = {}


def _kill_point(path, moment):
    if len(KILL_AT) == 3 and KILL_AT[0] == path.name and KILL_AT[1] == moment:
        _writes[path.name] = _writes.get(path.name, 0) + 1
        if _writes[path.name] == int(KILL_AT[2]):
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


# The files a run directory holds, by exact name (state: the resume state, per rank, and its previous epoch
# while every rank writes the next), and the temporaries atomic_write makes of them. Only these are ever
# deleted by the toolkit: a file a user put there, whatever its name, is never touched.
RUN_FILE = re.compile(r'config\.json|summary\.json|metrics\.jsonl|member_\d+\.safetensors'
                      r'|state(\.rank\d+)?(\.previous)?\.safetensors')
TEMPORARY = re.compile(r'\.(?P<name>.+)\.tmp\d+')


def temporary_path(path):
    """Where atomic_write writes `path` before renaming it."""
    return path.with_name(f'.{path.name}.tmp{os.getpid()}')


def is_run_temporary(path):
    """Whether `path` is a temporary that atomic_write made of one of a run's own files."""
    match = TEMPORARY.fullmatch(path.name)
    return match is not None and RUN_FILE.fullmatch(match['name']) is not None and path.is_file()


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(str(tmp))
        _kill_point(path, 'before')
        os.replace(tmp, path)
        _kill_point(path, 'after')
    except Exception as e:  # noqa: BLE001 - a full disk or a read-only directory (OSError, SafetensorError)
        raise EnsembleError(f'cannot write {path}: {e}') from None
    finally:
        if tmp.exists():
            tmp.unlink()


def json_safe(obj):
    """obj with every non-finite float as None: JSON has no NaN or Infinity (json.dumps would write bare
    tokens that strict readers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def lock_run_dir(run_dir):
    """Hold an OS lock on run_dir/.lock for as long as the returned file stays open (the OS releases it
    when the process dies, however it dies): one writer per run directory. None where the OS has no flock."""
    try:
        import fcntl
    except ImportError:   # not a POSIX system: no guard
        return None
    handle = open(Path(run_dir) / '.lock', 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or 'another process'
        handle.close()
        raise EnsembleError(f'{run_dir} is being written by {owner}: wait for it, or pass another --out') from None
    import platform
    handle.seek(0)
    handle.truncate()
    handle.write(f'process {os.getpid()} on {platform.node()}\n')
    handle.flush()
    return handle


def run_dir_writer(run_dir):
    """Who holds run_dir's lock ('process N on HOST'), or None when no process is writing it. Only looks:
    the lock file is neither created nor changed."""
    try:
        import fcntl
        handle = open(Path(run_dir) / '.lock')
    except (ImportError, OSError):   # no flock on this OS, or no lock file: nobody holds it
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or 'another process'
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + '\n')


def save_figure(fig, path, dpi=120):
    """A matplotlib figure as a PNG at path (its folder made if needed), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format='png'))


def stored_statistics(spec, state):
    """spec with its data statistics (input mean and std; regression's target mean and std) read from the
    fixed layers' buffers in `state`, which are what the network computes with: after --init from another
    run's weights, or a merge of models trained on other data, they are not the statistics of this data.
    Normalize is the first layer of every network build_model makes and TargetScale regression's last; no
    other layer has a buffer called 'mean'."""
    fixed = sorted((k[:-len('.mean')] for k in state if k.endswith('.mean') and k.count('.') == 1), key=int)
    stats = {}
    if fixed and fixed[0] == '0':
        stats.update(mean=state['0.mean'].flatten().tolist(), std=state['0.std'].flatten().tolist())
    if spec.get('task') == 'regression' and len(fixed) == 2:
        stats.update(target_mean=state[f'{fixed[1]}.mean'].flatten().tolist(),
                     target_std=state[f'{fixed[1]}.std'].flatten().tolist())
    return {**spec, **stats}


def save_member(path, state, spec, **meta):
    """Write one member's state dict with the model spec in the safetensors metadata (its statistics those
    of the state's own buffers)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    spec = spec if spec.get('arch') == OWN else stored_statistics(spec, tensors)
    metadata = {'format': FORMAT, 'model': json.dumps(spec), **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path):
    """(tensors, metadata) of a safetensors file, with a clear error for a missing or corrupt one."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise EnsembleError(f'checkpoint {path} does not exist')
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise EnsembleError(f'checkpoint {path} is not a readable safetensors file ({e})') from None
    return tensors, metadata


def load_member_state(path):
    """(spec, state_dict, metadata) of a member checkpoint."""
    state, metadata = read_checkpoint(path)
    if 'model' not in metadata:
        raise EnsembleError(f"{path} has no 'model' metadata: not a member checkpoint of this toolkit")
    try:
        meta = {k: json.loads(v) for k, v in metadata.items() if k != 'format'}
    except json.JSONDecodeError as e:
        raise EnsembleError(f'{path} has malformed metadata ({e}): not a member checkpoint of this toolkit') from None
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in state.values()):
        raise EnsembleError(f'{path} holds non-finite weights (NaN or inf): its run diverged')
    spec = check_model_spec(meta.pop('model'), path)
    with torch.device('meta'):   # the shapes its spec promises, without allocating them
        expected = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    for key in sorted(set(expected) | set(state)):
        got = tuple(state[key].shape) if key in state else 'missing'
        if got != expected.get(key, 'not in the model'):
            raise EnsembleError(f"{path} does not match its own model spec: tensor '{key}' is {got}, the spec "
                                f"says {expected.get(key, 'not in the model')}")
    return spec, state, meta


def load_member(path, device='cpu'):
    """Rebuild the exact nn.Module stored in a member_<i>.safetensors file (in eval mode)."""
    spec, state, _ = load_member_state(path)
    net = build_model(spec)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:   # its second line names the first tensor that does not fit
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise EnsembleError(f'{path} does not match its own model spec: '
                            f'{lines[1] if len(lines) > 1 else lines[0]}') from None
    return net.to(device).eval()


def read_config(run_dir):
    """A run directory's config.json as a dict ({} when there is none), every option in it checked to have
    its type and range: a value no command line would accept is refused, never used."""
    path = Path(run_dir) / 'config.json'
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnsembleError(f'{path} is not valid JSON ({e})') from None
    if not isinstance(config, dict):
        raise EnsembleError(f'{path} is not a run\'s config.json: it holds a JSON {type(config).__name__}, '
                            'not an object')
    if 'command' in config:   # rebasin.py's output: only its data options are training options (others may be null)
        options = {k: v for k, v in config.items() if k in DATA_OPTIONS and v is not None}
    else:
        options = config
    bad = out_of_range(checked_options(options, path))
    if bad:
        raise EnsembleError(f"{path}: '{bad[0]}' must be {bad[1]}, got {bad[2]}")
    return config


def read_metrics(run_dir):
    """A run directory's metrics.jsonl as a list of per-epoch dicts ([] when there is none)."""
    path = Path(run_dir) / 'metrics.jsonl'
    try:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    except json.JSONDecodeError as e:
        raise EnsembleError(f'{path} is not valid JSON lines ({e})') from None


def check_replaceable(path, held=False):
    """Refuse, in one line, to let --force replace `path` unless it is a run this toolkit wrote that no
    process is writing (held: this process holds its lock)."""
    writer = None if held else run_dir_writer(path)
    if writer is not None:   # a run still training: --force never touches it
        raise EnsembleError(f'{path} is being written by {writer}: wait for it, or pass another --out')
    if not is_our_run_dir(path):
        raise EnsembleError(f'refusing to replace {path}: --force replaces only a run directory this toolkit '
                            'wrote, holding nothing else; move or delete it yourself')


def is_our_run_dir(path):
    """Whether `path` is a run directory this toolkit wrote (its config.json carries FORMAT) holding nothing
    but the toolkit's files: the only kind of directory a --force may replace."""
    path = Path(path)
    try:
        config = read_config(path)
    except EnsembleError:
        return False

    def ours(p):
        return p.is_file() and (RUN_FILE.fullmatch(p.name) or p.name == '.lock' or is_run_temporary(p))
    return isinstance(config, dict) and config.get('format') == FORMAT and all(map(ours, path.iterdir()))


def member_paths(path):
    """The member files a path stands for: a member file itself, or every member_<i> of a run directory.
    An unfinished training run (no summary.json, or fewer members than its config.json says) is refused:
    it is finished with --resume, not read as a smaller ensemble."""
    path = Path(path)
    if path.is_dir():
        # member_<i> exactly: a user's member_best.safetensors beside them is not a member
        found = sorted((p for p in path.iterdir() if re.fullmatch(r'member_\d+\.safetensors', p.name)),
                       key=lambda p: int(p.stem.split('_')[1]))
        config = read_config(path)
        if 'members' in config and 'command' not in config:   # a training run
            if len(found) > config['members'] or [p.name for p in found] != [f'member_{i}.safetensors' for i in
                                                                            range(len(found))]:
                raise EnsembleError(f'{path} holds {", ".join(p.name for p in found)}, but its config.json says '
                                    f'{config["members"]} member(s), member_0 to member_{config["members"] - 1}')
            if not (path / 'summary.json').exists() or len(found) != config['members']:
                raise EnsembleError(f'{path} is an unfinished run ({len(found)} of {config["members"]} member files, '
                                    f'{"no " if not (path / "summary.json").exists() else ""}summary.json): finish it '
                                    f'with python train_ensemble.py --resume {path}')
            check_member_specs(found, config)
        if not found:
            raise EnsembleError(f'{path} holds no member_<i>.safetensors files')
        return found
    if path.suffix == '.safetensors' or path.exists():
        return [path]
    raise EnsembleError(f'{path} is neither a run directory nor a member checkpoint')


def check_member_specs(paths, config):
    """Every member file is the network its run's config.json describes (a file of another architecture
    or width copied into the run would otherwise be evaluated as a member)."""
    if 'model' not in config:   # runs older than the model spec in config.json
        return
    from safetensors import safe_open
    for path in paths:
        try:
            with safe_open(str(path), framework='pt') as f:
                spec = json.loads((f.metadata() or {}).get('model', 'null'))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise EnsembleError(f'checkpoint {path} is not a readable safetensors file ({e})') from None
        if spec != config['model']:
            differ = sorted(k for k in set(spec or {}) | set(config['model'])
                            if (spec or {}).get(k) != config['model'].get(k))
            raise EnsembleError(f'{path} is not the network its run\'s config.json describes (they differ in '
                                f'{", ".join(differ[:5])})')


def load_run(run_dir, device='cpu'):
    """(config, members) of a run directory: its config.json (or {}) and its members as modules."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EnsembleError(f'{run_dir} is a file; this takes a run directory (the folder that holds member files)')
    if not run_dir.is_dir():
        raise EnsembleError(f'run directory {run_dir} does not exist')
    return read_config(run_dir), [load_member(p, device) for p in member_paths(run_dir)]


#############################################
#               Evaluation                  #
#############################################

def to_float_images(x_uint8, dtype=None):
    """uint8 images as floats in [0, 1] (default dtype unless told otherwise); features pass as they are."""
    if x_uint8.is_floating_point():
        return x_uint8.to(dtype or torch.get_default_dtype())
    return x_uint8.to(dtype or torch.get_default_dtype()) / 255


def float_batches(x, batch_size, device='cpu'):
    """Inputs (uint8 images or features) as a list of float batches on the device (to recompute BatchNorm
    statistics on, or to measure a loss on)."""
    return [to_float_images(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]


def resolve_precision(precision, device):
    """'auto' is bf16 on a GPU and fp32 on a CPU (where bf16 matmuls are slow on most processors)."""
    if precision == 'auto':
        return 'bf16' if device.type == 'cuda' else 'fp32'
    if precision not in PRECISIONS:
        raise EnsembleError(f"unknown precision '{precision}': use auto, {', '.join(PRECISIONS)}")
    return precision


def autocast(device, precision):
    """Mixed precision on the device in use: matmuls and convolutions in the precision's dtype, weights,
    optimizer state and BatchNorm statistics kept fp32. No loss scaling for fp16: the objective is a
    sum over the batch, not a mean, so its gradients stay far above fp16's underflow (airbench94 trains
    in fp16 the same way)."""
    return torch.autocast(device.type, PRECISIONS[precision], enabled=precision != 'fp32')


def tta_views(x):
    """airbench's six test-time views as (weight, images): mirror, each with no shift and ±1 pixel."""
    padded = F.pad(x, (1,) * 4, mode='reflect')
    h, w = x.shape[-2:]
    shifted = [padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]]
    views = [(0.25, x), (0.25, x.flip(-1))]
    views += [(0.125, v) for s in shifted for v in (s, s.flip(-1))]
    return views


@torch.no_grad()
def predict_logits(nets, x_uint8, members=None, tta=False, batch_size=EVAL_BATCH, progress=None, precision='auto'):
    """(M, N, K) float32 logits of every member on uint8 images, batched, in eval mode.

    nets: a wide network (then `members` is its M) or a list of single-member networks.
    """
    nets = nets if isinstance(nets, (list, tuple)) else [nets]
    device = next(nets[0].parameters()).device
    precision = resolve_precision(precision, device)
    out = []
    for i in range(0, len(x_uint8), batch_size):
        x = to_float_images(x_uint8[i:i + batch_size].to(device))
        batch = []
        for net in nets:
            net.eval()
            m = members if members else 1
            with autocast(device, precision):
                views = tta_views(x) if tta else [(1.0, x)]
                z = sum(w * member_logits(net, v, m).float() for w, v in views)
            batch.append(z)
        out.append(torch.cat(batch))
        if progress is not None:
            progress(len(x))
    return torch.cat(out, dim=1)


def ensemble_metrics(logits, y, combiner):
    """Loss, accuracy and DIV of the ensemble and each member from (M, N, K) logits (no smoothing); for the
    combiner 'mean' (regression), MSE and RMSE in the targets' units instead of loss and accuracy."""
    member_ce, ensemble_ce, div = ensemble_terms(logits, y, combiner)
    if COMBINERS[combiner].task == 'regression':
        member_mse = member_ce.mean(1)
        return dict(loss=ensemble_ce.mean().item(), rmse=ensemble_ce.mean().sqrt().item(),
                    member_loss=member_mse.tolist(), member_rmse=member_mse.sqrt().tolist(), div=div.mean().item())
    ensemble_pred = combine(logits, combiner).argmax(-1)
    return dict(
        loss=ensemble_ce.mean().item(),
        acc=(ensemble_pred == y).float().mean().item(),
        member_loss=member_ce.mean(1).tolist(),
        member_acc=(logits.argmax(-1) == y).float().mean(1).tolist(),
        div=div.mean().item(),
    )


def evaluate(nets, x_uint8, y, combiner='prob', members=None, tta=False, precision='auto'):
    """ensemble_metrics of a wide network or a list of members on uint8 images."""
    logits = predict_logits(nets, x_uint8, members, tta, precision=precision)
    return ensemble_metrics(logits, y.to(logits.device), combiner)


#############################################
#        Sharpness-aware training           #
#############################################
# SAM (Foret et al. 2021, arXiv 2010.01412) and SharpBalance (Lu et al. 2024, arXiv 2407.12996) on
# the wide network. Member j owns the j-th chunk along dim 0 of every trainable tensor, so "per
# member" below always means per chunk: each member is perturbed by its own radius ρ, and norms are
# never taken across members.

def member_norms(tensors, members):
    """(M,) Euclidean norm of each member's share of a list of wide tensors (all chunks of dim 0)."""
    return torch.stack([t.reshape(members, -1).pow(2).sum(1) for t in tensors]).sum(0).sqrt()


def per_member(values, t):
    """(M,) per-member values shaped to broadcast over the wide tensor t (one value per dim-0 row)."""
    return values.repeat_interleave(t.size(0) // len(values)).view(-1, *[1] * (t.dim() - 1)).to(t.dtype)


def mask_gradient(logits, mask):
    """The same (M, B, K) logits, but gradients flow only into the members and examples where the
    (M, B) mask is 1. Written as z·m + sg(z·(1 − m)), which keeps the values bit for bit and, unlike a
    torch.where with detach, stays differentiable when the mask is all zeros."""
    m = mask.to(logits.dtype).unsqueeze(-1)
    return logits * m + (logits * (1 - m)).detach()


def sam_step(net, members, rho, logits_at, objective_of, sam_mask=None):
    """Put the SAM gradient into p.grad of every trainable parameter of the wide `net`; the caller
    then calls opt.step() as usual. Returns (logits, objective) at the current weights, for the log.

    logits_at(): (M, B, K) logits of the batch at the network's current weights (a forward pass).
    objective_of(logits): the scalar training objective (ensemble_objective, with its β, combiner,
        label smoothing and bagging weights).
    sam_mask: (M, B) SharpBalance's split; member j gets SAM on the examples where it is True and the
        plain gradient on the others. None: SAM on every example.

    SAM: g = ∇L(w), ε_j = ρ·g_j/‖g_j‖ for each member j, step with ∇L(w + ε) taken at w. At β > 0
    the gradient for member j depends on the other members through the ensemble term: every member
    ascends at once, each by its own normalized gradient of the full objective, and the gradient of
    the full objective is then taken at that jointly perturbed point.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    logits = logits_at()
    if sam_mask is None:
        objective = objective_of(logits)
        grads = torch.autograd.grad(objective, params)
        plain_grads = None
    else:
        # SharpBalance splits the objective per member and example: member j takes the full
        # objective's gradient for example b through its own logits z_jb, at w + ε when b is in its
        # SAM set and at w otherwise. At β > 0 this splits the ensemble term exactly (member j's share
        # of CE(y, p̄) goes wherever b goes for j), so the two parts add up to the full gradient. As
        # the losses are sums over examples, adding the parts is the official code's combination
        # (n_sam·mean_sam + n_sgd·mean_sgd) / n, with the 1/n already in the lr. The objective's
        # value is the same through either mask; the SAM part's is logged.
        objective = objective_of(mask_gradient(logits, sam_mask))
        grads = torch.autograd.grad(objective, params, retain_graph=True)
        plain_grads = torch.autograd.grad(objective_of(mask_gradient(logits, ~sam_mask)), params)
    scale = rho / (member_norms(grads, members) + SAM_EPS)
    # The second forward pass would update BatchNorm's running statistics a second time, with
    # statistics of perturbed weights. Keep the first pass's (as the usual SAM implementations do by
    # disabling the running statistics for the second pass): copy every buffer and put it back.
    # The copies are tiny (channels, not activations).
    buffers = [b.clone() for b in net.buffers()]
    weights = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * per_member(scale, g))
    perturbed = logits_at()
    if sam_mask is not None:
        perturbed = mask_gradient(perturbed, sam_mask)
    sam_grads = torch.autograd.grad(objective_of(perturbed), params)
    with torch.no_grad():   # back to w exactly (w + ε − ε would not be, in floating point)
        for p, w in zip(params, weights):
            p.copy_(w)
        for b, saved in zip(net.buffers(), buffers):
            b.copy_(saved)
    for i, p in enumerate(params):
        p.grad = sam_grads[i] if plain_grads is None else sam_grads[i] + plain_grads[i]
    return logits.detach(), objective.detach()


def sharpness_scores(net, x_uint8, y, members, scale=None):
    """(M, N) SharpBalance's per-example sharpness of every member: the squared norm of the example's
    gradient of the member's own cross-entropy (unsmoothed), w.r.t. all its trainable parameters. With
    `scale` (regression: the targets' std) the loss is the member's standardized squared error.

    As in the official code (engine.py, test_fisher): the network in eval mode (BatchNorm on running
    statistics, so an example's gradient does not depend on its batch), the training images without
    augmentation, exact per-example gradients of the whole network by torch.func (vmap over grad).
    It runs once per run and costs about three plain epochs (CPU, benchmarks/bench_sam.py). The loss
    summed over members gives every member its own gradient at once: member j's chunk only reaches z_j.
    """
    from torch.func import functional_call, grad, vmap
    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}

    def loss(params, x, y):
        out = functional_call(net, params, (x.unsqueeze(0),)).view(members, -1).float()
        if scale is not None:
            return squared_error(out, y, scale).sum()
        return F.cross_entropy(out, y.expand(members), reduction='sum')

    per_example_grads = vmap(grad(loss), in_dims=(None, 0, 0))
    chunk = max(1, PER_SAMPLE_GRAD_FLOATS // sum(p.numel() for p in params.values()))
    was_training = net.training
    net.eval()
    scores = []
    for i in range(0, len(y), chunk):
        g = per_example_grads(params, to_float_images(x_uint8[i:i + chunk]), y[i:i + chunk])
        scores.append(sum(t.reshape(t.size(0), members, -1).pow(2).sum(-1) for t in g.values()))
    net.train(was_training)
    return torch.cat(scores).T


def sharpbalance_masks(scores, flat_ratio, sharpest=False):
    """(M, N) bool: member j's SAM set, from (M, N) per-example sharpness scores.

    Every member selects ⌊flat_ratio·N⌋ examples by its own score; member j's SAM set is the union of
    the OTHER members' selections, and it trains on the rest with plain gradients. Which end is
    selected: the paper's overview figure draws each member's sharpest examples, but the official
    code that produced its results (main.py passes ascend=True to boosting_sam_split, which keeps
    np.argsort(score)[:total]) selects the LOWEST scores, the flattest examples. We follow the code
    (sharpest=False); sharpest=True takes the figure's reading. The official code also deals the
    examples that nobody selected round-robin into some members' SAM sets; the SharpBalance rule as
    stated (SAM on the union of the others' selections) leaves them to plain gradients, as here.
    """
    m, n = scores.shape
    k = int(n * flat_ratio)
    order = scores.argsort(dim=1, descending=sharpest, stable=True)
    selected = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    selected.scatter_(1, order[:, :k], True)
    by_others = selected.sum(0, keepdim=True) - selected.long()   # how many OTHER members chose each example
    return by_others > 0


#############################################
#       Several processes (torchrun)        #
#############################################
# Under torchrun, rank r of W holds a contiguous block of the M members in its own wide network. Every
# rank draws the same batches (same data seed, same generator), so no images are exchanged: only the
# members' logits, for the ensemble term (β > 0), the epoch's log and the evaluation. At β > 0 each
# step all-gathers the logits once and every rank computes the whole objective, the other ranks' members
# as constants: the gradient reaching its own members is exact, and the backward pass communicates
# nothing (an autograd all-gather would add a reduce-scatter per step: measured 1.3x slower than one
# process on a 2-core CPU, against 1.1x). Launched without torchrun, a run is one block of all M members
# and every collective below is the identity.

COLLECTIVE_TIMEOUT_S = 600   # a collective waiting this long for a dead or stuck rank fails instead of hanging


def member_block(members, world, rank):
    """The range of members that `rank` of `world` holds: contiguous blocks, sizes differing by at most one."""
    size, extra = divmod(members, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


class MemberBlock:
    """This process's members of the ensemble, and the collectives that join every rank's members."""

    def __init__(self, members, rank=0, world=1):
        if members < world:
            raise EnsembleError(f'--members {members} is fewer than the {world} processes: every process needs '
                                'at least one member')
        self.members, self.rank, self.world = members, rank, world
        self.blocks = [member_block(members, world, r) for r in range(world)]
        self.start, self.stop = self.blocks[rank].start, self.blocks[rank].stop

    @classmethod
    def from_environment(cls, members):
        """The block torchrun's environment (RANK, WORLD_SIZE) gives this process; all members without it."""
        return cls(members, int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)))

    def connect(self, device):
        """Join the other ranks: NCCL with one GPU per rank (LOCAL_RANK), gloo on CPUs. Returns this rank's device."""
        self.device = device
        if self.world == 1:
            return device
        import datetime
        import torch.distributed as dist
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        self.device = device
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        return device

    @torch.no_grad()
    def gather(self, local):
        """(M, ...) every member's rows, in member order, from this rank's (its members, ...) rows."""
        if self.world == 1:
            return local
        import torch.distributed as dist
        largest = len(self.blocks[0])   # one shape for every rank: pad the smaller blocks
        padded = torch.cat([local, local.new_zeros(largest - len(local), *local.shape[1:])])
        parts = padded.new_empty(self.world * largest, *padded.shape[1:])
        # renamed in torch 2.14
        (getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor)(parts, padded)
        parts = parts.view(self.world, *padded.shape)
        return torch.cat([part[:len(block)] for part, block in zip(parts, self.blocks)])

    def with_others(self, local):
        """(M, ...) every member's rows: this rank's as given, with their gradient, the other ranks' gathered
        as constants. A loss of all members then gives this rank's members their exact gradient, and the
        backward pass communicates nothing: each rank differentiates only through its own members."""
        if self.world == 1:
            return local
        everyone = self.gather(local)
        return torch.cat([everyone[:self.start], local, everyone[self.stop:]])

    def sum(self, value):
        """A tensor summed over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        value = value.clone()
        dist.all_reduce(value)
        return value

    def agree(self, work, ranks='all'):
        """work() on every rank (ranks='all') or on rank 0 only (ranks=0), then wait for the others: if it
        failed anywhere (EnsembleError, or OSError from the file system), every rank raises, so that none
        is left waiting in a later collective for one that stopped. Returns work()'s result (None on the
        ranks that did not run it). Every write of the run directory goes through here."""
        result, error = None, None
        if ranks == 'all' or self.rank == ranks:
            try:
                result = work()
            except EnsembleError as e:
                error = e
            except OSError as e:
                error = EnsembleError(f'{e.filename or "file system"}: {e.strerror or e}')
        if self.world > 1:
            failed = self.sum(torch.tensor([float(error is not None)], device=self.device))
            if error is None and failed.item():
                error = EnsembleError('another rank stopped with an error (its message is above)')
        if error is not None:
            raise error
        return result

    def resume_state(self, out):
        """The resume-state file this rank continues from: the last epoch every rank has a state of (see
        state_path), or None to start over. Reads only: the files are tidied once the run directory is held."""
        current, previous = state_path(out, self), state_path(out, self, previous=True)
        epochs = self.agree(lambda: {state_epoch(p): p for p in (previous, current) if p.exists()})
        common = set(epochs)
        if self.world > 1:
            mine = torch.tensor([-1, -1] + sorted(epochs))[-2:].to(self.device)
            import torch.distributed as dist
            everyone = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(everyone, mine)
            common = set.intersection(*({int(e) for e in t.tolist()} for t in everyone)) - {-1}
        return epochs[max(common)] if common else None


def state_path(out, block, previous=False):
    """A rank's resume-state file. With several ranks each keeps its previous epoch's state until every rank
    has written the next (end_epoch: rename, write, barrier), so that some epoch's state is always on every
    rank, whenever the job is killed."""
    name = 'state' if block.world == 1 else f'state.rank{block.rank}'
    return Path(out) / f'{name}{".previous" if previous else ""}.safetensors'


def state_epoch(path):
    """The epoch a resume-state file continues from, read from its metadata alone."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return int((f.metadata() or {})['epoch'])
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise EnsembleError(f'{path} is not a readable resume state ({e}): delete it to restart that run '
                            'from the beginning') from None


#############################################
#                Training                   #
#############################################

def option(default, help, flag=None, parse=None, choices=None):
    """A Config field: its default and its command-line help, the one place an option is written.
    flag: the command line's own spelling ('--x/--no-x' for a switch), or spellings (a tuple: the name
    first, then the older names it still answers to); parse: turns the command line's
    text into the value (the command line then takes text); choices: the values it takes, shown by --help
    (checked by resolve_config, with the run's other options)."""
    meta = dict(help=help, flag=flag, parse=parse, choices=choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_ints(text):
    """A list of integers as every command line here writes one: comma-separated, with ranges a-b
    ('512,512', '0-4', '0,2,5-7'); None and '' stay None."""
    if text is None:
        return None
    values = []
    try:
        for part in filter(str.strip, str(text).split(',')):
            low, dash, high = part.strip().partition('-') if not part.strip().startswith('-') else (part, '', '')
            if dash and int(high) < int(low):
                raise ValueError
            values += range(int(low), int(high) + 1) if dash else [int(low)]
    except ValueError:
        raise EnsembleError(f"expected comma-separated integers or ranges a-b, got '{text}'") from None
    return values


def ints_text(values):
    """A sorted list of integers as parse_ints reads it back: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs = itertools.groupby(enumerate(values), lambda pair: pair[1] - pair[0])   # consecutive values share a key
    parts = [[v for _, v in run] for _, run in runs]
    return ','.join(str(p[0]) if len(p) == 1 else f'{p[0]}-{p[-1]}' for p in parts)


@dataclass
class Config:
    """Every option of a run, each with its default and help; the command line is built from these
    fields. None means "the recipe's default for this architecture and dataset"."""
    # The ensemble and its objective
    task: str = option('classification', "classification (cross-entropy) or regression (squared error, score "
                                         'averaging; an mlp on a table of features: a .csv, a .npz or '
                                         'synthetic-regression).', choices=TASKS)
    members: int = option(1, 'Ensemble size M.')
    beta: float = option(0.0, 'Diversity weight: 0 = independent members, 1 = joint training (the ensemble loss); '
                              '> 1 needs --allow-unstable.')
    combine: Optional[str] = option(None, 'Combiner: ' + '; '.join(f'{name} {c.help}' for name, c in COMBINERS.items())
                                          + '.', choices=tuple(COMBINERS))
    bagging: bool = option(False, 'Each member weights each example by its own bootstrap count (batches stay shared).')
    allow_unstable: bool = option(False, 'Allow --beta > 1, where the objective is unbounded below.')
    param: str = option('standard', "Parametrization: 'standard' (PyTorch init, one lr) or 'spectral' (spectral.py: "
                                    'init and per-layer lr from the spectral condition).',
                                    choices=('standard', 'spectral'))
    sam_rho: Optional[float] = option(None, 'SAM (Foret et al. 2021) for every member with this radius (e.g. 0.05): '
                                            'step with the gradient at w + rho*g/|g|, each member its own g. About 2x '
                                            'the cost of a step.', flag=('--rho', '--sam-rho'))
    flat_ratio: Optional[float] = option(None, 'SharpBalance (Lu et al. 2024, needs --rho): each member selects '
                                               'this fraction of the training set by its own per-sample sharpness; '
                                               "from --sam-start-epoch on, member j uses SAM on the other members' "
                                               'selections and plain gradients on the rest.')
    sam_start_epoch: Optional[int] = option(None, 'SharpBalance: plain SAM before this epoch, then score the training '
                                                  'set once and split it (default: half the epochs).')
    # Data
    dataset: str = option('cifar10', 'cifar10, cifar100, fashion-mnist, mnist, synthetic, or a path to a .npz file; '
                                     'regression: synthetic-regression, a .npz (x_train, y_train, x_test, y_test: '
                                     'features and real targets) or a .csv (header row, numbers only; a fixed 20% of '
                                     'the rows is the test split).')
    target: Optional[str] = option(None, "Regression from a .csv: the target column (default: the last).")
    data_dir: str = option('data', 'Where datasets are downloaded and cached.')
    val_size: int = option(0, 'Hold out this many training examples as a validation split.')
    shard: Optional[str] = option(None, "Train on the i-th of n disjoint parts (class-balanced for labels), as 'i/n'.")
    subset: Optional[int] = option(None, 'Use at most this many training and test examples (quick runs).',
                                   flag=('--examples', '--subset'))
    classes: Optional[list] = option(None, "Keep only these classes in every split, e.g. '0-4' or '0,2,5' (labels "
                                           'keep their ids and the network all its outputs, so runs on disjoint '
                                           'classes share one label space).', parse=parse_ints)
    # The network
    arch: Optional[str] = option(None, 'Network: ' + '; '.join(f'{name}, {a.help}' for name, a in ARCHS.items())
                                       + '.', choices=tuple(ARCHS))
    width: float = option(1.0, 'Width multiplier for airbench and resnet18 channels and the ViT\'s token width '
                               '(64 at 1).')
    kernel_size: int = option(3, "airbench's conv kernel size k (k x k).")
    hidden: list = option([1024], "mlp hidden sizes, e.g. '1024' or '512,512,512'.", parse=parse_ints)
    depth: int = option(4, 'vit: transformer blocks.')
    heads: int = option(4, 'vit: attention heads per block (they split the token width).')
    patch_size: int = option(4, 'vit: p x p patches become tokens (the image size must be a multiple).')
    # The recipe (None: the architecture's, RECIPES)
    epochs: Optional[float] = option(None, 'Epochs (fractions allowed) (default: the recipe: airbench 9.9, '
                                           'resnet18 16, mlp 8, vit 10; regression 30).')
    batch_size: Optional[int] = option(None, 'Batch size (default: airbench 1024, resnet18 512, mlp 256, vit 256; '
                                             'regression 128).')
    lr: Optional[float] = option(None, 'Learning rate; for sgd per 1024 examples, decoupled from momentum '
                                       '(default: the recipe: airbench 11.5, resnet18 8, mlp 4, vit 3e-3 (adam), '
                                       'regression 1; adam on a sgd recipe 1e-3).')
    momentum: Optional[float] = option(None, 'Nesterov momentum for sgd (default: the recipe).')
    weight_decay: Optional[float] = option(None, 'For sgd: fraction of the weights removed per 1024 examples; '
                                                 'for adam: AdamW decay.')
    label_smoothing: Optional[float] = option(None, 'Label smoothing of every cross-entropy term '
                                                    '(default: airbench 0.2, resnet18 0.1, mlp 0, vit 0.1; '
                                                    'regression: none).')
    optimizer: Optional[str] = option(None, 'sgd (Nesterov), adam (AdamW) or muon (the hidden weight matrices take '
                                            'orthogonalized, spectrally scaled steps at --muon-lr; input/output '
                                            'layers, biases and norms take sgd) (default: the recipe: sgd; vit adam).',
                                       choices=('sgd', 'adam', 'muon'))
    muon_lr: Optional[float] = option(None, 'muon: the spectral norm of a hidden layer\'s step per √(fan_out/fan_in), '
                                            'at the schedule\'s peak (default: spectral.py\'s MUON_LR, 0.05).')
    lookahead: Optional[bool] = option(None, "airbench's Lookahead weight averaging (default: on for airbench).",
                                       flag='--lookahead/--no-lookahead')
    bias_scaler: Optional[float] = option(None, "BatchNorm biases' lr multiplier (default: airbench 64, others 1).")
    whiten_bias_epochs: Optional[int] = option(None, "Epochs the airbench whitening conv's bias trains before it "
                                                     'freezes (default: 3).')
    augment: Optional[bool] = option(None, 'Random flips and 2-pixel shifts (default: on for 3-channel data).',
                                     flag='--augment/--no-augment')
    tta: Optional[bool] = option(None, 'Six-view test-time augmentation for the final numbers (default: as --augment).',
                                 flag='--tta/--no-tta')
    # Seeds, device, output
    seed: int = option(0, 'Member j starts from seed + j.')
    data_seed: Optional[int] = option(None, 'Seed of data order, augmentation, bagging and synthetic data '
                                            '(default: --seed).')
    device: str = option('auto', 'auto, cpu or cuda.', choices=('auto', 'cpu', 'cuda'))
    precision: str = option('auto', 'Autocast dtype of the matmuls and convolutions: fp32, bf16 or fp16 (weights, '
                                    'optimizer state and BatchNorm statistics stay fp32; checkpoints are fp32). '
                                    'auto: bf16 on CUDA, fp32 on CPU.', choices=('auto', *PRECISIONS))
    channels_last: Optional[bool] = option(None, 'channels_last memory layout for network and images '
                                                 '(default: on for CUDA).',
                                           flag='--channels-last/--no-channels-last')
    compile: bool = option(False, 'torch.compile the network.', flag='--compile')
    out: Optional[str] = option(None, 'Run directory (default: runs/ and a name of the dataset, arch, M, beta, '
                                      'combiner, seed, and a short hash of any other option given).')
    init: Optional[str] = option(None, 'Start every member from these weights: a member file, or a run with 1 or M '
                                       'members.')


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


# What each numeric option must be (None, "the recipe's", always passes): (field, test, requirement).
OPTION_RANGES = [
    ('members', lambda v: v >= 1, 'at least 1'),
    ('beta', lambda v: _finite(v) and v >= 0, 'a finite number >= 0 (0 independent, 1 joint)'),
    ('width', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    ('kernel_size', lambda v: v >= 1, 'at least 1'),
    ('hidden', lambda v: len(v) > 0 and all(h >= 1 for h in v), 'a list of sizes of at least 1'),
    ('depth', lambda v: v >= 1, 'at least 1'),
    ('heads', lambda v: v >= 1, 'at least 1'),
    ('patch_size', lambda v: v >= 1, 'at least 1'),
    ('epochs', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    ('batch_size', lambda v: v >= 1, 'at least 1'),
    ('lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    ('momentum', lambda v: _finite(v) and 0 <= v < 1, 'in [0, 1)'),
    ('weight_decay', lambda v: _finite(v) and v >= 0, 'a finite number >= 0'),
    ('label_smoothing', lambda v: _finite(v) and 0 <= v < 1, 'in [0, 1)'),
    ('bias_scaler', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    ('whiten_bias_epochs', lambda v: v >= 0, 'at least 0'),
    ('val_size', lambda v: v >= 0, 'at least 0'),
    ('subset', lambda v: v >= 1, 'at least 1 (leave it out for all the data)'),
    ('sam_rho', lambda v: _finite(v) and v >= 0, 'a radius: a finite number >= 0'),
    ('muon_lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
]


# The options that say which data a run saw: a reader of the run (analyze.py, rebasin.py) loads them again.
DATA_OPTIONS = ('task', 'dataset', 'target', 'data_dir', 'val_size', 'shard', 'subset', 'classes', 'seed', 'data_seed')


def out_of_range(options):
    """(option, requirement, value) of the first option in `options` outside its range, or None."""
    for name, ok, requirement in OPTION_RANGES:
        value = options.get(name)
        if value is not None and not ok(value):
            return name, requirement, value
    return None


def resolve_config(cfg, data=None):
    """Check the options and fill every None from the recipe; raises EnsembleError on bad input."""
    if cfg.arch is None:
        cfg = replace(cfg, arch='mlp' if cfg.task == 'regression' else 'airbench')
    check_options(cfg)
    regression = cfg.task == 'regression'
    recipe = OWN_RECIPE if cfg.arch == OWN else REGRESSION_RECIPE if regression else ARCHS[cfg.arch].recipe
    resolved = {k: (recipe[k] if getattr(cfg, k) is None and k in recipe else getattr(cfg, k))
                for k in asdict(cfg)}
    resolved['optimizer'] = optimizer = cfg.optimizer or recipe.get('optimizer', 'sgd')
    # A recipe's lr and weight decay are for its own kind of optimizer: sgd (and muon, whose other groups take
    # sgd), or adam. The other kind takes ADAM_LR and no decay for adam, and needs --lr for sgd.
    if (optimizer == 'adam') != (recipe.get('optimizer') == 'adam'):
        if optimizer != 'adam' and cfg.lr is None:
            raise EnsembleError(f"the {cfg.arch} recipe is {recipe.get('optimizer', 'sgd')}'s: --optimizer "
                                f'{optimizer} needs --lr too')
        resolved['lr'] = ADAM_LR if cfg.lr is None else cfg.lr
        resolved['weight_decay'] = 0.0 if cfg.weight_decay is None else cfg.weight_decay
    if resolved['data_seed'] is None:
        resolved['data_seed'] = cfg.seed
    if optimizer == 'muon' and resolved['muon_lr'] is None:
        resolved['muon_lr'] = _spectral().MUON_LR
    if resolved['combine'] is None:
        resolved['combine'] = DEFAULT_COMBINER[cfg.task]
    if regression:   # a table of features: no labels to smooth, no image to flip, crop or lay out
        resolved.update(label_smoothing=0.0, augment=False, tta=False, channels_last=False)
    if resolved['augment'] is None:   # flips and shifts suit natural images, not digits or clothes
        resolved['augment'] = ((data.x_train.size(1) == 3) if data is not None
                               else cfg.dataset not in ('mnist', 'fashion-mnist'))
    if resolved['tta'] is None:
        resolved['tta'] = resolved['augment']
    device = resolve_device(cfg.device)
    resolved['precision'] = resolve_precision(cfg.precision, device)
    if resolved['channels_last'] is None:   # the layout of the GPU's convolution kernels; no gain on a CPU
        resolved['channels_last'] = device.type == 'cuda'
    if resolved['epochs'] <= 0 or resolved['batch_size'] < 1:
        raise EnsembleError('--epochs must be positive and --batch-size at least 1')
    if cfg.flat_ratio is not None:
        if resolved['sam_start_epoch'] is None:   # the paper's recipe: SAM for the first half (100 of 200 epochs)
            resolved['sam_start_epoch'] = int(resolved['epochs'] // 2)
        if not 0 <= resolved['sam_start_epoch'] < math.ceil(resolved['epochs']):
            raise EnsembleError(f"--sam-start-epoch must be between 0 and {math.ceil(resolved['epochs']) - 1} "
                                f"(the last epoch), got {resolved['sam_start_epoch']}")
    if resolved['out'] is None:
        resolved['out'] = default_out(cfg, resolved['combine'])
    return Config(**resolved)


def check_options(cfg):
    """Refuse options that no run can have, alone or together (before any data is loaded)."""
    bad = out_of_range(asdict(cfg))
    if bad:
        raise EnsembleError(f"{cli_name(bad[0])} must be {bad[1]}, got {bad[2]}")
    if cfg.beta > 1 and not cfg.allow_unstable:
        raise EnsembleError(f'--beta {cfg.beta} > 1 makes the objective unbounded below: the members can '
                            'grow DIV without limit (Jeffares et al. 2023, Thm 5.1; the Hessian at any '
                            'stationary point is indefinite). Pass --allow-unstable to run it anyway')
    if cfg.arch not in ARCHS and cfg.arch != OWN:
        raise EnsembleError(f"unknown architecture '{cfg.arch}': use {', '.join(ARCHS)}")
    if cfg.task not in TASKS:
        raise EnsembleError(f"unknown task '{cfg.task}': use {' or '.join(TASKS)}")
    if cfg.combine not in (None, *combiners_for(cfg.task)):
        raise EnsembleError(f"unknown combiner '{cfg.combine}' for {cfg.task}: use "
                            f"{' or '.join(combiners_for(cfg.task))}")
    if cfg.task == 'regression':
        for name, given, why in (('arch', cfg.arch != OWN and 'regression' not in ARCHS[cfg.arch].tasks,
                                  'regression trains an mlp on features: --arch mlp'),
                                 ('label_smoothing', cfg.label_smoothing not in (None, 0), 'labels only'),
                                 ('augment', cfg.augment, 'images only'), ('tta', cfg.tta, 'images only'),
                                 ('classes', cfg.classes is not None, 'labels only')):
            if given:
                raise EnsembleError(f"{cli_name(name)} does not apply to --task regression ({why})")
    if cfg.target is not None and not (cfg.task == 'regression' and str(cfg.dataset).endswith('.csv')):
        raise EnsembleError('--target names the target column of a .csv table (with --task regression); '
                            f'{cfg.dataset} is not one')
    if cfg.param not in ('standard', 'spectral'):
        raise EnsembleError(f"unknown parametrization '{cfg.param}': use standard or spectral")
    if cfg.optimizer not in (None, 'sgd', 'adam', 'muon'):
        raise EnsembleError(f"unknown optimizer '{cfg.optimizer}': use sgd, adam or muon")
    if cfg.arch == OWN and (cfg.param == 'spectral' or cfg.optimizer == 'muon'):
        raise EnsembleError('--param spectral and --optimizer muon need to know which weights are hidden matrices; '
                            'with your own module use sgd or adam')
    arch = ARCHS.get(cfg.arch)
    if arch is not None and arch.problem and arch.problem({k: getattr(cfg, k) for k in arch.settings}):
        raise EnsembleError(arch.problem({k: getattr(cfg, k) for k in arch.settings}))
    if arch is not None and arch.not_matrices and (cfg.param == 'spectral' or cfg.optimizer == 'muon'):
        raise EnsembleError(f'--param spectral and --optimizer muon read weights as matrices; the {cfg.arch}: '
                            f'{arch.not_matrices}: use them with '
                            f"{', '.join(n for n, a in ARCHS.items() if not a.not_matrices)}")
    if not (str(cfg.dataset).endswith(('.npz', '.csv')) or cfg.dataset in (*DATASETS, TENSORS)):
        raise EnsembleError(f"unknown dataset '{cfg.dataset}': use one of {', '.join(DATASETS)}, a .npz or "
                            '(regression) a .csv file')
    if cfg.shard is not None:
        parse_shard(cfg.shard)
    if cfg.flat_ratio is None and cfg.sam_start_epoch is not None:
        raise EnsembleError('--sam-start-epoch only applies to SharpBalance: pass --flat-ratio too')
    if cfg.flat_ratio is not None:
        if not 0 < cfg.flat_ratio < 1:
            raise EnsembleError(f'--flat-ratio is the fraction of the data each member selects, strictly '
                                f'between 0 and 1, got {cfg.flat_ratio}')
        if cfg.sam_rho is None:
            raise EnsembleError('--flat-ratio (SharpBalance) decides where SAM is applied: pass --rho too')
        if cfg.members < 2:
            raise EnsembleError('SharpBalance (--flat-ratio) gives each member the samples the OTHER members '
                                'select: it needs --members 2 or more')


# Options a default run name shows itself; any other option given is summarized by a short hash, so that
# runs with other options never collide.
NAMED_OPTIONS = ('dataset', 'arch', 'members', 'beta', 'combine', 'bagging', 'shard', 'sam_rho', 'flat_ratio',
                 'classes', 'seed', 'out', 'device', 'precision', 'compile', 'channels_last')


def default_out(cfg, combine):
    """runs/<dataset>_<arch>_m<M>_beta<β>_<combiner>[tags]_s<seed>[_<hash of every other option given>]."""
    name = Path(str(cfg.dataset)).stem
    tags = "_bag" * cfg.bagging + (f'_shard{cfg.shard.replace("/", "of")}' if cfg.shard else '')
    tags += f'_sam{cfg.sam_rho:g}' if cfg.sam_rho is not None else ''
    tags += f'_flat{cfg.flat_ratio:g}' if cfg.flat_ratio is not None else ''
    tags += f'_classes{"-".join(map(str, cfg.classes))}' if cfg.classes is not None else ''
    defaults = option_defaults()
    others = {f.name: getattr(cfg, f.name) for f in fields(Config) if f.name not in NAMED_OPTIONS
              and getattr(cfg, f.name) != defaults[f.name] and not (f.name == 'arch' or getattr(cfg, f.name) is None)}
    digest = '_' + hashlib.sha1(json.dumps(others, sort_keys=True).encode()).hexdigest()[:6] if others else ''
    return f"runs/{name}_{cfg.arch}_m{cfg.members}_beta{cfg.beta:g}_{combine}{tags}_s{cfg.seed}{digest}"


def parse_shard(text):
    try:
        i, n = (int(v) for v in str(text).split('/'))
    except ValueError:
        raise EnsembleError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if not 0 <= i < n:
        raise EnsembleError(f'--shard i/n needs 0 <= i < n, got {text}')
    return i, n


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise EnsembleError('--device cuda was asked for, but torch sees no CUDA GPU')
    if name not in ('cpu', 'cuda'):
        raise EnsembleError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def model_spec(cfg, data):
    if data.task == 'regression':   # statistics of the training split; a constant column keeps std 1
        x, y = data.x_train, data.y_train
        std = lambda t: torch.where(t.std(0) > 0, t.std(0), torch.ones(())).tolist()  # noqa: E731
        return dict(arch=cfg.arch, task='regression', in_channels=x.size(1), image_size=1, num_classes=y.size(1),
                    width=cfg.width, kernel_size=cfg.kernel_size, hidden=list(cfg.hidden), mean=x.mean(0).tolist(),
                    std=std(x), target_mean=y.mean(0).tolist(), target_std=std(y))
    c, h, w = data.x_train.shape[1:]
    if h != w:
        raise EnsembleError(f'images must be square, got {h}x{w}')
    x = data.x_train[:10000].float() / 255
    settings = {k: getattr(cfg, k) for k in ARCHS[cfg.arch].settings}   # the architecture's own options
    problem = ARCHS[cfg.arch].problem and ARCHS[cfg.arch].problem({**settings, 'image_size': h})
    if problem:
        raise EnsembleError(problem)
    return dict(arch=cfg.arch, in_channels=c, image_size=h, num_classes=data.num_classes, **settings,
                mean=x.mean((0, 2, 3)).tolist(), std=x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def initial_member_states(cfg, spec, data, members=None):
    """The starting states of `members` (member indices; default all): from --init, or each from its own
    seed (seed + j)."""
    members = range(cfg.members) if members is None else members
    if not cfg.init:
        nets = [init_member(spec, cfg.seed + j, data.x_train) for j in members]
        if cfg.param == 'spectral':
            for net in nets:
                _spectral().spectral_init_(net)
        return [net.state_dict() for net in nets]
    paths = member_paths(cfg.init)
    if len(paths) not in (1, cfg.members):
        raise EnsembleError(f'--init {cfg.init} has {len(paths)} members; give one member file, '
                            f'or a run with exactly {cfg.members} members')
    with torch.device('meta'):   # the shapes the model needs, without allocating them
        template = build_model(spec)
    states = []
    for path in paths if len(paths) == 1 else [paths[j] for j in members]:
        _, state, _ = load_member_state(path)
        for key, t in template.state_dict().items():
            if key not in state or state[key].shape != t.shape:
                got = tuple(state[key].shape) if key in state else 'missing'
                raise EnsembleError(f"--init {path} does not fit this model: tensor '{key}' is {got}, "
                                    f'expected {tuple(t.shape)} (check --arch, --width, --kernel-size, --hidden)')
        states.append(state)
    return states * len(members) if len(paths) == 1 else states


def optimizer_for(net, cfg):
    """Nesterov SGD with airbench's decoupled lr / weight decay (BatchNorm biases at bias_scaler x lr),
    AdamW, or Muon (spectral.py: the hidden weight matrices take orthogonalized steps at --muon-lr, the
    rest this SGD); with --param spectral, spectral.py rescales each weight's lr. Each group keeps its
    peak lr in 'initial_lr' for the schedule."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    is_norm = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for p in m.parameters()}
    norm = [p for p in trainable if id(p) in is_norm]
    other = [p for p in trainable if id(p) not in is_norm]
    if cfg.optimizer == 'adam':
        lr, scaler = cfg.lr, 1.0
    else:
        kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))   # Nesterov's steady-state gain, per 1024 examples
        lr, scaler = cfg.lr / kilostep, cfg.bias_scaler
    groups = [g for g in (dict(params=norm, lr=lr * scaler, name='norms'), dict(params=other, lr=lr, name='weights'))
              if g['params']]
    if cfg.param == 'spectral':
        groups = _spectral().spectral_param_groups(net, cfg.members, lr, 0.0,
                                                   'adam' if cfg.optimizer == 'adam' else 'sgd', base_groups=groups)
    if cfg.optimizer == 'muon':
        groups = _spectral().muon_param_groups(net, cfg.members, groups, cfg.muon_lr)
    if cfg.optimizer == 'adam':
        opt = torch.optim.AdamW([dict(g, weight_decay=cfg.weight_decay) for g in groups])
    else:   # torch multiplies weight decay by the lr: divide it out, so decay per step is the same for all
        decay = cfg.weight_decay * cfg.batch_size / kilostep   # fraction of w removed per step
        groups = [dict(g, weight_decay=decay / g['lr']) for g in groups]
        opt = (_spectral().Muon(groups, momentum=cfg.momentum) if cfg.optimizer == 'muon' else
               torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True))
    for g in opt.param_groups:
        g['initial_lr'] = g['lr']
    return opt


def lr_factor(step, total_steps):
    """airbench's triangle: linear warm-up from 0.2 to 1 over the first 23% of steps, then down to 0.07."""
    s, p, e = LR_SCHEDULE['start'], LR_SCHEDULE['peak'] * total_steps, LR_SCHEDULE['end']
    if step < p:
        return s + (1 - s) * step / p
    return 1 + (e - 1) * (step - p) / max(total_steps - p, 1)


class Lookahead:
    """airbench's weight averaging: every few steps the weights move to an EMA of themselves whose decay
    grows over training (fast early, strong averaging at the end)."""

    def __init__(self, ema):
        self.ema = ema

    @classmethod
    def of(cls, net):
        return cls({k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()})

    def update(self, net, decay):
        state = net.state_dict()
        current = [state[k] for k in self.ema]
        with torch.no_grad():   # one multi-tensor kernel each instead of two small kernels per tensor
            torch._foreach_lerp_(list(self.ema.values()), current, 1 - decay)
            torch._foreach_copy_(current, list(self.ema.values()))


def save_state(path, net, opt, lookahead, generator, epoch, step, sam_mask=None):
    """The resume state: weights, optimizer state, Lookahead EMA, SharpBalance's SAM sets, data RNG,
    epoch and step."""
    from safetensors.torch import save_file
    tensors = {f'net/{k}': v for k, v in net.state_dict().items()}
    for i, s in opt.state_dict()['state'].items():
        tensors.update({f'opt/{i}/{k}': torch.as_tensor(v) for k, v in s.items() if v is not None})
    if lookahead is not None:
        tensors.update({f'lookahead/{k}': v for k, v in lookahead.ema.items()})
    if sam_mask is not None:
        tensors['sharpbalance/sam_mask'] = sam_mask
    tensors['rng/data'] = generator.get_state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {'format': FORMAT, 'epoch': str(epoch), 'step': str(step)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path, net, opt, generator, device):
    """Restore what save_state wrote; returns (epoch, step, lookahead or None, sam_mask or None)."""
    tensors, meta = read_checkpoint(path)
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith('net/')})
        opt_state = opt.state_dict()
        opt_state['state'] = {}
        for k, v in tensors.items():
            if k.startswith('opt/'):
                _, i, name = k.split('/', 2)
                opt_state['state'].setdefault(int(i), {})[name] = v.to(device)
        opt.load_state_dict(opt_state)
        generator.set_state(tensors['rng/data'])
        epoch, step = int(meta['epoch']), int(meta['step'])
    except (KeyError, RuntimeError, ValueError) as e:
        raise EnsembleError(f'{path} is not a resume state of this run ({str(e).splitlines()[0]})') from None
    lookahead = None
    if any(k.startswith('lookahead/') for k in tensors):
        lookahead = Lookahead({k[10:]: v.to(device) for k, v in tensors.items() if k.startswith('lookahead/')})
    sam_mask = tensors['sharpbalance/sam_mask'].to(device) if 'sharpbalance/sam_mask' in tensors else None
    return epoch, step, lookahead, sam_mask


def environment(device):
    import platform
    versions = {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__}
    try:
        import torchvision
        versions['torchvision'] = torchvision.__version__
    except Exception:  # noqa: BLE001 - torchvision is optional at run time
        pass
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    return dict(versions=versions, device_name=name, device_type=device.type)


COLUMNS = [('epoch', 'epoch', 'd'), ('train_objective', 'objective', '.4f'), ('train_loss', 'train loss', '.4f'),
           ('train_acc', 'train acc', '.4f'), ('train_div', 'train DIV', '.4f'), ('test_loss', 'test loss', '.4f'),
           ('test_acc', 'test acc', '.4f'), ('test_div', 'test DIV', '.4f'), ('time_s', 'seconds', '.2f')]
# Regression's rows: losses are MSE and the score is RMSE, both in the targets' units (trained in std units).
REGRESSION_COLUMNS = [(key.replace('_acc', '_rmse'), label.replace('loss', 'MSE').replace('acc', 'RMSE')
                       .replace('objective', 'objective/σ²'), fmt) for key, label, fmt in COLUMNS]


def score_name(task):
    """The metric a run reports beside its loss: accuracy, or for regression RMSE."""
    return 'rmse' if task == 'regression' else 'acc'


def format_row(row=None, task='classification'):
    """One line of the per-epoch table (the header when row is None)."""
    columns = REGRESSION_COLUMNS if task == 'regression' else COLUMNS
    cells = [label if row is None else format(row[key], fmt) for key, label, fmt in columns]
    return ' | '.join(c.rjust(len(label)) for c, (_, label, _) in zip(cells, columns))


class Training:
    """One run between its steps: the wide network, its optimizer and schedule, the training images on
    the device and the data streams. Built fresh (writing config.json) or from a run directory's
    resume state; train() below drives it. A run killed at any moment resumes: before its first resume
    state it starts over from config.json (same seeds, same result); with its last epoch's state but
    no summary.json (killed while writing the members), it writes the final files without training."""

    def __init__(self, cfg, console, resume=False, model=None, data=None, force=False):
        if model is not None or data is not None:   # the user's own module and/or tensors
            cfg = replace(cfg, arch=OWN if model is not None else cfg.arch,
                          dataset=TENSORS if data is not None else cfg.dataset)
        if cfg.arch == OWN and model is None:
            raise EnsembleError("--arch own is your own module: train it from Python with "
                                "train(cfg, model=make_member)")
        self.given = cfg   # as given, before the recipe fills it in
        checked = resolve_config(cfg)   # every option checked before the data is loaded
        self.block = block = MemberBlock.from_environment(checked.members)   # this process's members
        self.device = device = block.connect(resolve_device(checked.device))
        if data is not None:
            data = tensor_data(data, checked, model is not None, device)
        else:
            data = block.agree(lambda: load_run_data(checked, device), ranks=0)   # a first download: by one rank
            data = data or load_run_data(checked, device)   # the others read what it cached
        self.data = data
        self.cfg = cfg = resolve_config(cfg, data)   # the defaults that depend on the data (augment: 3 channels)
        self.out = Path(cfg.out)
        if block.rank > 0:   # rank 0 speaks for the job
            console = make_console(quiet=True)
        self.console = console
        self.force = force and not resume
        block.agree(lambda: self.check_directory(resume), ranks=0)   # before rank 0 writes config.json
        saved = read_config(self.out) if resume else {}
        self.model = model
        if model is not None:   # its spec is known once its members are built (below)
            self.spec = saved.get('model')
        else:
            self.spec = (check_model_spec(saved.get('model'), self.out / 'config.json') if resume
                         else model_spec(cfg, data))
        world = saved.get('world_size', 1) if resume else block.world
        if world != block.world:   # each rank holds the resume state of its own block of members
            how = (f'torchrun --nproc_per_node {world} train_ensemble.py --resume {self.out}' if world > 1 else
                   f'python train_ensemble.py --resume {self.out}, without torchrun')
            raise EnsembleError(f'{self.out} was trained by {world} process(es), this is {block.world}: resume it '
                                f'with as many ({how})')
        state = block.resume_state(self.out) if resume else None   # none yet: start over, same seeds
        self.m, self.n = block.stop - block.start, len(data.y_train)   # this rank's members, the images
        self.batch_size = min(cfg.batch_size, self.n)
        self.steps_per_epoch = self.n // self.batch_size
        self.total_steps, self.epochs = math.ceil(self.steps_per_epoch * cfg.epochs), math.ceil(cfg.epochs)
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True

        if model is not None:
            net = self.own_network(state is None)
        else:
            net = build_model(self.spec, members=self.m)
            if state is None:
                states = initial_member_states(cfg, self.spec, data, range(block.start, block.stop))
                net.load_state_dict(stack_members(states, net.state_dict()))
                self.spec = stored_statistics(self.spec, states[0])   # --init: the statistics its weights came with
        self.net = net.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        # Regression trains on squared errors in units of the targets' std (so the recipe's lr fits any units).
        self.scale = torch.tensor(self.spec['target_std'], device=device) if cfg.task == 'regression' else None
        self.opt = optimizer_for(self.net, cfg)
        # The training images once, on the device, already through the network's fixed first layer
        # (Normalize), in the input dtype and layout; padded for random crops. A step then gathers its
        # batch in one op, and trains the rest of the network on it.
        self.pad = TRANSLATE if cfg.augment else 0
        self.images = training_images(data.x_train, self.net[0], None if cfg.precision == 'fp32' else
                                      PRECISIONS[cfg.precision], self.pad, cfg.channels_last)
        self.forward = torch.compile(self.net[1:]) if cfg.compile else self.net[1:]

        self.generator = torch.Generator(device).manual_seed(cfg.data_seed)   # order and crops
        flips = torch.Generator(device).manual_seed(cfg.data_seed + 1)
        self.flip_mask = torch.rand(self.n, generator=flips, device=device) < 0.5
        self.bag = self.bootstrap_counts() if cfg.bagging else None

        self.epoch, self.step, self.lookahead, self.metrics = 0, 0, None, []
        # SharpBalance: (members here, n) bool, each one's SAM set, fixed once sam_start_epoch is reached
        self.sam_mask = None
        self.take_directory(resume, state)
        self.train_time = self.metrics[-1]['time_s'] if self.metrics else 0.0

    def bootstrap_counts(self):
        """(M, n) bagging weights: member j sees example i bag[j, i] times (in expectation per epoch). All M
        members', on every rank: the ensemble term weights examples by their mean."""
        m, n, device = self.cfg.members, self.n, self.device
        draws = torch.randint(n, (m, n), device=device,
                              generator=torch.Generator(device).manual_seed(self.cfg.data_seed + 2))
        return torch.zeros(m, n, device=device).scatter_add_(1, draws, torch.ones(m, n, device=device))

    def own_network(self, fresh):
        """The user's module, M times (this rank's members), from its factory: each from its own seed, or
        from --init's member files (loaded into the factory's modules)."""
        cfg, members = self.cfg, range(self.block.start, self.block.stop)
        states = None
        if fresh and cfg.init:
            paths = member_paths(cfg.init)
            if len(paths) not in (1, cfg.members):
                raise EnsembleError(f'--init {cfg.init} has {len(paths)} members; give one member file, '
                                    f'or a run with exactly {cfg.members} members')
            states = [read_checkpoint(paths[0 if len(paths) == 1 else j])[0] for j in members]
        example = to_float_images(self.data.x_train[:2].cpu())
        try:
            net = own_members(self.model, [cfg.seed + j for j in members], example, states)
        except RuntimeError as e:   # load_state_dict: the --init files are of another module
            raise EnsembleError(f'--init {cfg.init} does not fit your module: {str(e).splitlines()[0]}') from None
        spec = own_spec(cfg, self.data, net[1].template[0], net[1].vectorized)
        if self.spec is not None and self.spec != spec:   # resumed: the same module as before
            raise EnsembleError(f'{self.out} was trained with another module or data ({self.spec.get("module")}, '
                                f'inputs {self.spec.get("input_shape")}): pass the same model= and data=')
        self.spec = spec
        return net

    def check_directory(self, resume):
        init = Path(self.cfg.init).resolve() if self.cfg.init else None
        if self.force and init and (init == self.out.resolve() or self.out.resolve() in init.parents):
            raise EnsembleError(f'--init {self.cfg.init} is in the run --force would replace: copy it elsewhere first')
        strays = [] if (self.out / 'config.json').exists() or not self.out.is_dir() else sorted(
            p.name for p in self.out.iterdir() if RUN_FILE.fullmatch(p.name))
        if strays:   # an unknown run's files: training beside them would leave a run its config.json contradicts
            raise EnsembleError(f'{self.out} holds {strays[0]} but no config.json, so it is no run this toolkit can '
                                'replace or resume: move or delete those files, or pass another --out')
        if (self.out / 'config.json').exists() and self.force:
            check_replaceable(self.out)
        elif (self.out / 'config.json').exists() and not resume:
            differ = differing_options(self.given, read_config(self.out))
            if differ:
                raise EnsembleError(f'{self.out} holds a run with other options ({", ".join(differ)}): pass '
                                    'another --out, or --force to replace it')
            complete = (self.out / 'summary.json').exists()
            raise EnsembleError(f'{self.out} already holds this run' + (', complete' if complete else
                                f', unfinished: continue it with --resume {self.out}') +
                                ' (or pass another --out, or --force to train it again)')
        if self.out.exists() and not self.out.is_dir():
            raise EnsembleError(f'--out {self.out} is a file, not a directory')
        if resume and (self.out / 'summary.json').exists():
            raise EnsembleError(f'{self.out} is already complete (it has summary.json); nothing to resume')

    def take_directory(self, resume, state):
        """Everything is checked: now hold the run directory (one writer at a time), write its config.json
        or read its resume state, and remove a killed run's half-written temporaries. Rank 0 holds the
        directory for the job; every rank reads its own resume state."""
        block = self.block
        self.lock = block.agree(lambda: self.hold_directory(resume), ranks=0)
        block.agree(lambda: self.read_state(state))

    def read_state(self, state):
        """This rank's part of the resume state (none: start over, dropping what an earlier attempt left)."""
        current, previous = state_path(self.out, self.block), state_path(self.out, self.block, previous=True)
        if not (self.out / 'config.json').exists():
            raise EnsembleError(f'rank {self.block.rank} does not see {self.out}/config.json that rank 0 wrote: with '
                                'several machines, --out must be on a file system they all share')
        if state is None:   # states an earlier attempt left on this rank would mix with this attempt's
            current.unlink(missing_ok=True)
            previous.unlink(missing_ok=True)
            return
        if state != current:   # continuing from the previous epoch's state: the next one, on this rank only, is dropped
            os.replace(state, current)
        self.epoch, self.step, self.lookahead, self.sam_mask = load_state(
            current, self.net, self.opt, self.generator, self.device)
        self.metrics = read_metrics(self.out)[:self.epoch]

    def hold_directory(self, resume):
        """Create and lock the run directory, write config.json on a new run; returns the lock."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EnsembleError(f'cannot create --out {self.out}: {e.strerror}') from None
        lock = lock_run_dir(self.out)   # held as long as this object lives
        if self.force and (self.out / 'config.json').exists():   # checked again, now that nobody else can write
            check_replaceable(self.out, held=True)
            for old in self.out.iterdir():
                if RUN_FILE.fullmatch(old.name) or is_run_temporary(old):
                    old.unlink()
        if (self.out / 'config.json').exists() and not resume:   # written meanwhile by a run that held the lock
            raise EnsembleError(f'{self.out} already holds a run: pass --out elsewhere, --resume {self.out} to '
                                'continue it, or delete it')
        if not resume:
            updates = [dict(name=g.get('name'), lr=g['initial_lr'], update='orthogonalized' if g.get('orthogonalize')
                            else 'adamw' if self.cfg.optimizer == 'adam' else 'sgd') for g in self.opt.param_groups]
            blocks = [[b.start, b.stop] for b in self.block.blocks]
            write_json(self.out / 'config.json', {**asdict(self.cfg), 'format': FORMAT, 'model': self.spec,
                                                  'optimizer_groups': updates, 'world_size': self.block.world,
                                                  'member_blocks': blocks, **environment(self.device)})
        for stale in filter(is_run_temporary, self.out.iterdir()):   # half-written files of a killed run
            stale.unlink()
        return lock

    def announce(self):
        cfg = self.cfg
        sharpness = '' if cfg.sam_rho is None else f', SAM rho={cfg.sam_rho:g}' + (
            f', SharpBalance flat_ratio={cfg.flat_ratio:g} from epoch {cfg.sam_start_epoch}' if cfg.flat_ratio else '')
        ranks = '' if self.block.world == 1 else f' on {self.block.world} processes'
        self.console.print(
            f'[bold]{self.out}[/]: {cfg.members} member(s) of {cfg.arch} on {cfg.dataset} ({self.n} '
            f'{"rows" if cfg.task == "regression" else "examples" if cfg.dataset == TENSORS else "images"}), '
            f'beta={cfg.beta:g}, combine={cfg.combine}{", bagging" if cfg.bagging else ""}{sharpness}, '
            f'{cfg.epochs:g} epochs of {self.steps_per_epoch} steps, {self.device.type}{ranks}')
        self.console.print(format_row(task=cfg.task), soft_wrap=True)

    def clock(self):
        """Seconds, after the device has finished its queued work."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin_epoch(self, epoch):
        self.epoch = epoch
        self.net.train()
        hook = ARCHS[self.spec['arch']].each_epoch if self.spec['arch'] in ARCHS else None
        if hook is not None:
            hook(self.net, epoch, self.cfg)
        cfg = self.cfg
        # once, on the whole training set
        if cfg.flat_ratio and epoch >= cfg.sam_start_epoch and self.sam_mask is None:
            scores = self.block.gather(sharpness_scores(self.net, self.data.x_train, self.data.y_train, self.m,
                                                        self.scale))
            masks = sharpbalance_masks(scores, cfg.flat_ratio)   # every member's, from every member's scores
            self.sam_mask = masks[self.block.start:self.block.stop]
            shares = ', '.join(f'{share:.0%}' for share in masks.float().mean(1).tolist())
            self.console.print(f'SharpBalance from epoch {epoch}: SAM on {shares} of the training set (per member), '
                               'plain gradients on the rest')

    def steps_in_epoch(self):
        return min(self.steps_per_epoch, self.total_steps - self.step)

    def batches(self, epoch):
        """The epoch's batches as (indices, images, labels), from the data stream: a fresh order, and
        airbench's augmentation (a fixed random half mirrored, all of them every other epoch; random crops)."""
        order = torch.randperm(self.n, generator=self.generator, device=self.device)
        for i in range(self.steps_in_epoch()):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.cfg.augment:
                flip = self.flip_mask[idx] ^ bool(epoch % 2)
                shifts = torch.randint(0, 2 * self.pad + 1, (2, len(idx)), generator=self.generator, device=self.device)
                x = augment_batch(self.images, idx, flip, shifts, self.data.x_train.shape[-2:])
            else:
                x = self.images.index_select(0, idx)   # on a CPU 5x faster than images[idx]
            yield idx, x, self.data.y_train.index_select(0, idx)

    def train_step(self, idx, x, y):
        """One optimizer step on a batch (SAM or plain), the schedule and Lookahead; returns (this rank's
        share of the objective, this rank's members' logits)."""
        cfg, net, block = self.cfg, self.net, self.block
        for g in self.opt.param_groups:
            g['lr'] = g['initial_lr'] * lr_factor(self.step, self.total_steps)
        weights = None if self.bag is None else self.bag[:, idx]

        def logits_at():   # the wide forward pass at the current weights (SAM calls it twice)
            with autocast(self.device, cfg.precision):
                return member_logits(self.forward, x, self.m)

        def objective_of(logits):   # differentiable in this rank's members
            if cfg.beta == 0:   # independent members: this rank's own terms, nothing communicated
                own = None if weights is None else weights[block.start:block.stop]
                return ensemble_objective(logits, y, 0.0, cfg.combine, cfg.label_smoothing, own, self.scale)[0]
            everyone = block.with_others(logits)   # the whole objective, on every rank
            return ensemble_objective(everyone, y, cfg.beta, cfg.combine, cfg.label_smoothing, weights, self.scale)[0]

        self.opt.zero_grad(set_to_none=True)
        if cfg.sam_rho is None:
            logits = logits_at()
            objective = objective_of(logits)
            objective.backward()
        else:
            logits, objective = sam_step(net, self.m, cfg.sam_rho, logits_at, objective_of,
                                         None if self.sam_mask is None else self.sam_mask[:, idx])
        self.opt.step()
        self.step += 1
        if cfg.lookahead and self.epoch >= LOOKAHEAD['start_epoch'] and self.step % LOOKAHEAD['every'] == 0:
            if self.lookahead is None:
                self.lookahead = Lookahead.of(net)
            else:
                decay = (LOOKAHEAD['decay_base'] ** LOOKAHEAD['every']
                         * (self.step / self.total_steps) ** LOOKAHEAD['decay_pow'])
                self.lookahead.update(net, decay)
        if self.step == self.total_steps and self.lookahead is not None:
            self.lookahead.update(net, 1.0)   # as airbench94: end training on the averaged weights
        # The log sums the ranks' objectives: at beta > 0 every rank holds the whole of it.
        return objective if cfg.beta == 0 else objective / block.world, logits

    def end_epoch(self, epoch, log, steps):
        """The epoch's metrics row (training log, test and validation evaluation); write it and the resume state."""
        cfg, score = self.cfg, score_name(self.cfg.task)
        objective_sum, loss_sum, correct, div_sum = log.totals()
        count = max(steps * self.batch_size, 1)
        row = dict(epoch=epoch, time_s=self.train_time, lr=self.opt.param_groups[-1]['lr'],
                   train_objective=objective_sum / count, train_loss=loss_sum / count, train_div=div_sum / count)
        row[f'train_{score}'] = math.sqrt(max(row['train_loss'], 0)) if cfg.task == 'regression' else correct / count
        for split in ('test', 'val') if self.data.x_val is not None else ('test',):
            r = self.evaluate(*self.data.split(split))
            row.update({f'{split}_loss': r['loss'], f'{split}_{score}': r[score], f'{split}_div': r['div']})
            if split == 'test':
                row.update({'member_test_loss': r['member_loss'], f'member_test_{score}': r[f'member_{score}']})
        self.console.print(format_row(row, cfg.task), soft_wrap=True)
        # Divergence is judged in the units training sees: a regression's MSE over the targets' variance.
        unit = 1.0 if self.scale is None else self.scale.pow(2).mean().item()
        if not all(math.isfinite(row[k]) and abs(row[k]) / (unit if k == 'test_loss' else 1) < DIVERGED_LOSS
                   for k in ('train_objective', 'test_loss')):
            # Before anything is written: the run directory keeps the last good epoch's state.
            raise EnsembleError(f'training diverged at epoch {epoch} (objective {row["train_objective"]}, test loss '
                                f'{row["test_loss"]}); the last good epoch is kept. Lower --lr'
                                + (' or --beta' if cfg.beta > 1 else ''))
        self.metrics.append(row)
        lines = ''.join(json.dumps(json_safe(r), allow_nan=False) + '\n' for r in self.metrics)
        self.block.agree(lambda: write_text(self.out / 'metrics.jsonl', lines), ranks=0)
        self.block.agree(lambda: self.write_state(epoch + 1))   # no rank goes on before every rank has its state

    def write_state(self, epoch):
        current = state_path(self.out, self.block)
        if self.block.world > 1 and current.exists():   # kept until every rank has this epoch's (state_path)
            os.replace(current, state_path(self.out, self.block, previous=True))
        save_state(current, self.net, self.opt, self.lookahead, self.generator, epoch, self.step, self.sam_mask)

    def evaluate(self, x, y, tta=False):
        """ensemble_metrics of every member (of every rank) on uint8 images."""
        logits = self.block.gather(predict_logits(self.net, x, self.m, tta, precision=self.cfg.precision))
        return ensemble_metrics(logits, y.to(logits.device), self.cfg.combine)

    def finish(self):
        """The final numbers (with airbench's six-view TTA when asked), the member files and summary.json."""
        cfg, block, score = self.cfg, self.block, score_name(self.cfg.task)
        summary = dict(self.metrics[-1], train_time_s=self.train_time, tta=bool(cfg.tta))
        if cfg.tta:
            r = self.evaluate(self.data.x_test, self.data.y_test, tta=True)
            summary.update(test_loss=r['loss'], test_acc=r['acc'], test_div=r['div'],
                           member_test_loss=r['member_loss'], member_test_acc=r['member_acc'])
        if self.model is not None:
            states = [{k: v.cpu() for k, v in self.net[1].member_state(j).items()} for j in range(self.m)]
        else:
            wide = {k: v.cpu() for k, v in self.net.state_dict().items()}
            states = split_members(wide, build_model(self.spec).state_dict())
        block.agree(lambda: [save_member(self.out / f'member_{j}.safetensors', state, self.spec, member=j,
                                         seed=cfg.seed + j, run=str(self.out))
                             for j, state in zip(range(block.start, block.stop), states)])
        # every member file is written before summary.json says the run is complete
        block.agree(lambda: write_json(self.out / 'summary.json', summary), ranks=0)
        # done: twice the members' size
        for path in (state_path(self.out, block), state_path(self.out, block, previous=True)):
            path.unlink(missing_ok=True)
        self.console.print(f"test {'RMSE' if score == 'rmse' else 'accuracy'}: "
                           f"ensemble {summary[f'test_{score}']:.4f}, "
                           f"mean member {sum(summary[f'member_test_{score}']) / cfg.members:.4f}"
                           f"{' (TTA)' if cfg.tta else ''}; "
                           f'{self.train_time:.1f} s of training; wrote {self.out}/')
        if self.lock is not None:
            self.lock.close()   # the directory is complete: another command may write it now
        return summary


def train(cfg, console=None, on_epoch_end: Optional[Callable[[int], None]] = None, resume=False, model=None, data=None,
          force=False):
    """Train an ensemble as `cfg` says and write its run directory; returns the summary dict.
    on_epoch_end(epoch) is called after each epoch's row and resume state are written.

    model: your own members instead of cfg.arch: make_member(seed) -> nn.Module, called for seeds
    cfg.seed + j. Each member's file loads with make_member(seed).load_state_dict(load_file(path)).
    data: your own tensors (x_train, y_train, x_test, y_test) instead of cfg.dataset: inputs your module
    takes (uint8 images are scaled to [0, 1]; with a network of this toolkit, what a .npz holds), integer
    labels 0..K-1, or float targets with cfg.task 'regression'. Objective, combiners, bagging, SAM and the
    schedule are the same as for the toolkit's networks; cfg.arch's recipe becomes AdamW at lr 1e-3
    (OWN_RECIPE) unless cfg says otherwise.

    force: replace what cfg.out holds, if it is a finished or interrupted run of this toolkit that no
    process is writing (only the run's own files are deleted)."""
    run = Training(cfg, console or make_console(), resume, model, data, force)
    run.announce()
    with progress_bar(run.console, run.total_steps - run.step) as advance:   # the whole run, with its ETA
        for epoch in range(run.epoch, run.epochs):
            start = run.clock()
            run.begin_epoch(epoch)
            log, steps = TrainingLog(run.cfg.combine, run.block), run.steps_in_epoch()
            for idx, x, y in run.batches(epoch):
                objective, logits = run.train_step(idx, x, y)
                log.add(objective, logits, y)
                advance(f'epoch {epoch + 1} of {run.epochs}')
            log.reduce()   # inside the timed part: the log is work of the loop
            run.train_time += run.clock() - start
            run.end_epoch(epoch, log, steps)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    return run.finish()


@contextmanager
def progress_bar(console, total):
    """advance(description) moves a progress bar with an ETA by one step, on a terminal; elsewhere (a log, a
    pipe, rich not installed) it does nothing."""
    if console.quiet or not console.is_terminal:
        yield lambda description: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    with Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn('ETA'), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task('training', total=total)
        yield lambda description: bar.update(task, advance=1, description=description)


def complete_run(cfg, console=None):
    """The summary of cfg's run (its --out): read back if it finished, resumed if it was interrupted,
    trained otherwise, so a sweep that is stopped continues where it stopped. A run directory made with
    other options is refused, never mixed in."""
    out = Path(cfg.out)
    if (out / 'config.json').exists():
        differ = differing_options(cfg, read_config(out))
        if differ:
            raise EnsembleError(f'{out} holds a run with other options ({", ".join(differ)}): pass another --out')
        if (out / 'summary.json').exists():
            return json.loads((out / 'summary.json').read_text())
        return train(config_to_resume(out), console, resume=True)
    return train(cfg, console)


#############################################
#                  Main                     #
#############################################

def differing_options(cfg, saved):
    """'option: saved → given' for each option given in cfg that a run's config.json holds otherwise. None and
    'auto' were resolved when it ran; an option its config.json lacks is newer than the run, which therefore
    ran as that option's default does."""
    defaults = option_defaults()
    return [f'{cli_name(f.name)}: {saved.get(f.name, defaults[f.name])} there, {getattr(cfg, f.name)} here'
            for f in fields(Config) if getattr(cfg, f.name) not in (None, 'auto') and f.name != 'out'
            and saved.get(f.name, defaults[f.name]) != getattr(cfg, f.name)]


def names(f):
    """The command-line spellings of Config field f (its name first; a switch as '--x/--no-x')."""
    flag = f.metadata['flag']
    return (flag,) if isinstance(flag, str) else flag or ('--' + f.name.replace('_', '-'),)


def cli_name(name):
    """The command line's name of Config option `name` ('sam_rho' -> '--rho')."""
    return names(next(f for f in fields(Config) if f.name == name))[0].split('/')[0]


def option_defaults():
    """{option: its default}, as written in Config."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(Config)}


def cli_error(message):
    """Print a one-line error and exit non-zero: bad input never ends in a traceback."""
    make_console(stderr=True).print(f'[bold red]error:[/] {message}', highlight=False)
    raise SystemExit(2)   # bad input, as for a usage error


@contextmanager
def user_errors(*kinds):
    """The toolkit's errors (EnsembleError, and `kinds`) as one line on stderr and exit status 2: wrap a
    script's command line in it (the experiments and benchmarks do)."""
    try:
        yield
    except (EnsembleError, *kinds) as e:
        cli_error(' '.join(str(e).split()))


def config_to_resume(run_dir):
    """The Config of the interrupted run in run_dir, from its config.json."""
    config_path = Path(run_dir) / 'config.json'
    if not config_path.exists() and any(Path(run_dir).glob('member_*.safetensors')):
        raise EnsembleError(f'cannot resume {run_dir}: its config.json is missing, but it holds member files '
                            f'(the run {"finished" if (Path(run_dir) / "summary.json").exists() else "trained"}); '
                            'resuming needs every option it ran with: restore config.json')
    if not config_path.exists() and (Path(run_dir) / '.lock').exists():
        raise EnsembleError(f'cannot resume {run_dir}: it was stopped before it wrote config.json, so nothing was '
                            'trained; run the original command again (same --out)')
    if not config_path.exists():
        raise EnsembleError(f'cannot resume {run_dir}: it has no config.json (not a run directory)')
    try:
        saved = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnsembleError(f'cannot resume {run_dir}: its config.json is not valid JSON ({e})') from None
    # Read back, never guessed: a config.json that lost its options would otherwise resume as the defaults
    # (a CIFAR-10 download into ./data) over the run's own files.
    missing = [k for k in ('dataset', 'arch', 'members', 'beta', 'seed')
               if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise EnsembleError(f'cannot resume {run_dir}: its config.json is not a training run\'s (no '
                            f'{", ".join(missing)})')
    return Config(**{**checked_options(saved, config_path), 'out': str(run_dir)})


def checked_options(saved, source):
    """The Config options in a dict read back from JSON, each checked to have its field's type."""
    def fits(value, kinds):   # kinds: the field's type, or Optional's (type, NoneType)
        if isinstance(value, bool):   # a bool is an int to isinstance, never to an option
            return bool in kinds
        if isinstance(value, list):
            return list in kinds and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return isinstance(value, kinds) or (float in kinds and isinstance(value, int))
    options = {f.name: saved[f.name] for f in fields(Config) if f.name in saved}
    for f in fields(Config):
        if f.name in options and not fits(options[f.name], get_args(f.type) or (f.type,)):
            kind = ' or '.join(k.__name__ for k in get_args(f.type) or (f.type,)).replace('NoneType', 'null')
            raise EnsembleError(f"{source}: '{f.name}' is {json.dumps(options[f.name])}, not {kind}")
    return options


def command():
    """The command line: one option per Config field, with the field's default and help, plus --resume.
    Built on demand, so that importing this file needs no typer."""
    import inspect
    import typer

    def main(resume: Optional[str] = None, force: bool = False, version: bool = False, **options):
        """Train an M-member deep ensemble with the objective  Σ_j (1−β)·CE(y, p_j) + β·M·CE(y, p̄)
        (regression: Σ_j (1−β)·(f_j − y)² + β·M·(f̄ − y)²)."""
        try:
            if resume and force:
                raise EnsembleError('--resume continues a run and --force replaces it: pass one of them')
            if resume:
                cfg = config_to_resume(resume)
                given = [f.name for f in fields(Config) if options[f.name] != params_by_name[f.name].default.default]
                if given:
                    dropped = ', '.join(map(cli_name, given))
                    raise EnsembleError(f'--resume reads every option from the run; drop {dropped}')
                train(cfg, resume=True)
                return
            for f in fields(Config):
                if f.metadata['parse'] is not None:
                    options[f.name] = f.metadata['parse'](options[f.name])
            train(Config(**options), force=force)
        except EnsembleError as e:
            cli_error(e)
        finally:   # under torchrun: leave the job's process group cleanly
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    params, defaults, panel = [], option_defaults(), None
    for f in fields(Config):
        default, annotation, panel = defaults[f.name], f.type, PANELS.get(f.name, panel)
        if f.metadata['parse'] is not None:   # the command line takes text
            annotation, default = Optional[str], None if default is None else ','.join(map(str, default))
        flags = list(names(f))
        choices = '|'.join(f.metadata['choices'] or ())
        metavar = choices if 0 < len(choices) <= 20 else None   # longer lists: the help names them
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(default, *flags, help=f.metadata['help'],
                                                             rich_help_panel=panel, metavar=metavar)))
    params.append(inspect.Parameter('resume', inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                    default=typer.Option(None, help='Continue the interrupted run in this directory '
                                                                    'from its last completed epoch (other options '
                                                                    'are read from it).',
                                                         rich_help_panel=PANELS['seed'])))
    params.append(inspect.Parameter('force', inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, '--force', help='Replace what --out (or the default) holds, if it is a run of this toolkit that no '
                               'process is writing (only its own files are deleted).', rich_help_panel=PANELS['seed'])))
    params.append(inspect.Parameter('version', inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, '--version', help='Print the versions (checkpoint format, torch) and exit.', is_eager=True,
        callback=print_version)))
    params_by_name = {p.name: p for p in params}
    main.__signature__ = inspect.Signature(params)
    main.__annotations__ = {p.name: p.annotation for p in params}
    return main


# The --help panels: each opens at its first option, in Config's order.
PANELS = {'task': 'The ensemble and its objective', 'dataset': 'Data', 'arch': 'The network',
          'epochs': "The recipe (default: the architecture's)", 'seed': 'Seeds, device and output'}


def version_line(script='train_ensemble.py'):
    """What a script's --version prints: the checkpoint format and torch's version."""
    return f'{script}: checkpoints {FORMAT}; torch {torch.__version__}'


def print_version(asked):
    if asked:
        print(version_line())
        raise SystemExit(0)


def main():
    """The command line (`python train_ensemble.py --help`); with no arguments, the help, not a CIFAR-10 run."""
    import typer
    import typer.rich_utils
    if not sys.stdout.isatty() and typer.rich_utils.MAX_WIDTH is None:   # a pipe's 80 columns cut the help's words
        typer.rich_utils.MAX_WIDTH = 110
    app = typer.Typer(add_completion=True, pretty_exceptions_enable=False,
                      context_settings=dict(help_option_names=['-h', '--help']))
    app.command()(command())
    app(args=sys.argv[1:] or ['--help'])


if __name__ == '__main__':
    main()
