"""How fast a sweep runs: trials per minute with one and with two worker processes.

Runs the pipeline's stages up to pretrain in a scratch folder (the repository's params, or
``--set`` overrides), then ``trackflow sweep`` on the same space, sampler and pruner once per
``--parallel`` value, each as a new study of ``--trials`` trials, and prints the wall time, trials
per minute, how many trials were pruned, and each value's speed-up over the first.

    python bench/sweep_speed.py --trials 40 --parallel 1 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import add_overrides_option, parse_overrides, run, scratch


def sweep(study: str, trials: int, parallel: int) -> float:
    """Wall seconds of one ``trackflow sweep`` run to ``trials`` trials."""
    argv = ["--study", study, "--n-trials", str(trials), "--parallel", str(parallel)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trackflow.cli", "sweep", *argv], check=True)
    return time.perf_counter() - start


def pruned(study: str) -> int:
    """Trials of ``study`` that its pruner stopped."""
    import optuna

    from trackflow.config import load_params
    from trackflow.tuning.study import storage_url

    params = load_params("params.yaml")
    url = storage_url(params.sweep, params.base.mlflow)
    loaded = optuna.load_study(study_name=study, storage=url)
    return sum(t.state == optuna.trial.TrialState.PRUNED for t in loaded.trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    add_overrides_option(parser)
    args = parser.parse_args()
    results = []
    with scratch(parse_overrides(args.set)):
        run("ingest", "split", "preprocess", "pretrain")
        for parallel in args.parallel:
            study = f"speed-parallel-{parallel}"
            seconds = sweep(study, args.trials, parallel)
            results.append((parallel, seconds, pruned(study)))
    print(f"\nsweep of {args.trials} trials on the scratch folder's params")
    print(f"  {'parallel':>8} {'wall s':>8} {'trials/min':>11} {'pruned':>7} {'speed-up':>9}")
    first = args.trials / results[0][1]
    for parallel, seconds, n_pruned in results:
        rate = args.trials / seconds
        line = f"{parallel:>8} {seconds:>8.1f} {rate * 60:>11.2f} {n_pruned:>7}"
        print(f"  {line} {rate / first:>8.2f}x")


if __name__ == "__main__":
    main()
