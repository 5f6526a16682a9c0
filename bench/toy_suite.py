"""The toy's suite: every recipe on every mixture of `toy.SUITE` x seeds, plus the frozen-fake control.

Each recipe (and the control) trains its runs as one ensemble (`toy.run_ensemble`), one process per
ensemble, all at once; on a CUDA machine the ensembles share the GPU, on CPU `--runs-per-process 1`
spreads single runs over a pool. Prints one JSON object: per recipe every run's metrics, the worst
case over the runs (highest tv, lowest precision, fewest covered modes, highest swd relative to the
naive 3-step teacher) and whether every run met the bar; the control ("control": the fastwan recipe
with a frozen fake score) must fail everywhere. `--frozen-ablation` also runs each recipe with its fake
score frozen ("RECIPE, frozen fake score"): what the recipe's other terms do without DMD's learning
fake score.

    python bench/toy_suite.py                                  # all recipes, the whole suite, 3 seeds
    python bench/toy_suite.py --recipes balanced --mixtures circle8 --seeds 0 --steps 2000 --eval-samples 8192
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time


def _run_group(recipe: str, freeze: bool, pairs: list, overrides: dict) -> list:
    import torch

    from fastwan.training import toy

    options = toy.ToyOptions(recipe=recipe, freeze_fake_score=freeze, **overrides)
    by_name = {spec.name: spec for spec in toy.SUITE}
    runs = [toy.ToyRun(by_name[name].build(), seed, name) for name, seed in pairs]
    results, _ = toy.run_ensemble(options, runs)
    if options.device == "cuda":
        torch.cuda.synchronize()
    return results


def worst_case(results: list) -> dict:
    return {
        "tv": max(r["tv"] for r in results),
        "precision": min(r["precision"] for r in results),
        "modes_missed": max(r["modes_total"] - r["modes_covered"] for r in results),
        "swd_over_teacher_3step": max(r["swd_student"] / r["swd_teacher_3step"] for r in results),
        "runs_passed": sum(r["passed"] for r in results),
        "runs": len(results),
    }


def main(argv=None) -> int:
    from fastwan.training import toy
    from fastwan.training.config import RECIPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--mixtures", default=",".join(s.name for s in toy.SUITE))
    parser.add_argument("--seeds", default=",".join(map(str, toy.SUITE_SEEDS)))
    parser.add_argument("--no-control", action="store_true", help="skip the frozen-fake-score control")
    parser.add_argument("--frozen-ablation", action="store_true",
                        help="also run every recipe with its fake score frozen")
    parser.add_argument("--steps", type=int, default=None, help="DMD steps (default: the toy's)")
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--runs-per-process", type=int, default=0,
                        help="runs per ensemble process (default: all of a recipe on cuda, 1 on cpu)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--partial", default=None, help="append each finished ensemble's runs to this file")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    mixtures = [m for m in args.mixtures.split(",") if m]
    known = {s.name for s in toy.SUITE}
    if unknown or not set(mixtures) <= known:
        parser.error(f"unknown recipes {unknown} or mixtures {sorted(set(mixtures) - known)}; recipes: "
                     f"{', '.join(RECIPES)}; mixtures: {', '.join(sorted(known))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = {"device": args.device, "threads": 1}
    if args.steps:
        overrides["steps"] = args.steps
    if args.eval_samples:
        overrides["eval_samples"] = args.eval_samples
    per_process = args.runs_per_process or (len(mixtures) * len(seeds) if args.device == "cuda" else 1)
    runs = [(m, s) for m in mixtures for s in seeds]
    labels = [(r, r, False) for r in recipes] + ([] if args.no_control else [("control", "fastwan", True)])
    if args.frozen_ablation:
        labels += [(f"{r}, frozen fake score", r, True) for r in recipes]
    jobs = [(label, recipe, freeze, runs[start:start + per_process])
            for label, recipe, freeze in labels for start in range(0, len(runs), per_process)]
    started = time.perf_counter()
    report = {"command": "python bench/toy_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": args.device, "mixtures": mixtures, "seeds": seeds, "recipes": {}}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(args.processes, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(_run_group, recipe, freeze, pairs, overrides): label
                   for label, recipe, freeze, pairs in jobs}
        collected: dict = {}
        for future in concurrent.futures.as_completed(futures):
            collected.setdefault(futures[future], []).extend(future.result())
            print(f"{futures[future]}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if args.partial:
                with open(args.partial, "a") as handle:
                    handle.write(json.dumps({futures[future]: future.result()}) + "\n")
    for label, _, _ in labels:
        results = sorted(collected[label], key=lambda r: (mixtures.index(r["mixture"]), r["seed"]))
        entry = {"worst": worst_case(results), "runs": results, "every_run_passed": all(r["passed"] for r in results)}
        if label == "control":
            entry["every_run_failed"] = not any(r["passed"] for r in results)
        report["recipes"][label] = entry
    report["seconds"] = round(time.perf_counter() - started, 1)
    if _has_cuda() and args.device == "cuda":
        import torch

        report["card"] = torch.cuda.get_device_name()
    print(json.dumps(report))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
