"""Where E-CAR's samples go wrong: its stages given real end states (issue 11's gap).

E-CAR generates a 4x4, then an 8x8, then the 16x16 token map. Here the first k stages are not
generated but taken from real training latents, as training builds them (the noisy end state
of each stage on the real token map, `ECAR.stage_path`); the AR reads them and the remaining
stages are generated as at sampling. k = 0 is the plain sampler; k = 2 leaves only the last
stage to the model. If the quality comes back as k grows, the early stages (the layout) lose
it; if it does not, the last stage (the detail) does. The floor: the same real latents decoded
by the tokenizer. Every row: the first N training latents' classes, the same seeds, FID,
precision, recall and classifier score against the first N test images.

    python benchmarks/stages.py                       # after headline.py's train part; ~15 min
    python benchmarks/stages.py --images 500 --root outputs/headline

Writes benchmarks/results/stages.json, stages.md and stages.png (one row of samples per k).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import headline  # noqa: E402  (the headline's paths and report helpers)

COLUMNS = [
    ("row", "{}"),
    ("given", "{}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("classifier_score", "{:.2f}"),
]


def stage_rows(paths: headline.Paths, images: int, batch: int = 50, seed: int = 0) -> dict:
    """Images of every k (stages given) and of the tokenizer floor, in [-1, 1], and the config."""
    import torch

    from ecar import flow
    from ecar.data.reader import read_latents
    from ecar.export import load_exported
    from ecar.sampler import tokenizer_decoder

    exported = load_exported(paths.export("ecar"))
    model, config, scale = exported.model, exported.config, exported.latent_scale
    decode = tokenizer_decoder(exported, torch.device("cpu"))
    latents, labels = read_latents(paths.manifest, "train", images)  # scaled, as the model sees them
    stages = model.layout.num_stages
    out: dict[str, list] = {f"k={k}": [] for k in range(stages)} | {"tokenizer": []}
    for first in range(0, images, batch):
        part = slice(first, first + batch)
        with torch.no_grad():
            maps = flow.token_maps(latents[part], model.layout.grids)
            ends: list = []
            stream = torch.Generator().manual_seed(seed + first)
            for s in range(stages - 1):
                ends.append(model.stage_path(s, maps, ends, stream)[1])
            for k in range(stages):
                generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(labels[part]))]
                *_, last = model.iter_stages(labels[part], config.sampling, generators, given_ends=ends[:k])
                out[f"k={k}"].append(decode(last.end_state / scale))
            out["tokenizer"].append(decode(latents[part] / scale))
        print(f"{time.strftime('%H:%M:%S')} stages: {min(first + batch, images)}/{images} images", flush=True)
    return {"images": {name: torch.cat(parts) for name, parts in out.items()}, "config": config}


def report(rows: dict, paths: headline.Paths, images: int, results: Path) -> dict:
    import torch

    from ecar.evaluation.evaluate import score_images

    config, found = rows["config"], {}
    grids = config.stages.grids
    for name, batch in rows["images"].items():
        metrics = score_images(batch, paths.manifest, "test", images, config, torch.nn.Identity(), ())
        given = "-" if name == "tokenizer" else " + ".join(f"{g}x{g}" for g in grids[: int(name[2:])]) or "none"
        found[name] = {"row": name, "given": given, **{key: metrics[key] for key, _ in COLUMNS[2:]}}
        print(json.dumps(found[name]), flush=True)
    result = {
        "what": __doc__.split("\n\n")[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "images": images,
        "model": paths.export("ecar"),
        "steps_per_stage": list(config.flow.steps_per_stage),
        "cfg_scale": config.sampling.cfg_scale,
        "rows": found,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "stages.json").write_text(json.dumps(result, indent=2))
    (results / "stages.md").write_text(markdown(result))
    strip(rows, results / "stages.png")
    return result


def markdown(result: dict) -> str:
    images, found = result["images"], result["rows"]
    lines = [
        "# E-CAR's stages given real end states",
        "",
        f"{result['date']}; the headline's E-CAR ({result['steps_per_stage']} steps per stage, CFG "
        f"{result['cfg_scale']}); the first {images} training latents' classes and stage paths, the same seeds "
        f"in every row; metrics against the first {images} test images (FID-{images}: compare within this table). "
        "`k`: how many of the first stages are taken from the real latents instead of generated; `tokenizer`: "
        "the real latents decoded (the floor).",
        "",
        *headline.markdown_table(COLUMNS, found.values()),
    ]
    generated = [row for name, row in found.items() if name.startswith("k=")]
    if len(generated) > 1 and "tokenizer" in found:
        plain, last, floor = generated[0]["fid"], generated[-1]["fid"], found["tokenizer"]["fid"]
        lines += [
            "",
            f"Given every stage but the last from real latents, E-CAR reaches FID {last:.2f}, against {plain:.2f} "
            f"when it generates every stage and {floor:.2f} for the tokenizer floor: the last stage alone keeps "
            f"{(last - floor) / (plain - floor):.0%} of the gap to the floor.",
        ]
    return "\n".join(lines) + "\n"


def strip(rows: dict, path: Path, count: int = 20) -> None:
    """One row of the first `count` images per row of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows["images"])
    figure, axes = plt.subplots(len(names), 1, figsize=(count * 0.6, len(names) * 0.8))
    for axis, name in zip(axes, names):
        batch = rows["images"][name][:count, 0]
        axis.imshow(((batch.clamp(-1, 1) + 1) / 2).permute(1, 0, 2).reshape(batch.shape[1], -1), cmap="gray")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(name, rotation=0, ha="right", va="center")
    figure.suptitle("The same latents' classes and seeds; k stages given")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/headline")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument(
        "--results-dir", type=Path, help="default: benchmarks/results for outputs/headline, else ROOT/results"
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite stages.md from stages.json")
    args = parser.parse_args(argv)
    paths = headline.Paths.under(args.root)
    results = headline.results_dir(args.root, args.results_dir)
    if args.markdown_only:
        (results / "stages.md").write_text(markdown(json.loads((results / "stages.json").read_text())))
    else:
        report(stage_rows(paths, args.images), paths, args.images, results)
    print((results / "stages.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
