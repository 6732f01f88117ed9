"""analyze.py: look inside trained ensembles: metrics, diversity, learner collusion, loss barriers, sharpness.

    python analyze.py evaluate runs/joint --split train,test           # members, ensemble, DIV, calibration, gaps
    python analyze.py evaluate runs/fm_s0 runs/fm_s1 runs/fm_s2        # three runs (or member files): one ensemble
    python analyze.py evaluate runs/low runs/high --classes all        # runs on classes 0-4 and 5-9, on all ten
    python analyze.py compare runs/beta_* --plot beta.png              # the β sweep: error, DIV, gap vs β
    python analyze.py debias runs/joint                                # how much of DIV is collusion
    python analyze.py drop runs/joint --fractions 0.2,0.4,0.6          # what dropping learners costs
    python analyze.py interpolate runs/a runs/b --align --repair --plot lmc.png
    python analyze.py sharpness runs/sam --rho 0.5

Every command reads run directories (SPEC.md), prints a table, writes its numbers with --json and, for
curves and sweeps, a PNG with --plot; evaluate, debias, drop, ood and robustness treat all the members of
several runs as one ensemble. Each evaluates the runs' own classes unless --classes says otherwise. The
metrics take logits, so they serve any model, and need only torch (scipy for AUROC): a copied analyze.py
imports train_ensemble.py and rebasin.py only to load runs and networks.
Every number evaluate and compare show is a row of PREDICTOR_METRICS or ENSEMBLE_METRICS.

The diagnostics are those of the collusion paper (Jeffares et al. 2023, arXiv 2301.11323: DIV vs β,
generalization gaps, debiasing, dropping learners), the modular-loss supplement (Webb et al.: the
ambiguity decomposition), SharpBalance (Lu et al. 2024: disagreement-error ratio, logit variance,
ASAM-style sharpness) and git re-basin (Ainsworth et al. 2022: barriers along A→B, A→π(B) and B→π(B),
with BatchNorm reset or REPAIR from rebasin.py).

Measured on Fashion-MNIST (4,000 training images, 3-member MLP with 64 hidden units, 3 epochs, CPU, seed 0),
independent (β = 0) vs joint (β = 1) training with probability averaging: test DIV 0.024 vs 16.3; debiasing
(biases fit on train, removed on test) changes DIV by +40% vs -49% (it removes nothing from independent
members and half of the joint ones' DIV); dropping one of the three members raises the test loss by 0.006 vs
1.50 nats. Running-average train numbers in summary.json understate the loss gap: 0.020 vs 0.061 clean.
"""

#############################################
#                 Settings                  #
#############################################

import copy
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import sys
import textwrap
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

try:   # one error type across the toolkit when train_ensemble.py sits beside this file (its callers catch it)
    from train_ensemble import EnsembleError
except ImportError:   # analyze.py copied alone: its metrics raise their own
    class EnsembleError(ValueError):
        """A user-facing error (bad input): the command line prints its message on one line."""


class _Sibling:
    """A sibling script (train_ensemble.py, rebasin.py), imported on first use: only loading runs and data,
    rebuilding networks and interpolating need one, so the metrics work in a copied analyze.py alone.
    Missing, it is an EnsembleError naming the file, which the command line prints in one line."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        try:
            module = importlib.import_module(self._name)
        except ImportError as e:
            name = e.name or self._name
            raise EnsembleError(f'this needs {name}.py (or the package {name}) beside analyze.py: '
                                'copy it from the deep-ensembles toolkit') from None
        return getattr(module, attr)


te, rebasin = _Sibling('train_ensemble'), _Sibling('rebasin')

PIPED_WIDTH = 200           # columns of tables written to a pipe or a log (rich's default of 80 cuts them)
ECE_BINS = 15               # equal-width confidence bins of the expected calibration error
DROP_DRAWS = 20             # random member subsets per drop fraction (all subsets when there are fewer)
INTERP_POINTS = 11          # λ = 0, 0.1, ..., 1
INTERP_EXAMPLES = 10000     # images per split for each λ of each curve (3 curves x 11 points add up)
SHARP_RHO = 0.5             # ASAM's radius: perturbations are measured relative to |w|, so ρ is ~10x SAM's
SHARP_STEPS = 5             # projected gradient ascent steps (1 step = the SAM/ASAM estimate)
SHARP_EXAMPLES = 2000       # fixed training images the ascent and the loss use
SHARP_BATCH = 500
ASAM_ETA = 0.01             # ASAM's offset in |w| + η, so that zero weights (biases) can still move


#############################################
#               Runs and data               #
#############################################

@functools.lru_cache(maxsize=2)   # several analyses of runs on the same data in one process load it once
def _cached_data(key):
    return te.load_run_data(json.loads(key), 'cpu', download=False)


def run_data(config, dataset=None, classes=None, data_dir=None):
    """The data a run was trained on (its config.json: its classes too), on the CPU. Overrides: `dataset`,
    `classes` (a list of labels, or 'all' for every class) and `data_dir` (where datasets are cached)."""
    fields = ('dataset', 'data_dir', 'seed', 'data_seed', 'val_size', 'shard', 'subset', 'task', 'target', 'classes')
    key = {k: config[k] for k in fields if config.get(k) is not None}
    key.update({k: v for k, v in (('dataset', dataset), ('data_dir', data_dir)) if v})
    if classes is not None:
        key['classes'] = None if classes == 'all' else sorted(classes)
    return _cached_data(json.dumps({k: v for k, v in key.items() if v is not None}, sort_keys=True))


def evaluated_classes(text, configs, spec):
    """The classes an evaluation covers, sorted (a regression run has none: None): --classes `text`, 'all' or
    a list as train_ensemble.py's --classes takes ('0-4', '0,2,5'); by default (None) the union of the
    runs' own classes (`configs`), every class when one of them has none. `spec`: the members' model spec."""
    k = spec.get('num_classes')
    if 'regression' in [spec.get('task')] + [c.get('task') for c in configs]:
        if text is not None:
            raise EnsembleError(f"--classes {text} does not apply to a regression run (its targets have no classes)")
        return None
    if text is None:
        own = [c.get('classes') for c in configs]
        return list(range(k)) if None in own else sorted(set().union(*own))
    if str(text).strip() == 'all':
        return list(range(k))
    try:
        values = te.parse_ints(text) or []
    except EnsembleError:
        raise EnsembleError(f"--classes takes all or a list like 0-4 or 0,2,5, got '{text}'") from None
    if not values:
        raise EnsembleError(f"--classes '{text}' names no class: use all, or a list like 0-4 or 0,2,5")
    outside = [c for c in values if not 0 <= c < k]
    if outside:
        raise EnsembleError(f'--classes {text}: class {outside[0]} is out of range; the members have {k} classes, '
                            f'0 to {k - 1}')
    return sorted(set(values))


def class_text(classes):
    """A sorted list of classes as --classes writes it: '0-4', '0,2,5-7'."""
    return te.ints_text(classes)


def _of_classes(classes, k):
    """' of classes 0-4', ' of all 10 classes', or for a regression run (None) nothing: what titles append."""
    if classes is None:
        return ''
    return f' of all {k} classes' if len(classes) == k else f' of classes {class_text(classes)}'


def run_config(path):
    """config.json of a run directory, or of the run a member file sits in ({} when there is none), every
    option checked (train_ensemble.read_config)."""
    path = Path(path)
    if not path.exists():
        raise EnsembleError(f'{path} does not exist (expected a run directory or a member file)')
    return te.read_config(path if path.is_dir() else path.parent)


def split_examples(data, split, examples=None):
    """(uint8 images, labels) of a split, the first `examples` of them (splits are class-balanced in order)."""
    x, y = data.split(split)
    return (x[:examples], y[:examples]) if examples else (x, y)


#############################################
#                Combiners                  #
#############################################
# How the members' outputs make the ensemble's prediction. train_ensemble.py owns the combiners
# (COMBINERS): with it beside this file, its registry is used, so a combiner added there works here too.
# Copied alone, analyze.py computes its metrics with a copy of the built-in combiners' arithmetic
# (tests/test_analyze_ensembles.py checks that the copy equals train_ensemble's, combiner by combiner).

_COMBINE = {   # combiner -> (its task, the ensemble's log-probabilities or output from (M, N, K) outputs)
    'prob': ('classification', lambda logits, log_p: torch.logsumexp(log_p, 0) - math.log(len(logits))),
    'logit': ('classification', lambda logits, log_p: F.log_softmax(logits.mean(0), -1)),
    'mean': ('regression', lambda logits, log_p: logits.mean(0)),
}


@functools.lru_cache(maxsize=None)
def _combiners():
    """{combiner: (task, predict)}: train_ensemble's registry when it can be imported, else the copy."""
    try:
        registry = importlib.import_module('train_ensemble').COMBINERS
    except ImportError:
        return _COMBINE
    return {name: (c.task, c.predict) for name, c in registry.items()}


def classification_combiners():
    return tuple(name for name, (task, _) in _combiners().items() if task == 'classification')


def _combine(logits, combiner, log_p=None):
    """The ensemble's prediction from (M, N, K) member outputs; log_p: their log_softmax, if at hand."""
    if combiner not in _combiners():
        raise EnsembleError(f"unknown combiner '{combiner}': use {' or '.join(classification_combiners())} "
                            "(classification) or mean (regression)")
    task, predict = _combiners()[combiner]
    if log_p is None and task == 'classification':
        log_p = F.log_softmax(logits, -1)
    return predict(logits, log_p)


def _cross_entropy(log_probs, y):
    """Per-example cross-entropy of log-probabilities (..., N, K) against labels (N,)."""
    return -log_probs.gather(-1, y.expand(log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def _squared_error(outputs, y):
    """Per-example squared error of outputs (..., N, T) against targets (N, T), the mean over the T targets."""
    return (outputs - y).pow(2).mean(-1)


def _ensemble_terms(logits, y, combiner):
    """(member losses (M, N), the ensemble's loss (N,)): cross-entropy, or for 'mean' the squared error."""
    if _combiners()[combiner][0] == 'regression':
        return _squared_error(logits, y), _squared_error(_combine(logits, combiner), y)
    log_p = F.log_softmax(logits, -1)
    return _cross_entropy(log_p, y), _cross_entropy(_combine(logits, combiner, log_p), y)


#############################################
#        Metrics of one predictor           #
#############################################
# Every number `evaluate`, `compare`, the JSON and the plots show is a row (key, label, format, function):
# a new metric is its function and one row. PREDICTOR_METRICS score one predictor (a member, the ensemble);
# ENSEMBLE_METRICS (below) score the members together.

Metric = namedtuple('Metric', 'key label format function')


def brier_score(probs, y):
    """Mean over examples of Σ_k (p_k − 1[y = k])², between 0 and 2."""
    return float((probs - F.one_hot(y, probs.size(-1)).to(probs)).pow(2).sum(-1).mean())


def calibration(probs, y, bins=ECE_BINS):
    """Expected calibration error: Σ_b (n_b / N)·|accuracy_b − confidence_b| over equal-width bins of the
    top-class probability."""
    confidence, prediction = probs.max(-1)
    correct = (prediction == y).to(confidence)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1   # bin b holds (b/bins, (b+1)/bins]
    gap = torch.zeros(bins, dtype=confidence.dtype, device=probs.device)
    gap.index_add_(0, index, correct - confidence)   # Σ (acc − conf) per bin = n_b·(acc_b − conf_b)
    return float(gap.abs().sum() / len(y))


PREDICTOR_METRICS = [   # function(log-probabilities (N, K), labels (N,), ECE bins) -> float
    Metric('acc', 'accuracy', '.4f', lambda log_p, y, bins: float((log_p.argmax(-1) == y).double().mean())),
    Metric('nll', 'NLL', '.4f', lambda log_p, y, bins: float(_cross_entropy(log_p, y).mean())),
    Metric('brier', 'Brier', '.4f', lambda log_p, y, bins: brier_score(log_p.exp(), y)),
    Metric('ece', 'ECE', '.4f', lambda log_p, y, bins: calibration(log_p.exp(), y, bins)),
]


def prediction_metrics(log_probs, y, bins=ECE_BINS):
    """Every PREDICTOR_METRICS number (accuracy, NLL, Brier score, ECE) of one predictor's (N, K)
    log-probabilities."""
    return {m.key: m.function(log_probs, y, bins) for m in PREDICTOR_METRICS}


def mean_std(values):
    """(mean, sample standard deviation) of numbers over seeds (standard deviation 0 for one seed)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


#############################################
#                Diversity                  #
#############################################

def ambiguity(logits, y, combiner):
    """The ambiguity decomposition CE(y, p̄) = mean_j CE(y, p_j) − DIV, with DIV by the combiner's own
    formula: logit averaging (normalized geometric mean) has the label-free (1/M) Σ_j KL(p̄ ‖ p_j)
    (Heskes 1998); probability averaging has the Jensen gap at the label (1/M) Σ_j log(p̄_y / p_j,y).
    Returns per-example DIV (N,) and the largest deviation of the identity (float64 throughout)."""
    logits = logits.double()
    if combiner not in classification_combiners():
        raise EnsembleError(f"unknown combiner '{combiner}': use {' or '.join(classification_combiners())}")
    member_ce, ensemble_ce = _ensemble_terms(logits, y, combiner)
    log_p = F.log_softmax(logits, -1)
    if combiner == 'logit':
        log_mean = _combine(logits, 'logit')
        div = (log_mean.exp() * (log_mean - log_p)).sum(-1).mean(0)
    elif combiner == 'prob':
        log_p_y = log_p.gather(-1, y.expand(log_p.shape[:-1]).unsqueeze(-1)).squeeze(-1)   # (M, N)
        div = torch.logsumexp(log_p_y, 0) - math.log(len(log_p)) - log_p_y.mean(0)
    else:   # a combiner with no closed form here: DIV by its definition (the residual is then 0 by construction)
        div = member_ce.mean(0) - ensemble_ce
    residual = float((member_ce.mean(0) - ensemble_ce - div).abs().max())
    return div, residual


def disagreement(logits):
    """Fraction of member pairs whose top classes differ, averaged over examples. Counting each example's
    votes per class (pairs that agree = Σ_c n_c(n_c − 1)) avoids building M² comparisons."""
    m, _, k = logits.shape
    if m < 2:
        return 0.0
    votes = F.one_hot(logits.argmax(-1), k).sum(0).double()   # (N, K) members per class
    return float(1 - (votes * (votes - 1)).sum(-1).mean() / (m * (m - 1)))


def double_fault(logits, y):
    """Fraction of member pairs that are both wrong, averaged over examples (Giacinto & Roli 2001; Kuncheva &
    Whitaker 2003): members that err on different examples have a low rate. None for one member (no pairs)."""
    m = len(logits)
    if m < 2:
        return None
    wrong = (logits.argmax(-1) != y).double().sum(0)   # (N,) members wrong per example
    return float((wrong * (wrong - 1)).mean() / (m * (m - 1)))


def logit_variance(logits):
    """Variance across members of the logits, averaged over examples and classes. Each member's logits
    are centred over classes first: a per-example shift changes no prediction, so it is not diversity."""
    centred = logits.double() - logits.double().mean(-1, keepdim=True)
    return float(centred.var(0, unbiased=False).mean())


def regression_metrics(outputs, y):
    """MSE and RMSE of one predictor's (N, T) outputs, in the targets' units (mean over the T targets)."""
    mse = float(_squared_error(outputs, y).mean())
    return dict(mse=mse, rmse=math.sqrt(mse))


def regression_report(outputs, y):
    """Everything `evaluate` shows for (M, N, T) regression outputs: per-member, mean-member and ensemble
    MSE and RMSE; DIV = mean_j (f_j − f̄)² and the residual of the ambiguity decomposition ensemble MSE =
    mean member MSE − DIV (Krogh & Vedelsby 1995; exact, so the residual is rounding, relative to the mean
    member MSE); and DIV / mean member MSE, the share of the members' error that averaging removes."""
    outputs, y = outputs.double(), y.to(outputs.device).double()
    members = [regression_metrics(o, y) for o in outputs]
    mean_member = {k: sum(m[k] for m in members) / len(members) for k in members[0]}
    ensemble = regression_metrics(outputs.mean(0), y)
    member_se, ensemble_se = _ensemble_terms(outputs, y, 'mean')
    div = _squared_error(outputs, outputs.mean(0)).mean(0)   # (N,): the members' spread around the ensemble
    residual = float((member_se.mean(0) - ensemble_se - div).abs().max()) / max(mean_member['mse'], 1e-300)
    return dict(examples=len(y), combiner='mean', members=members, mean_member=mean_member, ensemble=ensemble,
                div=float(div.mean()), decomposition_residual=residual,
                ensemble_improvement=_ratio(float(div.mean()), mean_member['mse']))


def _ratio(a, b):
    return a / b if b > 0 else None   # JSON has no NaN: None (null) when undefined


def _errors(logits, y, combiner):
    """(mean member error, ensemble error) of (M, N, K) logits."""
    return (float((logits.argmax(-1) != y).double().mean()),
            float((_combine(logits, combiner).argmax(-1) != y).double().mean()))


ENSEMBLE_METRICS = [   # function(member logits (M, N, K) float64, labels (N,), combiner) -> float or None
    Metric('div', 'DIV', '.4f', lambda z, y, c: float(ambiguity(z, y, c)[0].mean())),
    Metric('disagreement', 'disagreement', '.4f', lambda z, y, c: disagreement(z)),
    Metric('disagreement_error_ratio', 'disagreement / member error', '.4f',
           lambda z, y, c: _ratio(disagreement(z), _errors(z, y, c)[0])),
    Metric('ensemble_improvement_rate', 'ensemble improvement rate', '.4f',
           lambda z, y, c: (lambda m, e: _ratio(m - e, m))(*_errors(z, y, c))),
    Metric('double_fault', 'double fault', '.4f', lambda z, y, c: double_fault(z, y)),
    Metric('logit_variance', 'logit variance', '.4f', lambda z, y, c: logit_variance(z)),
]


def ensemble_report(logits, y, combiner, bins=ECE_BINS):
    """Everything `evaluate` shows for (M, N, K) member logits: the PREDICTOR_METRICS of each member, of
    their mean and of the ensemble; every ENSEMBLE_METRICS number (DIV, disagreement, the disagreement-error
    ratio, the ensemble improvement rate, the double-fault rate, the logit variance); and the residual of
    DIV's ambiguity decomposition (a check: rounding)."""
    logits, y = logits.double(), y.to(logits.device)
    log_p = F.log_softmax(logits, -1)
    members = [prediction_metrics(log_p[j], y, bins) for j in range(len(logits))]
    mean_member = {k: sum(m[k] for m in members) / len(members) for k in members[0]}
    ensemble = prediction_metrics(_combine(logits, combiner, log_p), y, bins)
    return dict(examples=len(y), combiner=combiner, members=members, mean_member=mean_member, ensemble=ensemble,
                decomposition_residual=ambiguity(logits, y, combiner)[1],
                **{m.key: m.function(logits, y, combiner) for m in ENSEMBLE_METRICS})


#############################################
#          Collusion diagnostics            #
#############################################

def member_bias(logits):
    """(M, 1, K) class-wise bias of each member: its mean logit minus the members' average mean logit.
    The biases sum to zero over members, so removing them leaves the mean logit unchanged."""
    mean_logit = logits.mean(1, keepdim=True)
    return mean_logit - mean_logit.mean(0, keepdim=True)


def debias(logits_fit, logits_apply):
    """Member logits on `logits_apply` with the biases estimated on `logits_fit` removed. Colluding
    members push their logits in opposite constant directions that cancel in the ensemble: removing
    the offsets removes that pseudo-diversity and leaves the logit-averaged ensemble exactly as it was."""
    return logits_apply - member_bias(logits_fit).to(logits_apply)


def ensemble_loss_error(logits, y, combiner):
    """The ensemble's (loss, error): cross-entropy and error rate, or for 'mean' (regression) MSE and RMSE."""
    if combiner == 'mean':
        mse = float(_squared_error(logits.mean(0), y).mean())
        return mse, math.sqrt(mse)
    log_probs = _combine(logits, combiner)
    return float(_cross_entropy(log_probs, y).mean()), float((log_probs.argmax(-1) != y).double().mean())


def drop_learners(logits, y, combiner, fractions, draws=DROP_DRAWS, seed=0):
    """For each fraction p: keep M − ⌊pM⌋ members (every subset if there are at most `draws`, else
    `draws` random ones) and measure the increase of the ensemble's loss and error over the full one."""
    m, g = len(logits), torch.Generator().manual_seed(seed)
    full = ensemble_loss_error(logits, y, combiner)
    rows = []
    for p in fractions:
        keep = m - math.floor(p * m + 1e-9)
        if not 0 <= p < 1 or keep < 1:
            raise EnsembleError(f'drop fraction {p} must be in [0, 1) and keep at least one of {m} members')
        if math.comb(m, keep) <= draws:
            subsets = [list(s) for s in itertools.combinations(range(m), keep)]
        else:
            subsets = [torch.randperm(m, generator=g)[:keep].tolist() for _ in range(draws)]
        rise = torch.tensor([ensemble_loss_error(logits[s], y, combiner) for s in subsets], dtype=torch.float64)
        rise -= torch.tensor(full, dtype=torch.float64)
        rows.append(dict(fraction=p, kept=keep, subsets=len(subsets),
                         loss_increase=float(rise[:, 0].mean()),
                         loss_increase_std=float(rise[:, 0].std(unbiased=False)),
                         error_increase=float(rise[:, 1].mean()),
                         error_increase_std=float(rise[:, 1].std(unbiased=False))))
    return dict(full_loss=full[0], full_error=full[1], fractions=rows)


#############################################
#              Loss landscape               #
#############################################

def barrier(values, lams=None):
    """max_λ L(λ) − ((1 − λ)·L(0) + λ·L(1)) of a curve sampled at `lams` (default: evenly from 0 to 1)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    lams = (torch.linspace(0, 1, len(values), dtype=torch.float64) if lams is None
            else torch.as_tensor(lams, dtype=torch.float64))
    return float((values - ((1 - lams) * values[0] + lams * values[-1])).max())


def align_state(net, state_a, state_b, example_input):
    """B's state with its hidden channels permuted by weight matching into A's basin (the same function)."""
    spec = rebasin.permutation_spec(net, example_input)
    return rebasin.apply_permutation(spec, rebasin.weight_matching(spec, state_a, state_b), state_b)


def interpolation_curve(net, state_a, state_b, lams, evaluate, bn=None, batches=None, progress=None):
    """evaluate(net) at each λ of the straight line from A to B. bn='reset' recomputes BatchNorm
    statistics, bn='repair' applies REPAIR (rebasin.py), both on `batches` and only strictly inside the
    line: the endpoints are the trained networks as they are. `net` ends holding the last state."""
    if bn == 'repair':
        ends = [copy.deepcopy(net) for _ in range(2)]
        for end, state in zip(ends, (state_a, state_b)):
            end.load_state_dict(state)
    rows = []
    for lam in lams:
        net.load_state_dict(rebasin.average([state_a, state_b], [1 - lam, lam]))   # exact at both ends
        if bn and 0 < lam < 1:
            net.load_state_dict(rebasin.reset_bn(net, batches) if bn == 'reset'
                                else rebasin.repair(ends[0], ends[1], net, lam, batches))
        rows.append(dict(lam=lam, **evaluate(net)))
        if progress:
            progress()
    return rows


CURVES = {'naive': 'A → B', 'aligned': 'A → π(B)', 'permuted': 'B → π(B)'}   # lmc_curves' lines: key -> label


def lmc_curves(spec, state_a, state_b, splits, points=INTERP_POINTS, align=False, bn=None, bn_inputs=None,
               device='cpu', progress=None):
    """Linear mode connectivity of two networks of one model spec (state dicts): the loss and error of each
    split in `splits` ({name: (inputs, targets)}) at `points` evenly spaced λ along A → B and, with `align`,
    A → π(B) and B → π(B), π(B) = B permuted into A's basin by weight matching. bn ('reset' or 'repair')
    treats the inner λ on `bn_inputs` (training inputs). Regression specs measure MSE and RMSE.
    Returns {curve: dict(points=[{lam, <split>_loss, <split>_error}], barrier={<split>_loss, <split>_error})},
    the curves named by their CURVES keys (naive, and with `align` aligned and permuted)."""
    device = torch.device(device)
    combiner = 'mean' if spec.get('task') == 'regression' else 'prob'
    net = te.build_model(spec).to(device).eval()
    state_a, state_b = ({k: v.to(device) for k, v in s.items()} for s in (state_a, state_b))
    curves = {'naive': (state_a, state_b)}
    if align:
        aligned = align_state(net, state_a, state_b, torch.zeros(1, *te.input_shape(spec), device=device))
        curves.update({'aligned': (state_a, aligned), 'permuted': (state_b, aligned)})
    batches = te.float_batches(bn_inputs, rebasin.BN_BATCH, device) if bn else None

    def evaluate(net):
        out = {}
        for name, (x, y) in splits.items():
            loss, error = ensemble_loss_error(te.predict_logits([net], x), y.to(device), combiner)
            out.update({f'{name}_loss': loss, f'{name}_error': error})
        return out

    lams, result = torch.linspace(0, 1, points).tolist(), {}
    for name, (sa, sb) in curves.items():
        rows = interpolation_curve(net, sa, sb, lams, evaluate, bn, batches, progress)
        result[name] = dict(points=rows, barrier={f'{s}_{k}': barrier([r[f'{s}_{k}'] for r in rows])
                                                  for s in splits for k in ('loss', 'error')})
    return result


def sharpness_batches(x_uint8, y, batch_size=SHARP_BATCH, device='cpu'):
    """Fixed (float images, labels) batches on the device: what sharpness() measures the loss on."""
    return list(zip(te.float_batches(x_uint8, batch_size, device), y.to(device).split(batch_size)))


def sharpness(model, batches, rho=SHARP_RHO, steps=SHARP_STEPS, adaptive=True, eta=ASAM_ETA):
    """Worst-case increase of the cross-entropy (no label smoothing) on fixed `batches` ((x, y) pairs) within
    the ball ‖ε / s‖₂ ≤ ρ, s = |w| + η (ASAM's adaptive scale; s = 1 if not adaptive), over every trainable
    parameter, found by
    `steps` of projected, normalized gradient ascent (step 2ρ/steps; one step is the SAM/ASAM estimate).
    The model runs in eval mode, so BatchNorm uses its running statistics (a perturbation never changes
    them) and the model itself is never modified. Returns dict(loss, perturbed_loss, sharpness)."""
    from torch.func import functional_call
    model.eval()
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    scale = {n: (w.abs() + eta) if adaptive else torch.ones_like(w) for n, w in weights.items()}
    delta = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}
    count = sum(len(y) for _, y in batches)

    def loss_at(delta, grad):
        total = 0.0
        for x, y in batches:   # one backward per batch: the gradients add up, the graphs don't pile up
            with torch.set_grad_enabled(grad):
                out = functional_call(model, {n: w + scale[n] * delta[n] for n, w in weights.items()}, (x,))
                loss = F.cross_entropy(out.float(), y, reduction='sum') / count
            if grad:
                loss.backward()
            total += float(loss.detach())
        return total

    values = []
    for step in range(steps + 1):
        values.append(loss_at(delta, grad=step < steps))
        if step == steps:
            break
        with torch.no_grad():
            norm = math.sqrt(sum(float(d.grad.pow(2).sum()) for d in delta.values())) or 1.0
            for d in delta.values():
                d.add_(d.grad, alpha=2 * rho / steps / norm)
                d.grad = None
            radius = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
            if radius > rho:   # project back onto the ball
                for d in delta.values():
                    d.mul_(rho / radius)
    base, worst = values[0], max(values)
    return dict(loss=base, perturbed_loss=worst, sharpness=worst - base)


#############################################
#        Shifted data: corruptions          #
#############################################
# The corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019, arXiv 1903.12261), generated on the fly
# on uint8 batches (N, C, H, W) on any device, deterministic for a torch.Generator. The severity
# constants are the published CIFAR-10-C ones (their make_cifar_c.py); the operations are our own torch
# versions of theirs, so numbers on these approximate, not equal, numbers on the official files (read
# those with --corrupted-dir). Blur sizes are CIFAR's pixels, used as they are at any image size (scaled
# to 28 pixels, defocus's smallest disks would vanish); the elastic transform's are fractions of the
# image size, as theirs. Its constants trade an affine jitter that shrinks with severity for a local
# displacement that grows, so how far it moves an image is not monotone in severity. Not generated: glass blur,
# zoom blur, snow, frost, fog and spatter
# (image files, or long per-pixel loops).

SEVERITY = {   # corruption -> its parameter at severities 1..5
    'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),                 # std of additive noise
    'shot_noise': (500, 250, 100, 75, 50),                             # photons per unit intensity
    'impulse_noise': (0.01, 0.02, 0.03, 0.05, 0.07),                   # fraction of values set to 0 or 1
    'speckle_noise': (0.06, 0.10, 0.12, 0.16, 0.20),                   # std of multiplicative noise
    'gaussian_blur': (0.4, 0.6, 0.7, 0.8, 1.0),                        # sigma
    'defocus_blur': ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),   # disk radius, its antialiasing sigma
    'motion_blur': ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),       # length, sigma; angle uniform in ±45°
    'contrast': (0.75, 0.5, 0.4, 0.3, 0.15),                           # factor on the distance to the mean
    'brightness': (0.05, 0.1, 0.15, 0.2, 0.3),                         # added to HSV value
    'saturate': ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation times a, plus b
    'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),                         # downscale factor
    'jpeg_compression': (80, 65, 58, 50, 40),                          # JPEG quality
    'elastic_transform': ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
}   # elastic: displacement scale, its smoothing sigma and the affine jitter, as fractions of the image size
CORRUPTIONS = tuple(SEVERITY)


def _per_channel_conv(x, kernel):
    """x (N, C, H, W) filtered with one small 2-D kernel on every channel, reflecting at the borders: a sum
    of shifted copies, one per nonzero weight (on a CPU several times faster than a grouped conv2d)."""
    (kh, kw), (h, w) = kernel.shape, x.shape[-2:]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode='reflect')
    out = torch.zeros_like(x)
    for i, j in kernel.nonzero().tolist():
        out.add_(padded[..., i:i + h, j:j + w], alpha=float(kernel[i, j]))
    return out


def _gaussian_kernel(sigma, truncate=4.0):
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).float()


def _gaussian_blur(x, sigma):
    g = _gaussian_kernel(sigma)
    return _per_channel_conv(_per_channel_conv(x, g.view(1, -1)), g.view(-1, 1))


def _disk(radius, alias_sigma):
    """A normalized disk of `radius` on a 17 x 17 grid, antialiased by a 3 x 3 Gaussian (as theirs)."""
    t = torch.arange(-8, 9, dtype=torch.float32)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius ** 2).float()
    disk /= disk.sum()
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * alias_sigma ** 2))
    g = (g / g.sum()).view(1, 1, 3)
    antialias = (g.view(3, 1) * g.view(1, 3)).view(1, 1, 3, 3)
    kernel = F.conv2d(F.pad(disk.view(1, 1, 17, 17), (1, 1, 1, 1)), antialias)[0, 0]
    keep = int(radius) + 2   # the disk and its antialiasing; the rest of the 17 x 17 grid is zero
    return kernel[8 - keep:9 + keep, 8 - keep:9 + keep]


def _shifted(padded, pad, dx, dy, h, w):
    """The (h, w) images inside `padded` (padded by `pad` on every side) read at (column + dx, row + dy), bilinear."""
    x0, y0 = math.floor(dx), math.floor(dy)
    fx, fy = dx - x0, dy - y0
    at = lambda oy, ox: padded[..., pad + oy:pad + oy + h, pad + ox:pad + ox + w]  # noqa: E731
    return ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
            + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))


def _sample(x, dx, dy):
    """x sampled at (column + dx, row + dy) per pixel (bilinear, reflecting at the borders); dx, dy (N, H, W)."""
    n, _, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                                torch.arange(w, device=x.device, dtype=x.dtype), indexing='ij')
    grid = torch.stack([(cols + dx) * 2 / (w - 1) - 1, (rows + dy) * 2 / (h - 1) - 1], dim=-1)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=True)


def _hsv_value_and_range(x):
    """Per pixel: V = max over channels, and V − min (the chroma): RGB = V − chroma·k(hue)."""
    v = x.max(1, keepdim=True).values
    return v, v - x.min(1, keepdim=True).values


def corrupt(x_uint8, name, severity, generator=None):
    """x_uint8 (N, C, H, W) uint8 images with the corruption `name` at severity 1..5: a new uint8 tensor
    of the same shape on the same device, deterministic for the generator (on that device)."""
    if name not in SEVERITY:
        raise EnsembleError(f"unknown corruption '{name}': use one of {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise EnsembleError(f'severity must be 1..5, got {severity}')
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise EnsembleError(f'corrupt takes uint8 images (N, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}')
    c, g, (n, channels, h, w) = SEVERITY[name][severity - 1], generator, x_uint8.shape
    if name == 'jpeg_compression':
        from torchvision.io import decode_jpeg, encode_jpeg
        images = [decode_jpeg(encode_jpeg(image, quality=c)) for image in x_uint8.cpu()]
        return torch.stack(images).to(x_uint8.device)
    x = x_uint8.float() / 255
    noise = lambda: torch.randn(x.shape, generator=g, device=x.device)  # noqa: E731
    if name == 'gaussian_noise':
        x = x + c * noise()
    elif name == 'shot_noise':
        x = torch.poisson(x * c, generator=g) / c
    elif name == 'impulse_noise':   # salt and pepper, independently per value
        u = torch.rand(x.shape, generator=g, device=x.device)
        x = torch.where(u < c / 2, 0.0, torch.where(u < c, 1.0, x))
    elif name == 'speckle_noise':
        x = x + x * c * noise()
    elif name == 'gaussian_blur':
        x = _gaussian_blur(x, c)
    elif name == 'defocus_blur':
        x = _per_channel_conv(x, _disk(*c))
    elif name == 'motion_blur':   # a one-sided Gaussian-weighted streak, at a random whole-degree angle in ±45°
        length, sigma = c
        degrees = torch.randint(-45, 46, (n,), generator=g, device=x.device)
        weights = [math.exp(-t ** 2 / (2 * sigma ** 2)) for t in range(length + 1)]
        pad = length + 1
        padded = F.pad(x, (pad,) * 4, mode='reflect')
        out = torch.zeros_like(x)
        for degree in degrees.unique().tolist():   # the images sharing an angle share their shifted copies
            chosen = (degrees == degree).nonzero().flatten()
            part, a = padded[chosen], math.radians(degree)
            streak = sum(wt * _shifted(part, pad, -t * math.cos(a), -t * math.sin(a), h, w)
                         for t, wt in enumerate(weights))
            out[chosen] = streak / sum(weights)
        x = out
    elif name == 'contrast':
        mean = x.mean((2, 3), keepdim=True)
        x = (x - mean) * c + mean
    elif name == 'brightness':   # HSV value + c, hue and saturation kept: every channel scales with V
        v, _ = _hsv_value_and_range(x)
        new_v = (v + c).clamp(0, 1)
        x = torch.where(v > 0, x * new_v / v.clamp_min(1e-12), new_v.expand_as(x))
    elif name == 'saturate':     # HSV saturation S·a + b, hue and value kept
        if channels != 3:
            raise EnsembleError('saturate changes colour: it needs 3-channel images')
        v, chroma = _hsv_value_and_range(x)
        s = torch.where(v > 0, chroma / v.clamp_min(1e-12), torch.zeros_like(v))
        new_s = (s * c[0] + c[1]).clamp(0, 1)
        k = torch.where(chroma > 0, (v - x) / chroma.clamp_min(1e-12),   # a grey pixel has hue 0 (red), as skimage's
                        torch.tensor([0.0, 1.0, 1.0], device=x.device).view(1, 3, 1, 1).expand_as(x))
        x = v - v * new_s * k
    elif name == 'pixelate':
        small = (max(1, int(h * c)), max(1, int(w * c)))
        x = F.interpolate(F.interpolate(x, size=small, mode='area'), size=(h, w), mode='nearest')
    elif name == 'elastic_transform':   # a random affine jitter, then a smooth random displacement field
        alpha, sigma, jitter = c[0] * h, c[1] * h, c[2] * h
        centre, side = h // 2, h // 3   # three points around the centre move by up to ±jitter pixels
        source = torch.tensor([[centre + side, centre + side], [centre + side, centre - side],
                               [centre - side, centre - side]], dtype=torch.float64, device=x.device)
        target = source + (torch.rand(n, 3, 2, generator=g, device=x.device, dtype=torch.float64) * 2 - 1) * jitter
        ones = torch.ones(n, 3, 1, dtype=torch.float64, device=x.device)
        # The affine map taking each output pixel back to where it is read from: target -> source.
        back = torch.linalg.solve(torch.cat([target, ones], 2), source.expand(n, 3, 2))   # (N, 3, 2)
        rows, cols = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64),
                                    torch.arange(w, device=x.device, dtype=torch.float64), indexing='ij')
        points = torch.stack([cols, rows, torch.ones_like(rows)], -1).view(1, h * w, 3)
        read = (points @ back).view(n, h, w, 2).float()
        field = lambda: torch.rand(n, 1, h, w, generator=g, device=x.device) * 2 - 1  # noqa: E731
        dx, dy = ((_gaussian_blur(field(), sigma)[:, 0] * alpha) if sigma > 0 else torch.zeros(n, h, w, device=x.device)
                  for _ in range(2))
        x = _sample(x, read[..., 0] - cols.float() + dx, read[..., 1] - rows.float() + dy)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupted_files(directory, name, severity):
    """The official CIFAR-10-C / CIFAR-100-C files: (uint8 images (10000, C, H, W), labels) of one corruption
    at one severity, from DIR/<name>.npy (50,000 images, severities 1..5 in order) and DIR/labels.npy."""
    import numpy as np
    directory = Path(directory)
    path, labels_path = directory / f'{name}.npy', directory / 'labels.npy'
    for p in (path, labels_path):
        if not p.is_file():
            raise EnsembleError(f'{p} does not exist (expected CIFAR-10-C style <corruption>.npy and labels.npy)')
    try:
        images, labels = np.load(path, allow_pickle=False, mmap_mode='r'), np.load(labels_path, allow_pickle=False)
    except ValueError as e:
        raise EnsembleError(f'{path} is not a plain numpy array file ({e})') from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) % 5 or len(labels) != len(images):
        raise EnsembleError(f'{path} must hold 5 x N uint8 images (N·5, H, W, C) with as many labels, '
                               f'got {images.dtype} {images.shape} and {len(labels)} labels')
    per = len(images) // 5
    part = slice((severity - 1) * per, severity * per)
    x = torch.from_numpy(np.ascontiguousarray(images[part])).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.asarray(labels[part]).astype(np.int64))


def robustness(nets, x_uint8, y, combiner, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5), seed=0,
               corrupted_dir=None, progress=None, classes=None):
    """Clean and corrupted test metrics of an ensemble: {'clean': report, 'corrupted': {(name, severity):
    report}} with ensemble_report's numbers (members, mean member, ensemble: accuracy, NLL, Brier, ECE;
    DIV). Corruptions are generated from x_uint8 (seeded per corruption and severity), or read from the
    official files in corrupted_dir (then x_uint8 and y serve only the clean row, and `classes`, if given,
    keeps the files' images of those classes)."""
    device = next((nets[0] if isinstance(nets, (list, tuple)) else nets).parameters()).device
    result = dict(clean=ensemble_report(te.predict_logits(nets, x_uint8).cpu(), y, combiner), corrupted={})
    for i, name in enumerate(corruptions):
        for severity in severities:
            if corrupted_dir:
                x, labels = corrupted_files(corrupted_dir, name, severity)
                if classes is not None:
                    keep = torch.isin(labels, torch.as_tensor(classes))
                    x, labels = x[keep], labels[keep]
            else:
                generator = torch.Generator(device).manual_seed(seed * 1000 + i * 10 + severity)
                x, labels = corrupt(x_uint8.to(device), name, severity, generator), y
            result['corrupted'][name, severity] = ensemble_report(te.predict_logits(nets, x).cpu(), labels, combiner)
            if progress is not None:
                progress()
    return result


#############################################
#       Shifted data: out-of-distribution   #
#############################################
# Scores for "should this input be trusted": higher means more likely out of distribution. The
# detection metrics treat the OOD set as the positive class.

OOD_SCORES = {'max_prob': '1 - max probability', 'entropy': 'entropy', 'mutual_information': 'mutual information'}


def ood_scores(logits, combiner='prob'):
    """{score: (N,)} from (M, N, K) member logits (OOD_SCORES names them): 1 − the ensemble's top
    probability and its predictive entropy, the ensemble being the run's combiner's; and the mutual
    information between prediction and member, H(p̄) − mean_j H(p_j) = mean_j KL(p_j ‖ p̄), which is defined
    on the mean of the members' probabilities p̄ whatever the combiner: how much the members disagree."""
    log_p = F.log_softmax(logits.double(), -1)
    log_mean = torch.logsumexp(log_p, 0) - math.log(len(logits))
    mean_entropy = -(log_mean.exp() * log_mean).sum(-1)
    log_ensemble = log_mean if combiner == 'prob' else _combine(logits.double(), combiner, log_p)
    member_entropy = -(log_p.exp() * log_p).sum(-1).mean(0)
    return {'max_prob': 1 - log_ensemble.exp().max(-1).values,
            'entropy': -(log_ensemble.exp() * log_ensemble).sum(-1),
            'mutual_information': (mean_entropy - member_entropy).clamp_min(0)}


def auroc(scores_in, scores_out):
    """Area under the ROC curve of telling scores_out (positive) from scores_in by a threshold: the
    probability that an OOD input scores higher than an in-distribution one, ties counting one half
    (the Mann–Whitney statistic)."""
    from scipy.stats import rankdata
    ranks = rankdata(torch.cat([scores_in, scores_out]).cpu().numpy())   # tied scores share their mean rank
    n_in, n_out = len(scores_in), len(scores_out)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def aupr(scores_in, scores_out):
    """Average precision of finding the OOD inputs (positive) by a threshold on the score: Σ (R_t − R_t−1)·P_t
    over the distinct scores t, descending, where tied scores are one threshold (all flagged or none), as
    sklearn.metrics.average_precision_score counts them."""
    scores, order = torch.cat([scores_in, scores_out]).double().sort(descending=True)
    positive = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).double()[order]
    last = torch.cat([scores[1:] != scores[:-1], torch.tensor([True])])   # the last input flagged at each threshold
    flagged = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last]
    hits = positive.cumsum(0)[last]
    recall_gained = torch.diff(hits, prepend=torch.zeros(1)) / len(scores_out)
    return float((recall_gained * hits / flagged).sum())


def fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    """The fraction of in-distribution inputs flagged at the highest threshold that flags at least `tpr` of
    the OOD inputs (sklearn.metrics.roc_curve's first threshold with TPR ≥ tpr): the k-th highest OOD
    score, k the fewest OOD inputs that make up the fraction tpr."""
    n = len(scores_out)
    k = int((torch.arange(1, n + 1, dtype=torch.float64) / n < tpr).sum()) + 1
    threshold = scores_out.double().sort(descending=True).values[min(k, n) - 1]
    return float((scores_in.double() >= threshold).double().mean())


def ood_report(logits_in, logits_out, combiner='prob'):
    """{score: {auroc, aupr, fpr95, mean_in, mean_out}} for every ood_scores score."""
    scores_in, scores_out = ood_scores(logits_in, combiner), ood_scores(logits_out, combiner)
    return {name: dict(auroc=auroc(scores_in[name], scores_out[name]), aupr=aupr(scores_in[name], scores_out[name]),
                       fpr95=fpr_at_tpr(scores_in[name], scores_out[name]), mean_in=float(scores_in[name].mean()),
                       mean_out=float(scores_out[name].mean())) for name in scores_in}


#############################################
#                  Plots                    #
#############################################

def _figure(panels, width=5.0):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 4.2), squeeze=False)
    return plt, fig, axes[0]


def _label(ax, x_label, y_label, fontsize=7, legend=True):
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=fontsize)


def _legend_beside(fig, ax, fontsize=7):
    """One legend for all panels, right of the last one, where it covers no point (the figure widens)."""
    fig.set_figwidth(fig.get_figwidth() + 2.2)
    ax.legend(fontsize=fontsize, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _save(plt, fig, path, title):
    # each line wrapped to the figure's width (about 8.5 characters of the title's font per inch), so that
    # long run names never run off its edges
    width = int(8.5 * fig.get_figwidth())
    fig.suptitle('\n'.join(textwrap.fill(line, width, break_on_hyphens=False) for line in title.split('\n')))
    fig.tight_layout()
    te.save_figure(fig, path)
    plt.close(fig)


def _mean_by_beta(rows, key):
    """(βs, mean of `key` over the runs at each β): runs that differ only in their seed make one point."""
    values = {}
    for r in rows:
        values.setdefault(r['beta'], []).append(r[key])
    betas = sorted(values)
    return betas, [sum(values[b]) / len(values[b]) for b in betas]


def plot_sweep(path, groups, title):
    """compare's figure: test error (regression: RMSE), DIV (train and test) and the loss gap against β, one
    line per group; with --shifted a fourth panel: mean corrupted error and 1 − each OOD AUROC."""
    shifted = all('corrupted_acc' in r for rows in groups.values() for r in rows)
    regression = all('test_rmse' in r for rows in groups.values() for r in rows)
    plt, fig, axes = _figure(4 if shifted else 3)
    err_ax, div_ax, gap_ax = axes[:3]
    for i, (label, rows) in enumerate(groups.items()):
        if shifted:
            style = dict(color=f'C{i}', marker='o')
            betas, acc = _mean_by_beta(rows, 'corrupted_acc')
            axes[3].plot(betas, [1 - a for a in acc], '-', label=f'{label}: corrupted error', **style)
            for j, key in enumerate(k for k in rows[0] if k.startswith('ood_auroc_')):
                betas, auc = _mean_by_beta(rows, key)
                axes[3].plot(betas, [1 - a for a in auc], ('--', ':', '-.')[j % 3],
                             label=f"{label}: 1 − AUROC ({OOD_SCORES[key[len('ood_auroc_'):]]})", **style)
        style = dict(color=f'C{i}', marker='o')
        for key, line, what in (('test', '-', 'ensemble'), ('member_test', ':', 'mean member')):
            if regression:
                err_ax.plot(*_mean_by_beta(rows, f'{key}_rmse'), line, label=f'{label}: {what}', **style)
            else:
                betas, acc = _mean_by_beta(rows, f'{key}_acc')
                err_ax.plot(betas, [1 - a for a in acc], line, label=f'{label}: {what}', **style)
        for key, line, what in (('train_div', '-', 'train'), ('test_div', '--', 'test')):
            div_ax.plot(*_mean_by_beta(rows, key), line, label=f'{label}: {what}', **style)
        gap_ax.plot(*_mean_by_beta(rows, 'gap'), '-', label=label, **style)
    div = next(m.label for m in ENSEMBLE_METRICS if m.key == 'div')   # the metric rows name what the plots show
    names = ['test RMSE' if regression else 'test error', div,
             f"ensemble {'MSE' if regression else 'loss'} gap (test − train)"]
    names += ['under shift (lower is better)'] * shifted
    for ax, name in zip(axes, names):
        _label(ax, 'β (0 = independent, 1 = joint)', name)
    div_ax.set_yscale('symlog', linthresh=1e-3)   # DIV spans orders of magnitude between β = 0 and β = 1
    div_ax.set_ylim(bottom=0)   # DIV ≥ 0: one-member runs (DIV = 0 everywhere) would get a symmetric, negative axis
    _save(plt, fig, path, title)


def plot_drop(path, result, title, names=('loss', 'error')):
    plt, fig, axes = _figure(2)
    rows = [dict(fraction=0.0, **{f'{k}_increase{s}': 0.0 for k in ('loss', 'error') for s in ('', '_std')})]
    rows += result['fractions']   # the full ensemble, at 0, anchors the curve
    for ax, key, name in zip(axes, ('loss', 'error'), names):
        ax.errorbar([r['fraction'] for r in rows], [r[f'{key}_increase'] for r in rows],
                    yerr=[r[f'{key}_increase_std'] for r in rows], marker='o', capsize=3,
                    label=f"mean ± std over member subsets ({result['split']} split)")
        _label(ax, f"fraction of the {result['members']} members dropped", f'increase in ensemble {name}', 8)
    _save(plt, fig, path, title)


def plot_interpolation(path, curves, title, names=('loss', 'error')):
    plt, fig, axes = _figure(2)
    for i, (name, rows) in enumerate(curves.items()):
        lams = [r['lam'] for r in rows]
        for ax, key in zip(axes, ('loss', 'error')):
            for split, style in (('train', '-'), ('test', '--')):
                ax.plot(lams, [r[f'{split}_{key}'] for r in rows], style, marker='o', ms=3, color=f'C{i}',
                        label=f'{name} ({split})')
    for ax, name in zip(axes, names):
        _label(ax, 'λ (0: each curve\'s start, 1: its end)', f'{name} (solid: train, dashed: test)', legend=False)
    _legend_beside(fig, axes[-1])   # the curves peak mid-line and end anywhere: no corner is free
    _save(plt, fig, path, title)


def plot_robustness(path, result, title):
    """Ensemble test accuracy against severity, one line per corruption, the mean bold, the clean level dotted;
    with several members a second panel for the mean member. One legend, right of the panels, covers no point."""
    corrupted = result['corrupted']
    whos = ('ensemble',) if len(result['clean']['members']) == 1 else ('ensemble', 'mean_member')
    plt, fig, axes = _figure(len(whos))
    names = list(dict.fromkeys(name for name, _ in corrupted))
    severities = sorted({s for _, s in corrupted})
    for ax, who in zip(axes, whos):
        for i, name in enumerate(names):
            ax.plot(severities, [corrupted[name, s][who]['acc'] for s in severities], marker='.', lw=1,
                    color=plt.get_cmap('tab20')(i % 20), label=name.replace('_', ' '))
        ax.plot(severities, [sum(corrupted[n, s][who]['acc'] for n in names) / len(names) for s in severities],
                color='black', lw=2.5, label='mean')
        ax.axhline(result['clean'][who]['acc'], color='gray', linestyle=':', label='clean')
        ax.set_xticks(severities)
        ax.set_title(who.replace('_', ' ') if len(whos) > 1 else 'the one member')
        _label(ax, 'severity', 'test accuracy', legend=False)
    _legend_beside(fig, axes[-1])   # twelve corruptions fill every corner of the panels
    _save(plt, fig, path, title)


def plot_ood(path, scores_in, scores_out, names, title):
    """Histograms of each score on the in-distribution and the OOD test sets."""
    plt, fig, axes = _figure(len(scores_in), width=4.0)
    for ax, score in zip(axes, scores_in):
        top = max(float(scores_in[score].max()), float(scores_out[score].max()), 1e-6)
        bins = torch.linspace(0, top, 41).tolist()
        ax.hist(scores_in[score].cpu().numpy(), bins=bins, alpha=0.6, density=True, label=f'{names[0]} (in)')
        ax.hist(scores_out[score].cpu().numpy(), bins=bins, alpha=0.6, density=True, label=f'{names[1]} (out)')
        _label(ax, OOD_SCORES[score], 'density')
    _save(plt, fig, path, title)


#############################################
#               Command line                #
#############################################
# typer, rich and matplotlib, and the sibling scripts that load runs and data (train_ensemble.py) and align
# networks (rebasin.py), are imported only when the command line runs: a copied analyze.py needs only torch
# (and scipy for AUROC) for its metrics. Options are written once, as plain data (Opt), which make_app()
# turns into typer's options.

Opt = namedtuple('Opt', 'default help flags argument', defaults=((), False))   # flags: e.g. ('--json',)
COMMANDS = []   # (name, function) of every command, in the order --help lists them


def _argument(help, default=...):
    return Opt(default, help, (), True)


def _command(name=None):
    def register(function):
        COMMANDS.append((name or function.__name__, function))
        return function
    return register


EXAMPLES_HELP = 'Use at most this many images of each split (they are class-balanced in order).'
SOURCES = _argument('Run directories or member files; all their members make one ensemble.')
COMBINE = Opt(None, f"Combiner: {' or '.join(classification_combiners())} (default: the first run's; a regression "
                    "run's is mean, its only one).")
EXAMPLES = Opt(None, EXAMPLES_HELP)
DATASET = Opt(None, "Evaluate on this dataset (a name or an .npz, of the members' input shape and classes) "
                    "instead of the first run's.")
CLASSES = Opt(None, "Evaluate on these classes: all, or a list such as 0-4 or 0,2,5 (default: the run's own; for "
                    'several runs their union, every class when one has none).')
DATA_DIR = Opt(None, "Where datasets are cached (default: the data_dir in the run's config.json; for several runs "
                     "the first's).")
DEVICE = Opt('auto', 'auto (cuda when there is one), cpu or cuda.')
JSON_OUT = Opt(None, 'Write every number shown to this JSON file.', ('--json',))


def _help(doc):
    """A docstring as help text: each paragraph one line, so that the terminal, not the source, wraps it."""
    return '\n\n'.join(' '.join(p.split()) for p in inspect.cleandoc(doc).split('\n\n'))


def _typer_command(function, typer):
    """`function` with its Opt defaults replaced by typer's Argument and Option (typer reads the signature)."""
    signature = inspect.signature(function)
    params = [p.replace(default=typer.Argument(p.default.default, help=p.default.help) if p.default.argument
                        else typer.Option(p.default.default, *p.default.flags, help=p.default.help))
              for p in signature.parameters.values()]

    @functools.wraps(function)
    def command(*args, **kwargs):
        return function(*args, **kwargs)
    command.__signature__ = signature.replace(parameters=params)
    return command


def version():
    """analyze.py's version line: the checkpoint format it reads (train_ensemble.py's, when beside it) and torch's."""
    try:
        return importlib.import_module('train_ensemble').version_line('analyze.py')
    except ImportError:   # copied alone: it reads no checkpoints without train_ensemble.py
        return f'analyze.py: no train_ensemble.py beside it to read checkpoints; torch {torch.__version__}'


def _print_version(asked):
    if asked:
        print(version())
        raise SystemExit(0)


def make_app():
    """The typer application: every command in COMMANDS, and --version."""
    import typer
    app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                      context_settings=dict(help_option_names=['-h', '--help']))

    @app.callback(help='Metrics, diversity, collusion diagnostics, interpolation and sharpness of trained ensembles.')
    def options(_version: bool = typer.Option(False, '--version', help='Print the versions (checkpoint format, '
                                              'torch) and exit.', is_eager=True, callback=_print_version)):
        pass

    for name, function in COMMANDS:
        app.command(name, help=_help(function.__doc__))(_typer_command(function, typer))
    return app


def __getattr__(name):   # analyze.app: the application, built on first use (typer is imported only then)
    if name == 'app':
        return make_app()
    raise AttributeError(f"module 'analyze' has no attribute '{name}'")


def _user_errors():
    """The exception types that mean bad input, not a bug: ours (train_ensemble's), rebasin's, files."""
    rebasin_error = (sys.modules['rebasin'].RebasinError,) if 'rebasin' in sys.modules else ()
    return (EnsembleError, OSError, json.JSONDecodeError) + rebasin_error


def _fail(message):
    """One line on stderr and exit status 2: train_ensemble.cli_error, or the same line without it."""
    try:
        cli_error = te.cli_error
    except EnsembleError:
        sys.stderr.write(f'error: {message}\n')
        raise SystemExit(2) from None
    cli_error(message)


@contextmanager
def _session():
    """A rich console; bad input (runs, splits, options, a missing sibling script) becomes one line on stderr
    and exit status 2."""
    from rich.console import Console
    console = Console(soft_wrap=True, highlight=False)
    if not console.is_terminal and 'COLUMNS' not in os.environ:
        console.width = PIPED_WIDTH
    try:
        yield console
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        _fail(' '.join(str(e).split()))


@contextmanager
def _progress(console, description, total):
    """A transient progress bar; yields advance(n=1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=console is None or not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _logits(console, nets, x, label):
    """(M, N, K) logits, computed in batches on the networks' device; the metrics run on the CPU."""
    with _progress(console, f'{label}: {len(x)} examples', len(x)) as advance:
        return te.predict_logits(nets, x, progress=advance).cpu()


def _cell(value, format='.4f'):
    return value if isinstance(value, str) else '–' if value is None else f'{value:{format}}'


def _table(title, columns, rows):
    """A rich table; numbers are shown with 4 decimals unless already formatted (strings)."""
    from rich.markup import escape
    from rich.table import Table
    table = Table(title=None if title is None else escape(title), title_justify='left')
    for i, c in enumerate(columns):   # a header may wrap between words but is never cut off
        table.add_column(escape(c), justify='left' if i == 0 else 'right', min_width=max(map(len, c.split() or [''])))
    for row in rows:
        table.add_row(*[escape(_cell(c)) for c in row])
    return table


def _write(console, json_out, result):
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        te.write_json(json_out, result)
        console.print(f'wrote {json_out}')


Ensemble = namedtuple('Ensemble', 'name sources config nets data spec differs classes')
# What the members of one ensemble must agree on. Not their classes: runs trained on different classes of one
# dataset (A on 0-4, B on 5-9) share its label space, and together they are evaluated on the union.
SHARED = ('dataset', 'task', 'input shape', 'number of classes')
SPLITS = ('subset', 'val_size', 'shard')   # data options that change the splits, not the data: the first run's win


def _shared(config, spec):
    dataset, seed = config.get('dataset'), config.get('data_seed', config.get('seed'))
    if str(dataset).startswith('synthetic'):   # generated from the seed: another seed, another dataset
        dataset = f'{dataset} (seed {seed or 0})'
    return dict(zip(SHARED, (dataset, config.get('task') or spec.get('task') or 'classification',
                             te.input_shape(spec), spec.get('num_classes'))))


def _check_data(data, spec, dataset):
    """The data fits the members: inputs of their shape, no more classes (or targets) than they output."""
    shape, expected = tuple(data.x_test.shape[1:]), te.input_shape(spec)
    what = f'--dataset {dataset}' if dataset else f'dataset {data.name}'
    if shape != expected:
        raise EnsembleError(f'{what} has inputs of shape {shape}; the members take {expected}')
    if data.num_classes != spec.get('num_classes'):
        raise EnsembleError(f"{what} has {data.num_classes} classes (or targets); the members output "
                            f"{spec.get('num_classes')}")


def _data(config, spec, dataset=None, classes=None, data_dir=None):
    """The data of a run's config with the examples of `classes` (evaluated_classes' list; all of them, or None
    for a regression run, keep every example), checked against members of `spec` (_check_data)."""
    every = classes is None or len(classes) == spec.get('num_classes')
    data = run_data(config, dataset, 'all' if every else classes, data_dir)
    _check_data(data, spec, dataset)
    return data


def _load_ensemble(sources, device='auto', dataset=None, classes=None, data_dir=None):
    """Every member of every source (a run directory, or a member file) as one ensemble on the device, with
    the data of the first source's run: `dataset` and `data_dir` override its config's, and `classes`
    (--classes) the classes it keeps, by default the union of the runs' own (evaluated_classes). The sources
    must share dataset, task, input shape and number of classes: the first that differs is named."""
    dev, sources = te.resolve_device(device), [Path(s) for s in sources]
    if len(set(sources)) < len(sources):
        raise EnsembleError(f'{next(s for s in sources if sources.count(s) > 1)} is given twice: '
                            'its members would count twice in the ensemble')
    nets, first, other_splits, configs = [], None, set(), []
    for source in sources:
        config = run_config(source)
        configs.append(config)
        for path in te.member_paths(source):
            spec, state, _ = te.load_member_state(path)   # checked against its spec: it loads into build_model's
            shared = _shared(config, spec)
            first = first or (source, config, spec, shared)
            differs = next((k for k in SHARED if shared[k] != first[3][k] and None not in (shared[k], first[3][k])),
                           None)   # a member file without config.json has no dataset to disagree with
            if differs:
                raise EnsembleError(f'{path} and {first[0]} differ in {differs} ({shared[differs]} vs '
                                    f'{first[3][differs]}): one ensemble\'s members share {", ".join(SHARED)}')
            net = te.build_model(spec)
            net.load_state_dict(state)
            nets.append(net.to(dev).eval())
            other_splits |= {k for k in SPLITS if config and config.get(k) != first[1].get(k)}
    _, config, spec, shared = first
    if not (dataset or config.get('dataset')):
        raise EnsembleError(f'{first[0]} has no config.json naming its dataset: pass --dataset')
    evaluated = evaluated_classes(classes, configs, dict(spec, task=shared['task']))
    data = _data(config, spec, dataset, evaluated, data_dir)
    name = ' + '.join(str(s) for s in sources)
    return Ensemble(name, [str(s) for s in sources], config, nets, data, spec, sorted(other_splits), evaluated)


def _of(ensemble):
    return _of_classes(ensemble.classes, ensemble.spec.get('num_classes'))


def _note_splits(console, ensemble):
    """Runs trained on other parts of the data are evaluated on the first run's splits: say so."""
    if ensemble.differs:
        console.print(f"[yellow]note: the runs differ in {', '.join(ensemble.differs)}; every split is "
                      f'{ensemble.sources[0]}\'s[/]')


def _load(run, device, dataset, classes=None, data_dir=None):
    ensemble = _load_ensemble([run], device, dataset, classes, data_dir)
    return ensemble.config, ensemble.nets, ensemble.data


def _combiner(config, combine):
    """--combine, else the run's combiner; a regression run's is 'mean', the only one it has."""
    regression = config.get('task') == 'regression'
    combiner = combine or config.get('combine') or ('mean' if regression else 'prob')
    if combiner not in (('mean',) if regression else classification_combiners()):
        raise EnsembleError(f"unknown combiner '{combiner}' for this run: use "
                            + ('mean (it is a regression run)' if regression
                               else ' or '.join(classification_combiners())))
    return combiner


def _classification_only(config, run, what):
    if config.get('task') == 'regression':
        raise EnsembleError(f'{run} is a regression run; {what} is defined for classification only')


def _settings(config, keys=('dataset', 'arch', 'members', 'beta', 'combine')):
    return ', '.join(f'{k}={config[k]}' for k in keys if config.get(k) is not None)


def _report_tables(title, r, regression, bins):
    """evaluate's tables of one split: a row per member (one row in all when there is one member), the
    mean member and the ensemble; then, for two or more members, the diversity numbers."""
    single = len(r['members']) == 1
    metrics = ([Metric('mse', 'MSE', '.4f', None), Metric('rmse', 'RMSE', '.4f', None)] if regression else
               [m._replace(label=f'ECE ({bins} bins)') if m.key == 'ece' else m for m in PREDICTOR_METRICS])
    who = [(f'member {j}', m) for j, m in enumerate(r['members'])]
    who = [('the one member (M = 1)', r['ensemble'])] if single else who + [('mean member', r['mean_member']),
                                                                             ('ensemble', r['ensemble'])]
    tables = [_table(title, [''] + [m.label for m in metrics],
                     [(label, *(_cell(numbers[m.key], m.format) for m in metrics)) for label, numbers in who])]
    if single:
        return tables
    if regression:
        rows = [('DIV = mean_j (f_j − f̄)²', r['div']),
                ('decomposition residual (relative)', r['decomposition_residual']),
                ('DIV / mean member MSE', r['ensemble_improvement'])]
    else:
        rows = [(m.label, _cell(r[m.key], m.format)) for m in ENSEMBLE_METRICS]
        rows.insert(1, ('decomposition residual', r['decomposition_residual']))
    return tables + [_table(None, ['diversity', 'value'], rows)]


def _gap(splits, regression):
    """Test minus train of the ensemble's loss and error (regression: MSE and RMSE), the mean member's loss
    and DIV (the last two only with several members)."""
    tr, ts = splits['train'], splits['test']
    loss = 'mse' if regression else 'nll'
    gap = dict(ensemble_loss=ts['ensemble'][loss] - tr['ensemble'][loss])
    if regression:
        gap['ensemble_rmse'] = ts['ensemble']['rmse'] - tr['ensemble']['rmse']
    else:
        gap['ensemble_error'] = tr['ensemble']['acc'] - ts['ensemble']['acc']
    if len(ts['members']) > 1:
        gap.update(mean_member_loss=ts['mean_member'][loss] - tr['mean_member'][loss], div=ts['div'] - tr['div'])
    return gap


def _split_names(values, data):
    """evaluate's --split values, each one split or a comma list ('train,test'); 'all' is every split the
    data holds (train, val when held out, test)."""
    names = [n.strip() for v in values for n in str(v).split(',') if n.strip()]
    if 'all' in names:
        names = ['train'] + ['val'] * (data.x_val is not None) + ['test']
    if not names:
        raise EnsembleError('--split names no split: use train, val, test or a list of them (train,test)')
    return list(dict.fromkeys(names))


@_command()
def evaluate(
    runs: List[Path] = SOURCES,
    split: List[str] = Opt(['test'], 'train, val, test, a list of them (train,test: the generalization gap) or all; '
                                     'or repeat it (--split train --split test).'),
    combine: Optional[str] = COMBINE,
    bins: int = Opt(ECE_BINS, 'Confidence bins of the ECE.'),
    examples: Optional[int] = EXAMPLES,
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
):
    """Members and ensemble: accuracy, NLL, Brier, ECE, diversity and generalization gaps.

    Several runs (or member files) are one ensemble of all their members, e.g. three seeds trained apart.
    Diversity (two or more members): DIV, checked against the ambiguity decomposition of the combiner,
    pairwise disagreement, the disagreement-error ratio, the ensemble improvement rate, the double-fault
    rate and the logit variance. The train split is evaluated like the others: eval mode, no augmentation.

    Runs trained on some classes (train_ensemble.py --classes) are evaluated on theirs, several runs on the
    union of their classes; --classes all evaluates every class, --classes 0-4 those.

    A regression run: MSE and RMSE in the targets' units, DIV = mean_j (f_j − f̄)² with the (exact)
    decomposition's residual, and DIV / mean member MSE."""
    with _session() as console:
        ensemble = _load_ensemble(runs, device, dataset, classes, data_dir)
        combiner = _combiner(ensemble.config, combine)
        regression, m = combiner == 'mean', len(ensemble.nets)
        _note_splits(console, ensemble)
        result = dict(runs=ensemble.sources, members=m, combiner=combiner, classes=ensemble.classes, splits={})
        for name in _split_names(split, ensemble.data):
            x, y = split_examples(ensemble.data, name, examples)
            outputs = _logits(console, ensemble.nets, x, name)
            r = result['splits'][name] = (regression_report(outputs, y) if regression else
                                          ensemble_report(outputs, y, combiner, bins))
            title = (f'{ensemble.name}: {m} member{"s" * (m > 1)}, {name} split '
                     f'({r["examples"]} examples{_of(ensemble)})')
            for table in _report_tables(title + (f', combiner {combiner}' if m > 1 else ''), r, regression, bins):
                console.print(table)
            if r['decomposition_residual'] > (1e-9 if regression else 1e-4):
                console.print('[yellow]warning: the ambiguity decomposition is off by '
                              f"{r['decomposition_residual']:.2g}[/]")
        if {'train', 'test'} <= result['splits'].keys():
            result['gap'] = _gap(result['splits'], regression)
            console.print(_table(f'generalization gap (test − train){"; losses are MSE" if regression else ""}',
                                 ['', 'gap'], [('DIV' if k == 'div' else k.replace('_', ' '), v)
                                               for k, v in result['gap'].items()]))
        _write(console, json_out, result)


def shifted_row(run, ood=None, examples=None, device='auto', console=None, severities=(1, 3, 5), classes=None,
                data_dir=None):
    """A run's numbers under shift, for compare --shifted: the ensemble's mean accuracy over every generated
    corruption (that the images allow) at `severities`, and with `ood` the AUROC of each OOD score; its test
    set of `classes` (--classes; default the run's own)."""
    config, nets, data = _load(run, device, None, classes, data_dir)
    _classification_only(config, run, 'compare --shifted (corruptions and OOD detection)')
    x, y = split_examples(data, 'test', examples)
    names = [n for n in CORRUPTIONS if n != 'saturate' or x.size(1) == 3]
    with _progress(console, f'{Path(run).name}: corruptions', len(names) * len(severities)) as advance:
        result = robustness(nets, x, y, _combiner(config, None), names, severities, progress=advance)
    row = dict(corrupted_acc=sum(r['ensemble']['acc'] for r in result['corrupted'].values()) / len(result['corrupted']))
    if ood:
        x_out, _ = split_examples(run_data(config, ood, 'all', data_dir), 'test', examples)
        if x_out.shape[1:] != x.shape[1:]:
            raise EnsembleError(f"--ood {ood} has images of shape {tuple(x_out.shape[1:])}; {run}'s are "
                                f'{tuple(x.shape[1:])}')
        report = ood_report(_logits(console, nets, x, 'in'), _logits(console, nets, x_out, 'out'),
                            _combiner(config, None))
        row.update({f'ood_auroc_{name}': r['auroc'] for name, r in report.items()})
    return row


def compare_row(run, recompute=False, device='auto', examples=None, console=None, classes=None, data_dir=None):
    """One run's row of the β sweep (a regression run's has RMSE where others have accuracy, and its losses
    are MSE). Test numbers and training time come from summary.json. Its train_*
    numbers are running averages over the epoch's augmented batches in train mode while the weights still
    move, so the gap they give is biased; `recompute` (or a run without summary.json, e.g. a merged
    one) evaluates train and test cleanly instead: eval mode, no augmentation, no test-time augmentation.
    A classification run's row also has every ENSEMBLE_METRICS number but DIV on the test split, as test_<key>.
    `classes` (--classes) other than the run's own are evaluated as `recompute` does: summary.json's are the
    run's own."""
    run = Path(run)
    config = run_config(run)
    spec = config.get('model') or te.load_member_state(te.member_paths(run)[0])[0]
    evaluated = evaluated_classes(classes, [config], spec)
    recompute = recompute or evaluated != evaluated_classes(None, [config], spec)
    summary_path = run / 'summary.json'
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    score = te.score_name(config.get('task'))   # accuracy, or for regression RMSE
    row = dict(run=str(run), name=run.name, members=len(te.member_paths(run)), beta=config.get('beta'),
               combine=_combiner(config, None), task=config.get('task') or 'classification',
               bagging=bool(config.get('bagging')),
               param=config.get('param', 'standard'), classes=evaluated, train_time_s=summary.get('train_time_s'),
               config=config)
    if summary and not recompute:
        row.update({'source': 'summary.json', f'test_{score}': summary[f'test_{score}'],
                    'test_loss': summary['test_loss'],
                    f'member_test_{score}': sum(summary[f'member_test_{score}']) / len(summary[f'member_test_{score}']),
                    'member_test_loss': sum(summary['member_test_loss']) / len(summary['member_test_loss']),
                    'train_loss': summary['train_loss'], 'train_div': summary['train_div'],
                    'test_div': summary['test_div']})
    own = (config.get('model') or {}).get('arch') == 'own'   # your own module: only train(model=...) rebuilds it
    if (row['task'] == 'regression' or row['members'] == 1 or own) and 'source' in row:   # nothing more to add
        return dict(row, gap=row['test_loss'] - row['train_loss'])
    config, nets, data = _load(run, device, None, classes, data_dir)
    for split in ('train', 'test') if 'source' not in row else ('test',):
        x, y = split_examples(data, split, examples)
        logits = _logits(console, nets, x, f'{run.name} {split}')
        if 'source' not in row or split == 'train':
            m = te.ensemble_metrics(logits, y, row['combine'])
            row.update({f'{split}_loss': m['loss'], f'{split}_{score}': m[score], f'{split}_div': m['div']})
            if split == 'test':
                row.update({f'member_test_{score}': sum(m[f'member_{score}']) / len(nets),
                            'member_test_loss': sum(m['member_loss']) / len(nets)})
        if split == 'test' and row['task'] == 'classification':
            row.update({f'test_{m.key}': m.function(logits.double(), y, row['combine'])
                        for m in ENSEMBLE_METRICS if m.key != 'div'})   # DIV: train and test, from the same source
    row.setdefault('source', 'eval')
    row['gap'] = row['test_loss'] - row['train_loss']
    return row


LABEL_KEYS = ('members', 'combine', 'bagging', 'param', 'arch', 'dataset', 'width', 'hidden', 'epochs')


def sweep_groups(rows):
    """Runs with a β that differ only in β and seeds share a line: {label: rows}. A label names up to
    three settings that tell the lines apart, the usual suspects (members, combiner, ...) first."""
    ignored = {'beta', 'seed', 'data_seed', 'out', 'device', 'device_name', 'device_type', 'versions', 'compile',
               'allow_unstable', 'data_dir', 'init'}
    rows = [r for r in rows if r['beta'] is not None]
    keys = sorted({k for r in rows for k in r['config']} - ignored)
    key_of = lambda r: tuple(json.dumps(r['config'].get(k), sort_keys=True) for k in keys)  # noqa: E731
    distinct = list(dict.fromkeys(key_of(r) for r in rows))
    varying = [k for i, k in enumerate(keys) if len({d[i] for d in distinct}) > 1 and k != 'model']
    shown = sorted(varying, key=lambda k: LABEL_KEYS.index(k) if k in LABEL_KEYS else len(LABEL_KEYS))[:3]
    groups = {}
    for r in rows:
        label = ', '.join(f"{k}={r['config'].get(k)}" for k in shown) or f"M={r['members']}, {r['combine']}"
        if len(varying) > len(shown):   # settings not shown may differ: number the groups apart
            label += f' (#{distinct.index(key_of(r)) + 1})'
        groups.setdefault(label, []).append(r)
    return groups


def _compare_table(rows, regression, shifted):
    """compare's tables, each (columns, rows): settings (those that differ between runs), test score and
    loss of ensemble and mean member, DIV, the gap, seconds and the shifted numbers; then every other
    ENSEMBLE_METRICS number on the test split (classification), in a table of their own so neither is too
    wide to read."""
    score, diverse = 'rmse' if regression else 'acc', any(r['members'] > 1 for r in rows)   # one member: no diversity
    def setting(r, key):   # classes as --classes writes them (the JSON keeps the list)
        return ('–' if r[key] is None else class_text(r[key])) if key == 'classes' else str(r[key])
    settings = [key for key in ('combine', 'bagging', 'param', 'classes') if len({setting(r, key) for r in rows}) > 1]
    columns = ['run', 'M', 'β', *settings,
               *(('test RMSE', 'member RMSE', 'test MSE', 'member MSE') if regression
                 else ('test acc', 'member acc', 'test loss', 'member loss')),
               *(('train DIV', 'test DIV') if diverse else ()), 'gap', 'seconds']
    table = [(r['name'], str(r['members']), '–' if r['beta'] is None else f"{r['beta']:g}",
              *(setting(r, key) for key in settings), r[f'test_{score}'], r[f'member_test_{score}'],
              r['test_loss'], r['member_test_loss'], *((r['train_div'], r['test_div']) if diverse else ()), r['gap'],
              '–' if r['train_time_s'] is None else f"{r['train_time_s']:.1f}") for r in rows]
    if shifted:
        auroc_keys = [k for k in rows[0] if k.startswith('ood_auroc_')]
        columns += ['corrupted acc'] + [f"AUROC {OOD_SCORES[k[len('ood_auroc_'):]]}" for k in auroc_keys]
        table = [t + (r['corrupted_acc'], *(r[k] for k in auroc_keys)) for t, r in zip(table, rows)]
    metrics = [m for m in ENSEMBLE_METRICS if m.key != 'div' and diverse and not regression]
    diversity = (['run', *(m.label for m in metrics)],
                 [(r['name'], *(_cell(r.get(f'test_{m.key}'), m.format) for m in metrics)) for r in rows])
    return [(columns, table)] + ([diversity] if metrics else [])


@_command()
def compare(
    runs: List[Path] = _argument('Run directories (e.g. runs/beta_*).'),
    recompute: bool = Opt(False, 'Evaluate train and test cleanly (eval mode, no augmentation) instead of reading '
                                 'summary.json, whose train numbers are running averages over augmented batches in '
                                 'train mode.', ('--recompute',)),
    examples: Optional[int] = Opt(None, EXAMPLES_HELP + ' (the test pass of the diversity columns, and --recompute)'),
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
    plot: Optional[Path] = Opt(None, 'Write test error, DIV (train, test) and the loss gap against β to this PNG.'),
    shifted: bool = Opt(False, "Add the ensemble's mean accuracy over the generated corruptions (severities 1, 3, 5) "
                               'and, with --ood, its OOD AUROC.', ('--shifted',)),
    ood: Optional[str] = Opt(None, '--shifted: the out-of-distribution set (a dataset name or an .npz).'),
    classes: Optional[str] = CLASSES._replace(help=CLASSES.help + " Classes other than a run's own are evaluated "
                                                                  'as --recompute does.'),
    data_dir: Optional[str] = DATA_DIR,
):
    """The β sweep: one row per run; --plot draws error, DIV and gap against β.

    Rows, sorted by β then name: members, β, combiner, bagging, parametrization, test accuracy and loss of
    the ensemble and the mean member, train and test DIV, the other diversity numbers of evaluate on the
    test split (classification), the generalization gap of the ensemble loss (test − train) and training
    seconds. The plot is the collusion paper's figure."""
    with _session() as console:
        if ood and not shifted:
            raise EnsembleError('--ood only applies with --shifted')
        rows = [compare_row(r, recompute, device, examples, console, classes, data_dir) for r in runs]
        tasks = sorted({r['task'] for r in rows})
        if len(tasks) > 1:
            raise EnsembleError(f'these runs mix {" and ".join(tasks)}: compare runs of one task')
        if shifted:
            for r in rows:
                r.update(shifted_row(r['run'], ood, examples, device, console, classes=classes, data_dir=data_dir))
        rows.sort(key=lambda r: (r['beta'] is None, r['beta'] or 0.0, r['name']))
        sources = sorted({r['source'] for r in rows})
        running = ' (running averages: --recompute for a clean pass)' if 'summary.json' in sources else ''
        tables = _compare_table(rows, tasks == ['regression'], shifted)
        same = len({json.dumps(r['classes']) for r in rows}) == 1 and rows[0]['classes']   # else a column
        k = (rows[0]['config'].get('model') or {}).get('num_classes')
        on = ('' if not same else f', all {k} classes' if len(rows[0]['classes']) == k
              else f", classes {class_text(rows[0]['classes'])}")
        runs = f'{len(rows)} run' + 's' * (len(rows) != 1)
        console.print(_table(f'{runs}{on}; train numbers from {" and ".join(sources)}{running}', *tables[0]))
        for columns, table in tables[1:]:
            console.print(_table('diversity on the test split', columns, table))
        groups = sweep_groups(rows)
        configs = [r.pop('config') for r in rows]
        for r in rows:
            r['group'] = next((label for label, members in groups.items() if r in members), None)
        if plot:
            common = {k: configs[0].get(k) for k in ('dataset', 'arch', 'members', 'combine')
                      if all(c.get(k) == configs[0].get(k) for c in configs)}
            plot_sweep(plot, groups, f"β sweep: {_settings(common) or f'{len(rows)} runs'}; train numbers from "
                                     + ' and '.join(sources))
            console.print(f'wrote {plot}')
        _write(console, json_out, dict(runs=rows))


@_command('debias')
def debias_command(
    runs: List[Path] = SOURCES,
    fit_split: str = Opt('train', 'Split on which the member biases are estimated: train, val or test.'),
    split: str = Opt('test', 'Split on which they are removed and DIV is measured: train, val or test.'),
    combine: Optional[str] = COMBINE,
    examples: Optional[int] = EXAMPLES,
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
):
    """How much of the diversity is collusion: DIV before and after removing member biases.

    Member j's class-wise logit bias b_j = mean_x z_j(x) − mean_{x,i} z_i(x) is estimated on --fit-split
    and removed on --split. The biases sum to zero, so the logit-averaged ensemble is unchanged (checked).

    A regression run: b_j is member j's mean offset from the ensemble's prediction (per target); removing
    it leaves the averaged prediction unchanged (and lowers DIV on the split it was fit on)."""
    with _session() as console:
        ensemble = _load_ensemble(runs, device, dataset, classes, data_dir)
        combiner, nets = _combiner(ensemble.config, combine), ensemble.nets
        _note_splits(console, ensemble)
        x_fit, _ = split_examples(ensemble.data, fit_split, examples)
        x, y = split_examples(ensemble.data, split, examples)
        before = _logits(console, nets, x, split)
        fit = _logits(console, nets, x_fit, fit_split) if fit_split != split else before
        after = debias(fit, before)
        score, mean = te.score_name(ensemble.config.get('task')), 'mean' if combiner == 'mean' else 'logit'
        numbers = {}
        for name, logits in (('before', before), ('after', after)):
            m = te.ensemble_metrics(logits, y, combiner)
            numbers[name] = {'div': m['div'], 'mean_member_loss': sum(m['member_loss']) / len(nets),
                             f'mean_member_{score}': sum(m[f'member_{score}']) / len(nets), 'ensemble_loss': m['loss'],
                             f'ensemble_{score}': m[score]}
        change = float((_combine(after, mean) - _combine(before, mean)).abs().max())
        div_before = numbers['before']['div']
        result = dict(runs=ensemble.sources, members=len(nets), combiner=combiner, classes=ensemble.classes,
                      fit_split=fit_split, split=split, examples=len(y), **numbers,
                      div_removed_percent=100 * (1 - numbers['after']['div'] / div_before) if div_before > 0 else None,
                      bias_norm=float(member_bias(fit).norm(dim=-1).mean()), logit_ensemble_max_change=change)
        console.print(_table(f'{ensemble.name}: {len(nets)} members, biases fit on {fit_split}, removed on {split} '
                             f'({len(y)} examples{_of(ensemble)}), combiner {combiner}'
                             + ('; losses are MSE' if combiner == 'mean' else ''), ['', 'before', 'after'],
                             [(k.replace('_', ' '), numbers['before'][k], numbers['after'][k])
                              for k in numbers['before']]))
        removed = result['div_removed_percent']
        console.print(f"DIV removed: {'–' if removed is None else f'{removed:.1f}%'}; "
                      f"mean ‖b_j‖ {result['bias_norm']:.4f}; "
                      + (f'averaged prediction changed by at most {change:.2g}' if combiner == 'mean' else
                         f'logit-averaged ensemble changed by at most {change:.2g} (log-probability)'))
        _write(console, json_out, result)


def _fractions(text):
    try:
        return [float(f) for f in text.split(',') if f.strip()]
    except ValueError:
        raise EnsembleError(f"--fractions must be comma-separated numbers, got '{text}'") from None


@_command()
def drop(
    runs: List[Path] = SOURCES,
    fractions: str = Opt('0.2,0.4,0.6', 'Comma-separated fractions p of members to drop (keeps M − ⌊pM⌋).'),
    draws: int = Opt(DROP_DRAWS, 'Random member subsets per fraction (every subset when there are fewer).'),
    seed: int = Opt(0, 'Seed of the random subsets.'),
    split: str = Opt('test', 'train, val or test.'),
    combine: Optional[str] = COMBINE,
    examples: Optional[int] = EXAMPLES,
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
    plot: Optional[Path] = Opt(None, 'Write the increase against the fraction dropped to this PNG.'),
):
    """What dropping members at test time costs the ensemble's loss and error.

    Mean and spread, over member subsets, of the increase over the full ensemble. Colluding members lean
    on each other, so dropping some hurts far more than in an independently trained ensemble. For a
    regression run the loss is the MSE and the error the RMSE."""
    with _session() as console:
        ps = _fractions(fractions)
        ensemble = _load_ensemble(runs, device, dataset, classes, data_dir)
        combiner, nets = _combiner(ensemble.config, combine), ensemble.nets
        _note_splits(console, ensemble)
        x, y = split_examples(ensemble.data, split, examples)
        result = dict(runs=ensemble.sources, combiner=combiner, split=split, members=len(nets),
                      classes=ensemble.classes, examples=len(y),
                      **drop_learners(_logits(console, nets, x, split), y, combiner, ps, draws, seed))
        loss, error = ('MSE', 'RMSE') if combiner == 'mean' else ('loss', 'error')
        console.print(_table(f"{ensemble.name}: {len(nets)} members, {split} split ({len(y)} examples{_of(ensemble)}), "
                             f"combiner {combiner}; full ensemble "
                             f"{loss} {result['full_loss']:.4f}, {error} {result['full_error']:.4f}",
                             ['dropped', 'kept', 'subsets', f'Δ {loss}', '± std', f'Δ {error}', '± std'],
                             [(f"{r['fraction']:g}", str(r['kept']), str(r['subsets']), r['loss_increase'],
                               r['loss_increase_std'], r['error_increase'], r['error_increase_std'])
                              for r in result['fractions']]))
        if plot:
            settings = _settings(dict(ensemble.config, members=len(nets)))
            plot_drop(plot, result, f'dropping members: {settings}', (loss, error))
            console.print(f'wrote {plot}')
        _write(console, json_out, result)


def _short(path):
    return f'{Path(path).parent.name}/{Path(path).stem}'


def _endpoints(a, b, member):
    """The two member files: a file stands for itself, a run directory for its member i (A) or j (B)."""
    try:
        index = [int(i) for i in member.split(',')]
    except ValueError:
        index = []
    if len(index) not in (1, 2):
        raise EnsembleError(f"--member must be 'i' or 'i,j', got '{member}'")
    index = index * 2 if len(index) == 1 else index
    files = []
    for path, i in zip((a, b), index):
        paths = te.member_paths(path)
        if Path(path).is_dir() and not 0 <= i < len(paths):
            raise EnsembleError(f'{path} has {len(paths)} members; --member {i} is out of range')
        files.append(paths[i] if Path(path).is_dir() else paths[0])
    return files


def _interpolation_tables(result, regression, of=''):
    """interpolate's tables: test loss and error of each curve at each λ, and the barriers. `of`: the classes
    evaluated, as _of_classes says them."""
    curves, treatment = result['curves'], {'reset': ', BatchNorm reset', 'repair': ', REPAIR', None: ''}[result['bn']]
    lams = [r['lam'] for r in next(iter(curves.values()))['points']]
    names = ('MSE', 'RMSE') if regression else ('loss', 'error')
    points = _table(f"{result['a']} → {result['b']}{treatment}: test {names[0]} / test {names[1]} at each λ "
                    f"({result['examples']} examples{of})",
                    ['λ'] + [f'{CURVES[c]} {k}' for c in curves for k in names],
                    [(f'{lam:.2f}', *[curves[c]['points'][i][f'test_{k}'] for c in curves for k in ('loss', 'error')])
                     for i, lam in enumerate(lams)])
    barriers = _table('barriers', ['curve', *(f'{s} {k}' for s in ('train', 'test') for k in names)],
                      [(CURVES[c], *curves[c]['barrier'].values()) for c in curves])
    return points, barriers


@_command()
def interpolate(
    a: Path = _argument('Endpoint A: a member file, or a run directory (its --member).'),
    b: Path = _argument('Endpoint B: a member file, or a run directory (its --member).'),
    align: bool = Opt(False, "Also interpolate A → π(B) and B → π(B), π(B) = B permuted into A's basin by weight "
                             'matching.', ('--align',)),
    reset_bn: bool = Opt(False, 'Recompute BatchNorm statistics at each inner λ on training data.', ('--reset-bn',)),
    repair: bool = Opt(False, "REPAIR at each inner λ: channels get the interpolated mean and std of the endpoints'.",
                       ('--repair',)),
    points: int = Opt(INTERP_POINTS, 'Points along the line: evenly spaced λ in [0, 1], endpoints included '
                                     '(--steps is its old name).', ('--points', '--steps')),
    member: str = Opt('0', "Which member of a run directory is the endpoint: 'i' for both, 'i,j' for A's and B's."),
    examples: int = Opt(INTERP_EXAMPLES, EXAMPLES_HELP),
    bn_examples: Optional[int] = Opt(None, "Training images for --reset-bn/--repair statistics (default: rebasin.py's "
                                           'BN_EXAMPLES).'),
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
    plot: Optional[Path] = Opt(None, 'Write loss and error against λ (train and test) to this PNG.'),
):
    """Loss and error along the line between two networks, and its barrier (linear mode connectivity).

    Train and test loss and error (regression: MSE and RMSE) at each λ, and the barrier
    max_λ L(λ) − ((1 − λ)L(0) + λL(1)). Every floating tensor is interpolated, BatchNorm statistics
    included; --reset-bn/--repair treat the inner points only, so the endpoints are the trained networks
    as they are. The JSON names the curves naive (A → B), aligned (A → π(B)) and permuted (B → π(B))."""
    with _session() as console:
        if points < 2:
            raise EnsembleError(f'--points must be at least 2 (the endpoints), got {points}')
        if reset_bn and repair:
            raise EnsembleError('--reset-bn and --repair are alternatives (--repair also recomputes the statistics)')
        dev = te.resolve_device(device)
        paths = _endpoints(a, b, member)
        (spec, state_a, _), (spec_b, state_b, _) = (te.load_member_state(p) for p in paths)
        if te.architecture(spec) != te.architecture(spec_b):   # data statistics may differ (shards, datasets)
            raise EnsembleError(f'{paths[0]} and {paths[1]} are different networks: their architectures differ')
        configs = [run_config(a), run_config(b)]
        evaluated = evaluated_classes(classes, configs, spec)   # by default the union of A's and B's
        data = _data(configs[0], spec, dataset, evaluated, data_dir)
        regression, of = spec.get('task') == 'regression', _of_classes(evaluated, spec.get('num_classes'))
        splits = {s: split_examples(data, s, examples) for s in ('train', 'test')}
        bn = 'reset' if reset_bn else 'repair' if repair else None
        result = dict(a=str(paths[0]), b=str(paths[1]), bn=bn, examples=len(splits['test'][1]), classes=evaluated)
        with _progress(console, 'weight matching, then interpolating' if align else 'interpolating',
                       points * (3 if align else 1)) as advance:
            result['curves'] = lmc_curves(spec, state_a, state_b, splits, points, align, bn,
                                          data.x_train[:bn_examples or rebasin.BN_EXAMPLES],
                                          dev, advance)
        for table in _interpolation_tables(result, regression, of):
            console.print(table)
        if plot:
            treatment = {'reset': ', BatchNorm reset', 'repair': ', REPAIR', None: ''}[bn]
            plot_interpolation(plot, {CURVES[c]: v['points'] for c, v in result['curves'].items()},
                               f"{spec['arch']} on {data.name}, {len(splits['test'][1])} test examples{of}{treatment}\n"
                               f"A = {_short(paths[0])}\nB = {_short(paths[1])}",
                               ('MSE', 'RMSE') if regression else ('loss', 'error'))
            console.print(f'wrote {plot}')
        _write(console, json_out, result)


@_command('sharpness')
def sharpness_command(
    runs: List[Path] = SOURCES,
    rho: float = Opt(SHARP_RHO, 'Radius of the ball (relative to |w| + η when adaptive).'),
    steps: int = Opt(SHARP_STEPS, 'Projected gradient ascent steps (1 = the SAM/ASAM estimate).'),
    adaptive: bool = Opt(True, 'Scale the ball by |w| + η as ASAM does (else a plain ℓ2 ball).',
                         ('--adaptive/--no-adaptive',)),
    examples: int = Opt(SHARP_EXAMPLES, 'Fixed training images the loss is measured on.'),
    batch_size: int = Opt(SHARP_BATCH, 'Batch size of those passes.'),
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    json_out: Optional[Path] = JSON_OUT,
):
    """Sharpness of each member: the worst training-loss increase within a ball of radius ρ.

    Found by projected gradient ascent on fixed training batches; mean and spread over members. Networks
    run in eval mode, so BatchNorm uses its running statistics and a perturbation changes only weights."""
    with _session() as console:
        if rho <= 0 or steps < 1:
            raise EnsembleError(f'--rho must be positive and --steps at least 1, got {rho} and {steps}')
        ensemble = _load_ensemble(runs, device, dataset, classes, data_dir)
        nets = ensemble.nets
        _classification_only(ensemble.config, ensemble.name, 'sharpness (of the cross-entropy)')
        _note_splits(console, ensemble)
        dev = te.resolve_device(device)
        x, y = split_examples(ensemble.data, 'train', examples)
        batches = sharpness_batches(x, y, batch_size, dev)
        with _progress(console, 'sharpness', len(nets)) as advance:
            members = []
            for net in nets:
                members.append(sharpness(net, batches, rho, steps, adaptive))
                advance()
        values = torch.tensor([m['sharpness'] for m in members], dtype=torch.float64)
        result = dict(runs=ensemble.sources, rho=rho, steps=steps, adaptive=adaptive, examples=len(y),
                      classes=ensemble.classes, members=members, mean=float(values.mean()),
                      std=float(values.std(unbiased=False)))
        console.print(_table(f"{ensemble.name}: {'adaptive ' if adaptive else ''}sharpness, ρ={rho:g}, {steps} steps, "
                             f"{len(y)} training images{_of(ensemble)}",
                             ['member', 'train loss', 'perturbed loss', 'sharpness'],
                             [(str(j), *m.values()) for j, m in enumerate(members)]))
        console.print(f"sharpness: mean {result['mean']:.4f}, std {result['std']:.4f} over {len(nets)} members")
        _write(console, json_out, result)


def _severities(text):
    """--severities: all (1-5) or a list as every command line here writes one (1-5, 3, 1,3,5), sorted."""
    if str(text).strip() == 'all':
        return [1, 2, 3, 4, 5]
    try:
        values = te.parse_ints(text) or []
    except EnsembleError:
        raise EnsembleError(f"--severities takes all or a list like 1-5, 3 or 1,3,5, got '{text}'") from None
    if not values or not set(values) <= {1, 2, 3, 4, 5}:
        raise EnsembleError(f'--severities must lie in 1-5, got {text}')
    return sorted(set(values))


@_command('ood')
def ood_command(
    runs: List[Path] = SOURCES,
    ood: str = Opt(..., "The out-of-distribution set: any dataset train_ensemble.py loads (a name or an .npz) with "
                        "images of the members' shape; its test split is used."),
    combine: Optional[str] = COMBINE,
    examples: Optional[int] = EXAMPLES,
    classes: Optional[str] = CLASSES._replace(help=CLASSES.help + ' Of the in-distribution test set; the OOD set '
                                                                  'keeps every example.'),
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    plot: Optional[Path] = Opt(None, 'Write histograms of the scores, in vs out, to this PNG.'),
    json_out: Optional[Path] = JSON_OUT,
):
    """How well the ensemble tells its own test set from another: AUROC, AUPR and FPR at 95% TPR.

    Scores per input: 1 − the top probability and the predictive entropy of the ensemble (under --combine),
    and the mutual information (H(p̄) − mean H(p_j) with p̄ the members' mean probability whatever the
    combiner: how much the members disagree; 0 for one member). The OOD set is the positive class."""
    with _session() as console:
        ensemble = _load_ensemble(runs, device, None, classes, data_dir)
        config, nets = ensemble.config, ensemble.nets
        _classification_only(config, ensemble.name, 'OOD detection (from predictive probabilities)')
        _note_splits(console, ensemble)
        x_in, _ = split_examples(ensemble.data, 'test', examples)
        x_out, _ = split_examples(run_data(config, ood, 'all', data_dir), 'test', examples)
        if x_out.shape[1:] != x_in.shape[1:]:
            raise EnsembleError(f"--ood {ood} has images of shape {tuple(x_out.shape[1:])}; the members' are "
                                f'{tuple(x_in.shape[1:])}')
        combiner = _combiner(config, combine)
        logits_in, logits_out = _logits(console, nets, x_in, 'in'), _logits(console, nets, x_out, 'out')
        report = ood_report(logits_in, logits_out, combiner)
        console.print(_table(f'{ensemble.name}: {len(nets)} members, {config.get("dataset")} test ({len(x_in)}'
                             f'{_of(ensemble)}) vs '
                             f'{ood} test ({len(x_out)}), OOD = positive, combiner {combiner}',
                             ['score', 'AUROC', 'AUPR', 'FPR at 95% TPR', 'mean in', 'mean out'],
                             [(OOD_SCORES[name], *r.values()) for name, r in report.items()]))
        if plot:
            plot_ood(plot, ood_scores(logits_in, combiner), ood_scores(logits_out, combiner),
                     (config.get('dataset'), ood),
                     f'{ensemble.name}: scores in vs out of distribution')
            console.print(f'wrote {plot}')
        _write(console, json_out, dict(runs=ensemble.sources, members=len(nets), in_dataset=config.get('dataset'),
                                       classes=ensemble.classes, ood=ood, combiner=combiner, examples_in=len(x_in),
                                       examples_out=len(x_out), scores=report))


def _robustness_tables(result, single):
    """robustness's tables: each corruption and severity, then the summary (for one member, no mean-member
    or DIV columns: they would repeat the ensemble's numbers and zeros)."""
    corrupted, clean = result['corrupted'], result['clean']
    whos = ('ensemble',) if single else ('ensemble', 'mean_member')
    columns = ['corruption, severity', 'ensemble acc', *(() if single else ('mean member acc',)), 'ensemble NLL',
               'ensemble ECE', *(() if single else ('DIV',))]
    row = lambda name, r: (name, r['ensemble']['acc'], *(() if single else (r['mean_member']['acc'],)),  # noqa: E731
                           r['ensemble']['nll'], r['ensemble']['ece'], *(() if single else (r['div'],)))
    rows = [row('clean', clean)] + [row(f'{name} {s}', r) for (name, s), r in corrupted.items()]
    summary = {}
    for who in whos:
        mean_acc = sum(r[who]['acc'] for r in corrupted.values()) / len(corrupted)
        summary[who] = dict(clean_acc=clean[who]['acc'], mean_corrupted_acc=mean_acc,
                            added_error=clean[who]['acc'] - mean_acc,
                            error_ratio=(1 - mean_acc) / max(1 - clean[who]['acc'], 1e-12))
    summary_table = _table('summary', ['', 'clean acc', 'mean corrupted acc', 'error added', 'corrupted / clean error'],
                           [(who.replace('_', ' '), *v.values()) for who, v in summary.items()])
    return columns, rows, summary, summary_table


def _by_corruption(corrupted):
    """{corruption: [report with its severity, ...]}: robustness's {(name, severity): report} as JSON, whose
    keys are identifiers."""
    by_name = {}
    for (name, severity), report in corrupted.items():
        by_name.setdefault(name, []).append(dict(severity=severity, **report))
    return by_name


@_command('robustness')
def robustness_command(
    runs: List[Path] = SOURCES,
    corruptions: str = Opt('all', f"'all' or comma-separated names: {', '.join(CORRUPTIONS)}."),
    severities: str = Opt('1-5', "'all' (1-5) or a list of severities 1 to 5: 1-5, 3, 1,3,5."),
    corrupted_dir: Optional[Path] = Opt(None, 'Read the official CIFAR-10-C / CIFAR-100-C <corruption>.npy and '
                                              'labels.npy from here instead of generating them.'),
    seed: int = Opt(0, 'Seed of the generated corruptions (each corruption and severity its own stream).'),
    combine: Optional[str] = COMBINE,
    examples: Optional[int] = EXAMPLES,
    classes: Optional[str] = CLASSES,
    dataset: Optional[str] = DATASET,
    data_dir: Optional[str] = DATA_DIR,
    device: str = DEVICE,
    plot: Optional[Path] = Opt(None, 'Write accuracy against severity per corruption to this PNG.'),
    json_out: Optional[Path] = JSON_OUT,
):
    """Accuracy, NLL, ECE and DIV of members and ensemble under corruption, by corruption and severity.

    The test set corrupted on the fly as CIFAR-10-C is (noise, blur, contrast, brightness, saturation,
    pixelation, JPEG, elastic; approximate, not the official files), or the official files with
    --corrupted-dir. Also the mean corrupted accuracy and how much error the corruptions add to the clean
    error."""
    with _session() as console:
        names = list(CORRUPTIONS) if corruptions.strip() == 'all' else [n.strip() for n in corruptions.split(',')]
        unknown = [n for n in names if n not in CORRUPTIONS]
        if unknown:
            raise EnsembleError(f"unknown corruption '{unknown[0]}': use all or some of {', '.join(CORRUPTIONS)}")
        levels = _severities(severities)
        ensemble = _load_ensemble(runs, device, dataset, classes, data_dir)
        _classification_only(ensemble.config, ensemble.name, 'robustness (image corruptions)')
        combiner, nets = _combiner(ensemble.config, combine), ensemble.nets
        _note_splits(console, ensemble)
        x, y = split_examples(ensemble.data, 'test', examples)
        if 'saturate' in names and x.size(1) != 3 and corrupted_dir is None:
            if corruptions != 'all':
                raise EnsembleError('saturate changes colour: these images have one channel')
            names.remove('saturate')
        with _progress(console, 'corruptions', len(names) * len(levels)) as advance:
            result = robustness(nets, x, y, combiner, names, levels, seed, corrupted_dir, advance,
                                None if len(ensemble.classes) == ensemble.spec['num_classes'] else ensemble.classes)
        columns, rows, summary, summary_table = _robustness_tables(result, len(nets) == 1)
        console.print(_table(f'{ensemble.name}: {len(nets)} members, test set under corruption ({len(y)} images'
                             f'{_of(ensemble)}), '
                             f'combiner {combiner}', columns, rows))
        console.print(summary_table)
        if plot:
            plot_robustness(plot, result, f'{ensemble.name}: accuracy under corruption')
            console.print(f'wrote {plot}')
        _write(console, json_out, dict(runs=ensemble.sources, members=len(nets), combiner=combiner,
                                       classes=ensemble.classes, generated=corrupted_dir is None, seed=seed,
                                       summary=summary,
                                       clean=result['clean'],
                                       corrupted=_by_corruption(result['corrupted'])))


def main():
    """The command line; without typer and rich it says so in one line."""
    try:
        app = make_app()
    except ImportError as e:
        sys.stderr.write(f"error: analyze.py's command line needs {e.name or 'typer'}: "
                         'pip install typer rich matplotlib\n')
        raise SystemExit(2) from None
    app()


if __name__ == '__main__':
    main()
