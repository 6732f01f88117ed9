"""The experiments run end to end at their smoke size (--quick) and write their table, numbers and figures;
an interrupted experiment continues where it stopped."""
import json
import runpy
import sys

from conftest import ROOT


def run_experiment(name, *args, monkeypatch):
    monkeypatch.setattr(sys, 'argv', [name, *map(str, args)])
    try:
        runpy.run_path(str(ROOT / 'experiments' / name), run_name='__main__')
    except SystemExit as e:
        assert e.code in (0, None)


def test_spectral_collusion_quick_writes_its_table_and_figures_and_reuses_finished_runs(tmp_path, monkeypatch,
                                                                                        fashion_mnist):
    out = tmp_path / 'sc'
    run_experiment('spectral_collusion.py', '--quick', '--out', out, '--device', 'cpu', monkeypatch=monkeypatch)
    table = (out / 'results.md').read_text()
    for method in ('standard', 'spectral', 'muon'):
        for beta in ('0', '1'):
            assert f'| {method} | {beta} |' in table
    results = json.loads((out / 'results.json').read_text())
    assert set(results['rows']) == {f'{m} beta={b}' for m in ('standard', 'spectral', 'muon') for b in (0, 1)}
    assert all(0 <= r['ensemble_error'][0] <= 1 for r in results['rows'].values())
    for png in ('sweep.png', 'results.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # Muon's swept lr acts on the hidden matrix: its two sweep points differ.
    assert results['sweep']['muon beta=0 lr=0.05'] != results['sweep']['muon beta=0 lr=0.2']
    # A second call reads every run back: nothing is trained again.
    stamps = {p: p.stat().st_mtime for p in out.glob('*/summary.json')}
    run_experiment('spectral_collusion.py', '--quick', '--out', out, '--device', 'cpu', monkeypatch=monkeypatch)
    assert stamps and all(p.stat().st_mtime == t for p, t in stamps.items())


def test_spectral_collusion_runs_airbench_too(tmp_path, monkeypatch, fashion_mnist):
    out = tmp_path / 'sc_airbench'
    run_experiment('spectral_collusion.py', '--quick', '--arch', 'airbench', '--out', out, '--device', 'cpu',
                   monkeypatch=monkeypatch)
    results = json.loads((out / 'results.json').read_text())
    assert results['settings']['arch'] == 'airbench' and len(results['rows']) == 6
    assert '2-member airbench width 0.0625' in (out / 'results.md').read_text()


def test_collusion_quick_writes_its_table_and_figures_with_the_papers_diagnostics(tmp_path, monkeypatch, fashion_mnist):
    out = tmp_path / 'collusion'
    run_experiment('collusion.py', '--quick', '--out', out, '--device', 'cpu', monkeypatch=monkeypatch)
    table = (out / 'results.md').read_text()
    for combiner in ('prob', 'logit'):
        for beta in ('0', '1'):
            assert f'| {combiner} | {beta} |' in table
    rows = json.loads((out / 'results.json').read_text())['rows']
    # With two members, dropping half leaves one: the loss rises by exactly the ensemble's DIV (prob).
    assert abs(rows['prob beta=1']['drop_half_loss'][0] - rows['prob beta=1']['test_div'][0]) < 1e-3
    assert rows['prob beta=1']['test_div'][0] > 5 * rows['prob beta=0']['test_div'][0]   # joint training colludes
    for png in ('sweep.png', 'curves.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_parameter_budget_quick_writes_its_table_and_figures(tmp_path, monkeypatch, fashion_mnist):
    out = tmp_path / 'budget'
    run_experiment('parameter_budget.py', '--quick', '--out', out, '--device', 'cpu', monkeypatch=monkeypatch)
    rows = json.loads((out / 'results.json').read_text())['rows']
    assert set(rows) == {'1x64 lambda=0'} | {f'4x16 lambda={lam}' for lam in ('0', '0.5', '0.9', '1')}
    assert all(0 < r['test_error'][0] < 0.5 for r in rows.values())   # ten classes: chance is 0.9
    table = (out / 'results.md').read_text()
    assert '| 1 x 64 | 50,890 |' in table and '| 4 x 16 | 50,920 |' in table   # one budget, two shapes
    for png in ('budget.png', 'curves.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_modular_loss_hessian_has_condition_number_one_over_one_minus_lambda():
    """Webb et al. 2020, supplementary C, computed rather than derived: at the stationary point of the scalar
    case the eigenvalues are c/M and c(1 − λ)/M, so κ = 1/(1 − λ); past λ = 1 one is negative (a saddle)."""
    sys.path.insert(0, str(ROOT / 'experiments'))
    from parameter_budget import hessian_at_stationary_point
    for family in ('gaussian', 'poisson'):
        for members in (2, 4, 7):
            for lam in (0.0, 0.5, 0.9, 0.99):
                eig = hessian_at_stationary_point(lam, members, family)
                assert abs((eig.max() / eig.min()).item() - 1 / (1 - lam)) < 1e-9 * (1 / (1 - lam))
            assert hessian_at_stationary_point(1.5, members, family).min() < 0


def test_sharpness_diversity_quick_writes_its_table_and_tradeoff_plot(tmp_path, monkeypatch, fashion_mnist):
    out = tmp_path / 'sd'
    run_experiment('sharpness_diversity.py', '--quick', '--out', out, '--device', 'cpu', monkeypatch=monkeypatch)
    rows = json.loads((out / 'results.json').read_text())['rows']
    assert set(rows) == {'plain rho=0', 'sam rho=0.05', 'sharpbalance rho=0.05'}
    assert rows['sam rho=0.05']['sharpness'][0] < rows['plain rho=0']['sharpness'][0]   # SAM flattens the members
    assert all(r['div'][0] > 0 and 0 < r['ensemble_acc'][0] <= 1 for r in rows.values())
    assert '| sharpbalance | 0.05 |' in (out / 'results.md').read_text()
    assert (out / 'tradeoff.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_collusion_quick_runs_the_regression_half(tmp_path, monkeypatch):
    out = tmp_path / 'regression'
    run_experiment('collusion.py', '--quick', '--task', 'regression', '--out', out, '--device', 'cpu',
                   monkeypatch=monkeypatch)
    table = (out / 'results.md').read_text()
    assert 'ensemble test RMSE' in table and '| mean | 0 |' in table and '| mean | 1 |' in table
    rows = json.loads((out / 'results.json').read_text())['rows']
    # Two members, half dropped: the MSE rises by exactly DIV (the ensemble's MSE is the mean member's minus DIV).
    assert (abs(rows['mean beta=1']['drop_half_loss'][0] - rows['mean beta=1']['test_div'][0])
            < 1e-3 * rows['mean beta=1']['test_div'][0])
    assert rows['mean beta=1']['test_div'][0] > rows['mean beta=0']['test_div'][0]


def test_rebasin_report_quick_runs_every_experiment_of_the_report(tmp_path, monkeypatch, fashion_mnist):
    """Each subcommand at its smoke size: the table's rows, every number, the figure."""
    expected = {'kernel-size': {'k=3', 'k=5'}, 'weight-decay': {'wd=0', 'wd=0.05'},
                'merge-many': {'k=3 n=2', 'k=3 n=3'},
                'train-merge-train': {'k=3 n=2'}, 'shards': {'e=1 n=2'}}
    for command, rows in expected.items():
        out = tmp_path / command
        run_experiment('rebasin_report.py', command, '--quick', '--out', out, '--device', 'cpu',
                       monkeypatch=monkeypatch)
        results = json.loads((out / 'results.json').read_text())
        assert set(results['rows']) == rows, command
        assert (out / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert (out / 'results.md').read_text().count('\n|') >= len(rows) + 2
    barriers = json.loads((tmp_path / 'kernel-size' / 'results.json').read_text())['rows']['k=3']
    assert all(value[0] >= -1e-9 for key, value in barriers.items() if 'loss' in key)   # a barrier is never negative
    merged = json.loads((tmp_path / 'merge-many' / 'results.json').read_text())['rows']['k=3 n=2']
    assert 0 <= merged['merged_acc'][0] <= 1 and merged['ensemble_loss'][0] > 0
    tmt = json.loads((tmp_path / 'train-merge-train' / 'results.json').read_text())['rows']['k=3 n=2']
    assert abs(tmt['A_AC'][0] - tmt['A'][0] / tmt['AC'][0]) < 1e-9
    assert (tmp_path / 'shards' / 'n2_e1_s0_merged.safetensors').exists()   # the merge the last run started from


def test_vit_heads_compares_per_head_with_shared_head_permutations_on_every_pair(tmp_path, monkeypatch):
    import train_ensemble as te
    from rich.console import Console
    run = tmp_path / 'vit'
    te.train(te.Config(out=str(run), dataset='synthetic', arch='vit', width=0.25, depth=1, heads=2, patch_size=8,
                       subset=256, batch_size=64, epochs=2, members=3, device='cpu'), console=Console(quiet=True))
    out = tmp_path / 'heads'
    run_experiment('vit_heads.py', run, '--examples', 128, '--out', out, monkeypatch=monkeypatch)
    results = json.loads((out / 'results.json').read_text())
    assert len(results['pairs']) == 3   # 0-1, 0-2, 1-2
    for pair in results['pairs'].values():
        for spec in ('shared', 'per head'):   # alignment moves B closer to A under either spec
            assert pair[spec]['distance'] < pair['unaligned']['distance']
            assert pair[spec]['objective'] > pair['unaligned']['objective']
    assert '| per head |' in (out / 'results.md').read_text()
