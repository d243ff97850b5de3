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
import re
import shutil
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "mutation.json"

WRAPPING_DECORATORS = {"property", "cached_property", "torch.no_grad()"}

# mutant name -> why it cannot change what the code computes (mutmut 3.8.1 names, for the
# source at the commit of the report)
SQUARE = "reads the height instead of the width: every latent, state and token map is square (a grid is one side)"
FRESH_NOISE = (
    "re-noises a full window's later stage (end b = 1, start a = 0) instead of drawing afresh: "
    "k = 0, sigma = 1, rho = 0, i.e. the same generator draws as unit block noise (up to the "
    "rounding of (x - tile mean) + tile mean)"
)
CPU_ONLY = (
    "equivalent on a CPU-only machine: without a device the stage index lands on the default device, "
    "the CPU; with the model on an accelerator the embedding lookup would fail loudly. Under a meta "
    "default device the CPU embedding still reads the meta index, so only an accelerator run kills it"
)
EQUIVALENT: dict[str, str] = {
    "ecar.flow.x_downsample__mutmut_2": SQUARE,
    "ecar.flow.x_upsample__mutmut_2": SQUARE,
    "ecar.flow.x_stage_endpoints__mutmut_12": SQUARE,
    "ecar.flow.x_upsample_and_renoise__mutmut_4": SQUARE,
    "ecar.flow.x_start_noise__mutmut_7": SQUARE,
    "ecar.flow.x_upsample__mutmut_9": "drops mode='nearest', F.interpolate's default mode",
    "ecar.flow.x_stage_endpoints__mutmut_1": (
        "`and`: differs only for no previous map with a start above 0, which no caller passes (no map means "
        "the first stage or a full window, start 0); with a map and start 0 the general branch gives "
        "0 * Up(P) + 1 * n = n exactly"
    ),
    "ecar.flow.x_stage_endpoints__mutmut_4": (
        "`start == 1.0`: at start 0 the general branch gives 0 * Up(P) + 1 * n = n exactly; no stage starts at 1"
    ),
    "ecar.flow.x_block_noise__mutmut_15": "`cells > 2`: cells = block^2 is never 2",
    "ecar.flow.x_renoise_coefficients__mutmut_42": "`cells > 2`: cells = factor^2 is never 2",
    "ecar.flow.x_block_noise__mutmut_18": "`<=` at floor - 1e-9: only that one float, already outside the range",
    "ecar.flow.x_block_noise__mutmut_34": (
        "takes the 1x1 shortcut never: the general path gives 0 * 0 + 1 * x = x for 1x1 tiles too"
    ),
    "ecar.flow.x_renoise_coefficients__mutmut_27": (
        "`<` at the 1e-12 cut-off: only an added variance of exactly 1e-12 (noise std 1e-6) changes"
    ),
    "ecar.flow.x_upsample_and_renoise__mutmut_18": (
        "`sigma == 1.0`: for sigma 0 it adds 0 * noise, the same value (it only spends random draws); sigma is 1 "
        "only for a start a = 0, which no caller re-noises (such a stage draws fresh noise)"
    ),
    "ecar.flow.x_sample_tau__mutmut_18": (
        "sigmoid(mean - std z) has the law of sigmoid(mean + std z) for a standard normal z: other but equally "
        "distributed training times"
    ),
    "ecar.flow.x_clean_estimate__mutmut_3": (
        "`or`: at start 0 the subtracted term is 0 * Up(P) = 0; a start above 0 always comes with a previous map"
    ),
    "ecar.flow.x_clean_estimate__mutmut_4": "`start >= 0`: at start 0 the subtracted term is 0 * Up(P) = 0",
    "ecar.euler.x_guided_velocity__mutmut_20": "slice(None, B) is slice(0, B)",
    "ecar.euler.x_guided_velocity__mutmut_22": "slice(B) is slice(0, B)",
    "ecar.euler.x_integrate__mutmut_2": (
        "the initial velocity is returned only after zero Euler steps; the config requires at least one"
    ),
    "ecar.layout.xǁStageLayoutǁstage_of_token__mutmut_3": (
        "torch.repeat_interleave(repeats) is repeat_interleave(arange(len(repeats)), repeats): the same stage indices"
    ),
    "ecar.layout.xǁStageLayoutǁstarts__mutmut_9": (
        "`/` for the grid ratio: the config requires each grid to be a whole multiple of the previous one, so "
        "both give the same number"
    ),
    "ecar.models.ecar.xǁClassConditionalǁdrop_labels__mutmut_5": (
        "shortcut at probability 1 instead of 0: rand < 0 drops nothing (same labels, only spends random "
        "draws), and the config keeps class_dropout below 1"
    ),
    "ecar.models.ecar.xǁClassConditionalǁdrop_labels__mutmut_13": "`<=`: only a uniform draw equal to p",
    "ecar.models.ecar.xǁClassConditionalǁweighted_total__mutmut_4": (
        "default weights 2 instead of 1: equal weights give the mean either way"
    ),
    "ecar.models.ecar.xǁECARǁstage_velocity__mutmut_4": "torch.full with an int fill value is already torch.long",
    "ecar.models.ecar.xǁECARǁstage_velocity__mutmut_8": "torch.full with an int fill value is already torch.long",
    "ecar.models.ecar.xǁECARǁstage_velocity__mutmut_5": CPU_ONLY,
    "ecar.models.ecar.xǁECARǁstage_velocity__mutmut_9": CPU_ONLY,
    "ecar.models.ecar.xǁECARǁloss__mutmut_22": "`s >= 0`: stage 0 starts at 0, which fails the condition anyway",
    "ecar.models.ecar.xǁECARǁloss__mutmut_24": "in training: " + FRESH_NOISE,
    "ecar.models.ecar.xǁECARǁloss__mutmut_110": (
        "leaves t in the training times' dtype: the flow's time embedding reads t as float32 (t_B.float())"
    ),
    "ecar.models.ecar.xǁECARǁloss__mutmut_68": "at stage 0 the start is 0, so stage_endpoints ignores the map",
    "ecar.models.ecar.xǁECARǁloss__mutmut_71": "at stage 0 the start is 0, so stage_endpoints ignores the map",
    "ecar.models.ecar.xǁECARǁiter_stages__mutmut_37": "also makes a KV cache for use_cache=False, never read",
    "ecar.models.ecar.xǁECARǁiter_stages__mutmut_39": (
        "previous_up starts as '' instead of None: read only at stage 0, whose start 0 skips it"
    ),
    "ecar.models.ecar.xǁECARǁiter_stages__mutmut_67": "at sampling: " + FRESH_NOISE,
    "ecar.models.ecar.xǁECARǁiter_stages__mutmut_71": "at sampling: " + FRESH_NOISE,
    "ecar.models.ecar.xǁECARǁgenerate__mutmut_1": (
        "the result starts as '' instead of None: a layout has at least one stage, so it is always replaced"
    ),
}


# mutant name -> the test that kills it (added for a survivor of the run before these tests)
KILLED_BY: dict[str, str] = {
    "ecar.flow.x_upsample_and_renoise__mutmut_19": (
        "tests/unit/test_flow_exact.py::test_up_and_renoise_without_room_for_noise_is_the_scaled_up_state_alone"
    ),
    "ecar.models.ecar.xǁECARǁ__init____mutmut_35": (
        "tests/unit/test_models.py::test_flow_positions_are_in_units_of_the_finest_token_grid"
    ),
    "ecar.models.ecar.xǁECARǁ__init____mutmut_36": (
        "tests/unit/test_models.py::test_flow_positions_are_in_units_of_the_finest_token_grid"
    ),
}


def allow_wrapping_decorators() -> None:
    """Make mutmut 3.8 mutate functions whose decorators are all in WRAPPING_DECORATORS."""
    import libcst as cst
    from mutmut.mutation import file_mutation

    def wrapping_only(node: cst.CSTNode) -> bool:
        decorators = getattr(node, "decorators", ())
        return (
            isinstance(node, cst.FunctionDef)
            and bool(decorators)
            and all(cst.Module([]).code_for_node(d.decorator) in WRAPPING_DECORATORS for d in decorators)
        )

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


# Test files from the cheapest and most exact to the model-level ones.
TEST_FILE_ORDER = (
    "test_flow_exact.py",
    "test_flow.py",
    "test_layout.py",
    "test_sampler_oracle.py",
    "test_learning.py",
    "test_models.py",
)


def pytest_collection_modifyitems(items) -> None:
    """A pytest hook (`-p benchmarks.mutation` in [tool.mutmut]): mutmut stops a mutant's tests at
    the first failure, so the cheap exact tests go first instead of in mutmut's set order."""

    def rank(item) -> int:
        name = item.path.name
        return TEST_FILE_ORDER.index(name) if name in TEST_FILE_ORDER else len(TEST_FILE_ORDER)

    items.sort(key=rank)


def run_mutmut(names: list[str], max_children: int | None) -> None:
    from mutmut.__main__ import cli

    allow_wrapping_decorators()
    try:
        cli(["run", *names, *(["--max-children", str(max_children)] if max_children else [])], standalone_mode=False)
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
            if status not in ("killed", "not checked"):
                row["diff"] = get_diff_for_mutant(name, path=path)
            rows.append(row)
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by verdict; the score over all mutants, and over those checked (an interrupted run)."""
    counts = {status: sum(r["status"] == status for r in rows) for status in {r["status"] for r in rows}}
    killed, checked = counts.get("killed", 0), len(rows) - counts.get("not checked", 0)
    return {
        "total": len(rows),
        "killed": killed,
        "survived": counts.get("survived", 0),
        "timeout": counts.get("timeout", 0),
        "not_checked": counts.get("not checked", 0),
        "other": {k: v for k, v in counts.items() if k not in ("killed", "survived", "timeout", "not checked")},
        "score": round(killed / len(rows), 4) if rows else None,
        "score_of_checked": round(killed / checked, 4) if checked else None,
    }


def report(as_before: bool) -> dict[str, Any]:
    """Write RESULTS from mutants/. A mutant that survived mutmut's run but is in KILLED_BY counts
    as killed: the run predates that test, which fails under the mutant (a fresh run kills it)."""
    from mutmut.configuration import config

    rows = verdicts()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    before = (
        {**score(rows), "not_killed": [r["mutant"] for r in rows if r["status"] not in ("killed", "not checked")]}
        if as_before
        else previous.get("before")
    )
    survivors = []
    for row in rows:
        name = row["mutant"]
        if row["status"] in ("killed", "not checked"):
            continue
        if name in KILLED_BY:
            verdict = f"killed by new test {KILLED_BY[name]}"
        elif name in EQUIVALENT:
            verdict = f"equivalent: {EQUIVALENT[name]}"
        else:
            verdict = "unexplained"
        survivors.append(
            {"mutant": name, "file": row["file"], "diff": row["diff"], "result": row["status"], "status": verdict}
        )
        if name in KILLED_BY:
            row["status"] = "killed"
    result = {
        "tool": "mutmut",
        "version": version("mutmut"),
        "date": date.today().isoformat(),
        "files": list(config().only_mutate),
        "tests": list(config().pytest_add_cli_args_test_selection),
        **score(rows),
        "before": before,
        "survivors": survivors,
        "not_checked_functions": sorted(
            {re.sub(r"__mutmut_\d+$", "", r["mutant"]) for r in rows if r["status"] == "not checked"}
        ),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to (re-)test; default: all without a verdict")
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and its cached verdicts")
    parser.add_argument("--report-only", action="store_true", help="write the report from mutants/ as it is")
    parser.add_argument("--as-before", action="store_true", help="record these verdicts as the score before")
    parser.add_argument("--max-children", type=int, help="parallel mutants (mutmut's default: one per core)")
    args = parser.parse_args()
    # mutmut works in the current directory: pyproject.toml, ecar/, tests/, mutants/
    import os

    os.chdir(REPO)
    if not args.report_only:
        if not args.resume:
            # mutmut copies unmutated files only once: a fresh run must not see stale copies
            shutil.rmtree(REPO / "mutants", ignore_errors=True)
        run_mutmut(args.names, args.max_children)
    result = report(args.as_before)
    print(
        f"mutation score {result['score']}: {result['killed']} of {result['total']} mutants killed, "
        f"{sum(s['status'] == 'unexplained' for s in result['survivors'])} survivors unexplained",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
