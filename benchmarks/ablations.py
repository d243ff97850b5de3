"""Where E-CAR loses to the flow-DiT at the headline's budget: one design choice changed at a time.

Each ablation is E-CAR (`ecar-fmnist`) with one choice changed, trained with the headline
experiment's budget on its data and tokenizer (same steps, batch, optimizer, schedule, EMA and
seed), sampled at its default schedule on the same (class, seed) rows and scored against the
same test images. The headline's own design ablations, the full window (`ecar-full`) and the AR
fed the clean estimate (`ecar-clean`), its other schedules (steps per stage) and its E-CAR and
flow-DiT rows are reused from its metrics. A difference within the headline's seed noise is a tie.

    python benchmarks/ablations.py                     # after headline.py's data part; resumable
    python benchmarks/ablations.py --ablations ecar-long-first ecar-additive
    python benchmarks/ablations.py --parts report

Writes benchmarks/results/ablations.json, ablations.md and ablations-grid.png (ROOT/results for
another root).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import headline  # noqa: E402  (the headline's budget, paths and parts)
from headline import Variant  # noqa: E402

from ecar.config import USER_ERRORS, Config  # noqa: E402
from ecar.presets import get_config  # noqa: E402

PARTS = ("train", "sample", "evaluate", "report")


@dataclass(frozen=True)
class Ablation:
    change: str  # the one choice it changes, in words
    overrides: dict[str, Any]  # of ecar-fmnist
    baseline: str = "ecar"  # the trained row it differs from by that choice alone


EQUAL_WEIGHTS = {"stages.loss_weight_growth": 1.0}
# name -> the ablation, in the order they are trained. `ecar-weights` (loss weights 1, 2, 4 against
# equal ones) won and is the default since: the model trained before is `ecar-equal-weights`, and
# the ablation run before that change (`ecar-flow6`) is judged against it.
ABLATIONS: dict[str, Ablation] = {
    "ecar-equal-weights": Ablation("equal per-stage loss weights (the default before; now 1, 2, 4)", EQUAL_WEIGHTS),
    "ecar-flow6": Ablation(
        "depth split: AR 1 + flow 6 blocks (default 4 + 4; 3% fewer parameters), equal loss weights",
        {"model.ar_depth": 1, "model.flow_depth": 6, **EQUAL_WEIGHTS},
        baseline="ecar-equal-weights",
    ),
    "ecar-long-first": Ablation(
        "window edges 0, .5, .75, 1: the 4x4 stage takes half the path (default even thirds)",
        {"stages.window_edges": [0.0, 0.5, 0.75, 1.0]},
    ),
    "ecar-2stages": Ablation(
        "two stages: grids 8, 16 with 10 + 10 steps, loss weights 1, 2 (default three: 4, 8, 16)",
        {"stages.grids": [8, 16], "flow.steps_per_stage": [10, 10]},
    ),
    "ecar-no-correction": Ablation(
        "even windows without the re-noise correction (default corrected)", {"stages.renoise_correction": False}
    ),
    "ecar-additive": Ablation(
        "condition added to the flow's input tokens (default spatial adaLN; 14% fewer parameters)",
        {"model.condition_injection": "additive"},
    ),
}
# the headline's rows shown beside the ablations: what each changes
HEADLINE_ROWS = {
    "ecar": "E-CAR's default",
    "ecar-full": "every stage from pure noise over [0, 1] (FlowAR-like full window)",
    "ecar-clean": "the AR fed the clean estimate (default: the noisy end state)",
    **{
        f"ecar@{'-'.join(map(str, s))}": f"{sum(s)} steps per image ({'+'.join(map(str, s))})"
        for s in headline.ECAR_SCHEDULES
    },
}
COLUMNS = [
    ("row", "{}"),
    ("change", "{}"),
    ("params_m", "{:.2f}"),
    ("sampling_gflops", "{:.2f}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("classifier_score", "{:.2f}"),
    ("baseline", "{}"),
    ("fid_vs_baseline", "{:+.2f}"),
    ("verdict", "{}"),
]


def ablation_configs(paths: headline.Paths, scale: headline.Scale, names: list[str]) -> dict[str, Config]:
    shared = headline.budget(paths, scale)
    return {name: get_config("ecar-fmnist", {**shared, **ABLATIONS[name].overrides}) for name in names}


def table(rows: dict[str, dict[str, Any]], names: list[str], threshold: float) -> list[dict[str, Any]]:
    """One line per headline E-CAR row and ablation that has metrics, then the best flow-DiT row,
    each judged against its baseline (E-CAR's default unless the ablation names another): better,
    worse, or a tie within `threshold` (the seed noise)."""
    changes = {**HEADLINE_ROWS, **{name: ABLATIONS[name].change for name in names}}
    dits = [name for name, row in rows.items() if row.get("model") == "dit" and "/seed" not in name]
    if dits:
        changes[min(dits, key=lambda name: rows[name]["fid"])] = "the best flow-DiT row (reference)"
    out = []
    for name, change in changes.items():
        row = rows.get(name)
        if row is None:
            continue
        line = {
            "row": name,
            "change": change,
            "params_m": row["params"] / 1e6,
            **{key: row[key] for key in ("sampling_gflops", "fid", "precision", "recall", "classifier_score")},
        }
        baseline = ABLATIONS[name].baseline if name in ABLATIONS else "ecar"
        if baseline in rows and name != "ecar":
            line["baseline"] = baseline
            line["fid_vs_baseline"] = row["fid"] - rows[baseline]["fid"]
            line["verdict"] = headline.verdict(row["fid"], rows[baseline]["fid"], threshold)
        out.append(line)
    return out


def summary_lines(lines: list[dict[str, Any]], threshold: float) -> list[str]:
    """What the table says, in words: which changes beat their baseline beyond the seed noise."""
    judged = [line for line in lines if "verdict" in line and line["row"] in ABLATIONS]
    if not judged:
        return []
    better = [line["row"] for line in judged if line["verdict"] == "better"]
    ties = [line["row"] for line in judged if line["verdict"] == "tie"]
    best = min(judged, key=lambda line: line["fid"])
    words = [
        "",
        f"Seed noise (the FID spread between two sampling seeds of the same model): {threshold:.2f}; "
        "a difference within it is a tie.",
        f"Better than their baseline beyond the noise: {', '.join(better) or 'none'}; "
        f"ties: {', '.join(ties) or 'none'}. Lowest FID of the ablations: {best['row']} "
        f"({best['fid']:.2f}, {best['fid_vs_baseline']:+.2f} against {best['baseline']}).",
    ]
    return words


def report(paths: headline.Paths, names: list[str], results: Path) -> dict[str, Any]:
    rows = paths.scored_rows()
    if "ecar" not in rows:
        raise FileNotFoundError(f"no E-CAR metrics under {paths.root}: run headline.py's evaluate part first")
    threshold = headline.seed_noise(rows, headline.between_seeds(paths, rows))["tie_threshold"]
    lines = table(rows, names, threshold)
    result = {
        **headline.report_header(__doc__.split("\n\n")[0], rows["ecar"]),
        "tie_threshold": threshold,
        "ablations": {name: dataclasses.asdict(ABLATIONS[name]) for name in names},
        "rows": lines,
    }
    text = [
        "# E-CAR's design ablations at the headline's budget",
        "",
        f"{result['date']}; every model trained {result['train_steps']} steps at batch "
        f"{result['global_batch_size']} on the headline's data; {result['samples']} samples per row on the same "
        f"(class, seed) rows, sampling seed 0; metrics against the first {result['reference_images']} test images. "
        "`fid_vs_baseline`: the row's FID minus its baseline's, the row it differs from by the one change "
        "(negative is better).",
        "",
        *headline.markdown_table(COLUMNS, lines),
    ]
    text += summary_lines(lines, threshold)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablations.json").write_text(json.dumps(result, indent=2))
    (results / "ablations.md").write_text("\n".join(text) + "\n")
    shown = [Variant(line["row"], line["row"]) for line in lines if "/" not in line["row"]]
    headline.grid(shown, paths, results / "ablations-grid.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--scale", choices=sorted(headline.SCALES), default="full")
    parser.add_argument("--root", default="outputs/headline", help="the headline's work root (its data and rows)")
    parser.add_argument("--train-steps", type=int, help="training steps (default: the scale's, as the headline)")
    parser.add_argument("--samples", type=int, help="images per row (default: the scale's, as the headline)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument(
        "--results-dir", type=Path, help="default: benchmarks/results for outputs/headline, else ROOT/results"
    )
    args = parser.parse_args(argv)
    scale = dataclasses.replace(
        headline.SCALES[args.scale],
        train_steps=args.train_steps or headline.SCALES[args.scale].train_steps,
        samples=args.samples or headline.SCALES[args.scale].samples,
    )
    results = headline.results_dir(args.root, args.results_dir)
    paths = headline.Paths.under(args.root)
    names = args.ablations
    variants = [Variant(name, name) for name in names]
    try:
        if {"train", "sample"} & set(args.parts):
            from ecar.runtime import init_ray

            init_ray(args.address)
        if "train" in args.parts:
            configs = ablation_configs(paths, scale, names)
            for name, config in configs.items():
                headline.log.info("%-18s %.2f M parameters", name, headline.parameter_count(config) / 1e6)
            headline.train_models(configs, names, paths, args.address)
        if "sample" in args.parts:
            headline.sample_variants(variants, paths, scale.samples, args.actors)
        if "evaluate" in args.parts:
            import ray

            ray.shutdown()
            headline.evaluate_variants(variants, paths, scale.samples)
        if "report" in args.parts:
            report(paths, names, results)
            print((results / "ablations.md").read_text())
    except USER_ERRORS as error:
        print(f"ablations: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
