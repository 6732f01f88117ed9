"""The GPU code paths, run on a CPU: mixed precision, channels_last, torch.compile and the one-gather
augmentation execute here exactly as they do on a GPU (only the device differs)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train_ensemble as te
from test_train_ensemble import member_states, run

SMALL_MLP = dict(dataset='synthetic', arch='mlp', hidden=[64], subset=2048, batch_size=64, epochs=3)


def reference_augment(images, flip, shifts, pad):
    """airbench's augmentation written the slow, obvious way: mirror, reflect-pad, crop; image by image."""
    out = []
    for x, f, (dy, dx) in zip(images, flip, shifts.T.tolist()):
        x = x.flip(-1) if f else x
        x = F.pad(x[None], (pad,) * 4, mode='reflect')[0]
        out.append(x[:, dy:dy + images.size(2), dx:dx + images.size(3)])
    return torch.stack(out)


@pytest.mark.parametrize('channels_last', [False, True])
def test_one_gather_augmentation_is_mirror_then_padded_crop(channels_last):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(50, 3, 8, 8, generator=g)
    idx = torch.randperm(50, generator=g)[:20]
    flip = torch.rand(20, generator=g) < 0.5
    shifts = torch.randint(0, 5, (2, 20), generator=g)
    padded = F.pad(images, (2,) * 4, mode='reflect')
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    out = te.augment_batch(padded, idx, flip, shifts, (8, 8))
    assert torch.equal(out, reference_augment(images[idx], flip, shifts, 2))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_channels_last_gives_the_same_logits_as_contiguous():
    torch.manual_seed(0)
    spec = dict(arch='airbench', in_channels=3, image_size=32, num_classes=10, width=1 / 8, kernel_size=3,
                hidden=[], mean=[0.5] * 3, std=[0.25] * 3)
    net = te.build_model(spec, members=3)
    fast = te.build_model(spec, members=3)
    fast.load_state_dict(net.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.rand(16, 3, 32, 32)
    for mode in ('train', 'eval'):
        getattr(net, mode)(), getattr(fast, mode)()
        expected = te.member_logits(net, x, 3)
        got = te.member_logits(fast, x.contiguous(memory_format=torch.channels_last), 3)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), mode


def test_mixed_precision_training_learns_and_ends_near_fp32(tmp_path):
    """bf16 and fp16 autocast on a CPU, as on a GPU: the loss falls, every number is finite, the final
    test loss is within 0.01 of the fp32 run's (measured: 0.0006 for bf16, 0.0002 for fp16), and the
    checkpoints hold fp32 weights."""
    fp32 = run(tmp_path, 'fp32', members=2, beta=1.0, precision='fp32', **SMALL_MLP)
    for precision in ('bf16', 'fp16'):
        mixed = run(tmp_path, precision, members=2, beta=1.0, precision=precision, **SMALL_MLP)
        lines = [json.loads(line) for line in (tmp_path / precision / 'metrics.jsonl').read_text().splitlines()]
        assert lines[-1]['train_loss'] < lines[0]['train_loss'] < math.log(10)
        assert all(math.isfinite(v) for line in lines for v in line.values() if isinstance(v, float))
        assert abs(mixed['test_loss'] - fp32['test_loss']) < 0.01
        assert abs(mixed['test_acc'] - fp32['test_acc']) < 0.02
        config = json.loads((tmp_path / precision / 'config.json').read_text())
        assert config['precision'] == precision and config['channels_last'] is False   # resolved values recorded
        assert all(t.dtype == torch.float32 for t in load_file(tmp_path / precision / 'member_0.safetensors').values()
                   if t.is_floating_point())


def test_auto_precision_and_layout_resolve_per_device():
    cpu = te.resolve_config(te.Config(device='cpu', dataset='synthetic'))
    assert (cpu.precision, cpu.channels_last) == ('fp32', False)
    assert te.resolve_precision('auto', torch.device('cuda')) == 'bf16'
    with pytest.raises(te.EnsembleError, match='unknown precision'):
        te.resolve_config(te.Config(device='cpu', dataset='synthetic', precision='fp8'))


def test_compiled_training_matches_eager_and_writes_the_same_run_directory(tmp_path):
    """torch.compile (inductor, C++ on a CPU) computes the same training to float32 rounding."""
    options = dict(SMALL_MLP, subset=512, epochs=2, members=2, beta=0.5)
    eager = run(tmp_path, 'eager', **options)
    compiled = run(tmp_path, 'compiled', compile=True, **options)
    assert (sorted(p.name for p in (tmp_path / 'eager').iterdir())
            == sorted(p.name for p in (tmp_path / 'compiled').iterdir()))
    assert compiled['test_loss'] == pytest.approx(eager['test_loss'], abs=1e-4)
    for a, b in zip(member_states(tmp_path / 'eager'), member_states(tmp_path / 'compiled')):
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_channels_last_training_matches_contiguous_training(tmp_path):
    """The whole GPU layout path on a CPU: channels_last network and padded training set, one-gather crops."""
    options = dict(dataset='synthetic', arch='airbench', width=1 / 16, subset=512, batch_size=64, epochs=2,
                   members=2, beta=1.0)
    contiguous = run(tmp_path, 'nchw', channels_last=False, **options)
    channels_last = run(tmp_path, 'nhwc', channels_last=True, **options)
    assert channels_last['test_loss'] == pytest.approx(contiguous['test_loss'], abs=1e-4)
    assert json.loads((tmp_path / 'nhwc' / 'config.json').read_text())['channels_last'] is True
