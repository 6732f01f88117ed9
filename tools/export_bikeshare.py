"""Export the UCI Bike Sharing data (hourly rentals in Washington D.C., 2011: 8,645 hours; Fanaee-T & Gama
2013) that ships inside the ISLP wheel to a regression .npz that train_ensemble.py reads, without
installing ISLP.

    pip download ISLP==0.6.0 --no-deps -d /tmp/islp
    python tools/export_bikeshare.py /tmp/islp/islp-0.6.0-py3-none-any.whl data/bikeshare.npz

The target is `bikers`, the hour's rentals. `casual` and `registered` are dropped: they sum to the
target. The calendar and weather categories become one-hot columns (season 4, month 12, hour 24,
weekday 7, weather 4), `day` (day of the year), `holiday` and `workingday` stay numbers, and so do the
four normalized weather readings: 58 features in all. A fixed random fifth of the hours (seed 0) is the
test split. The .npz also holds `feature_names`.
"""
import csv
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

TARGET, DROPPED = 'bikers', ('casual', 'registered')
CATEGORIES = ('season', 'mnth', 'hr', 'weekday', 'weathersit')   # one-hot; every other column is a number


def main(wheel, out):
    with zipfile.ZipFile(wheel) as z:
        rows = list(csv.DictReader(io.StringIO(z.read('ISLP/data/Bikeshare.csv').decode())))
    columns, names = [], []
    for key in rows[0]:
        if key in DROPPED or key == TARGET:
            continue
        values = [r[key] for r in rows]
        if key in CATEGORIES:
            levels = sorted(set(values), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
            columns += [[float(v == level) for v in values] for level in levels]
            names += [f'{key}={level}' for level in levels]
        else:
            columns.append([float(v) for v in values])
            names.append(key)
    x = np.array(columns, dtype=np.float32).T
    y = np.array([float(r[TARGET]) for r in rows], dtype=np.float32)
    test = np.zeros(len(y), dtype=bool)
    test[np.random.default_rng(0).permutation(len(y))[:len(y) // 5]] = True
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=x[~test], y_train=y[~test], x_test=x[test], y_test=y[test], feature_names=np.array(names))
    print(f'wrote {out}: {len(y)} hours, {x.shape[1]} features, {(~test).sum()} train / {test.sum()} test; '
          f'target {TARGET}: mean {y.mean():.1f}, std {y.std():.1f}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(f'usage: python {sys.argv[0]} ISLP_WHEEL OUT.npz (see the docstring)')
    main(*sys.argv[1:3])
