"""Merges beyond weight matching (issue 24): zipping two identical models returns that model; zipping a
model with a permuted copy of itself returns the same function (through BatchNorm and residual streams);
a partial zip at K = 0 is the two models' ensemble; learned matching never ends with a higher training
loss of the midpoint than its weight-matching start; `merge --method zip` writes an ordinary run
directory; experiments/merging.py runs end to end at its smoke size."""
import itertools
import json
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import rebasin
import train_ensemble as te
from conftest import ROOT


def model_spec(arch, **overrides):
    spec = dict(arch=arch, in_channels=3, image_size=16, num_classes=10, width=0.25, kernel_size=3,
                hidden=[32, 16], mean=[0.5] * 3, std=[0.25] * 3)
    return {**spec, **overrides}


def inputs(spec, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, spec['in_channels'], spec['image_size'], spec['image_size'], generator=g)


def setup(arch, seed=0, **overrides):
    """(module builder, permutation spec, a state whose BatchNorm statistics are those of the batches, batches)."""
    spec = model_spec(arch, **overrides)
    x = inputs(spec)
    batches = [x[:32], x[32:]]

    def module(state):
        net = te.build_model(spec)
        net.load_state_dict(state)
        return net.eval()

    net = te.init_member(spec, seed, (x * 255).to(torch.uint8)).eval()
    perm_spec = rebasin.permutation_spec(net, x[:1])
    state = net.state_dict()
    if rebasin._batchnorms(net):   # statistics of these very batches: recomputing them changes nothing
        state = rebasin.reset_bn(net, batches)
    return module, perm_spec, state, batches


def same_function(module, a, b, x):
    with torch.no_grad():
        return torch.allclose(module(a)(x), module(b)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('arch', ['mlp', 'airbench', 'resnet18'])
def test_zipping_a_model_with_itself_or_a_permuted_copy_returns_the_same_function(arch):
    module, spec, state, batches = setup(arch)
    x = inputs(model_spec(arch), 16, seed=1)
    copy = rebasin.apply_permutation(spec, rebasin.random_permutation(spec, seed=3), state)
    for other in (state, copy):
        merged, mats, _ = rebasin.zip_models(spec, [state, other], module, batches, device='cpu')
        assert same_function(module, merged, state, x), arch
        assert all(len(m) == spec.perms[p] for p, (m, _) in mats.items())   # n clusters of 2n channels


def test_zipping_two_identical_models_returns_that_model_for_every_alpha_beta_and_within():
    module, spec, state, batches = setup('mlp')
    x = inputs(model_spec('mlp'), 16, seed=1)
    corr = rebasin.feature_correlations(spec, [module(state), module(state)], batches, 'cpu')
    for within, alpha, beta in itertools.product((0.5, 1.0), (0.0, 1e-4, 0.3, 1.0), (0.0, 0.125, 1.0)):
        merged = rebasin.zip_models(spec, [state, state], module, batches, alpha, 'cpu', beta=beta, within=within,
                                    corr=corr)[0]
        assert same_function(module, merged, state, x), (within, alpha, beta)


@pytest.mark.parametrize('models', [3, 4])
def test_zipping_three_or_more_models_makes_n_clusters_of_every_channel_when_budgets_and_bars_run_out(models):
    # With β = 0 or α = 0 the greedy matching can leave no allowed pair before n clusters remain: the rest
    # join by complete linkage, each channel in exactly one cluster (a self-merge once crashed the zip).
    n = 12
    corr = torch.corrcoef(torch.randn(200, models * n, generator=torch.Generator().manual_seed(models)).T)
    for alpha, beta in itertools.product((0.0, 1e-4, 0.3, 1.0), (None, 0.0, 0.125, 1.0)):
        clusters = rebasin.zip_clusters(corr, models, alpha, beta, within=1.0)
        assert len(clusters) == n and sorted(sum(clusters, [])) == list(range(models * n)), (alpha, beta)
    module, spec, state, batches = setup('mlp')
    merged = rebasin.zip_models(spec, [state] * models, module, batches, 0.0, 'cpu', beta=0.0)[0]
    assert same_function(module, merged, state, inputs(model_spec('mlp'), 16, seed=1))


@pytest.mark.parametrize('within', [0.5, 1.0])
def test_zip_at_alpha_0_and_beta_0_is_the_permutation_average_of_its_greedy_cross_model_pairs(within):
    """β = 0: no merge within a model; α = 0: a merged pair merges no more. What is left is a permutation of
    B onto A (ZipIt's greedy pairing across models), averaged: weight averaging after activation-style matching."""
    module, spec, a, batches = setup('mlp')
    _, _, b, _ = setup('mlp', seed=1)
    x = inputs(model_spec('mlp'), 16, seed=1)
    merged, mats, corr = rebasin.zip_models(spec, [a, b], module, batches, 0.0, 'cpu', bn=False, beta=0.0,
                                            within=within)
    n = {p: c.shape[0] // 2 for p, c in corr.items()}
    assert all(torch.equal((m[:, :n[p]] > 0).sum(1), (m[:, n[p]:] > 0).sum(1)) for p, (m, _) in mats.items())
    perms = rebasin._zip_permutations(spec, corr, 2)
    average = rebasin.average([rebasin.apply_permutation(spec, q, p) for q, p in zip(perms, [a, b])])
    assert same_function(module, merged, average, x)
    assert not same_function(module, merged, a, x)


def test_tune_zip_is_given_only_held_out_training_tensors_and_returns_a_point_of_its_grid():
    module, spec, a, batches = setup('mlp')
    _, _, b, _ = setup('mlp', seed=1)
    x_held = inputs(model_spec('mlp'), 48, seed=2)   # images neither the models nor the correlations saw
    y_held = torch.randint(10, (48,), generator=torch.Generator().manual_seed(0))
    grid = dict(within=(1.0,), alpha=(0.1, 1.0), beta=(0.0, 1.0))
    for k in (None, 1):
        point, accuracy, scores = rebasin.tune_zip(spec, [a, b], module, batches, x_held, y_held, grid, k, 'cpu')
        assert [p for p, _ in scores] == [dict(within=1.0, alpha=al, beta=be) for al in (0.1, 1.0) for be in (0.0, 1.0)]
        assert point in [p for p, _ in scores] and accuracy == max(acc for _, acc in scores)
        if k is None:   # the score is the zipped model's accuracy on the held-out images
            merged = rebasin.zip_models(spec, [a, b], module, batches, device='cpu', **point)[0]
            assert accuracy == rebasin.held_out_accuracy(module, [merged], x_held, y_held)


def test_a_partial_zip_at_k_0_is_the_ensemble_and_at_every_k_of_identical_models_is_the_model():
    module, spec, a, batches = setup('mlp')
    _, _, b, _ = setup('mlp', seed=1)
    x = inputs(model_spec('mlp'), 16, seed=1)
    branches, shared = rebasin.partial_zip(spec, [a, b], 0, module, batches, device='cpu')
    assert shared == [] and same_function(module, branches[0], a, x) and same_function(module, branches[1], b, x)
    for k in range(len(spec.perms) + 1):
        branches, shared = rebasin.partial_zip(spec, [a, a], k, module, batches, device='cpu')
        assert all(same_function(module, branch, a, x) for branch in branches), k
        assert all(torch.equal(branches[0][key], branches[1][key]) for key in shared)
    every = ', '.join(map(str, range(len(spec.perms) + 1)))
    with pytest.raises(rebasin.RebasinError, match=f'is not one of the .* permutation groups; use one of {every}$'):
        rebasin.partial_zip(spec, [a, b], len(spec.perms) + 1, module, batches, device='cpu')


def test_a_partial_zip_that_cuts_a_residual_stream_is_refused_in_one_line():
    module, spec, state, batches = setup('resnet18')
    with pytest.raises(rebasin.RebasinError, match='--partial 1 cuts a residual stream .*; use one of 0, 3, 4, 6,'):
        rebasin.partial_zip(spec, [state, state], 1, module, batches, device='cpu')


def test_zipping_refuses_a_vit_with_a_reason():
    spec = dict(model_spec('vit'), depth=1, heads=2, patch_size=4, width=0.5)
    net = te.build_model(spec)
    x = inputs(spec, 4)
    with pytest.raises(rebasin.RebasinError, match='attention heads'):
        rebasin.zip_models(rebasin.permutation_spec(net, x[:1]), [net.state_dict()] * 2, lambda s: net, [x])


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """Two small MLPs trained on the same synthetic data (a second each)."""
    root = tmp_path_factory.mktemp('pair')
    for seed in range(2):
        cfg = te.Config(dataset='synthetic', arch='mlp', hidden=[32, 32], subset=512, batch_size=64, epochs=3,
                        device='cpu', seed=seed, data_seed=0, out=str(root / f'mlp_s{seed}'))
        te.train(cfg, console=Console(quiet=True))
    return root


def test_learned_matching_never_ends_with_a_higher_midpoint_training_loss_than_weight_matching(pair):
    (spec_a, a, _), (_, b, _) = (te.load_member_state(pair / f'mlp_s{s}' / 'member_0.safetensors') for s in (0, 1))
    data = te.load_run_data(te.read_config(pair / 'mlp_s0'))
    x, y = te.to_float_images(data.x_train[:256]), data.y_train[:256]
    batches, targets = list(x.split(64)), list(y.split(64))

    def module(state):
        net = te.build_model(spec_a)
        net.load_state_dict(state)
        return net.eval()

    spec = rebasin.permutation_spec(module(a), x[:1])

    def midpoint_loss(perm):
        with torch.no_grad():
            return float(F.cross_entropy(module(rebasin.average([a, rebasin.apply_permutation(spec, perm, b)]))(x), y))

    start = midpoint_loss(rebasin.weight_matching(spec, a, b))
    runs = [rebasin.ste_matching(spec, [a, b], module, batches, targets, steps=30, lr=lr, seed=0, device='cpu')
            for lr in (1e-3, 3e-2)]
    assert all(midpoint_loss(perms[1]) <= start for perms in runs)
    again = rebasin.ste_matching(spec, [a, b], module, batches, targets, steps=30, lr=1e-3, seed=0, device='cpu')
    assert all(torch.equal(again[1][p], runs[0][1][p]) for p in spec.perms)   # deterministic for a seed


def test_merge_zip_writes_a_run_whose_member_gives_the_zipped_model_and_a_partial_zip_an_ensemble(pair, tmp_path):
    from typer.testing import CliRunner
    sources = [str(pair / f'mlp_s{s}') for s in (0, 1)]

    def cli(*args):
        result = CliRunner().invoke(rebasin.make_app(), [*map(str, args)])
        assert result.exit_code == 0, result.output
        return te.read_config(args[args.index('--out') + 1])

    config = cli('merge', *sources, '--method', 'zip', '--examples', 256, '--test-examples', 200, '--out',
                 tmp_path / 'zip', '--device', 'cpu')
    net = te.load_member(tmp_path / 'zip' / 'member_0.safetensors')
    data = te.load_run_data(config)
    logits = te.predict_logits([net], data.x_test[:200], tta=bool(te.read_config(sources[0]).get('tta')))
    accuracy = float((logits[0].argmax(1) == data.y_test[:200]).float().mean())
    assert accuracy == pytest.approx(config['evaluation']['test_acc'])   # the recorded accuracy is this model's
    config = cli('merge', *sources, '--method', 'zip', '--partial', 0, '--examples', 256, '--out', tmp_path / 'p0',
                 '--device', 'cpu')
    e = config['evaluation']
    assert config['partial'] == 0 and e['test_acc'] == pytest.approx(e['source_ensemble_test_acc'])
    assert config['parameters'] == 2 * config['parameters_per_model']
    net = te.load_member(tmp_path / 'p0' / 'member_0.safetensors')   # the partially zipped model itself
    x = data.x_test[:e['examples']]   # no TTA: averaging views before or after the branches differs slightly
    logits = te.predict_logits([net], x)
    ensemble = te.predict_logits([te.load_member(te.member_paths(s)[0]) for s in sources], x)
    # K = 0 zips nothing: the sources' ensemble, up to the statistics the merge recomputes
    torch.testing.assert_close(logits[0].log_softmax(-1), te.combine(ensemble, 'prob'), rtol=0, atol=2e-2)
    result = CliRunner().invoke(rebasin.make_app(), ['merge', *sources, '--partial', '1', '--out', str(tmp_path / 'w')])
    assert result.exit_code == 2 and 'needs --method zip' in result.output


def test_merging_experiment_quick_writes_its_tables_and_figures(tmp_path, monkeypatch, fashion_mnist):
    out = tmp_path / 'merging'
    monkeypatch.setattr(sys, 'argv', ['merging.py', '--quick', '--out', str(out), '--device', 'cpu'])
    try:
        runpy.run_path(str(ROOT / 'experiments' / 'merging.py'), run_name='__main__')
    except SystemExit as e:
        assert e.code in (0, None)
    results = json.loads((out / 'results.json').read_text())
    table = (out / 'results.md').read_text()
    for method in ('naive', 'weight', 'activation', 'ste', 'zip'):
        assert f'| {method} |' in table
    assert set(results) >= {'settings', 'same_task', 'many_models'}
    for png in out.glob('*.png'):
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert len(list(out.glob('*.png'))) >= 2
