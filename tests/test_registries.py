"""Every entry of every registry keeps the claims its kind makes, so a new entry is checked with no new
test: each architecture (train_ensemble.ARCHS) trains its members at β = 0 exactly as alone, and a planted
permutation of it computes the same function and is undone by weight matching; each metric
(analyze.PREDICTOR_METRICS, ENSEMBLE_METRICS) is a finite number that depends on the examples and
members as a set, and is in the report evaluate and the JSON show. The combiners
(tests/test_train_ensemble.py) and merge methods (tests/test_rebasin_cli.py) are parametrized over their
registries the same way."""

import pytest
import torch

import analyze
import rebasin
import train_ensemble as te
from test_train_ensemble import member_states, run


def tiny(name):
    return dict(dataset='synthetic', arch=name, subset=64, batch_size=32, epochs=1, **te.ARCHS[name].tiny)


@pytest.mark.parametrize('name', te.ARCHS)
def test_every_architecture_trains_its_members_at_beta0_as_if_alone(tmp_path, name, float64):
    run(tmp_path, 'together', members=2, beta=0.0, seed=10, **tiny(name))
    together = member_states(tmp_path / 'together')
    for j in range(2):
        run(tmp_path, f'alone{j}', members=1, seed=10 + j, data_seed=10, **tiny(name))
        alone = member_states(tmp_path / f'alone{j}')[0]
        for key in alone:
            assert torch.allclose(together[j][key], alone[key], atol=1e-10, rtol=0), (name, j, key)


@pytest.mark.parametrize('name', te.ARCHS)
def test_every_architecture_is_the_same_function_permuted_and_weight_matching_undoes_it(name):
    cfg = te.resolve_config(te.Config(**tiny(name)))
    data = te.load_data('synthetic', subset=64)
    spec = te.model_spec(cfg, data)
    net = te.init_member(spec, 0, data.x_train)
    with torch.no_grad():   # break exact ties (identity inits) so that one permutation is the best
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = te.to_float_images(data.x_test[:8])
    pspec = rebasin.permutation_spec(net, x[:1])
    params = {k: v.clone() for k, v in net.state_dict().items()}
    planted = rebasin.apply_permutation(pspec, rebasin.random_permutation(pspec, seed=3), params)
    twin = te.build_model(spec)
    twin.load_state_dict(planted)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), net.eval()(x), rtol=1e-4, atol=1e-5)
    perm = rebasin.weight_matching(pspec, params, planted)
    restored = rebasin.apply_permutation(pspec, perm, planted)
    assert all(torch.equal(restored[k], v) for k, v in params.items()), name


def random_logits(members=3, n=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(members, n, classes, generator=g, dtype=torch.float64), torch.randint(classes, (n,),
                                                                                                  generator=g)


@pytest.mark.parametrize('metric', analyze.ENSEMBLE_METRICS, ids=lambda m: m.key)
def test_every_ensemble_metric_is_finite_depends_on_members_and_examples_as_sets_and_is_reported(metric):
    z, y = random_logits()
    value = metric.function(z, y, 'prob')
    assert isinstance(value, float) and torch.isfinite(torch.tensor(value))
    members, examples = torch.tensor([2, 0, 1]), torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    assert metric.function(z[members][:, examples], y[examples], 'prob') == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert analyze.ensemble_report(z, y, 'prob')[metric.key] == pytest.approx(value, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize('metric', analyze.PREDICTOR_METRICS, ids=lambda m: m.key)
def test_every_predictor_metric_is_finite_depends_on_the_examples_as_a_set_and_is_reported(metric):
    z, y = random_logits(members=1)
    log_p = torch.log_softmax(z[0], -1)
    value = metric.function(log_p, y, analyze.ECE_BINS)
    assert torch.isfinite(torch.tensor(float(value)))
    examples = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    assert metric.function(log_p[examples], y[examples], analyze.ECE_BINS) == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert analyze.ensemble_report(z, y, 'prob')['members'][0][metric.key] == pytest.approx(value, rel=1e-12, abs=1e-15)
