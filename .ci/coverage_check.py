"""Coverage of lisa_kernels from a coverage.py JSON report: the total share of lines executed and every function
that never ran (no executed line). What may go unmeasured is listed in .coveragerc alone: a "pragma: no cover" in a
measured file fails the check.

    python .ci/coverage_check.py coverage.json [--min-lines 95] [--require-functions]

Exits 1 where the total is below --min-lines, where (with --require-functions) a function never ran, or where a
measured file excludes lines itself.
"""
import argparse
import json
import re
import sys

PRAGMA = re.compile(r"#\s*(pragma|PRAGMA)[:\s]?\s*(no|NO)\s*(cover|COVER)")    # coverage.py's default exclusion


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--min-lines", type=float, default=0.0)
    ap.add_argument("--require-functions", action="store_true")
    args = ap.parse_args()
    with open(args.report) as f:
        data = json.load(f)
    total = data["totals"]["percent_covered"]
    never = []
    for path, entry in sorted(data["files"].items()):
        if "functions" not in entry:
            print("coverage check FAILED: the report has no functions (coverage.py >= 7.5 writes them)")
            return 1
        for name, fn in entry["functions"].items():
            s = fn["summary"]
            if name and s["num_statements"] > 0 and s["covered_lines"] == 0:
                never.append(f"{path.split('lisa_kernels/')[-1]}:{fn['missing_lines'][0]} {name}")
    pragmas = []
    for path in sorted(data["files"]):
        with open(path) as f:
            pragmas += [f"{path}:{n}" for n, line in enumerate(f, 1) if PRAGMA.search(line)]
    for where in pragmas:
        print(f"   excluded in the code (list it in .coveragerc instead): {where}")
    print(f"lisa_kernels: {total:.1f}% of lines executed ({data['totals']['covered_lines']} of "
          f"{data['totals']['num_statements']}); {len(never)} functions never ran")
    for line in never:
        print(f"   never ran: {line}")
    failed = total < args.min_lines or (args.require_functions and never) or pragmas
    if failed:
        print(f"coverage check FAILED (at least {args.min_lines}% of lines"
              f"{', every function run' if args.require_functions else ''})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
