"""Your own model and data: train(cfg, model=make_member, data=(x_train, y_train, x_test, y_test)) trains M
members of any nn.Module on any tensors with the same β objective, and writes the same run directory.
At β = 0 each member trains exactly as it would alone, vectorized (torch.func) or in a loop."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import train_ensemble as te
from test_train_ensemble import quiet_console


class TinyNet(nn.Module):
    """A user's classifier with BatchNorm and dropout (vmap runs both: stacked running statistics)."""

    def __init__(self, features=20, classes=4, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(features, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        return self.out(self.drop(F.relu(self.bn(self.fc(x)))))


class BranchyNet(TinyNet):
    """Data-dependent control flow, which vmap cannot run: the members go in a loop."""

    def forward(self, x):
        h = F.relu(self.bn(self.fc(x)))
        if h.mean() > 10:   # never true; vmap refuses the branch on a tensor's value anyway
            h = h * 0
        return self.out(h)


def blobs(n=600, features=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    return x[:500], y[:500], x[500:], y[500:]


OPTIONS = dict(epochs=2, batch_size=50, device='cpu')


def train(tmp_path, name, model, data=None, **options):
    cfg = te.Config(out=str(tmp_path / name), **{**OPTIONS, **options})
    return te.train(cfg, console=quiet_console(), model=model, data=data or blobs())


@pytest.mark.parametrize('net', [TinyNet, BranchyNet])
def test_at_beta0_each_own_member_trains_exactly_as_if_alone(tmp_path, net, float64):
    """To float64 precision (in float32, SIMD lanes round a stacked tensor's members differently)."""
    data = tuple(t.double() if t.is_floating_point() else t for t in blobs())
    summary = train(tmp_path, 'together', lambda seed: net(), data, members=3, seed=10)
    config = te.read_config(tmp_path / 'together')
    assert config['arch'] == 'own' and config['dataset'] == 'tensors'
    assert config['model']['vectorized'] == (net is TinyNet)
    for j in range(3):   # the same data order (data_seed), member j's own start (seed)
        train(tmp_path, f'alone{j}', lambda seed: net(), data, members=1, seed=10 + j, data_seed=10)
        together = load_file(tmp_path / 'together' / f'member_{j}.safetensors')
        alone = load_file(tmp_path / f'alone{j}' / 'member_0.safetensors')
        assert together.keys() == alone.keys()
        for key in alone:
            assert torch.allclose(together[key], alone[key], atol=1e-12, rtol=0), (j, key)
    assert summary['test_acc'] > 0.6   # chance is 0.25


def test_own_members_reload_into_the_users_module_and_joint_training_inflates_diversity(tmp_path):
    data = blobs()
    independent = train(tmp_path, 'b0', lambda seed: TinyNet(dropout=0.1), data, members=3, beta=0.0, epochs=4)
    joint = train(tmp_path, 'b1', lambda seed: TinyNet(dropout=0.1), data, members=3, beta=1.0, epochs=4)
    assert te.read_config(tmp_path / 'b1')['model']['vectorized']   # dropout and BatchNorm under vmap
    assert joint['test_div'] > independent['test_div']
    members = []
    for j in range(3):
        member = TinyNet()
        member.load_state_dict(load_file(tmp_path / 'b1' / f'member_{j}.safetensors'))
        members.append(member.eval())
    with torch.no_grad():
        logits = torch.stack([m(data[2]) for m in members])
    ensemble = te.ensemble_metrics(logits, data[3], 'prob')
    assert ensemble['acc'] == pytest.approx(joint['test_acc']) and ensemble['loss'] == pytest.approx(joint['test_loss'])
    with pytest.raises(te.EnsembleError, match='make_member'):   # the toolkit cannot rebuild your module itself
        te.load_member(tmp_path / 'b1' / 'member_0.safetensors')


def test_own_regression_and_bad_data_are_checked(tmp_path):
    x, _, x_test, _ = blobs()
    w = torch.randn(20, 2, generator=torch.Generator().manual_seed(1))
    summary = train(tmp_path, 'reg', lambda seed: nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)),
                    (x, x @ w, x_test, x_test @ w), task='regression', members=2, epochs=6)
    assert summary['test_rmse'] < float((x_test @ w).std())   # it learned something
    with pytest.raises(te.EnsembleError, match='integer labels'):
        train(tmp_path, 'bad', lambda seed: TinyNet(), (x, x[:, 0], x_test, x_test[:, 0]))
    with pytest.raises(te.EnsembleError, match='nn.Module'):
        train(tmp_path, 'bad2', lambda seed: 'not a module')
    with pytest.raises(te.EnsembleError, match='spectral'):
        train(tmp_path, 'bad3', lambda seed: TinyNet(), optimizer='muon')


def test_a_users_cnn_learns_fashion_mnist(tmp_path, fashion_mnist):
    data = te.load_data(fashion_mnist, subset=3000)

    def small_cnn(seed):
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(64, 10))

    summary = train(tmp_path, 'cnn', small_cnn, (data.x_train, data.y_train, data.x_test, data.y_test),
                    members=2, epochs=4, batch_size=32, lr=3e-3)
    assert summary['test_acc'] > 0.65 and min(summary['member_test_acc']) > 0.6   # chance is 0.1


def test_a_run_of_your_own_module_is_skipped_by_merge_and_read_from_its_summary_by_compare(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import analyze
    import rebasin
    monkeypatch.chdir(tmp_path)
    train(tmp_path / 'runs', 'mine', lambda seed: TinyNet(), members=2, epochs=1)
    for seed in (0, 1):
        te.train(te.Config(dataset='synthetic', arch='mlp', hidden=[16], subset=128, epochs=1, seed=seed,
                           out=f'runs/mlp{seed}', device='cpu'), console=quiet_console())
    runs = sorted(f'runs/{p.name}' for p in (tmp_path / 'runs').iterdir())
    merged = CliRunner().invoke(rebasin.make_app(), ['merge', *runs, '--no-eval'])
    assert merged.exit_code == 0 and 'skipped runs/mine: a run of your own module' in merged.output, merged.output
    compared = CliRunner().invoke(analyze.make_app(), ['compare', *runs])
    assert compared.exit_code == 0 and 'mine' in compared.output, compared.output
