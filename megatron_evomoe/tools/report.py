"""MoE analytics report of a checkpoint: JSON of the numbers and PNG figures.

    python -m megatron_evomoe.tools.report runs/demo --out runs/demo/report
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from ..eval.moe_analysis import analyze
from ..training.restore import load_trained_model


def plot_figures(result: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    layers = result["layers"]
    if not layers:
        return files
    # 1. per-modality expert distribution per layer
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    for ax, (name, rep) in zip(axes[0], layers.items()):
        E = len(rep["image"]["load"])
        xs = np.arange(E)
        ax.bar(xs - 0.2, rep["image"]["load"], 0.4, label="image")
        ax.bar(xs + 0.2, rep["text"]["load"], 0.4, label="text")
        ax.set_title(f"layer {name}: JS={rep['js_image_text'] or 0:.3f}")
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction of tokens")
        ax.legend()
    files.append(_save(fig, out / "expert_distribution.png"))
    # 2. expert output similarity heatmaps
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3), squeeze=False)
    for ax, (name, rep) in zip(axes[0], layers.items()):
        im = ax.imshow(np.array(rep["output_cosine_matrix"]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {name}: output cosine")
        fig.colorbar(im, ax=ax)
    files.append(_save(fig, out / "expert_similarity.png"))
    # 3. router logit densities, image vs text (per expert)
    E = len(next(iter(layers.values()))["image"]["load"])
    fig, axes = plt.subplots(len(layers), E, figsize=(3 * E, 2.4 * len(layers)), squeeze=False)
    for row, (name, rep) in zip(axes, layers.items()):
        img, txt = np.array(rep["router_logits"]["image"]), np.array(rep["router_logits"]["text"])
        for e, ax in enumerate(row):
            for arr, label in ((img, "image"), (txt, "text")):
                if arr.size:
                    ax.hist(arr[:, e], bins=40, density=True, alpha=0.5, label=label)
            ax.set_title(f"layer {name} expert {e}", fontsize=8)
        row[0].legend(fontsize=7)
    files.append(_save(fig, out / "router_logit_density.png"))
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m megatron_evomoe.tools.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder, or a run's save_dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output folder for report.json and the figures")
    p.add_argument("--num-samples", type=int_at_least(1), default=128, help="training samples routed (>= 1)")
    p.add_argument("--no-pope", action="store_true", help="skip the POPE evaluation (and its shuffle test)")
    p.add_argument("--data-root", help="dataset folder, if it moved since training")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        model, cfg, bundle, state = load_trained_model(args.checkpoint, data_root=args.data_root)
        result = analyze(model, cfg, bundle, num_samples=args.num_samples, pope=not args.no_pope,
                         stage_idx=state["stage_idx"])
        out.mkdir(parents=True, exist_ok=True)
    except USER_ERRORS as e:  # a bad checkpoint folder or dataset, --out naming a file
        return user_error(e)
    try:
        result["figures"] = plot_figures(result, out)
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)", file=sys.stderr)
    slim = {**result, "layers": {k: {kk: vv for kk, vv in v.items() if kk != "router_logits"}
                                 for k, v in result["layers"].items()}}
    (out / "report.json").write_text(json.dumps(slim, indent=1))
    print_summary(slim)
    return 0


def print_summary(result: dict) -> None:
    print(f"LM loss {result['lm_loss']:.4f}  (router shuffled: {result['lm_loss_router_shuffled']:.4f})")
    if "pope" in result:
        print(f"POPE F1 {result['pope']['f1']:.3f}  (router shuffled: {result['pope_router_shuffled']['f1']:.3f})")
    print(f"{'layer':>5} {'out-cos':>8} {'CKA':>6} {'w-cos':>6} {'JS img/txt':>10} {'CV':>6}  load image | text")
    for name, rep in result["layers"].items():
        js = rep["js_image_text"]
        print(f"{name:>5} {rep['expert_output_cosine']:>8.3f} {rep['expert_output_cka']:>6.3f} "
              f"{rep['expert_weight_cosine']:>6.3f} {js if js is not None else float('nan'):>10.3f} "
              f"{rep['all']['load_cv']:>6.2f}  {' '.join(f'{x:.2f}' for x in rep['image']['load'])} | "
              f"{' '.join(f'{x:.2f}' for x in rep['text']['load'])}")


if __name__ == "__main__":
    sys.exit(main())
