"""Regression ensembles: the collusion paper's other half (score averaging, squared error), on real numbers."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import analyze
import train_ensemble as te

TINY = dict(task='regression', dataset='synthetic-regression', arch='mlp', hidden=[32], subset=1000, batch_size=100,
            epochs=10)


def quiet_console():
    from rich.console import Console
    return Console(quiet=True)


def run(tmp_path, name, **options):
    return te.train(te.Config(out=str(tmp_path / name), device='cpu', **options), console=quiet_console())


def outputs_of(run_dir, x):
    config, nets = te.load_run(run_dir)
    return te.predict_logits(nets, x)


# ---- the decomposition and the objective ----

def test_squared_error_decomposes_exactly_into_mean_member_error_minus_diversity():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 300, 3, generator=g, dtype=torch.float64) * 4 + 7
    y = torch.randn(300, 3, generator=g, dtype=torch.float64) * 4 + 7
    r = analyze.regression_report(outputs, y)
    assert r['ensemble']['mse'] == pytest.approx(r['mean_member']['mse'] - r['div'], rel=1e-12)
    assert r['decomposition_residual'] < 1e-6
    member, ensemble, div = te.ensemble_terms(outputs, y, 'mean')   # the training code's terms
    spread = (outputs - outputs.mean(0)).pow(2).mean(-1).mean(0)    # DIV as the members' variance around f̄
    assert torch.allclose(div, spread, rtol=0, atol=1e-10)
    assert torch.allclose(member.mean(0) - ensemble, spread, rtol=0, atol=1e-10)


def test_the_objective_is_independent_training_at_beta0_and_M_times_the_ensemble_loss_at_beta1():
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(4, 64, 2, generator=g, requires_grad=True)
    y, scale = torch.randn(64, 2, generator=g), torch.tensor([2.0, 0.5])
    objective, (member, ensemble) = te.ensemble_objective(outputs, y, 0.0, 'mean', scale=scale)
    assert ensemble is None   # independent members never build the ensemble term
    objective.backward()
    for j in range(4):
        solo = outputs[j].detach().clone().requires_grad_()
        (((solo - y) / scale) ** 2).mean(-1).sum().backward()
        assert torch.allclose(outputs.grad[j], solo.grad, atol=1e-6)
    objective, (_, ensemble) = te.ensemble_objective(outputs, y, 1.0, 'mean', scale=scale)
    assert torch.allclose(objective, 4 * (((outputs.mean(0) - y) / scale) ** 2).mean(-1).sum())


# ---- training ----

def test_at_beta0_a_regression_ensemble_trains_each_member_exactly_as_if_alone(tmp_path, float64):
    options = dict(TINY, hidden=[16, 8], lookahead=True)
    run(tmp_path, 'ensemble', members=3, beta=0.0, seed=10, **options)
    ensemble = [load_file(p) for p in te.member_paths(tmp_path / 'ensemble')]
    for j in range(3):
        run(tmp_path, f'solo{j}', members=1, seed=10 + j, data_seed=10, **options)
        solo = load_file(te.member_paths(tmp_path / f'solo{j}')[0])
        for key in solo:
            assert torch.allclose(ensemble[j][key], solo[key], atol=1e-12, rtol=0), (j, key)


@pytest.fixture(scope='module')
def beta_pair(tmp_path_factory):
    """5-member ensembles on synthetic regression, independent (β = 0) and joint (β = 1), same seeds."""
    root = tmp_path_factory.mktemp('regression')
    options = dict(TINY, hidden=[64], subset=None, epochs=8, members=5)
    return {beta: (root / f'beta{beta}', run(root, f'beta{beta}', beta=beta, **options)) for beta in (0.0, 1.0)}


def test_joint_training_inflates_diversity_and_worsens_the_members(beta_pair):
    """The paper's regression finding: at β = 1 the members spread far around the ensemble (DIV up by an
    order of magnitude) and each of them predicts far worse than an independently trained member."""
    independent, joint = beta_pair[0.0][1], beta_pair[1.0][1]
    assert joint['test_div'] > 10 * independent['test_div']
    assert joint['train_div'] > 10 * independent['train_div']
    member_mse = {beta: np.mean(s['member_test_loss']) for beta, (_, s) in beta_pair.items()}
    assert member_mse[1.0] > 3 * member_mse[0.0]
    for _, summary in beta_pair.values():   # the ensemble's MSE is the mean member's minus DIV, as logged
        mean_member = np.mean(summary['member_test_loss'])
        assert summary['test_loss'] == pytest.approx(mean_member - summary['test_div'], rel=1e-4)


def test_a_checkpoint_predicts_in_the_targets_units(beta_pair):
    """The members learn standardized targets; their last layer maps back, so a reloaded member predicts
    raw targets (mean 50, scale 10 here) from raw features with nothing else."""
    run_dir, summary = beta_pair[0.0]
    data = te.load_run_data(te.read_config(run_dir))
    net = te.load_member(te.member_paths(run_dir)[0])
    with torch.no_grad():
        prediction = net(data.x_test)
    rmse = float((prediction - data.y_test).pow(2).mean().sqrt())
    assert rmse == pytest.approx(summary['member_test_rmse'][0], rel=1e-4)
    assert rmse < 0.6 * float(data.y_test.std())   # far better than predicting the mean
    assert abs(float(prediction.mean()) - float(data.y_test.mean())) < 2


def test_debias_removes_a_planted_per_member_offset_completely(beta_pair):
    """Constant per-member offsets that cancel in the ensemble are exactly what debiasing removes: with them
    planted on a real ensemble's outputs, the debiased members are the debiased members without them."""
    run_dir, _ = beta_pair[0.0]
    data = te.load_run_data(te.read_config(run_dir))
    fit, test = outputs_of(run_dir, data.x_train).double(), outputs_of(run_dir, data.x_test).double()
    offsets = torch.tensor([-30.0, -10.0, 0.0, 15.0, 25.0], dtype=torch.float64).view(5, 1, 1)   # sum 0
    planted = analyze.debias(fit + offsets, test + offsets)
    assert torch.allclose(planted, analyze.debias(fit, test), atol=1e-9)
    before = analyze.regression_report(test + offsets, data.y_test)
    after = analyze.regression_report(planted, data.y_test)
    assert before['div'] > 100 * after['div'] > 0
    assert after['ensemble']['mse'] == pytest.approx(before['ensemble']['mse'], rel=1e-12)


def test_sam_and_sharpbalance_train_regression_members(tmp_path):
    summary = run(tmp_path, 'sb', members=3, beta=0.0, sam_rho=0.05, flat_ratio=0.5, **TINY)
    data = te.load_run_data(te.read_config(tmp_path / 'sb'))
    assert summary['test_loss'] < 0.6 * float(data.y_test.var())


# ---- data ----

def write_csv(path, x, y, target_at=None, header=None):
    columns = [f'f{i}' for i in range(x.shape[1])]
    table = np.asarray(x, dtype=np.float64)
    at = x.shape[1] if target_at is None else target_at
    columns.insert(at, 'target')
    table = np.insert(table, at, np.asarray(y).ravel(), axis=1)
    lines = [','.join(header or columns)] + [','.join(f'{v:.6g}' for v in row) for row in table]
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_a_csv_reads_its_target_column_and_holds_out_a_fixed_fifth(tmp_path):
    x = np.random.default_rng(0).normal(size=(250, 4))
    y = 3 * x[:, 0] - x[:, 3]
    path = write_csv(tmp_path / 't.csv', x, y, target_at=2)
    data = te.load_data(str(path), task='regression', target='target')
    assert (len(data.y_train), len(data.y_test)) == (200, 50)
    assert data.x_train.shape[1] == 4 and data.y_train.shape == (200, 1)
    rows = torch.cat([data.x_train, data.x_test])
    expected = torch.sort(torch.tensor(x[:, 0], dtype=torch.float32)).values
    assert torch.allclose(torch.sort(rows[:, 0]).values, expected, atol=1e-5)
    assert torch.allclose(3 * data.x_test[:, 0] - data.x_test[:, 3], data.y_test[:, 0], atol=1e-4)
    again = te.load_data(str(path), task='regression', target='target')
    assert torch.equal(again.x_test, data.x_test)   # the same split every time


def test_regression_npz_val_shards_and_subsets_are_disjoint(tmp_path):
    g = np.random.default_rng(1)
    path = tmp_path / 'r.npz'
    np.savez(path, x_train=g.normal(size=(120, 3)), y_train=g.normal(size=120), x_test=g.normal(size=(40, 3)),
             y_test=g.normal(size=40))
    whole = te.load_data(str(path), task='regression', val_size=20)
    parts = [te.load_data(str(path), task='regression', val_size=20, shard=(i, 3)) for i in range(3)]
    rows = torch.cat([p.x_train for p in parts] + [whole.x_val])
    assert len(torch.unique(rows, dim=0)) == 120 and all(len(p.y_train) in (33, 34) for p in parts)
    small = te.load_data(str(path), task='regression', subset=30)
    assert (len(small.y_train), len(small.y_test)) == (30, 30) and small.y_train.shape == (30, 1)


@pytest.mark.parametrize('args, message', [
    (['--task', 'regression', '--arch', 'airbench'], 'regression trains an mlp'),
    (['--task', 'regression', '--combine', 'prob'], "unknown combiner 'prob' for regression"),
    (['--task', 'regression', '--label-smoothing', '0.1'], 'label-smoothing does not apply'),
    (['--task', 'regression', '--dataset', 'fashion-mnist'], 'is for classification'),
    (['--dataset', 'synthetic-regression'], 'pass --task regression'),
    (['--target', 'y', '--dataset', 'synthetic'], '--target names the target column'),
    (['--task', 'regression', '--target', 'y'], 'synthetic-regression is not one'),
    (['--task', 'clustering'], "unknown task 'clustering'"),
])
def test_bad_regression_options_get_a_one_line_error(args, message, tmp_path):
    base = ['--arch', 'mlp', '--dataset', 'synthetic-regression', '--device', 'cpu', '--out', str(tmp_path / 'r')]
    result = CliRunner().invoke(cli(), base + args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / 'r').exists()


def cli():
    import typer
    app = typer.Typer()
    app.command()(te.command())
    return app


@pytest.mark.parametrize('make, message', [
    (lambda p: p.write_text('a,b,y\n1,2,3\n4,x,6\n7,8,9\n'), "column 'b' is not a number"),
    (lambda p: p.write_text('a,b,y\n1,2,3\n4,5\n7,8,9\n'), 'line 3 has 2 fields'),
    (lambda p: p.write_text('a,b,y\n1,2,3\n4,5,nan\n7,8,9\n'), 'NaN or infinite'),
    (lambda p: p.write_text('a,b,y\n1,2,3\n'), 'at least two columns and two rows'),
])
def test_bad_csv_tables_get_a_one_line_error(tmp_path, make, message):
    path = tmp_path / 'bad.csv'
    make(path)
    with pytest.raises(te.EnsembleError, match=message):
        te.load_data(str(path), task='regression')
    with pytest.raises(te.EnsembleError, match="no column 'price'"):
        te.load_data(str(write_csv(tmp_path / 'ok.csv', np.ones((5, 2)), np.ones(5))), task='regression',
                     target='price')


# ---- analysis ----

def test_analyze_reads_the_task_from_the_run_and_refuses_classification_only_commands(beta_pair, tmp_path):
    runner, joint = CliRunner(), str(beta_pair[1.0][0])
    out = tmp_path / 'eval.json'
    result = runner.invoke(analyze.app, ['evaluate', joint, '--split', 'train', '--split', 'test', '--device', 'cpu',
                                         '--json', str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    test = report['splits']['test']
    assert test['combiner'] == 'mean' and test['decomposition_residual'] < 1e-9
    assert test['ensemble']['rmse'] == pytest.approx(beta_pair[1.0][1]['test_rmse'], rel=1e-4)
    assert set(report['gap']) == {'ensemble_loss', 'mean_member_loss', 'ensemble_rmse', 'div'}

    result = runner.invoke(analyze.app, ['compare', str(beta_pair[0.0][0]), joint, '--plot', str(tmp_path / 'c.png'),
                                         '--json', str(tmp_path / 'c.json')])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / 'c.json').read_text())['runs']
    assert [r['beta'] for r in rows] == [0.0, 1.0] and rows[1]['test_div'] > 10 * rows[0]['test_div']
    assert (tmp_path / 'c.png').stat().st_size > 10000

    result = runner.invoke(analyze.app, ['debias', joint, '--json', str(tmp_path / 'd.json')])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / 'd.json').read_text())
    assert d['after']['div'] < d['before']['div'] and d['logit_ensemble_max_change'] < 1e-3
    assert d['after']['ensemble_rmse'] == pytest.approx(d['before']['ensemble_rmse'], rel=1e-5)

    result = runner.invoke(analyze.app, ['drop', joint, '--fractions', '0.4', '--json', str(tmp_path / 'p.json')])
    assert result.exit_code == 0 and 'Δ RMSE' in result.output, result.output
    assert json.loads((tmp_path / 'p.json').read_text())['fractions'][0]['loss_increase'] > 0

    for command in (['robustness', joint], ['sharpness', joint], ['ood', joint, '--ood', 'synthetic'],
                    ['compare', joint, '--shifted'], ['evaluate', joint, '--combine', 'prob']):
        result = runner.invoke(analyze.app, command)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (command, result.output)
        assert 'regression' in result.output


def test_weight_matching_aligns_regression_members_and_lowers_the_barrier(beta_pair, tmp_path):
    run_dir = str(beta_pair[0.0][0])
    out = tmp_path / 'i.json'
    result = CliRunner().invoke(analyze.app, ['interpolate', run_dir, run_dir, '--member', '0,1', '--align',
                                              '--steps', '5', '--json', str(out)])
    assert result.exit_code == 0, result.output
    curves = json.loads(out.read_text())['curves']
    assert curves['aligned']['barrier']['test_loss'] < 0.5 * curves['naive']['barrier']['test_loss']


def test_mergemany_merges_regression_members_into_one_run_that_analyze_reads(beta_pair, tmp_path):
    import rebasin
    runner = CliRunner()
    result = runner.invoke(rebasin.make_app(), ['merge', str(beta_pair[0.0][0]), '--out', str(tmp_path / 'merged')])
    assert result.exit_code == 0, result.output
    result = runner.invoke(analyze.app, ['evaluate', str(tmp_path / 'merged'), '--json', str(tmp_path / 'm.json')])
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / 'm.json').read_text())['splits']['test']['ensemble']
    data = te.load_run_data(te.read_config(beta_pair[0.0][0]))
    assert merged['mse'] < float(data.y_test.var())   # one merged network, in the targets' units, still predicts


def test_a_member_started_from_other_data_records_the_statistics_it_computes_with(tmp_path):
    """--init from a run on other targets keeps that run's fixed input and target scaling (the weights were
    learned for it): the member files and config.json say so, and the run reads back as itself."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (1.5 * x[:, :1] + 0.5).astype(np.float32)   # other statistics than synthetic-regression's
    np.savez(tmp_path / 'other.npz', x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    source = run(tmp_path, 'source', **{**TINY, 'epochs': 1})
    run(tmp_path, 'continued', **{**TINY, 'epochs': 1, 'dataset': str(tmp_path / 'other.npz'),
                                  'init': str(tmp_path / 'source')})
    before = te.load_member_state(tmp_path / 'source' / 'member_0.safetensors')[0]
    spec, state, _ = te.load_member_state(tmp_path / 'continued' / 'member_0.safetensors')
    assert spec['target_std'] == before['target_std'] and spec['mean'] == before['mean']
    assert spec['target_std'] != te.model_spec(te.Config(arch='mlp', hidden=[32]), te.load_data(
        str(tmp_path / 'other.npz'), task='regression'))['target_std']   # not the new data's
    assert te.read_config(tmp_path / 'continued')['model'] == spec
    config, nets = te.load_run(tmp_path / 'continued')   # its own config.json and members agree
    assert len(nets) == 1 and source['test_loss'] > 0
