"""`facediffuser demo` end to end (tiny models, the session's Ray): real preprocessing, training and serving, and
the outputs a newcomer opens — shards with linked subjects, two model directories, decodable PNGs, an index.html
whose every link exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_writes_every_phase_output(ray_session, tmp_path, capsys):
    import ray

    from pipelines.demo import DemoConfig, demo

    out = tmp_path / "demo-output"
    result = demo(DemoConfig(out=str(out), steps=4, sample_steps=4, num_images=2))
    printed = capsys.readouterr().out
    assert all(f"[demo {n}/5]" in printed for n in range(1, 6)), printed
    assert ray.is_initialized()  # the session's Ray was reused, not shut down

    # Shards: the photos' people, each linked to a noun of its caption.
    table = pq.read_table(out / "preprocessed" / "shards")
    assert table.num_rows >= 3
    subject_counts = sorted({len(row) for row in table.column("subjects").to_pylist()})
    assert subject_counts[0] == 1 and subject_counts[-1] >= 2, subject_counts  # one person and several people
    for row in table.to_pylist():
        for subject in row["subjects"]:
            assert row["caption"][: subject["noun_end"]].endswith(subject["noun"]), (row["caption"], subject)
    assert (out / "preprocessed" / "manifest.json").is_file()
    # the sample photos hold three dimmer copies (A/a, H/h, HAH/hah): the near-duplicate filter drops one of each
    manifest = json.loads((out / "preprocessed" / "manifest.json").read_text())
    assert manifest["filters"]["near_duplicate"]["rejected"] == 3, manifest["filters"]

    # Two trained model directories, with loss curves.
    final = Path(result["model"])
    assert (final / "sdm" / "unet").is_dir() and (final / "tdm" / "unet").is_dir()
    assert (final / "sdm" / "subject_encoder").is_dir()
    assert len(result["curves"]) == 2 and all(Path(c).stat().st_size > 1000 for c in result["curves"])

    # Generated PNGs decode; masks too.
    assert len(result["images"]) == 2
    for path in result["images"] + result["masks"]:
        with Image.open(path) as image:
            image.load()
            assert image.width > 0 and image.height > 0

    # index.html references only files that exist, and shows every image.
    page = (out / "index.html").read_text()
    assert re.search(r"near duplicate +3 rejected +\(at dedup, --duplicate-distance 6\)", page), page[:3000]
    sources = set(re.findall(r"(?:src|href)='([^']+)'", page))
    assert sources and all((out / s).is_file() for s in sources), [s for s in sources if not (out / s).is_file()]
    for path in result["images"] + result["curves"] + result["masks"]:
        assert Path(path).relative_to(out).as_posix() in sources
