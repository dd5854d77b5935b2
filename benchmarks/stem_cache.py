"""Wall time of one replica run with the frozen-stem cache against the same run without it.

``python benchmarks/stem_cache.py`` (``make bench-stem``) trains the same run (by default the
demo's: FVAE-LoRA on ``synth-waterbirds``, 5 epochs, one thread) with ``--stem-cache on`` and
``--stem-cache off``, alternating the order round by round (on/off, off/on, …) so that a drift in
machine load hits both alike, each into a fresh output folder. Before the first round it makes
sure the replica and its stem features exist and reports how long computing the features took
(a once-per-replica cost, not part of a run). It prints every round's wall and CPU seconds, the
within-round ratio cached / uncached, their median, the ratio of the median times, and whether
the two runs recorded the same metrics; the last line is one JSON object with all of it.
Nothing here is a unit test: these machines are shared and noisy, so the ratio is measured
side by side in one process, and the load average before and after is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from robustbench_fvae.cli import ArgumentParser, add_data_root_option, command, fail  # noqa: E402
from robustbench_fvae.config import ConfigError, config_from_settings  # noqa: E402
from robustbench_fvae.config.resolve import resolve_config  # noqa: E402
from robustbench_fvae.training import build_model_and_data, run  # noqa: E402

COMPARED = ("val", "test", "counterfactual", "selected_epoch")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python benchmarks/stem_cache.py",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="fvae", help="method of the timed run (default: fvae)")
    p.add_argument("--dataset", default="synth-waterbirds", help="replica (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (default: 5, the demo)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of one cached + one uncached "
                   "run, order alternating (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    add_data_root_option(p, "data", "datasets folder (default: data)")
    p.add_argument("--weights", default=None,
                   help="backbone weights file (default: the offline backbone's cache)")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="any further run setting, e.g. batch_size=32 (repeatable)")
    return p


def _settings(args: argparse.Namespace, out: str, stem_cache: str) -> dict:
    settings = {"method": args.method, "dataset": args.dataset, "epochs": args.epochs,
                "data_root": args.data_root, "out": out, "device": "cpu", "num_workers": 0,
                "threads": args.threads, "stem_cache": stem_cache}
    if args.weights:
        settings.update(backbone="rbf_vit_offline", weights=args.weights)
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--setting expects KEY=VALUE, got {item!r}")
        settings[key] = json.loads(value) if value[:1].isdigit() or value in (
            "true", "false") else value
    return settings


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@command
def main(argv: list[str] | None = None) -> int:
    """Exit codes as every command's (robustbench_fvae/cli.py): 2 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        measure(args)
    except (ValueError, FileNotFoundError, LookupError) as err:
        return fail(err)
    return 0


def measure(args: argparse.Namespace) -> dict:
    """The side-by-side measurement (see the module docstring); returns the JSON object."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rbf-bench-stem-") as tmp:
        cfg = resolve_config(config_from_settings(_settings(args, tmp, "on")))
        start = time.perf_counter()
        build_model_and_data(cfg, torch.device("cpu"), progress=False, log=print)
        prepare_s = time.perf_counter() - start
        print(f"replica and stem features ready in {prepare_s:.1f}s (computed once per replica; "
              "0 when they existed)")
        load_before = _load()
        rounds = []
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            times, metrics = {}, {}
            for mode in order:
                out = str(Path(tmp) / f"round{r}-{mode}")
                cfg = config_from_settings(_settings(args, out, mode))
                wall, cpu = time.perf_counter(), time.process_time()
                result = run(cfg, force=True, progress=False, log=lambda _m: None)
                times[mode] = (time.perf_counter() - wall, time.process_time() - cpu)
                metrics[mode] = {k: result.metrics.get(k) for k in COMPARED}
            same = metrics["on"] == metrics["off"]
            ratio = times["on"][0] / times["off"][0]
            rounds.append({"order": list(order), "cached_wall_s": round(times["on"][0], 2),
                           "uncached_wall_s": round(times["off"][0], 2),
                           "cached_cpu_s": round(times["on"][1], 2),
                           "uncached_cpu_s": round(times["off"][1], 2),
                           "ratio": round(ratio, 4), "same_metrics": same,
                           "test_wg": metrics["on"]["test"]["worst_group_acc"]})
            print(f"round {r + 1}/{args.rounds} ({'/'.join(order)}): cached "
                  f"{times['on'][0]:.1f}s wall ({times['on'][1]:.1f}s CPU), uncached "
                  f"{times['off'][0]:.1f}s wall ({times['off'][1]:.1f}s CPU), ratio "
                  f"{ratio:.3f}; same metrics: {same}")
    load_after = _load()
    cached = [r["cached_wall_s"] for r in rounds]
    uncached = [r["uncached_wall_s"] for r in rounds]
    result = {
        "method": args.method, "dataset": args.dataset, "epochs": args.epochs,
        "threads": args.threads, "rounds": rounds, "prepare_s": round(prepare_s, 1),
        "median_paired_ratio": round(statistics.median(r["ratio"] for r in rounds), 4),
        "ratio_of_medians": round(statistics.median(cached) / statistics.median(uncached), 4),
        "same_metrics": all(r["same_metrics"] for r in rounds),
        "load_before": load_before, "load_after": load_after, "cores": os.cpu_count(),
    }
    print(f"cached / uncached wall time of one run: median paired ratio "
          f"{result['median_paired_ratio']:.3f}, ratio of medians {result['ratio_of_medians']:.3f}"
          f" ({args.rounds} rounds, {args.threads} thread(s), 1-min load {load_before} -> "
          f"{load_after} on {os.cpu_count()} cores)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
