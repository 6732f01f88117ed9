"""Every metric analyze.py prints agrees with a maintained implementation: scikit-learn for the detection
and proper-scoring metrics, torchmetrics for the calibration error. They are oracles for the tests only:
analyze.py computes everything with torch (it is copied into other repositories alone). Inputs: random,
tied, saturated, one-member, and a real ensemble's logits on Fashion-MNIST."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from sklearn import metrics
from torchmetrics.classification import MulticlassCalibrationError

import analyze
import train_ensemble as te


def oracle_fpr(scores_in, scores_out, tpr=0.95):
    y, s = detection_labels(scores_in, scores_out)
    fpr, tprs, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tprs >= tpr)]


def detection_labels(scores_in, scores_out):
    return (np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))],
            np.r_[scores_in.double().numpy(), scores_out.double().numpy()])


def assert_detection_agrees(scores_in, scores_out):
    y, s = detection_labels(scores_in, scores_out)
    assert analyze.auroc(scores_in, scores_out) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert analyze.aupr(scores_in, scores_out) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
    assert analyze.fpr_at_tpr(scores_in, scores_out) == pytest.approx(oracle_fpr(scores_in, scores_out), abs=1e-12)


g = torch.Generator().manual_seed(0)
DETECTION_CASES = {
    'random': (torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.7),
    'tied': (torch.randint(0, 4, (300,), generator=g).double(), torch.randint(1, 5, (30,), generator=g).double()),
    'identical sets': (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.1, 0.2, 0.3, 0.4])),
    'all equal': (torch.zeros(50), torch.zeros(20)),
    'saturated': (torch.ones(40), torch.cat([torch.ones(10), torch.zeros(10)])),
    'separated': (torch.randn(100, generator=g), torch.randn(30, generator=g) + 100),
}


@pytest.mark.parametrize('case', DETECTION_CASES)
def test_detection_metrics_agree_with_scikit_learn(case):
    assert_detection_agrees(*DETECTION_CASES[case])


def test_tied_scores_are_one_threshold():
    """The audit's cases: identical score sets cannot be told apart (AUPR = the OOD prevalence, not 1), and
    the threshold at 95% TPR flags at least 95% of the OOD inputs (the quantile flagged 28 of 30)."""
    same = torch.rand(40, generator=g)
    assert analyze.aupr(same, same) == pytest.approx(0.5) and analyze.auroc(same, same) == pytest.approx(0.5)
    zeros_in, zeros_out = torch.zeros(70), torch.zeros(30)   # a one-member ensemble's mutual information
    assert analyze.aupr(zeros_in, zeros_out) == pytest.approx(0.3) and analyze.fpr_at_tpr(zeros_in, zeros_out) == 1.0
    scores_out = torch.arange(30.0)
    threshold_fpr = analyze.fpr_at_tpr(scores_out, scores_out)   # the threshold 1 flags 29 of 30 (1.45 flagged 28)
    assert threshold_fpr == pytest.approx(29 / 30) and oracle_fpr(scores_out, scores_out) == pytest.approx(29 / 30)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.lists(st.integers(0, 6), min_size=1, max_size=40),
       st.sampled_from([0.5, 0.8, 0.95, 1.0]))
def test_detection_metrics_agree_with_scikit_learn_on_any_tied_scores(scores_in, scores_out, tpr):
    scores_in, scores_out = torch.tensor(scores_in, dtype=torch.float64), torch.tensor(scores_out, dtype=torch.float64)
    assert_detection_agrees(scores_in, scores_out)
    assert analyze.fpr_at_tpr(scores_in, scores_out, tpr) == pytest.approx(oracle_fpr(scores_in, scores_out, tpr))


def probability_cases():
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (500,), generator=gen)
    random = F.log_softmax(3 * torch.randn(500, 10, generator=gen, dtype=torch.float64), -1)
    saturated = F.log_softmax(60 * F.one_hot(y, 10).double() - 30 * torch.rand(500, 10, generator=gen).double(), -1)
    return {'random': (random, y), 'saturated': (saturated, y), 'real': real_ensemble_log_probs()}


def real_ensemble_log_probs():
    """A two-member MLP ensemble trained for one epoch on 2,000 Fashion-MNIST images, on 1,000 test images."""
    import tempfile
    from test_train_ensemble import quiet_console
    with tempfile.TemporaryDirectory() as out:
        cfg = te.Config(dataset='fashion-mnist', arch='mlp', hidden=[64], members=2, subset=2000, epochs=1,
                        device='cpu', out=out)
        te.train(cfg, console=quiet_console())
        config, nets = te.load_run(out)
        data = te.load_run_data(config)
    logits = te.predict_logits(nets, data.x_test[:1000]).double()
    return te.combine(logits, 'prob'), data.y_test[:1000]


PROBABILITY_CASES = probability_cases() if te.DEBIAN_FASHION_MNIST.exists() else {}


@pytest.mark.parametrize('case', ['random', 'saturated', 'real'])
def test_proper_scores_agree_with_scikit_learn(case):
    log_probs, y = PROBABILITY_CASES[case]
    probs = log_probs.exp().numpy()
    found = analyze.prediction_metrics(log_probs, y)
    labels = list(range(probs.shape[1]))
    assert found['nll'] == pytest.approx(metrics.log_loss(y.numpy(), probs, labels=labels), rel=1e-9, abs=1e-12)
    assert found['brier'] == pytest.approx(metrics.brier_score_loss(y.numpy(), probs, labels=labels), rel=1e-9)
    assert found['acc'] == pytest.approx(metrics.accuracy_score(y.numpy(), probs.argmax(1)))


@pytest.mark.parametrize('case', ['random', 'saturated', 'real'])
def test_calibration_error_agrees_with_torchmetrics(case):
    """Equal-width bins of the top probability. Ours are (lo, hi], torchmetrics' [lo, hi): they differ only
    for a confidence exactly on a bin edge, which these continuous inputs do not have (the saturated case's
    confidences of exactly 1 fall in the last bin either way)."""
    log_probs, y = PROBABILITY_CASES[case]
    oracle = MulticlassCalibrationError(num_classes=log_probs.size(1), n_bins=analyze.ECE_BINS, norm='l1')
    assert analyze.calibration(log_probs.exp(), y) == pytest.approx(float(oracle(log_probs.exp().float(), y)), abs=1e-5)


def test_one_member_has_zero_mutual_information_and_no_detection_skill_from_it():
    logits = torch.randn(1, 200, 10, generator=g)
    scores = analyze.ood_scores(logits)
    assert torch.all(scores['mutual_information'] == 0)
    report = analyze.ood_report(logits[:, :120], logits[:, 120:])['mutual_information']
    assert report['auroc'] == 0.5 and report['aupr'] == pytest.approx(80 / 200) and report['fpr95'] == 1.0


def test_ood_scores_follow_the_runs_combiner():
    """1 − max p and the entropy are the ensemble's under its own combiner; mutual information stays the
    disagreement of the members' probabilities, whatever the combiner."""
    logits = 4 * torch.randn(3, 50, 10, generator=g, dtype=torch.float64)
    by_prob, by_logit = analyze.ood_scores(logits, 'prob'), analyze.ood_scores(logits, 'logit')
    geometric = F.softmax(logits.mean(0), -1)
    assert torch.allclose(by_logit['max_prob'], 1 - geometric.max(-1).values)
    assert torch.allclose(by_logit['entropy'], -(geometric * geometric.log()).sum(-1))
    assert torch.allclose(by_prob['max_prob'], 1 - F.softmax(logits, -1).mean(0).max(-1).values)
    assert torch.equal(by_prob['mutual_information'], by_logit['mutual_information'])
    assert not torch.allclose(by_prob['max_prob'], by_logit['max_prob'])
    assert math.isfinite(float(by_logit['entropy'].sum()))
