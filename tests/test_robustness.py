"""Robustness under shift: the corruptions are what CIFAR-10-C's are (severity orders them, a seed fixes
them, images stay uint8 images), the official files are read without pickle, and an ensemble's accuracy
falls under corruption."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import analyze
import train_ensemble as te
from conftest import FASHION_MNIST
from test_train_ensemble import quiet_console


@pytest.fixture(scope='module')
def images():
    """300 Fashion-MNIST test images (one channel) and 300 synthetic CIFAR-shaped ones (three)."""
    if not (FASHION_MNIST / 'train-images-idx3-ubyte.gz').exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)')
    return dict(gray=te.load_data('fashion-mnist', subset=300).x_test,
                colour=te.load_data('synthetic', subset=300).x_test)


@pytest.mark.parametrize('name', analyze.CORRUPTIONS)
def test_a_corruption_is_deterministic_keeps_uint8_images_and_grows_with_severity(name, images):
    for kind, x in images.items():
        if name == 'saturate' and kind == 'gray':
            with pytest.raises(te.EnsembleError, match='3-channel'):
                analyze.corrupt(x, name, 1)
            continue
        out = {s: analyze.corrupt(x, name, s, torch.Generator().manual_seed(7)) for s in (1, 5)}
        again = analyze.corrupt(x, name, 1, torch.Generator().manual_seed(7))
        assert torch.equal(out[1], again)
        for y in out.values():
            assert y.dtype == torch.uint8 and y.shape == x.shape
        distance = {s: (y.float() - x.float()).abs().mean().item() for s, y in out.items()}
        assert distance[1] > 0, (name, kind)
        if name != 'elastic_transform':   # its published constants shrink the affine jitter as severity grows
            assert distance[1] < distance[5], (name, kind, distance)


def test_bad_corruption_requests_are_refused(images):
    x = images['colour']
    for args, message in [(('fog', 1), 'unknown corruption'), (('contrast', 6), 'severity'),
                          (('contrast', 1), 'uint8')]:
        with pytest.raises(te.EnsembleError, match=message):
            analyze.corrupt(x.float() if message == 'uint8' else x, *args)


def test_severities_are_written_as_every_list_here_is():
    for text, levels in (('1-5', [1, 2, 3, 4, 5]), ('all', [1, 2, 3, 4, 5]), ('3', [3]), ('1,3,5', [1, 3, 5]),
                         ('4,1-2', [1, 2, 4])):
        assert analyze._severities(text) == levels, text
    for text in ('0-9', '6', 'x', ','):
        with pytest.raises(te.EnsembleError, match='--severities'):
            analyze._severities(text)


def test_the_official_files_are_read_by_severity_without_pickle(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5 * 4, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / 'contrast.npy', x)
    np.save(tmp_path / 'labels.npy', np.arange(20) % 10)
    images, labels = analyze.corrupted_files(tmp_path, 'contrast', 3)
    assert torch.equal(images, torch.from_numpy(x[8:12]).permute(0, 3, 1, 2))
    assert labels.tolist() == [8, 9, 0, 1]
    np.save(tmp_path / 'fog.npy', np.array([{'a': 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(te.EnsembleError, match='not a plain numpy array'):
        analyze.corrupted_files(tmp_path, 'fog', 1)
    with pytest.raises(te.EnsembleError, match='does not exist'):
        analyze.corrupted_files(tmp_path, 'snow', 1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A quick two-member MLP ensemble on 3,000 Fashion-MNIST images."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    te.train(te.Config(out=str(out), dataset='fashion-mnist', arch='mlp', hidden=[64], members=2, subset=3000,
                       epochs=2, device='cpu'), console=quiet_console())
    return out


def test_an_ensembles_accuracy_falls_under_corruption_and_the_command_writes_table_json_and_plot(tmp_path, trained):
    tmp_path.joinpath('run').symlink_to(trained, target_is_directory=True)
    result = CliRunner().invoke(analyze.app, ['robustness', str(tmp_path / 'run'), '--corruptions',
                                              'gaussian_noise,contrast,motion_blur', '--severities', '1-5',
                                              '--plot', str(tmp_path / 'r.png'), '--json', str(tmp_path / 'r.json')])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / 'r.json').read_text())
    acc = lambda name, s: next(x for x in r['corrupted'][name] if x['severity'] == s)['ensemble']['acc']  # noqa: E731
    for name in ('gaussian_noise', 'contrast', 'motion_blur'):
        assert acc(name, 5) < r['clean']['ensemble']['acc'], name
        assert acc(name, 5) <= acc(name, 1), name
    assert r['summary']['ensemble']['mean_corrupted_acc'] < r['summary']['ensemble']['clean_acc']
    assert (tmp_path / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    bad = CliRunner().invoke(analyze.app, ['robustness', str(tmp_path / 'run'), '--severities', '0-9'])
    assert bad.exit_code == 2 and '1-5' in bad.output


def test_detection_metrics_are_the_mann_whitney_statistic_and_its_companions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.7
    pairs = (b.view(-1, 1) > a.view(1, -1)).double() + 0.5 * (b.view(-1, 1) == a.view(1, -1)).double()
    assert analyze.auroc(a, b) == pytest.approx(float(pairs.mean()), abs=1e-12)
    ties = torch.tensor([0.0, 1.0, 1.0, 2.0])
    assert analyze.auroc(ties, ties) == 0.5 and analyze.auroc(a, a + 100) == 1.0 and analyze.auroc(a + 100, a) == 0.0
    assert analyze.aupr(a, a + 100) == 1.0 and analyze.fpr_at_tpr(a, a + 100) == 0.0
    assert analyze.fpr_at_tpr(a, a) == pytest.approx(0.95, abs=0.01)


def test_an_ensemble_tells_its_test_set_from_upside_down_inverted_clothes(tmp_path, trained):
    data = te.load_data('fashion-mnist', subset=3000)
    flipped = lambda x: (255 - x.flip(-2)).numpy()  # noqa: E731
    np.savez(tmp_path / 'upside_down.npz', x_train=flipped(data.x_train), y_train=data.y_train.numpy(),
             x_test=flipped(data.x_test), y_test=data.y_test.numpy())
    result = CliRunner().invoke(analyze.app, ['ood', str(trained), '--ood', str(tmp_path / 'upside_down.npz'),
                                              '--plot', str(tmp_path / 'ood.png'),
                                              '--json', str(tmp_path / 'ood.json')])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / 'ood.json').read_text())['scores']
    assert set(scores) == {'max_prob', 'entropy', 'mutual_information'}
    assert all(s['auroc'] > 0.5 for s in scores.values()), scores
    assert (tmp_path / 'ood.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    bad = CliRunner().invoke(analyze.app, ['ood', str(trained), '--ood', 'synthetic'])
    assert bad.exit_code == 2 and 'shape' in bad.output
    # The β-sweep table with its shifted columns.
    result = CliRunner().invoke(analyze.app, ['compare', str(trained), '--shifted',
                                              '--ood', str(tmp_path / 'upside_down.npz'),
                                              '--examples', '300', '--json', str(tmp_path / 'compare.json'),
                                              '--plot', str(tmp_path / 'compare.png')])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / 'compare.json').read_text())['runs'][0]
    assert 0 < row['corrupted_acc'] < row['test_acc'] and row['ood_auroc_mutual_information'] > 0.5
    assert (tmp_path / 'compare.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
