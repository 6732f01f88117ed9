"""Weight matching and MergeMany on trained networks, side by side with the reference algorithm, one CPU thread.

    python benchmarks/bench_matching.py                    # trains 4 Fashion-MNIST MLPs 784-512-512-512-10 once
    python benchmarks/bench_matching.py --run runs/mlp4    # or any finished run with 4 (or more) MLP members

The reference algorithm is the git re-basin paper's weight matching (Ainsworth et al. 2022,
samuela/git-re-basin weight_matching.py), written here from its description for timing only: start
from the identity; sweep over the permutations in a random order; for each, sum the cost matrices of
every tensor it touches (the other axes permuted by the current permutations), solve the linear
assignment, keep it; stop after a sweep in which no assignment gained more than 1e-12. It runs in
float32, as the JAX original does. Ours is rebasin.weight_matching. Both see the same permutation spec
(traced by rebasin.permutation_spec) and the same tensors, and report the same objective Σ⟨A, π(B)⟩
over every tensor the permutations touch (float64). Goals (issue 12): ours at most 0.3x the reference's
time on the pair at an equal or higher objective, and MergeMany of the four under 5 s.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402

RUN = dict(dataset='fashion-mnist', arch='mlp', hidden=[512, 512, 512], members=4, beta=0.0, device='cpu')


def reference_weight_matching(spec, params_a, params_b, seed=0, max_iter=100):
    """The reference algorithm (see the module docstring); returns (permutation, sweeps)."""
    keys = rebasin._matched_keys(spec, params_a)
    a = {k: params_a[k].float() for k in keys}
    b = {k: params_b[k].float() for k in keys}
    perm = {p: torch.arange(n) for p, n in spec.perms.items()}
    touched = {p: [(k, ax) for k in keys for ax, q in enumerate(spec.axes[k]) if q == p] for p in spec.perms}
    names = [p for p in spec.perms if touched[p]]
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_iter + 1):
        progress = False
        for p in rng.permutation(names):
            n = spec.perms[p]
            cost = torch.zeros(n, n)
            for k, axis in touched[p]:
                w_b = b[k]
                for other_axis, q in enumerate(spec.axes[k]):
                    if q is not None and other_axis != axis:
                        w_b = w_b.index_select(other_axis, perm[q])
                cost += a[k].movedim(axis, 0).reshape(n, -1) @ w_b.movedim(axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            old = cost[torch.arange(n), perm[p]].sum().item()
            new = cost[torch.arange(n), torch.as_tensor(cols)].sum().item()
            progress = progress or new > old + 1e-12
            perm[p] = torch.as_tensor(cols)
        if not progress:
            break
    return perm, sweep


def objective(spec, perm, params_a, params_b):
    """Σ⟨A, π(B)⟩ over the tensors weight matching matches, in float64 (its .objective)."""
    moved = rebasin.apply_permutation(spec, perm, params_b)
    return rebasin._inner(*({k: t[k].double() for k in rebasin._matched_keys(spec, params_a)}
                            for t in (params_a, moved)))


def fastest(repeats, fn):
    """(seconds of the fastest of `repeats` calls, the last call's result)."""
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def methods(run, models, spec, pairs, repeats, examples=rebasin.BN_EXAMPLES):
    """Weight against activation matching on each pair: seconds, and the midpoint's test loss and accuracy
    (the interpolation barrier's worst point for these networks), beside the unaligned midpoint's."""
    data = te.load_run_data(te.read_config(run), download=False)
    batches = [te.to_float_images(data.x_train[i:i + rebasin.BN_BATCH]) for i in range(0, examples, rebasin.BN_BATCH)]
    nets = [rebasin._module(m.model_spec, m.state, 'cpu') for m in models]
    net = rebasin._module(models[0].model_spec, models[0].state, 'cpu')

    def midpoint(a, b):
        net.load_state_dict(rebasin.average([a, b]))
        r = te.evaluate([net], data.x_test, data.y_test)
        return f"{r['loss']:.3f} / {r['acc']:.4f}"

    table = Table(title=f'weight vs activation matching ({examples} training images), midpoint test loss / accuracy')
    for col in ['pair', 'unaligned midpoint', 'weight: s', 'weight: midpoint', 'activation: s', 'activation: midpoint']:
        table.add_column(col, justify='right')
    for i, j in pairs:
        a, b = models[i].state, models[j].state
        w_s, w = fastest(repeats, lambda: rebasin.weight_matching(spec, a, b, device='cpu'))
        a_s, act = fastest(repeats, lambda: rebasin.activation_matching(spec, nets[i], nets[j], batches, 'cpu'))
        table.add_row(f'{i}-{j}', midpoint(a, b), f'{w_s:.2f}', midpoint(a, rebasin.apply_permutation(spec, w, b)),
                      f'{a_s:.2f}', midpoint(a, rebasin.apply_permutation(spec, act, b)))
    return table


def main(
    run: str = typer.Option('runs/bench_matching_mlp',
                            help='A finished run of 4+ MLP members; trained here if missing.'),
    repeats: int = typer.Option(3, help='Timed calls of each; the fastest counts (shared machines are noisy).'),
    threads: int = typer.Option(1, help='torch CPU threads.'),
):
    """Print seconds, sweeps and objective of ours against the reference on every pair of members, and MergeMany's
    time."""
    console = Console()
    torch.set_num_threads(threads)
    if not (Path(run) / 'summary.json').exists():
        console.print(f'training {RUN} into {run} (once)')
        te.complete_run(te.Config(out=run, **RUN), Console(quiet=True))
    models = rebasin._load_models([run])
    _, spec = rebasin._permutation_spec_of(models[0].model_spec)
    states = [m.state for m in models]
    table = Table(title=f'{run}: {len(states)} members, {threads} thread(s), fastest of {repeats} per job')
    for col in ['job', 'seconds', 'sweeps / passes', 'objective Σ⟨A, π(B)⟩', 'ratio to reference']:
        table.add_column(col, justify='right')
    # Every pair of members: which local optimum each finds is luck of the order, so compare over all of them.
    pairs = [(i, j) for i in range(len(states)) for j in range(i + 1, len(states))]
    ours_total = ref_total = 0.0
    for i, j in pairs:
        ref_s, (ref_perm, ref_sweeps) = fastest(repeats, lambda: reference_weight_matching(spec, states[i], states[j]))
        ours_s, ours = fastest(repeats, lambda: rebasin.weight_matching(spec, states[i], states[j], device='cpu'))
        ref_total, ours_total = ref_total + ref_s, ours_total + ours_s
        table.add_row(f'reference, {i}-{j}', f'{ref_s:.2f}', str(ref_sweeps),
                      f'{objective(spec, ref_perm, states[i], states[j]):.3f}', '1.00')
        table.add_row(f'ours, {i}-{j}', f'{ours_s:.2f}', str(len(ours.objective) - 1),
                      f'{objective(spec, ours, states[i], states[j]):.3f}', f'{ours_s / ref_s:.2f}')
    table.add_row(f'all {len(pairs)} pairs', f'{ours_total:.2f} / {ref_total:.2f}', '', '',
                  f'{ours_total / ref_total:.2f}')
    console.print(table)
    console.print(methods(run, models, spec, pairs, repeats))
    passes = []
    merge_s, _ = fastest(1, lambda: rebasin.merge_many(spec, states[:4], device='cpu',
                                                       progress=lambda r: passes.append(r)
                                                       if 'distance' in r else None))
    console.print(f"MergeMany of 4: {merge_s:.2f} s, {len(passes) - 1} passes, "
                  f"Σ distance² {passes[0]['distance']:.1f} -> {passes[-1]['distance']:.1f}")


if __name__ == '__main__':
    typer.run(main)
