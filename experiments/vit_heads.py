"""Does letting every attention head reorder its own query/key and value dimensions (rebasin.py's ViT spec)
align two ViTs better than one reordering shared by a block's heads? (issue 12)

    python train_ensemble.py --dataset fashion-mnist --arch vit --subset 10000 --members 4 --seed 1 --out runs/fm_vit_m4
    python experiments/vit_heads.py runs/fm_vit_m4 runs/fm_vit_m2      # every pair of members of each run

For every pair (A, B) of a run's members and each spec, weight matching's objective Σ⟨A, π(B)⟩, the distance
‖A − π(B)‖ and the test loss and error of the midpoint (A + π(B)) / 2, which is where these networks'
barriers peak (`analyze.py interpolate --align` draws a whole line), beside the unaligned midpoint.
Writes results.md (per pair, then mean ± standard deviation) and results.json under --out.
"""
import itertools
import sys
from pathlib import Path
from typing import List

import torch
import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402

SPECS = {'shared': False, 'per head': True}   # name -> ViT.permutation_table(per_head=...)
COLUMNS = ['objective', 'distance', 'midpoint loss', 'midpoint error']


def compare(run, pairs_of, examples, console):
    """{pair: {'unaligned': {...}, 'shared': {...}, 'per head': {...}}} for every pair of the run's members."""
    models = rebasin._load_models([run])
    if models[0].model_spec['arch'] != 'vit' or len(models) < 2:
        raise te.EnsembleError(f'{run}: needs a ViT run with at least two members')
    data = te.load_run_data(te.read_config(run), download=False)
    x, y = data.x_test[:examples or None], data.y_test[:examples or None]
    net = rebasin._module(models[0].model_spec, models[0].state, 'cpu')
    specs = {}
    for name, per_head in SPECS.items():
        table, buffers, within = net.permutation_table(per_head=per_head)
        specs[name] = rebasin.spec_from_table(table, models[0].state, buffers, within)
    keys = rebasin._matched_keys(specs['per head'], models[0].state)   # the same tensors under either spec

    def row(a, b, perm=None, spec=None):
        moved = b if perm is None else rebasin.apply_permutation(spec, perm, b)
        net.load_state_dict(rebasin.average([a, moved]))
        r = te.evaluate([net], x, y)
        a64, b64 = ({k: t[k].double() for k in keys} for t in (a, moved))
        return {'objective': rebasin._inner(a64, b64), 'distance': rebasin._sq_distance(a64, b64) ** 0.5,
                'midpoint loss': r['loss'], 'midpoint error': 1 - r['acc']}

    results = {}
    for i, j in pairs_of(len(models)):
        a, b = models[i].state, models[j].state
        result = {'unaligned': row(a, b)}
        for name, spec in specs.items():
            result[name] = row(a, b, rebasin.weight_matching(spec, a, b, device='cpu'), spec)
        results[f'{run} {i}-{j}'] = result
        console.print(f'{run} {i}-{j}: ' + ', '.join(f"{name} midpoint loss {r['midpoint loss']:.3f}"
                                                     for name, r in result.items()))
    return results


def main(runs: List[Path] = typer.Argument(..., help='ViT runs (train_ensemble.py --arch vit) of two or more members.'),
         out: Path = typer.Option(Path('runs/vit_heads'), help='Where results.md and results.json go.'),
         examples: int = typer.Option(0, help='Test images each midpoint is evaluated on; 0 for all of them.')):
    """Per pair of members: weight matching with per-head against shared head-dimension permutations."""
    console = Console()
    torch.set_num_threads(1)
    try:
        results = {k: v for run in runs
                   for k, v in compare(run, lambda n: itertools.combinations(range(n), 2), examples, console).items()}
    except (te.EnsembleError, rebasin.RebasinError) as e:
        console.print(f'[red]error:[/red] {e}')
        raise typer.Exit(2)
    lines = ['| pair | unaligned midpoint loss / error | '
             + ' | '.join(f'{s}: {c}' for s in SPECS for c in COLUMNS) + ' |',
             '|---' * (2 + len(SPECS) * len(COLUMNS)) + '|']
    for pair, r in results.items():
        lines.append(f"| {pair} | {r['unaligned']['midpoint loss']:.3f} / {r['unaligned']['midpoint error']:.3f} | "
                     + ' | '.join(f'{r[s][c]:.4g}' for s in SPECS for c in COLUMNS) + ' |')
    summary = {s: {c: analyze.mean_std([r[s][c] for r in results.values()]) for c in COLUMNS}
               for s in ('unaligned', *SPECS)}
    lines += ['', '| spec | ' + ' | '.join(COLUMNS) + ' |', '|---' * (1 + len(COLUMNS)) + '|']
    lines += [f'| {s} | ' + ' | '.join(f'{m:.4g} ± {sd:.2g}' for m, sd in summary[s].values()) + ' |' for s in summary]
    out.mkdir(parents=True, exist_ok=True)
    te.write_text(out / 'results.md', '\n'.join(lines) + '\n')
    te.write_json(out / 'results.json', {'runs': [str(r) for r in runs], 'examples': examples, 'pairs': results,
                                         'summary': summary})
    console.print('\n'.join(lines), soft_wrap=True)
    console.print(f'wrote {out / "results.md"} and {out / "results.json"}')


if __name__ == '__main__':
    with te.user_errors():   # a missing dataset or bad option: one line, exit 2
        typer.run(main)
