"""SPEC: every script runs as `python SCRIPT.py --help` and documents its commands (run in-process, as
__main__, with runpy: the same code path as the command line, without a new interpreter per script)."""
import runpy
import sys

import pytest

from conftest import ROOT

EXPECTED = {
    'train_ensemble.py': ('--beta', '--members', '--precision', '--channels-last', '--resume'),
    'rebasin.py': ('spec', 'align', 'merge'),
    'analyze.py': ('evaluate', 'compare', 'debias', 'drop', 'interpolate', 'sharpness'),
    'spectral.py': ('report', 'coord-check', 'lr-sweep'),
}


@pytest.mark.parametrize('script', sorted(EXPECTED))
def test_the_script_runs_as_a_command_and_lists_what_it_offers(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    monkeypatch.setenv('COLUMNS', '200')   # one line per option, whatever the terminal
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name='__main__')
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None), out
    missing = [word for word in EXPECTED[script] if word not in out]
    assert not missing, (missing, out)
