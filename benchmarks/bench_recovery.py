"""How often weight matching and activation matching recover a planted permutation (issue 12, part 2).

    python benchmarks/bench_recovery.py                         # 20 permutations per architecture and noise
    python benchmarks/bench_recovery.py --trials 5 --archs mlp

For each network A: B = π(A) + Gaussian noise, each tensor's noise at a relative scale (0, 0.01, 0.1 of the
tensor's own standard deviation), π random. Reported over --trials random π: the fraction of permutations
recovered exactly, and the fraction of units (channels) put back in their place, for weight matching and
activation matching (on --examples images). A is a trained member where one is given (--run, a finished
run; its data feeds activation matching), else a freshly initialized member of the architecture on
synthetic images: airbench's whitening and identity-initialized convolutions and resnet18's random
weights still make every channel distinct, but trained networks are the harder, more telling case.
"""
import copy
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402

ARCHS = {   # name: (model-spec overrides) on 32x32 colour images
    'mlp 512x3': dict(arch='mlp', hidden=[512, 512, 512]),
    'airbench w0.25 k3': dict(arch='airbench', width=0.25, kernel_size=3),
    'airbench w0.25 k5': dict(arch='airbench', width=0.25, kernel_size=5),
    'airbench w1 k3': dict(arch='airbench', width=1.0, kernel_size=3),
    'resnet18 w0.25': dict(arch='resnet18', width=0.25),
    'resnet18 w1': dict(arch='resnet18', width=1.0),
}


def noisy(state, scale, generator):
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=generator)
            if v.is_floating_point() and v.numel() > 1 and scale > 0 else v for k, v in state.items()}


def recovered(spec, found, planted):
    """(all permutations exact, fraction of units back in place)."""
    back, identity = rebasin.compose(spec, planted, found), rebasin.identity_permutation(spec)
    return (all(torch.equal(back[p], identity[p]) for p in spec.perms),
            sum(int((back[p] == identity[p]).sum()) for p in spec.perms) / sum(q.numel() for q in identity.values()))


def network(name, run, examples):
    """(model, state, permutation spec, batches of input images) for one row."""
    if run:
        models = rebasin._load_models([run])
        net, spec = rebasin._permutation_spec_of(models[0].model_spec)
        net.load_state_dict(models[0].state)
        data = te.load_run_data(te.read_config(run), download=False)
        x = te.to_float_images(data.x_train[:examples])
    else:
        model_spec = {**dict(in_channels=3, image_size=32, num_classes=10, width=1.0, kernel_size=3, hidden=[],
                             mean=[0.5] * 3, std=[0.25] * 3), **ARCHS[name]}
        images = torch.randint(0, 256, (max(examples, 256), 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        net = te.init_member(model_spec, 0, images)
        spec = rebasin.permutation_spec(net, torch.zeros(1, 3, 32, 32))
        x = te.to_float_images(images[:examples])
    return net.eval(), net.state_dict(), spec, [x[i:i + 250] for i in range(0, len(x), 250)]


def main(
    archs: str = typer.Option(','.join(ARCHS), help='Rows (comma-separated names of ARCHS), ignored with --run.'),
    run: str = typer.Option(None, help='A finished run: its member 0 is A (trained), '
                                       'its training images feed activation matching.'),
    trials: int = typer.Option(20, help='Random permutations per architecture and noise scale.'),
    noises: str = typer.Option('0,0.01,0.1,0.5,1', help="Noise scales relative to each tensor's standard deviation."),
    examples: int = typer.Option(1000, help='Images for activation matching.'),
    threads: int = typer.Option(1, help='torch CPU threads.'),
):
    """Print, per network and noise scale, exact recoveries and units in place for both methods."""
    torch.set_num_threads(threads)
    console = Console()
    table = Table(title=f'planted permutations recovered, {trials} per row'
                  + (f' (A: {run}, member 0)' if run else ' (A: a fresh initialization)'))
    for col in ['network', 'noise', 'weight: exact', 'weight: units', 'activation: exact', 'activation: units',
                'seconds']:
        table.add_column(col, justify='right')
    for name in ([Path(run).name] if run else archs.split(',')):
        net, state, spec, batches = network(name, run, examples)
        for scale in [float(v) for v in noises.split(',')]:
            start, counts = time.perf_counter(), {'weight': [], 'activation': []}
            g = torch.Generator().manual_seed(1)
            for trial in range(trials):
                planted = rebasin.random_permutation(spec, seed=1000 + trial)
                b_state = rebasin.apply_permutation(spec, planted, noisy(state, scale, g))
                b = copy.deepcopy(net)
                b.load_state_dict(b_state)
                counts['weight'].append(recovered(spec, rebasin.weight_matching(spec, state, b_state, device='cpu'),
                                                  planted))
                counts['activation'].append(recovered(spec, rebasin.activation_matching(spec, net, b, batches, 'cpu'),
                                                      planted))
            cells = [(f'{sum(e for e, _ in counts[m]) / trials:.0%}', f'{sum(u for _, u in counts[m]) / trials:.4f}')
                     for m in ('weight', 'activation')]
            table.add_row(name, f'{scale:g}', *cells[0], *cells[1], f'{time.perf_counter() - start:.0f}')
            console.print(f'{name}, noise {scale:g}: exact / units: weight {cells[0]}, activation {cells[1]}')
    console.print(table)


if __name__ == '__main__':
    typer.run(main)
