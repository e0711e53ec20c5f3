"""``qvlm-bench perf``: GPU latency and memory on real low-bit kernels, gated against the simulated model.

Registered in ``harness/cli.py``; on machines without the evaluation dependencies (the GPU image)
the same command runs as ``python -m harness.perf.command ...``.
Nothing on this path imports lm-eval or datasets.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .benchmark import PerfConfig

DEFAULT_SCHEMES = "w4a16,w8a8,w4a4,w6a6"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in _csv(s)]


def _override(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"override {s!r} must look like KEY=VALUE")
    k, v = s.split("=", 1)
    import yaml

    return k.strip(), yaml.safe_load(v)


def add_perf_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``perf`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "perf", help="GPU latency and memory with real low-bit kernels",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append",
                   help="architecture name (llava-1.5-7b, llava-1.5-13b: random weights, no download), "
                        "a local folder or a Hub id; repeat for several")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated registered methods (default rtn, or with --methods-from every entry "
                        "of the suite; `all`: every registered method); "
                        "the float reference is always measured first. Each row's state is made as the "
                        "accuracy suites make it (harness.prepare.prepare_state) with the method's defaults")
    p.add_argument("--methods-from", default=None, metavar="SUITE",
                   help="take the methods, with their options, labels and clip lever, from a suite YAML "
                        "(a file or a bundled suite name), and make each state as that suite does: its "
                        "`quant` settings, calibration set (its task's data where lm-eval is installed, "
                        "else random batches, and the records say so), activation-range rule and seed, so "
                        "the rows join the suite's accuracy rows (`qvlm-bench table RESULTS --perf OUT`); "
                        "with --methods, only those names")
    p.add_argument("--schemes", type=_csv, default=None,
                   help=f"comma-separated schemes (default {DEFAULT_SCHEMES}; with --methods-from, the suite's)")
    p.add_argument("--batch", type=_ints, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    p.add_argument("--override", type=_override, action="append", default=[],
                   help="quantization override KEY=VALUE, e.g. w_group_size=128 (repeatable)")
    p.add_argument("--new-tokens", type=int, default=128, help="forced new tokens (EOS ignored)")
    p.add_argument("--text-tokens", type=int, default=70, help="text tokens around the image")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the square picture in pixels where the family takes any size (Qwen2.5-VL: "
                        "a multiple of 28, default 672 = 576 image tokens; LLaVA-OneVision: default 384 = "
                        "1485 tokens with its any-res tiles); LLaVA-1.5's is fixed (336)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up generates (>= 5 for reported numbers)")
    p.add_argument("--reps", type=int, default=20, help="timed generates (>= 20 for reported numbers)")
    p.add_argument("--gate", choices=["auto", "strict"], default="auto",
                   help="correctness gate policy (docs/benchmarks/perf.md)")
    p.add_argument("--gate-tokens", type=int, default=8, help="greedy tokens compared by the gate")
    p.add_argument("--kernels", type=_csv, default=None,
                   help="restrict kernel candidates by name prefix (experiments); names of opt-in kernels "
                        "(triton-int4-gemv, triton-int4-gemv2, triton-int8-gemv2, torch-int_mm-int8) add "
                        "them instead (docs/benchmarks/perf.md)")
    p.add_argument("--objective", choices=["generate", "decode", "prefill"], default="generate",
                   help="choose each layer's weight layout by the time of the whole workload (default), "
                        "by decode time alone, or by prefill time alone (rows say which)")
    p.add_argument("--trained-gate", choices=["auto", "on", "off"], default="auto",
                   help="also gate every variant end to end on the bundled trained model with the same "
                        "kernels (auto: on CUDA only)")
    p.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                   help="run each variant (with all its batch sizes) in a fresh child process, so that a "
                        "CUDA fault costs that variant only and memory starts clean (auto: on for CUDA "
                        "devices, off on the CPU; docs/perf.md)")
    p.add_argument("--wide-layouts", action="store_true",
                   help="let a layer take a weight layout wider than its codes' storage (e.g. FP8 copies of "
                        "W4 codes: more memory for speed); rows say so (layouts: wide)")
    p.add_argument("--no-compile", action="store_true", help="eager glue instead of inductor")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32", "fp64"],
                   help="auto: fp16, plus a bf16 pass (with a bf16 baseline) for variants whose best "
                        "kernel needs bf16; fp64 on the CPU (models.loading.auto_dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/perf", help="folder for records.jsonl and leaderboard.md")
    p.add_argument("--suite", default="perf")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per model; variants not started by then are skipped and listed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant of an isolated run
    p.add_argument("--leaderboard-only", action="store_true",
                   help="only re-render leaderboard.md from records.jsonl")
    p.set_defaults(func=run_from_args)
    return p


def perf_methods(names: list[str] | None, suite: str | None = None) -> list:
    """The method entries a perf run measures: names (None: rtn; ``all``: every registered method
    but the reference), or a suite's ``methods`` entries (options, labels, clip), only those of
    ``names`` where given (every entry of a named method: ``rtn`` is rtn and rtn+clip)."""
    from .. import registry

    if suite is not None:
        from ..suite_config import load_suite

        from ..cells import resolve_variants

        variants = resolve_variants(load_suite(suite))  # the suite's labels (options, clip, calibration)
        if names and names != ["all"]:
            unknown = sorted(set(names) - {v.method for v in variants})
            if unknown:
                raise ValueError(f"--methods {','.join(unknown)}: not a method of suite {suite} "
                                 f"(it has {', '.join(dict.fromkeys(v.method for v in variants))})")
            variants = [v for v in variants if v.method in names]
        return variants
    names = names or ["rtn"]
    if names == ["all"]:
        ref = registry.reference_method()
        return [m for m in registry.available_methods() if m != ref]
    return names


def perf_schemes(args: argparse.Namespace) -> list[str]:
    """``--schemes``, or by default the suite's (``--methods-from``) or ``DEFAULT_SCHEMES``."""
    if args.schemes:
        return args.schemes
    if args.methods_from:
        from ..suite_config import load_suite

        return [q.scheme for q in load_suite(args.methods_from).schemes]
    return _csv(DEFAULT_SCHEMES)


def perf_config(args: argparse.Namespace, methods: list) -> PerfConfig:
    """The ``PerfConfig`` of a ``qvlm-bench perf`` command line (checked: ``PerfConfig.check``)."""
    from .benchmark import PerfConfig

    return PerfConfig(methods=methods, schemes=perf_schemes(args), batches=args.batch, out=args.out, suite=args.suite,
                      new_tokens=args.new_tokens, text_tokens=args.text_tokens, image_size=args.image_size,
                      warmup=args.warmup,
                      reps=args.reps, gate=args.gate, gate_tokens=args.gate_tokens, compile=not args.no_compile,
                      graphs=not args.no_graphs, device=args.device, dtype=args.dtype, seed=args.seed,
                      overrides=dict(args.override), time_budget_s=args.time_budget, kernels=args.kernels,
                      objective=args.objective, trained_gate=args.trained_gate, leaderboard=False,
                      isolate=args.isolate, wide_layouts=args.wide_layouts,
                      methods_from=getattr(args, "methods_from", None))


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from pathlib import Path

    from .table import write_perf_table

    out = Path(args.out)
    command = "python -m harness.perf.command " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.child:  # a child process of an isolated run (harness.perf.isolate): one variant, its records
        from .benchmark import run_child

        return run_child(args.child)
    if args.leaderboard_only:
        print(write_perf_table(out / "records.jsonl", out / "leaderboard.md"))
        return 0
    if not args.model:
        print("qvlm-bench perf: --model is required (an architecture name such as llava-1.5-7b, "
              "a local folder or a Hub id), unless --leaderboard-only", file=sys.stderr)
        return 2
    from .benchmark import run_perf

    try:
        config = perf_config(args, perf_methods(args.methods, args.methods_from))
    except (KeyError, ValueError) as exc:
        print(f"qvlm-bench perf: {exc}", file=sys.stderr)
        return 2
    from ..resultsdir import ResultsDirError

    failed = 0
    for model in args.model:
        try:
            recs = run_perf(model, config)
        except ResultsDirError as exc:
            print(f"qvlm-bench perf: {exc}", file=sys.stderr)
            return 2
        failed += sum(r["status"] != "ok" for r in recs)
    text = write_perf_table(out / "records.jsonl", out / "leaderboard.md", command=command)
    print(text)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvlm-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_perf_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "perf":
        argv = ["perf", *argv]
    args = parser.parse_args(argv)
    return args.func(args, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
