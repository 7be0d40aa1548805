"""Per-image evaluation rows → a table per protocol and method, report.md / report.json, and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facediffuser.metrics.protocol import METHODS

# metrics whose values lie in [0, 1] and belong on the bar chart, in display order
CHART_METRICS = ("identity_facenet", "identity_dlib", "prompt_clip", "face_rate_facenet", "face_rate_dlib")


def aggregate(rows: list[dict], identity_names: list[str], with_clip: bool) -> dict:
    """{protocol: {method: {metric: value}}}. Identity: mean of per-image scores (0 when no face, negatives 0).

    face_rate_<name>: fraction of images where every subject got a face. For two subjects also
    missing_faces_<name> (images where some subject got no face), duplicates_<name> (images where two faces
    resemble the same reference most) and blend_rate_<name>: the fraction of images the blend guard flags (a copied
    face or merged subjects; facediffuser/metrics/identity.py blend_warnings).
    """
    table: dict[str, dict[str, dict]] = {}
    present = {r["protocol"] for r in rows}
    for protocol in [p for p in ("single", "multi") if p in present] + sorted(present - {"single", "multi"}):
        table[protocol] = {}
        methods = {r["method"] for r in rows if r["protocol"] == protocol}
        for method in sorted(methods, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m)):
            chosen = [r for r in rows if r["protocol"] == protocol and r["method"] == method]
            summary: dict = {"images": len(chosen)}
            for name in identity_names:
                summary[f"identity_{name}"] = _mean(r[f"identity_{name}"] for r in chosen)
                summary[f"face_rate_{name}"] = _mean(float(r[f"missing_{name}"] == 0) for r in chosen)
                if protocol == "multi":
                    summary[f"missing_faces_{name}"] = sum(int(r[f"missing_{name}"] > 0) for r in chosen)
                    summary[f"duplicates_{name}"] = sum(int(r[f"duplicate_{name}"]) for r in chosen)
                    summary[f"blend_rate_{name}"] = _mean(float(r[f"blend_{name}"]) for r in chosen)
            if with_clip:
                summary["prompt_clip"] = _mean(r["prompt_clip"] for r in chosen)
            summary["by_kind"] = {
                kind: {
                    key: _mean(r[key] for r in chosen if r["kind"] == kind)
                    for key in [f"identity_{n}" for n in identity_names] + (["prompt_clip"] if with_clip else [])
                }
                for kind in dict.fromkeys(r["kind"] for r in chosen)
            }
            table[protocol][method] = summary
    return table


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


def write_reports(out_dir: Path, table: dict, meta: dict, pictures: dict) -> None:
    (out_dir / "report.json").write_text(json.dumps({"results": table, **meta, "pictures": pictures}, indent=2))
    lines = [
        "# Face-diffuser evaluation",
        "",
        f"Model: `{meta['model']}` · {meta['counts']['images']} images "
        f"({meta['config']['images_per_prompt']} per prompt, {meta['config']['steps']} steps, "
        f"scheduler {meta['config']['scheduler']}, w {meta['config']['guidance_scale']}, "
        f"reference mode {meta['config'].get('reference_mode', 'whole')}) · "
        f"{meta['wall_time_s']:.0f} s",
        "",
        "Identity: cosine to the reference face, 0 when no face is found, clamped at 0; two subjects: greedy "
        "face↔reference matching, minimum over the pair. `facenet` = FastComposer's metric (MTCNN + "
        "InceptionResnetV1), `dlib` = dlib's face descriptor. Prompt: CLIP image–text cosine.",
        "",
    ]
    for protocol, methods in table.items():
        columns = [k for k in next(iter(methods.values())) if k != "by_kind"]
        lines += [
            f"## {protocol}-subject",
            "",
            "| method | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for method, summary in methods.items():
            lines.append(f"| {method} | " + " | ".join(_cell(summary[c]) for c in columns) + " |")
        lines.append("")
    if meta.get("missing_metrics"):
        lines += ["Not computed: " + "; ".join(meta["missing_metrics"]), ""]
    lines += ["## Pictures", "", f"![metrics]({pictures['chart']})", ""]
    for name, path in pictures["grids"].items():
        lines += [f"### {name}", "", f"![{name}]({path})", ""]
    if pictures["overlays"]:
        lines += [
            "### Fusion masks (red: the SDM's noise was used; mean over the fusion steps)",
            "",
            " ".join(f"![overlay]({p})" for p in pictures["overlays"]),
            "",
        ]
    (out_dir / "report.md").write_text("\n".join(lines))


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def bar_chart(table: dict, path: Path) -> None:
    """One panel per protocol: for each [0, 1] metric, a bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(table), figsize=(6.5 * len(table), 4), squeeze=False)
    for axis, (protocol, methods) in zip(axes[0], table.items()):
        metrics = [m for m in CHART_METRICS if m in next(iter(methods.values()))]
        width = 0.8 / len(methods)
        for index, (method, summary) in enumerate(methods.items()):
            positions = np.arange(len(metrics)) + (index - (len(methods) - 1) / 2) * width
            axis.bar(positions, [summary[m] for m in metrics], width, label=method)
        axis.set_xticks(np.arange(len(metrics)), [m.replace("_", "\n", 1) for m in metrics], fontsize=8)
        lowest = min(0.0, *(summary[m] for summary in methods.values() for m in metrics))
        axis.set_ylim(lowest, 1)  # CLIP cosine can be negative (random models); the others lie in [0, 1]
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_title(f"{protocol}-subject")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
