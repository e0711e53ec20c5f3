"""``qvlm-bench``: run suites, write leaderboards, list what is available, measure GPU perf."""

from __future__ import annotations

import argparse
import logging
import sys


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_run(args) -> int:
    from .suite_config import SuiteError, load_suite
    from .executors import make_executor
    from .report import write_leaderboard
    from .runner import failure_lines, run_suite

    overrides = {}
    for key in ("models", "methods", "schemes", "tasks"):
        if getattr(args, key):
            overrides[key] = _csv(getattr(args, key))
    for key in ("limit", "device", "dtype", "data_dir", "output", "batch_size", "seed", "threads", "shards",
                "deterministic"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        suite = load_suite(args.suite, overrides=overrides)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .models.family import UnknownFamilyError
    from .models.loading import check_family

    try:  # an unsupported family stops the run before any cell, not once per cell
        for model in suite.models:
            check_family(model.name)
    except UnknownFamilyError as exc:
        print(f"error: model {model.name!r}: {exc}", file=sys.stderr)
        return 2
    try:
        executor = make_executor(args.executor, suite, address=args.address, workers=args.workers,
                                 gpus_per_worker=args.gpus_per_worker, shard_size=args.shard_size,
                                 show_progress=None if args.executor == "serial" else not args.quiet)
    except (RuntimeError, ValueError) as exc:  # Ray absent, bad flags, too few GPUs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .records import RecordWriteError
    from .resultsdir import ResultsDirError

    try:
        summary = run_suite(suite, show_progress=not args.quiet, executor=executor)
    except (SuiteError, ResultsDirError) as exc:  # planning (two entries, one row); folder unusable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RecordWriteError as exc:  # the disk filled mid-run: every record before it is kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{suite.name}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} already done "
          f"-> {suite.output_dir / 'records.jsonl'}")
    table_failed = False
    try:
        paths = write_leaderboard(suite.output_dir)
        print(paths["md"].read_text())
    except (OSError, ValueError) as exc:
        table_failed = True
        print(f"error: the leaderboard in {suite.output_dir} was not rewritten, so any tables there are "
              f"from an earlier tabulation: {exc}", file=sys.stderr)
    if summary.failed:
        print(f"{summary.failed} cell(s) failed (full errors and tracebacks in the records):", file=sys.stderr)
        for line in failure_lines(summary.records):
            print(f"  {line}", file=sys.stderr)
    return 1 if summary.failed or table_failed else 0


def cmd_table(args) -> int:
    from .report import write_leaderboard
    from .records import read_records

    stats = dict(n_resamples=args.resamples, seed=args.bootstrap_seed, level=args.level, plots=not args.no_plots,
                 contrasts=args.contrast)
    try:
        if len(args.results) > 1:
            from .report import write_aggregate

            if not args.output:
                raise ValueError("several results folders are combined into one table: name its folder "
                                 "with --output (e.g. --output results/calibration-seeds)")
            if args.perf:
                raise ValueError("--perf joins one results folder's rows: give one folder")
            paths = write_aggregate(args.results, args.output, **stats)
        else:
            perf = None
            if args.perf:
                perf = read_records(args.perf.rstrip("/") + "/records.jsonl")
                if not perf:
                    raise FileNotFoundError(f"no records in {args.perf}/records.jsonl (--perf)")
            # --output: the tables elsewhere (e.g. beside the perf records they join), the folder untouched
            paths = write_leaderboard(args.results[0], perf_records=perf, out_dir=args.output, **stats)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_compact_records(args) -> int:
    from .records_compact import compact_records
    from .resultsdir import ResultsDirError

    status = 0
    for folder in args.results:
        try:
            c = compact_records(folder)
        except (OSError, RuntimeError, ResultsDirError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        if c["records"]:
            print(f"{folder}: {c['records']} record(s) point at {c['sidecars']} sidecar(s) in meta/; "
                  f"{c['bytes_before'] / 2**20:.2f} MB -> {c['bytes_after'] / 2**20:.2f} MB")
        else:
            print(f"{folder}: no inline method_meta or act_ranges to move (already compact)")
    return status


def cmd_compact_samples(args) -> int:
    from .resultsdir import ResultsDirError
    from .samples import SamplesError, compact_samples

    status = 0
    for folder in args.results:
        try:
            c = compact_samples(folder)
        except (OSError, SamplesError, ResultsDirError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        if c["files"]:
            print(f"{folder}: {c['files']} samples file(s) rewritten, {c['bytes_before'] / 2**20:.2f} MB -> "
                  f"{c['bytes_after'] / 2**20:.2f} MB (with {c['prompt_files']} new prompts file(s)); "
                  f"{c['records']} record(s) repointed")
        else:
            print(f"{folder}: no plain samples files (already compact)")
        for msg in c["skipped"]:
            print(f"error: kept as it is: {msg}", file=sys.stderr)
            status = 1
    return status


def cmd_compact_perf(args) -> int:
    from .perf.detail import PerfDetailError, compact_perf
    from .resultsdir import ResultsDirError

    status = 0
    for folder in args.results:
        try:
            c = compact_perf(folder)
        except (OSError, PerfDetailError, ResultsDirError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        if c["records"]:
            print(f"{folder}: {c['records']} perf record(s) rewritten, their detail in {c['files']} sidecar(s) "
                  f"in perf-detail/; {c['bytes_before'] / 2**20:.2f} MB -> {c['bytes_after'] / 2**20:.2f} MB")
        else:
            print(f"{folder}: no perf record with its detail inline (already compact)")
    return status


def cmd_list(args) -> int:
    from .models.loading import PENDING_BUNDLED, bundled_models
    from .quant.config import COMMON_SCHEMES, OVERRIDE_KEYS
    from .registry import available_methods, broken_methods
    from tasks.index import available_tasks

    what = args.what
    if what in (None, "methods"):
        print("methods:")
        for name, cls in available_methods().items():
            print(f"  {name:<16} {cls.summary}")
        broken = broken_methods()
        if broken:
            print("modules that failed to import (their methods are unavailable):")
            for module, error in broken.items():
                print(f"  {module}: {error}")
    if what in (None, "tasks"):
        print("tasks:")
        for name in available_tasks():
            print(f"  {name}")
    if what in (None, "schemes"):
        print("schemes: w<bits>a<bits>, bits in 2..8 or 16, e.g. " + ", ".join(COMMON_SCHEMES))
        print("  overrides: " + ", ".join(OVERRIDE_KEYS))
    if what in (None, "models"):
        from .models.family import available_families

        print("model families (adapters in harness/models/family.py):")
        for name, summary in available_families().items():
            print(f"  {name:<16} {summary}")
        print("bundled models:")
        bundled = bundled_models()
        for name, path in bundled.items():
            print(f"  {name:<16} {path}")
        for name in PENDING_BUNDLED:
            if name not in bundled:
                print(f"  {name:<16} not trained yet (harness/models/bundled/README.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvlm-bench", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a suite (default: the bundled offline suite)",
                       description="Run every (model × method × scheme × task) cell of a suite, "
                                   "resuming where a previous run stopped, then write the leaderboard.")
    r.add_argument("suite", nargs="?", default=None, help="suite YAML file or bundled suite name (default: default)")
    r.add_argument("--models", help="comma-separated models (bundled name, folder or Hub id)")
    r.add_argument("--methods", help="comma-separated method names (see `qvlm-bench list methods`)")
    r.add_argument("--schemes", help="comma-separated schemes, e.g. w4a4,w6a6")
    r.add_argument("--tasks", help="comma-separated task names")
    r.add_argument("--limit", type=int, help="at most N examples per task")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--dtype", help="auto (fp16 on GPUs, fp64 on the CPU), fp16, bf16, fp32 or fp64")
    r.add_argument("--data-dir", dest="data_dir", help="folder with local copies of the task datasets")
    r.add_argument("--output", help="results folder (default results/<suite name>)")
    r.add_argument("--batch-size", dest="batch_size", type=int, help="evaluation batch size")
    r.add_argument("--seed", type=int, help="random seed")
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    r.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="identical results run to run on a GPU, at a cost (the suite key `deterministic`)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d = r.add_argument_group("distributed (--executor ray; pip install 'qvlm-bench[distributed]')")
    d.add_argument("--executor", choices=["serial", "ray"], default="serial",
                   help="serial: one process (default); ray: groups run on Ray workers")
    d.add_argument("--address", help="Ray cluster to join (e.g. auto, or HOST:6379); default: start a "
                                     "local Ray instance with this machine's GPUs or --workers CPU workers")
    d.add_argument("--workers", type=int, help="number of workers (default: one per GPU; on CPUs: 1)")
    d.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float,
                   help="GPUs each worker holds (default 1; a fraction packs workers onto a GPU)")
    d.add_argument("--shard-size", dest="shard_size", type=int,
                   help="split a task with more questions than this into shards (default 10000; 0: never)")
    d.add_argument("--shards", type=int, help="split every task into N shards (overrides the suite's `shards`)")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("table", aliases=["leaderboard"], help="write leaderboard tables and plots from a results folder (or several runs)",
                       description="Write leaderboard.{md,csv,tex,html} and plots from results/<suite>/records.jsonl, "
                                   "every number with a paired 95 % interval (bootstrap over each task's "
                                   "clusters: questions, or the images a task groups them by); given "
                                   "several folders (runs with different --seed), one leaderboard of the mean "
                                   "over runs whose intervals add the seed-to-seed spread, into --output.")
    t.add_argument("results", nargs="+", help="results folder(s) holding records.jsonl")
    t.add_argument("--output", help="folder for the combined table (several results folders), or for one "
                                       "folder's tables instead of beside its records")
    t.add_argument("--perf", help="results folder of `qvlm-bench perf` records to join (latency/memory plots)")
    t.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    t.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    t.add_argument("--bootstrap-seed", dest="bootstrap_seed", type=int, default=0, help="bootstrap seed")
    t.add_argument("--no-plots", dest="no_plots", action="store_true", help="tables only")
    t.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="also tabulate variant A minus variant B with its paired interval, per model and "
                        "scheme (repeatable; X+clip:X is always included) -> contrasts.md")
    t.set_defaults(func=cmd_table)

    c = sub.add_parser("compact-samples", help="rewrite a results folder's plain per-question logs compactly",
                       description="Rewrite every plain samples/*.jsonl file of each results folder as "
                                   "samples/*.jsonl.gz with the prompts stored once per task "
                                   "(harness/samples.py), repoint the records' samples_file, and delete an "
                                   "old file only after the new one reads back to the same rows. Holds the "
                                   "folder's lock; running it again changes nothing.")
    c.add_argument("results", nargs="+", help="results folder(s) holding records.jsonl and samples/")
    c.set_defaults(func=cmd_compact_samples)

    cr = sub.add_parser("compact-records", help="move records' per-state parts into shared gzip sidecars",
                        description="Move each record's method_meta and act_ranges (of 1 KB or more) in each folder's "
                                    "records.jsonl into meta/<digest>.json.gz, shared by the records of one "
                                    "quantization state (harness/records_compact.py); reading the records "
                                    "puts it back. The new file must read back to the old records before it "
                                    "replaces them. Holds the folder's lock; running it again changes nothing.")
    cr.add_argument("results", nargs="+", help="results folder(s) holding records.jsonl")
    cr.set_defaults(func=cmd_compact_records)

    cp = sub.add_parser("compact-perf", help="move a perf results folder's per-layer detail into sidecars",
                        description="Move the per-layer detail of every perf record in each folder's "
                                    "records.jsonl (gate errors per layer, fused-quantizer checks, kernel "
                                    "timings per candidate) into gzip sidecars in perf-detail/ "
                                    "(harness/perf/detail.py), each record naming its own; a record is "
                                    "rewritten only after it reads back through its sidecar unchanged. "
                                    "Holds the folder's lock; running it again changes nothing.")
    cp.add_argument("results", nargs="+", help="perf results folder(s) holding records.jsonl (e.g. results/perf)")
    cp.set_defaults(func=cmd_compact_perf)

    ls = sub.add_parser("list", help="list methods, tasks, schemes and bundled models")
    ls.add_argument("what", nargs="?", choices=["methods", "tasks", "schemes", "models"])
    ls.set_defaults(func=cmd_list)

    from .perf.command import add_perf_parser  # in-tree: a broken perf module must not vanish silently

    add_perf_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm-eval", "lm_eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
