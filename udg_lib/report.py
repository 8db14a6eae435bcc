"""The report's command line: `python -m udg_lib.report --profile cpu` rebuilds `outputs/<profile>/report.md`
from the saved outputs (`rendering`); `--publish` copies the reference folder to `results/<profile>/` and
rewrites README's results block (`publishing`); `--compare REF RUN` prints two folders' headline numbers side by
side; `--benchmarks` rewrites README's benchmark block. How claims are judged: `udg_lib.judging`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from udg_lib import paths
from udg_lib.publishing import compare_results, precision_differences, publish_results
from udg_lib.rendering import (
    BENCHMARKS_BLOCK,
    render_benchmarks_block,
    render_results_block,
    update_readme,
    write_report,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udg_lib.report", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="rebuild outputs/<profile>/report.md")
    parser.add_argument("--outputs-root", help="folder of stage outputs instead of outputs/<profile>")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the reference files to results/<profile>/ and rewrite README's block; "
                             "refuses a run whose stages record a +dirty commit, none, or one older than the last "
                             "change to udg_lib/, notebooks/ or params/<profile>/")
    parser.add_argument("--results-dir", help="where --publish copies to instead of results/<profile>")
    parser.add_argument("--readme", help="README whose block --publish rewrites instead of the repo's")
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE", "RUN"),
                        help="print the headline numbers of two results/outputs folders side by side")
    parser.add_argument("--benchmarks", nargs="?", const="", metavar="FOLDER",
                        help="rewrite README's benchmark block from benchmarks/results/*.json (or FOLDER's)")
    args = parser.parse_args(argv)
    if args.benchmarks is not None:
        folder = Path(args.benchmarks) if args.benchmarks else paths.repo_root() / "benchmarks" / "results"
        if not folder.is_dir():
            print(f"udg report: no folder {folder}", file=sys.stderr)
            return 1
        try:
            readme = update_readme(args.readme or paths.repo_root() / "README.md",
                                   render_benchmarks_block(folder), BENCHMARKS_BLOCK)
        except ValueError as error:
            print(f"udg report: {error}", file=sys.stderr)
            return 1
        print(f"{readme}: benchmark block rewritten from {folder}")
        return 0
    if args.compare:
        missing = [f for f in args.compare if not Path(f).is_dir()]
        if missing:
            print(f"udg report: no folder {missing[0]}", file=sys.stderr)
            return 1
        compared = compare_results(*args.compare)
        for line in precision_differences(compared):
            print(line)
        print(compared.to_markdown(index=False, floatfmt=".4g", missingval="—"))
        return 0
    if not args.profile:
        parser.error("--profile is required (or --compare REFERENCE RUN, or --benchmarks)")
    root = paths.outputs_root(args.profile, args.outputs_root)
    if not root.is_dir():
        print(f"udg report: no outputs at {root}; run `make run PROFILE={args.profile}` first", file=sys.stderr)
        return 1
    print(write_report(root, args.profile))
    if args.publish:
        dest = Path(args.results_dir) if args.results_dir else paths.repo_root() / "results" / args.profile
        try:
            files = publish_results(root, dest, args.profile, repo=paths.repo_root())
            readme = update_readme(args.readme or paths.repo_root() / "README.md",
                                   render_results_block(dest, args.profile), args.profile)
        except (FileNotFoundError, ValueError) as error:
            print(f"udg report: {error}", file=sys.stderr)
            return 1
        print(f"{dest}: {len(files)} files, {sum(p.stat().st_size for p in files):,} bytes; {readme} updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
