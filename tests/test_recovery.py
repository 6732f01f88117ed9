"""Nothing lost: a training run killed (SIGKILL) just before or just after any of its file writes is
finished by --resume, with the weights of a run that was never interrupted and no temporary left."""
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from test_train_ensemble import cli, member_states, run

OPTIONS = dict(dataset='synthetic', arch='mlp', hidden=[16], subset=256, batch_size=64, epochs=3, members=2, beta=0.5)
ARGS = ['--dataset', 'synthetic', '--arch', 'mlp', '--hidden', '16', '--subset', '256', '--batch-size', '64',
        '--epochs', '3', '--members', '2', '--beta', '0.5', '--device', 'cpu']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('straight') / 'run'
    run(out.parent, 'run', **OPTIONS)
    return member_states(out)


@pytest.mark.parametrize('kill_at', [
    'config.json:after:1',            # nothing trained yet
    'metrics.jsonl:before:1',         # epoch 0 done, nothing of it written
    'state.safetensors:before:1',     # epoch 0's row written, its state not
    'state.safetensors:after:2',      # between epochs
    'metrics.jsonl:after:3',          # the last epoch's row, not its state
    'state.safetensors:after:3',      # trained, no member written
    'member_0.safetensors:after:1',   # half the members written
    'summary.json:before:1',          # everything but the summary
])
def test_a_run_killed_at_any_write_is_finished_by_resume(tmp_path, uninterrupted, kill_at):
    out = tmp_path / 'run'
    env = dict(os.environ, TRAIN_ENSEMBLE_KILL_AT=kill_at, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    killed = subprocess.run([sys.executable, 'train_ensemble.py', *ARGS, '--out', str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / 'summary.json').exists()
    result = CliRunner().invoke(cli(), ['--resume', str(out)])
    assert result.exit_code == 0, result.output
    for a, b in zip(uninterrupted, member_states(out)):
        assert all(torch.equal(a[key], b[key]) for key in a), kill_at
    assert len(member_states(out)) == 2 and not list(out.glob('.*tmp*'))


def test_a_run_killed_before_its_config_is_written_is_started_again_by_its_own_command(tmp_path):
    out = tmp_path / 'run'
    env = dict(os.environ, TRAIN_ENSEMBLE_KILL_AT='config.json:before:1')
    killed = subprocess.run([sys.executable, 'train_ensemble.py', *ARGS, '--out', str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and not (out / 'config.json').exists()
    result = CliRunner().invoke(cli(), ['--resume', str(out)])
    assert result.exit_code == 2 and 'run the original command again' in result.output
    result = CliRunner().invoke(cli(), [*ARGS, '--out', str(out)])
    assert result.exit_code == 0, result.output
    assert (out / 'summary.json').exists() and not list(out.glob('.*tmp*'))


@pytest.mark.parametrize('delay', [2.2, 2.9, 3.6])
def test_a_run_killed_at_a_moment_of_no_particular_meaning_is_finished_too(tmp_path, uninterrupted, delay):
    """SIGKILL after a fixed delay, wherever that lands (start-up, an epoch, a write): the run's own
    command (if it had written nothing) or --resume ends with the uninterrupted weights."""
    import signal
    import time
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, 'train_ensemble.py', *ARGS, '--out', str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    if (out / 'summary.json').exists():
        pass   # it finished before the kill
    elif (out / 'config.json').exists():
        assert CliRunner().invoke(cli(), ['--resume', str(out)]).exit_code == 0
    else:
        assert CliRunner().invoke(cli(), [*ARGS, '--out', str(out)]).exit_code == 0
    for a, b in zip(uninterrupted, member_states(out)):
        assert all(torch.equal(a[key], b[key]) for key in a), delay
    assert not list(out.glob('.*tmp*'))
