"""analyze.py: identical members have no diversity; the ambiguity decomposition holds for both combiners;
planted collusion is removed by debiasing without touching the ensemble; barriers and interpolation
endpoints are exact; a calibrated predictor has ECE near 0; every command runs on real Fashion-MNIST runs;
and joint training (β = 1) shows the collusion signature that independent training does not."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from typer.testing import CliRunner

import analyze  # noqa: E402
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402



def random_logits(members=4, n=2000, k=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(k, (n,), generator=g)
    shared = 2.0 * F.one_hot(y, k) + scale * torch.randn(n, k, generator=g)
    return shared + scale * torch.randn(members, n, k, generator=g), y


# ---- metrics on logits ----

@pytest.mark.parametrize('combiner', ['prob', 'logit'])
def test_identical_members_have_no_diversity_and_the_ensemble_is_any_member(combiner):
    logits, y = random_logits(members=1)
    report = analyze.ensemble_report(logits.expand(3, -1, -1), y, combiner)
    assert abs(report['div']) < 1e-12 and report['disagreement'] == 0 and report['logit_variance'] < 1e-20
    assert abs(report['ensemble_improvement_rate']) < 1e-12 and report['disagreement_error_ratio'] == 0
    for key, value in report['ensemble'].items():
        assert all(math.isclose(m[key], value, abs_tol=1e-9) for m in report['members']), key


@pytest.mark.parametrize('combiner', ['prob', 'logit'])
def test_the_ambiguity_decomposition_holds_for_both_combiners(combiner):
    logits, y = random_logits(members=5)
    div, residual = analyze.ambiguity(logits, y, combiner)
    assert residual < 1e-5 and div.min() > -1e-9 and div.mean() > 0.5
    member_ce, ensemble_ce, _ = te.ensemble_terms(logits, y, combiner)   # float32, the training code's terms
    assert (member_ce.mean(0) - ensemble_ce - div).abs().max() < 1e-5
    if combiner == 'logit':   # DIV = (1/M) Σ_j KL(p̄ ‖ p_j), which does not depend on the label
        other, _ = analyze.ambiguity(logits, (y + 1) % 10, combiner)
        torch.testing.assert_close(other, div)
        log_pbar = te.combine(logits, 'logit')
        kl = (log_pbar.exp() * (log_pbar - torch.log_softmax(logits, -1))).sum(-1).mean(0)
        assert (kl - div).abs().max() < 1e-5


def test_disagreement_counts_member_pairs_that_vote_differently():
    logits, _ = random_logits(members=5, n=300)
    votes = logits.argmax(-1)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    brute = sum((votes[i] != votes[j]).double().mean() for i, j in pairs) / len(pairs)
    assert math.isclose(analyze.disagreement(logits), float(brute), rel_tol=1e-12)


def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_an_overconfident_one_is_not():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(2 * torch.randn(40000, 10, generator=g), -1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)   # labels drawn from the predicted probabilities
    assert analyze.calibration(probs, y) < 0.01
    assert analyze.calibration(F.softmax(3 * probs.log(), -1), y) > 0.1
    assert analyze.brier_score(F.one_hot(y, 10).double(), y) == 0


def test_drop_learners_tries_every_subset_when_there_are_few_and_identical_members_lose_nothing():
    logits, y = random_logits(members=4)
    result = analyze.drop_learners(logits, y, 'prob', [0.25, 0.5])
    assert [(r['kept'], r['subsets']) for r in result['fractions']] == [(3, 4), (2, 6)]
    assert result['fractions'][1]['loss_increase'] > result['fractions'][0]['loss_increase'] > 0
    same = analyze.drop_learners(logits[:1].expand(4, -1, -1), y, 'prob', [0.5])
    assert same['fractions'][0]['loss_increase'] == 0 == same['fractions'][0]['error_increase']
    with pytest.raises(te.EnsembleError):
        analyze.drop_learners(logits, y, 'prob', [1.0])


def test_planted_collusion_has_large_diversity_that_debiasing_removes_without_changing_the_ensemble():
    g = torch.Generator().manual_seed(1)
    offset = 6 * torch.randn(2, 10, generator=g)
    offsets = torch.stack([offset[0], offset[1], -offset[0] - offset[1]])[:, None]   # cancel in the mean logit
    (shared_fit, _), (shared, y) = (random_logits(members=1, seed=s) for s in (2, 3))
    fit, logits = shared_fit + offsets, shared + offsets   # a shared function plus opposite constant offsets
    before = te.ensemble_metrics(logits, y, 'prob')['div']
    debiased = analyze.debias(fit, logits)
    after = te.ensemble_metrics(debiased, y, 'prob')['div']
    assert before > 3 and after < 1e-3 * before
    torch.testing.assert_close(te.combine(debiased, 'logit'), te.combine(logits, 'logit'), atol=1e-5, rtol=0)
    torch.testing.assert_close(analyze.member_bias(fit).sum(0), torch.zeros(1, 10), atol=1e-4, rtol=0)


# ---- loss landscape ----

def test_barrier_of_a_known_curve():
    lams = torch.linspace(0, 1, 11)
    bump = 2 + (1 - 2) * lams + 4 * lams * (1 - lams)   # line from 2 to 1 plus a bump of height 1 at λ = 0.5
    assert math.isclose(analyze.barrier(bump.tolist()), 1.0, rel_tol=1e-6)
    assert math.isclose(analyze.barrier((2 - lams).tolist()), 0.0, abs_tol=1e-6)        # a straight line
    assert analyze.barrier((1 - 4 * lams * (1 - lams)).tolist()) == 0   # a dip: the endpoints are the max
    assert math.isclose(analyze.barrier([0, 3, 0], lams=[0, 0.25, 1]), 3)


def test_interpolation_is_exact_at_the_ends_and_mixes_batchnorm_statistics(runs):
    """The one interpolation of state dicts (rebasin.average, which analyze.py's curves use)."""
    (_, a, _), (_, b, _) = (te.load_member_state(p) for p in te.member_paths(runs['bn']))
    for lam, end in ((0.0, a), (1.0, b)):
        mixed = rebasin.average([a, b], [1 - lam, lam])
        assert all(torch.equal(mixed[k], end[k]) for k in end if end[k].is_floating_point())
    mid = rebasin.average([a, b], [0.5, 0.5])
    key = '3.norm1.running_var'
    torch.testing.assert_close(mid[key], (a[key] + b[key]) / 2)


# ---- real runs (Fashion-MNIST slices), shared by the tests below ----

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    if not te.DEBIAN_FASHION_MNIST.exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)')
    root, quiet = tmp_path_factory.mktemp('analyze_runs'), Console(quiet=True)
    mlp = dict(dataset='fashion-mnist', arch='mlp', hidden=[64], members=3, subset=3000, epochs=3, device='cpu')
    for beta in (0.0, 1.0):
        te.train(te.Config(out=str(root / f'beta{beta:g}'), beta=beta, **mlp), console=quiet)
    te.train(te.Config(out=str(root / 'bn'), dataset='fashion-mnist', arch='airbench', width=0.125, members=2,
                       subset=256, batch_size=128, epochs=1, device='cpu'), console=quiet)
    return dict(independent=root / 'beta0', joint=root / 'beta1', bn=root / 'bn')


def cli(*args):
    return CliRunner().invoke(analyze.app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


def is_png(path):
    return path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_evaluate_reports_members_ensemble_diversity_and_the_gap(runs, tmp_path):
    out = ok('evaluate', runs['joint'], '--split', 'train,test', '--json', tmp_path / 'e.json')   # or repeated
    assert 'ensemble' in out and 'disagreement' in out and 'generalization gap' in out
    result = json.loads((tmp_path / 'e.json').read_text())
    train, test = result['splits']['train'], result['splits']['test']
    assert result['combiner'] == 'prob' and len(test['members']) == 3 and test['examples'] == 3000
    assert list(result['splits']) == ['train', 'test'] and result['classes'] == list(range(10))
    assert test['decomposition_residual'] < 1e-6
    summary = json.loads((runs['joint'] / 'summary.json').read_text())   # the same test numbers as training's
    assert math.isclose(test['div'], summary['test_div'], rel_tol=1e-4)
    assert math.isclose(test['ensemble']['acc'], summary['test_acc'], abs_tol=1e-6)
    assert math.isclose(result['gap']['ensemble_loss'], test['ensemble']['nll'] - train['ensemble']['nll'])


def test_compare_sorts_by_beta_and_draws_the_sweep(runs, tmp_path):
    ok('compare', runs['joint'], runs['independent'], '--json', tmp_path / 'c.json', '--plot', tmp_path / 'c.png')
    rows = json.loads((tmp_path / 'c.json').read_text())['runs']
    assert [r['beta'] for r in rows] == [0.0, 1.0] and rows[0]['source'] == 'summary.json'
    assert rows[1]['train_div'] > 10 * rows[0]['train_div'] and is_png(tmp_path / 'c.png')
    ok('compare', runs['independent'], '--recompute', '--json', tmp_path / 'r.json')
    clean = json.loads((tmp_path / 'r.json').read_text())['runs'][0]
    assert clean['source'] == 'eval' and math.isclose(clean['test_loss'], rows[0]['test_loss'], rel_tol=1e-5)


def test_debias_and_drop_write_their_numbers(runs, tmp_path):
    ok('debias', runs['joint'], '--json', tmp_path / 'd.json')
    result = json.loads((tmp_path / 'd.json').read_text())
    assert result['fit_split'] == 'train' and result['logit_ensemble_max_change'] < 1e-4
    assert result['before']['div'] > result['after']['div']
    ok('drop', runs['joint'], '--fractions', '0.34,0.67', '--json', tmp_path / 'p.json', '--plot', tmp_path / 'p.png')
    result = json.loads((tmp_path / 'p.json').read_text())
    assert [r['kept'] for r in result['fractions']] == [2, 1] and is_png(tmp_path / 'p.png')


def test_interpolate_aligns_repairs_and_reproduces_the_endpoints_exactly(runs, tmp_path):
    a, b = te.member_paths(runs['independent'])[:2]
    ok('interpolate', a, b, '--align', '--repair', '--points', 3, '--examples', 1000, '--bn-examples', 1000,
       '--json', tmp_path / 'i.json', '--plot', tmp_path / 'i.png')
    curves = json.loads((tmp_path / 'i.json').read_text())['curves']
    assert list(curves) == ['naive', 'aligned', 'permuted'] and is_png(tmp_path / 'i.png')   # identifiers
    assert [p['lam'] for p in curves['naive']['points']] == [0.0, 0.5, 1.0]
    data = analyze.run_data(analyze.run_config(a))
    for path, point in ((a, curves['naive']['points'][0]), (b, curves['naive']['points'][-1])):
        x, y = analyze.split_examples(data, 'test', 1000)
        loss, error = analyze.ensemble_loss_error(te.predict_logits([te.load_member(path)], x), y, 'prob')
        assert (point['test_loss'], point['test_error']) == (loss, error)   # exactly, not approximately
    # aligning B changes its weights, not its function; matched networks interpolate with a lower barrier
    for key, value in curves['naive']['points'][-1].items():
        assert math.isclose(curves['aligned']['points'][-1][key], value, rel_tol=1e-5, abs_tol=1e-6), key
    assert curves['aligned']['barrier']['test_loss'] < curves['naive']['barrier']['test_loss']


def test_interpolate_resets_batchnorm_between_two_members_of_a_run(runs, tmp_path):
    ok('interpolate', runs['bn'], runs['bn'], '--member', '0,1', '--reset-bn', '--steps', 3, '--examples', 100,
       '--bn-examples', 128, '--json', tmp_path / 'i.json')   # --steps: --points' old name
    result = json.loads((tmp_path / 'i.json').read_text())
    assert result['bn'] == 'reset' and result['b'].endswith('member_1.safetensors')
    assert len(result['curves']['naive']['points']) == 3


def test_sharpness_grows_with_the_radius_and_leaves_the_members_untouched(runs, tmp_path):
    ok('sharpness', runs['bn'], '--examples', 128, '--steps', 2, '--json', tmp_path / 's.json')
    result = json.loads((tmp_path / 's.json').read_text())
    assert len(result['members']) == 2 and result['mean'] > 0
    net = te.load_member(te.member_paths(runs['independent'])[0])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = analyze.split_examples(analyze.run_data(analyze.run_config(runs['independent'])), 'train', 500)
    batches = [(te.to_float_images(x), y)]
    small, large = (analyze.sharpness(net, batches, rho, steps=3)['sharpness'] for rho in (0.05, 0.5))
    assert 0 < small < large
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bad_input_gets_a_one_line_error(runs, tmp_path):
    for args, message in [(['evaluate', tmp_path / 'nope'], 'does not exist'),
                          (['evaluate', runs['independent'], '--split', 'dev'], "unknown split 'dev'"),
                          (['evaluate', runs['independent'], '--split', 'val'], "no 'val' split"),
                          (['debias', runs['independent'], '--combine', 'median'], "unknown combiner"),
                          (['drop', runs['independent'], '--fractions', '0.5,x'], 'comma-separated'),
                          (['drop', runs['independent'], '--fractions', '1'], 'keep at least one'),
                          (['interpolate', runs['independent'], runs['bn']], 'different networks'),
                          (['interpolate', runs['independent'], runs['independent'], '--reset-bn'], 'no BatchNorm'),
                          (['interpolate', runs['independent'], runs['independent'], '--member', '7'], 'out of range'),
                          (['compare', tmp_path / 'nope'], 'does not exist')]:
        result = cli(*args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)


def test_version_names_the_checkpoint_format_and_torch_and_needs_no_sibling(monkeypatch):
    assert ok('--version').strip() == f'analyze.py: checkpoints {te.FORMAT}; torch {torch.__version__}'
    monkeypatch.setitem(sys.modules, 'train_ensemble', None)   # as if analyze.py were copied alone
    alone = analyze.version()
    assert alone.startswith('analyze.py: no train_ensemble.py beside it') and torch.__version__ in alone


def test_every_command_documents_itself():
    for command in ('evaluate', 'compare', 'debias', 'drop', 'interpolate', 'sharpness', 'ood', 'robustness'):
        help_text = ok(command, '--help')
        assert '--json' in help_text and ('--device' in help_text or command == 'compare')
        assert '--classes' in help_text and '--data-dir' in help_text   # every command that reads examples


# ---- the paper's claim ----

def test_joint_training_shows_the_collusion_signature_and_independent_training_does_not(runs):
    """At β = 1 DIV is hundreds of times larger, debiasing removes a large share of it while at β = 0 it removes
    none, and dropping one of three members costs far more. Measured over seeds 0-2 (3,000 images, 3 epochs):
    DIV 9.6-14.1 vs 0.013-0.016, removed 41-57% vs -41% to -93%, Δloss 0.76-2.5 vs 0.003-0.004 nats."""
    measured = {}
    for name in ('independent', 'joint'):
        config, nets = te.load_run(runs[name])
        data = analyze.run_data(config)
        fit = te.predict_logits(nets, data.x_train)
        logits = te.predict_logits(nets, data.x_test)
        before = te.ensemble_metrics(logits, data.y_test, 'prob')['div']
        after = te.ensemble_metrics(analyze.debias(fit, logits), data.y_test, 'prob')['div']
        drop = analyze.drop_learners(logits, data.y_test, 'prob', [0.34])['fractions'][0]['loss_increase']
        measured[name] = dict(div=before, removed=1 - after / before, drop=drop)
    independent, joint = measured['independent'], measured['joint']
    assert joint['div'] > 50 * independent['div'], measured
    assert joint['removed'] > 0.2 and joint['removed'] > independent['removed'] + 0.4, measured
    assert joint['drop'] > 20 * independent['drop'], measured
