"""What the demo shows: each phase's heading and time on the console (`PhaseClock`), and OUT/index.html with a
section per phase (`write_index`)."""

from __future__ import annotations

import html
import time
from pathlib import Path

PHASES = ("photos", "preprocess", "train", "serve", "page")


class PhaseClock:
    """Prints each phase's heading and, at its end, its time; keeps the times for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, name: str, text: str) -> None:
        self.stop()
        print(f"[demo {PHASES.index(name) + 1}/{len(PHASES)}] {text}", flush=True)
        self._current = (name, time.perf_counter())

    def stop(self) -> float:
        if self._current is None:
            return 0.0
        name, started = self._current
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self._current = None
        return self.seconds[name]

    def summary(self) -> str:
        return "phase times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items())


def write_index(out: Path, sections: list[tuple[str, list[Path], str]]) -> Path:
    """OUT/index.html: one section per phase; images by relative path, so the folder can be moved or zipped."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Face-diffuser demo</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:auto;padding:1rem}"
        "img{max-width:100%;margin:.2rem;border:1px solid #ddd;image-rendering:pixelated}"
        ".row img{height:160px}pre{background:#f4f4f4;padding:.5rem;overflow:auto;max-height:20rem}"
        "</style></head><body><h1>Face-diffuser demo</h1>"
    ]
    for title, images, text in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            parts.append(f"<pre>{html.escape(text)}</pre>")
        if images:
            cls = " class='row'" if len(images) > 2 else ""
            parts.append(
                f"<div{cls}>"
                + "".join(
                    f"<a href='{p.relative_to(out).as_posix()}'><img src='{p.relative_to(out).as_posix()}' "
                    f"alt='{html.escape(p.stem)}' title='{html.escape(p.stem)}'></a>"
                    for p in images
                )
                + "</div>"
            )
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def filter_summary(manifest: dict) -> str:
    """The preprocessing filters' counts (the manifest's "filters"), one line each: how many photos the filter
    rejected, at which stage and under which setting; then how many photos went in and were written."""
    lines = []
    for code, entry in manifest.get("filters", {}).items():
        setting = ", ".join(f"{flag} {value}" for flag, value in (entry["setting"] or {}).items())
        where = f"at {entry['stage']}" + (f", {setting}" if setting else "")
        lines.append(f"{code.replace('_', ' '):<16} {entry['rejected']:>4} rejected   ({where})")
    counts = manifest["counts"]
    lines.append(f"{counts['input']} photos in: {counts['written']} written, {counts['rejected']} rejected in all")
    return "\n".join(lines)
