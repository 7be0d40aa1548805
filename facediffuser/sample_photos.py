"""`facediffuser sample-photos`: photos to try the pipeline with on a machine that has none.

Two real people, bundled: the astronaut (A; scikit-image's sample photo, public domain) and Grace Hopper (H; the
US Navy portrait matplotlib ships as sample data, public domain, cropped square), as one, two and three people
tiled side by side, four arrangements of each count, so that preprocessing finds 1-3 faces and training sees every
subject count. Two different people, because a product that checks references refuses one person given as two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ASTRONAUT = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
HOPPER = Path(__file__).resolve().parent / "assets" / "hopper.jpg"
LAYOUTS = ["A", "H", "a", "h", "AH", "HA", "AA", "hh", "AHA", "HAH", "AAH", "hah"]  # lower case: dimmer copy


def sample_photos(folder: str | Path) -> list[Path]:
    """Write the 12 sample photos into `folder`; → their paths. Dimmer copies keep the rows from being identical."""
    folder = Path(folder)
    tiles = {name: np.asarray(Image.open(path).convert("RGB")) for name, path in (("A", ASTRONAUT), ("H", HOPPER))}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, layout in enumerate(LAYOUTS):
        pixels = np.concatenate(
            [tiles[c.upper()] if c.isupper() else (tiles[c.upper()] * 0.8).astype(np.uint8) for c in layout], axis=1
        )
        people = {1: "one-person", 2: "two-people", 3: "three-people"}[len(layout)]
        path = folder / f"{index:02d}-{people}.jpg"  # names differ by more than case (macOS)
        Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the photos into (created if missing)")


def run(args: argparse.Namespace) -> int:
    paths = sample_photos(args.out)
    print(f"wrote {len(paths)} photos of 1-3 people to {args.out}", flush=True)
    return 0
