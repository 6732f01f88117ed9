"""What the toolkit promises about the user's files (README, "What is guaranteed"): a run that is still
training is never replaced, --force replaces only what is provably the toolkit's own, a folder that is not
a run keeps every file of the user's, results are written whole or not at all, and --resume never guesses
options it cannot read back."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rebasin
import train_ensemble as te
from test_train_ensemble import TINY_MLP, cli as train_cli, run

ROOT = Path(__file__).resolve().parents[1]


def rebasin_cli(*args):
    return CliRunner().invoke(rebasin.make_app(), [str(a) for a in args])


def train_again(out, *args):
    """train_ensemble.py --force onto `out`: a tiny synthetic MLP run."""
    args = ['--dataset', 'synthetic', '--arch', 'mlp', '--hidden', '32', '--examples', '256', '--epochs', '1',
            '--device', 'cpu', '--out', out, '--force', *args]
    return CliRunner().invoke(train_cli(), [str(a) for a in args])


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    """Two finished one-member MLP runs (synthetic data)."""
    root = tmp_path_factory.mktemp('runs')
    for seed in (0, 1):
        run(root, f's{seed}', seed=seed, **{**TINY_MLP, 'epochs': 1})
    return root / 's0', root / 's1'


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob('*'))}


def test_force_never_replaces_a_run_that_is_still_training(tmp_path, two_runs):
    live = tmp_path / 'live'
    run(tmp_path, 'live', **{**TINY_MLP, 'epochs': 1})
    before = snapshot(live)
    trainer = te.lock_run_dir(live)   # as a training process holds it while it runs
    try:
        for command in ('align', 'merge'):
            result = rebasin_cli(command, *two_runs, '--out', live, '--force')
            assert result.exit_code != 0 and 'being written by process' in result.output, result.output
        result = train_again(live)
        assert result.exit_code != 0 and 'being written by process' in result.output, result.output
    finally:
        trainer.close()
    after = snapshot(live)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k.name != '.lock')
    assert rebasin_cli('align', *two_runs, '--out', live, '--force').exit_code == 0   # released: replaced


def test_force_replaces_only_files_that_are_exactly_the_toolkits_own(tmp_path, two_runs):
    out = tmp_path / 'aligned'
    assert rebasin_cli('align', *two_runs, '--out', out).exit_code == 0
    (out / 'member_notes.safetensors').mkdir()
    (out / 'member_notes.safetensors' / 'notes.txt').write_text('mine')
    (out / 'state_backup.safetensors').write_text('mine too')
    before = snapshot(out)
    for result in rebasin_cli('align', *two_runs, '--out', out, '--force'), train_again(out):
        assert result.exit_code != 0 and 'refusing to replace' in result.output
        assert snapshot(out) == before


def test_training_with_force_replaces_a_finished_run_with_other_options_whole(tmp_path):
    out = tmp_path / 'run'
    run(tmp_path, 'run', **{**TINY_MLP, 'epochs': 1, 'members': 3})
    refused = CliRunner().invoke(train_cli(), ['--dataset', 'synthetic', '--arch', 'mlp', '--hidden', '32',
                                               '--examples', '256', '--epochs', '1', '--out', str(out)])
    assert refused.exit_code != 0 and 'or --force' in refused.output   # without it: nothing replaced
    result = train_again(out, '--members', '2')
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name != '.lock') == [
        'config.json', 'member_0.safetensors', 'member_1.safetensors', 'metrics.jsonl', 'summary.json']
    assert te.read_config(out)['members'] == 2 and len(te.member_paths(out)) == 2


def test_training_into_a_users_folder_deletes_none_of_the_users_files(tmp_path):
    folder = tmp_path / 'mine'
    folder.mkdir()
    users = {'.draft.tmp.txt': 'draft', '.session.tmp': 'session', '.config.json.tmp.bak': 'backup',
             'notes.tmp1': 'notes'}
    for name, text in users.items():
        (folder / name).write_text(text)
    stale = folder / '.metrics.jsonl.tmp4242'   # what a killed run of ours leaves: removed
    stale.write_text('half')
    run(tmp_path, 'mine', **{**TINY_MLP, 'epochs': 1})
    assert {name: (folder / name).read_text() for name in users} == users
    assert not stale.exists() and (folder / 'summary.json').exists()


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / 'results.md'
    te.write_text(path, 'the finished table\n')

    def full_disk(self, text):
        with open(self, 'w') as f:
            f.write(text[:3])
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Path, 'write_text', full_disk)
    with pytest.raises(te.EnsembleError, match='No space left'):
        te.write_text(path, 'a new table that does not fit\n')
    monkeypatch.undo()
    assert path.read_text() == 'the finished table\n' and os.listdir(tmp_path) == ['results.md']


def test_every_file_a_command_writes_goes_through_the_one_atomic_write():
    """Scripts, experiments and benchmarks never write a result in place (a full disk would leave half of
    it): no bare write_text, savefig or open(..., 'w') outside train_ensemble's atomic writers."""
    offenders = []
    for path in [*ROOT.glob('*.py'), *ROOT.glob('experiments/*.py')]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split('#')[0].replace('te.write_text(', '')
            if ('.write_text(' in code or '.savefig(' in code or "open(" in code and "'w'" in code) \
                    and 'tmp' not in code:
                offenders.append(f'{path.name}:{number}: {line.strip()}')
    assert offenders == []


@pytest.mark.parametrize('config', ['{}', '[]', '{"format": "deep-ensembles/1"}', '"members"'])
def test_resume_refuses_a_config_it_cannot_read_back_and_creates_nothing(tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'r').mkdir()
    (tmp_path / 'r' / 'config.json').write_text(config)
    result = CliRunner().invoke(train_cli(), ['--resume', 'r'])
    assert result.exit_code != 0 and 'cannot resume r' in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ['r'] and os.listdir(tmp_path / 'r') == ['config.json']


def test_resume_refuses_options_of_the_wrong_type(tmp_path):
    run(tmp_path, 'r', **{**TINY_MLP, 'epochs': 1})
    (tmp_path / 'r' / 'summary.json').unlink()
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps({**config, 'members': '3'}))
    with pytest.raises(te.EnsembleError, match="'members' is \"3\", not int"):
        te.config_to_resume(tmp_path / 'r')


def test_training_refuses_a_folder_of_member_files_without_config_json_and_force_cannot_eat_its_init(tmp_path):
    run(tmp_path, 'old', **{**TINY_MLP, 'epochs': 1, 'members': 2})
    (tmp_path / 'old' / 'config.json').unlink()   # an unknown run: training beside it would contradict it
    before = snapshot(tmp_path / 'old')
    args = ['--dataset', 'synthetic', '--arch', 'mlp', '--hidden', '32', '--examples', '256', '--epochs', '1']
    without_force = CliRunner().invoke(train_cli(), args + ['--out', str(tmp_path / 'old')])
    for result in without_force, train_again(tmp_path / 'old'):
        assert result.exit_code == 2 and 'no config.json' in result.output, result.output
        assert snapshot(tmp_path / 'old') == before
    run(tmp_path, 'base', **{**TINY_MLP, 'epochs': 1})
    result = train_again(tmp_path / 'base', '--init', tmp_path / 'base' / 'member_0.safetensors')
    assert result.exit_code == 2 and '--init' in result.output and (tmp_path / 'base' / 'member_0.safetensors').exists()
