"""Mutation testing of the flow math, the Euler/CFG loop, the stage layout and E-CAR (`make mutation`).

    python benchmarks/mutation.py                 # fresh run: mutmut over [tool.mutmut], then the report
    python benchmarks/mutation.py --resume        # keep mutants/ and its cached verdicts, test the rest
    python benchmarks/mutation.py --resume NAME.. # re-test these mutants (after a new test), then report
    python benchmarks/mutation.py --report-only [--as-before]

mutmut 3 copies `ecar/` into `mutants/`, where every mutated function becomes a trampoline that
calls the original or the mutant named by the worker's environment; it puts `mutants/` first on
`sys.path`, ahead of the editable install's finder (which only answers what the path does not),
so the tests import the mutated copy.

mutmut skips every decorated function, because a decorator runs at definition time and may have
effects. Three here only wrap the function: `@property`, `@cached_property` and
`@torch.no_grad()`, and skipping them would leave out the stage loop (`ECAR.iter_stages`,
`generate`) and every window and offset of `StageLayout`. `allow_wrapping_decorators` lets
mutmut mutate those: the trampoline keeps the decorators, the original and mutant copies it
dispatches to are plain functions.

The report, benchmarks/results/mutation.json, lists every mutant that was not killed with its
diff and why it is harmless (`EQUIVALENT`) or which test now kills it (`KILLED_BY`). `--as-before`
records the current verdicts as the score before those tests, kept by later reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "mutation.json"

WRAPPING_DECORATORS = {"property", "cached_property", "torch.no_grad()"}

# mutant name -> why it cannot change what the code computes (filled in from the survivors)
EQUIVALENT: dict[str, str] = {}

# mutant name -> the test that kills it (added for a survivor of the run before these tests)
KILLED_BY: dict[str, str] = {}


def allow_wrapping_decorators() -> None:
    """Make mutmut 3.8 mutate functions whose decorators are all in WRAPPING_DECORATORS."""
    import libcst as cst
    from mutmut.mutation import file_mutation

    def wrapping_only(node: cst.CSTNode) -> bool:
        decorators = getattr(node, "decorators", ())
        return (isinstance(node, cst.FunctionDef) and bool(decorators) and
                all(cst.Module([]).code_for_node(d.decorator) in WRAPPING_DECORATORS for d in decorators))

    skip = file_mutation.MutationVisitor._skip_node_and_children
    arrange = file_mutation.function_trampoline_arrangement

    def skip_unless_wrapping(self, node):
        # every other reason to skip a function still applies
        return skip(self, node.with_changes(decorators=()) if wrapping_only(node) else node)

    def arrange_with_bare_copies(function, mutants, class_name):
        if not wrapping_only(function):
            return arrange(function, mutants, class_name)
        # `with_changes` keeps the body's nodes, which is what the mutations point into
        declarations, methods, assignments, names = arrange(function.with_changes(decorators=()), mutants, class_name)
        trampoline = methods[0].with_changes(decorators=[*function.decorators, *methods[0].decorators])
        return declarations, [trampoline, *methods[1:]], assignments, names

    file_mutation.MutationVisitor._skip_node_and_children = skip_unless_wrapping
    file_mutation.function_trampoline_arrangement = arrange_with_bare_copies


def run_mutmut(names: list[str]) -> None:
    from mutmut.__main__ import cli

    allow_wrapping_decorators()
    try:
        cli(["run", *names], standalone_mode=False)
    except SystemExit as stop:  # mutmut exits non-zero when its clean run or setup check fails
        if stop.code:
            raise


def verdicts() -> list[dict[str, Any]]:
    """Every mutant of every mutated file: name, file, status and (unless killed) its diff."""
    from mutmut.__main__ import SourceFileMutationData, status_by_exit_code, walk_mutatable_files
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    rows = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            row = {"mutant": name, "file": str(path), "status": status}
            if status != "killed":
                row["diff"] = get_diff_for_mutant(name, path=path)
            rows.append(row)
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: sum(r["status"] == status for r in rows) for status in {r["status"] for r in rows}}
    killed = counts.get("killed", 0)
    return {"total": len(rows), "killed": killed, "survived": counts.get("survived", 0),
            "timeout": counts.get("timeout", 0), "other": {k: v for k, v in counts.items()
                                                          if k not in ("killed", "survived", "timeout")},
            "score": round(killed / len(rows), 4) if rows else None}


def report(as_before: bool) -> dict[str, Any]:
    from mutmut.configuration import config

    rows = verdicts()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    summary = score(rows)
    before = ({**summary, "not_killed": [r["mutant"] for r in rows if r["status"] != "killed"]}
              if as_before else previous.get("before"))
    survivors = []
    for row in rows:
        if row["status"] == "killed" and row["mutant"] not in KILLED_BY:
            continue
        if row["mutant"] in KILLED_BY:
            verdict = f"killed by new test {KILLED_BY[row['mutant']]}"
        elif row["mutant"] in EQUIVALENT:
            verdict = f"equivalent: {EQUIVALENT[row['mutant']]}"
        else:
            verdict = "unexplained"
        survivors.append({**row, "diff": row.get("diff", ""), "result": row["status"], "status": verdict})
    result = {
        "tool": "mutmut", "version": version("mutmut"), "date": date.today().isoformat(),
        "files": list(config().only_mutate), "tests": list(config().pytest_add_cli_args_test_selection),
        **summary, "before": before, "survivors": survivors,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to (re-)test; default: all without a verdict")
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and its cached verdicts")
    parser.add_argument("--report-only", action="store_true", help="write the report from mutants/ as it is")
    parser.add_argument("--as-before", action="store_true", help="record these verdicts as the score before")
    args = parser.parse_args()
    # mutmut works in the current directory: pyproject.toml, ecar/, tests/, mutants/
    import os
    os.chdir(REPO)
    if not args.report_only:
        if not args.resume:
            # mutmut copies unmutated files only once: a fresh run must not see stale copies
            shutil.rmtree(REPO / "mutants", ignore_errors=True)
        run_mutmut(args.names)
    result = report(args.as_before)
    print(f"mutation score {result['score']}: {result['killed']} of {result['total']} mutants killed, "
          f"{sum(s['status'] == 'unexplained' for s in result['survivors'])} survivors unexplained",
          file=sys.stderr)


if __name__ == "__main__":
    main()
