"""Why E-CAR's samples collapsed within each class, and what fixed it (issue 17).

Runs on the headline experiment's trained models (benchmarks/headline.py, same budget, same
data): E-CAR with the AR fed the clean estimate (`ecar-clean`, the design before the fix), E-CAR
with the AR fed the previous stage's noisy end state in training and sampling (`ecar`, the
default now) and the flow-DiT as the reference. Sampling-time hypotheses are tested on both
E-CAR models: no guidance (CFG 1), a linear guidance ramp from 1 at stage 1, and guidance only
late in the path (interval [0.5, 1]). Every row: the same 2,000 (class, seed) rows, FID,
precision, recall and classifier score against the first 2,000 test images; rows the headline
already scored are reused from its metrics.

    python benchmarks/diversity.py            # after headline.py's train part; resumable
    python benchmarks/diversity.py --parts report
    python benchmarks/diversity.py --variants ecar ecar+ramp dit@50   # only some rows

Writes benchmarks/results/diversity.json, diversity.md and diversity.png (per class: 8 samples
of each model, the same seeds in every panel).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import headline  # noqa: E402  (the headline's models, paths and parts)
from headline import Variant  # noqa: E402

from ecar import storage  # noqa: E402

SAMPLING_ABLATIONS = {
    "cfg1": ("sampling.cfg_scale=1.0",),
    "ramp": ("sampling.cfg_schedule=linear",),
    "late": ("sampling.guidance_interval=[0.5,1.0]",),
}
REFERENCE = "dit@50"


def rows() -> list[Variant]:
    out = [Variant("ecar-clean", "ecar-clean"), Variant("ecar", "ecar")]
    for model in ("ecar-clean", "ecar"):
        out += [Variant(f"{model}+{name}", model, overrides) for name, overrides in SAMPLING_ABLATIONS.items()]
    return out + [
        Variant(REFERENCE, "dit", ("flow.steps_per_stage=[50]",)),
        Variant(f"{REFERENCE}+cfg1", "dit", ("flow.steps_per_stage=[50]", "sampling.cfg_scale=1.0")),
    ]


def per_class_grid(variants: list[Variant], paths: headline.Paths, path: Path, per_class: int = 8) -> None:
    """One panel per model: a row per class, `per_class` samples each (rows c, c + 10, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ecar.sampler import read_samples

    shown = [v for v in variants if storage.exists(storage.join(paths.samples(v.name), "manifest.json"))]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 4.2))
    for axis, variant in zip(np.atleast_1d(axes), shown):
        samples = read_samples(paths.samples(variant.name), "images")
        images, labels = samples["images"][..., 0], samples["label"]
        shown_per_class = min(per_class, *(int((labels == c).sum()) for c in range(10)))  # rows of equal length
        panel = np.concatenate([np.concatenate(list(images[labels == c][:shown_per_class]), axis=1) for c in range(10)])
        axis.imshow(panel, cmap="gray", vmin=0, vmax=255)
        axis.set_title(variant.name, fontsize=8)
        axis.axis("off")
    figure.suptitle("Samples per class (rows: classes 0-9; the same seeds in every panel)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


COLUMNS = [
    ("variant", "{}"),
    ("model", "{}"),
    ("overrides", "{}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("classifier_score", "{:.2f}"),
    ("within_class_spread", "{:.3f}"),
    ("sampling_gflops", "{:.2f}"),
]


def within_class_spread(paths: headline.Paths, names: list[str], count: int) -> dict[str, float]:
    """Per row: the pixel standard deviation across a class's samples, averaged over pixels and
    classes, over the same figure for the first `count` test images (1: as varied within each
    class as real images; a collapsed class, every sample the same garment, goes towards 0)."""
    import numpy as np

    from ecar.data.prepare import read_image_labels, read_image_split
    from ecar.presets import get_config
    from ecar.sampler import read_samples

    def spread(images, labels) -> float:
        return float(np.mean([images[labels == c].std(axis=0).mean() for c in np.unique(labels)]))

    config = get_config("ecar-fmnist")
    real = (read_image_split(paths.images, "test", count, config).numpy()[:, 0] + 1) / 2  # [0, 1]
    reference = spread(real, read_image_labels(paths.images, "test", count, config))
    out = {}
    for name in names:
        if storage.exists(storage.join(paths.samples(name), "manifest.json")):
            samples = read_samples(paths.samples(name), "images")
            out[name] = spread(samples["images"][..., 0] / 255.0, samples["label"]) / reference
    return out


def noise(paths: headline.Paths) -> dict:
    """The headline's noise figures at the same N: real train images against the test images
    (the floor of every metric) and E-CAR's default sampled with a second seed (seed noise)."""
    found = paths.read_metrics(("floor-real-train", "ecar", f"ecar/seed{headline.SEED_ROW_SEED}"))
    return {
        name: {key: row[key] for key in ("fid", "precision", "recall", "classifier_score")}
        for name, row in found.items()
    }


def noise_lines(figures: dict, samples: int) -> list[str]:
    lines = []
    if "floor-real-train" in figures:
        f = figures["floor-real-train"]
        lines += [
            "",
            f"Floor (N = {samples} real training images against the same test images): FID {f['fid']:.2f}, "
            f"precision {f['precision']:.3f}, recall {f['recall']:.3f}, classifier score {f['classifier_score']:.2f}.",
        ]
    second = f"ecar/seed{headline.SEED_ROW_SEED}"
    if "ecar" in figures and second in figures:
        a, b = figures["ecar"], figures[second]
        lines.append(
            f"Seed noise (E-CAR's default, sampling seed 0 vs {headline.SEED_ROW_SEED}): FID {a['fid']:.2f} / "
            f"{b['fid']:.2f}, recall {a['recall']:.3f} / {b['recall']:.3f}, precision {a['precision']:.3f} / "
            f"{b['precision']:.3f}."
        )
    return lines


def before_after_lines(found: dict) -> list[str]:
    """Recall before the fix (the AR fed the clean estimate) and after (fed the noisy end state),
    both at CFG 1.5, beside the flow-DiT reference."""
    if not all(name in found for name in ("ecar-clean", "ecar", REFERENCE)):
        return []
    before, after, dit = found["ecar-clean"], found["ecar"], found[REFERENCE]
    return [
        "",
        f"Recall before -> after: E-CAR {before['recall']:.3f} (clean estimate) -> {after['recall']:.3f} "
        f"(noisy end state, the default now); flow-DiT ({REFERENCE}) {dit['recall']:.3f}. "
        f"FID {before['fid']:.2f} -> {after['fid']:.2f} (flow-DiT {dit['fid']:.2f}).",
    ]


def findings(found: dict, threshold: float, recall_noise: float | None = None) -> list[str]:
    """Issue 17's bar in words: E-CAR's within-class spread and recall against the flow-DiT
    reference, and each of E-CAR's sampling changes against its default. A change meets the bar
    when its recall is at least the flow-DiT's and its FID within the seed noise of the default's;
    a recall change within `recall_noise` (the default's spread between two seeds) is marked so."""
    if "ecar" not in found or REFERENCE not in found:
        return []
    ecar, dit = found["ecar"], found[REFERENCE]
    lines = ["", "**What it shows.**"]
    if "within_class_spread" in ecar and "within_class_spread" in dit:
        spread, reference = ecar["within_class_spread"], dit["within_class_spread"]
        lines.append(
            f"- Within a class, E-CAR's samples are {'at least as' if spread >= reference else 'less'} varied as "
            f"the flow-DiT's: spread {spread:.3f} against {reference:.3f}."
        )
    lines.append(
        f"- Recall: E-CAR {ecar['recall']:.3f} against the flow-DiT's {dit['recall']:.3f} "
        f"({ecar['recall'] / dit['recall']:.2f}x), at FID {ecar['fid']:.2f} against {dit['fid']:.2f}"
        + (f"; E-CAR's recall moves by {recall_noise:.3f} between two sampling seeds." if recall_noise else ".")
    )
    changes = [name for name in found if name.startswith("ecar+")]
    meeting = []
    for name in changes:
        row = found[name]
        meets = row["recall"] >= dit["recall"] and row["fid"] <= ecar["fid"] + threshold
        meeting += [name] if meets else []
        change = row["recall"] - ecar["recall"]
        within = recall_noise is not None and abs(change) <= recall_noise
        lines.append(
            f"- {name}: recall {row['recall']:.3f} ({change:+.3f}{', within the seed noise' if within else ''}), "
            f"FID {row['fid']:.2f} ({row['fid'] - ecar['fid']:+.2f}), "
            f"spread {row.get('within_class_spread', float('nan')):.3f}."
        )
    if changes:
        lines.append(
            f"- Meets the bar (recall at least the flow-DiT's, FID within {threshold:.2f} of the default's): "
            f"{', '.join(meeting) or 'none'}."
        )
    return lines


def report(variants: list[Variant], paths: headline.Paths, results: Path) -> dict:
    found = paths.read_metrics(v.name for v in variants)
    first = next(iter(found.values()))
    for name, value in within_class_spread(paths, list(found), first["reference_images"]).items():
        found[name]["within_class_spread"] = value
    result = {**headline.report_header(__doc__.split("\n\n")[0], first), "rows": found}
    lines = [
        "# E-CAR's within-class diversity: ablations (issue 17)",
        "",
        f"{result['date']}; models of the headline experiment ({result['train_steps']} steps at batch "
        f"{result['global_batch_size']}); {result['samples']} samples per row on the same (class, seed) rows; "
        f"metrics against the first {result['reference_images']} test images. `within_class_spread`: the pixel "
        "standard deviation across a class's samples over that of the test images (1: as varied as real images "
        "within each class; towards 0: every sample of a class the same garment).",
        "",
        *headline.markdown_table(COLUMNS, found.values()),
    ]
    result["noise"] = noise(paths)
    result["tie_threshold"] = headline.seed_noise(paths.scored_rows(), {})["tie_threshold"]
    result["not_measured"] = [v.name for v in rows() if v.name not in found]
    lines += noise_lines(result["noise"], result["samples"])
    lines += before_after_lines(found)
    second = result["noise"].get(f"ecar/seed{headline.SEED_ROW_SEED}")
    recall_noise = abs(second["recall"] - found["ecar"]["recall"]) if second and "ecar" in found else None
    lines += findings(found, result["tie_threshold"], recall_noise)
    if result["not_measured"]:
        lines += ["", f"**Not measured yet** (the run is under way): {', '.join(result['not_measured'])}."]
    results.mkdir(parents=True, exist_ok=True)
    (results / "diversity.json").write_text(json.dumps(result, indent=2))
    (results / "diversity.md").write_text("\n".join(lines) + "\n")
    per_class_grid(
        [v for v in variants if v.name in ("ecar-clean", "ecar", REFERENCE)], paths, results / "diversity.png"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=("sample", "evaluate", "report"), default=["sample", "evaluate", "report"]
    )
    parser.add_argument("--root", default="outputs/headline")
    parser.add_argument(
        "--variants", nargs="+", choices=[v.name for v in rows()], help="only these rows (default: all)"
    )
    parser.add_argument("--samples", type=int, default=headline.SCALES["full"].samples)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument(
        "--results-dir", type=Path, help="default: benchmarks/results for outputs/headline, else ROOT/results"
    )
    args = parser.parse_args(argv)
    results = headline.results_dir(args.root, args.results_dir)
    paths = headline.Paths.under(args.root)
    variants = [v for v in rows() if not args.variants or v.name in args.variants]
    if "sample" in args.parts:
        from ecar.runtime import init_ray

        init_ray(None)
        headline.sample_variants(variants, paths, args.samples, args.actors)
        import ray

        ray.shutdown()
    if "evaluate" in args.parts:
        headline.evaluate_variants(variants, paths, args.samples)
    if "report" in args.parts:
        report(variants, paths, results)
        print((results / "diversity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
