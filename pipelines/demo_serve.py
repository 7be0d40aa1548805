"""The demo's serving phase: the Serve app started on this Ray (or added to a running Serve) and one real HTTP
generate request with the bundled reference photo; what came back is written under OUT/generated/."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

from facediffuser.sample_photos import ASTRONAUT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_http_port() -> int | None:
    """The HTTP port of a Serve instance already running on this Ray, or None when Serve is not running."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.port if client is not None else None
    except Exception:  # a private API: treat anything unexpected as "not running"
        return None


def write_png(data_b64: str, path: Path) -> Path:
    path.write_bytes(base64.b64decode(data_b64))
    return path


def generate_over_http(
    model_dir: str,
    out: Path,
    app_name: str,
    route_prefix: str,
    port: int | None,
    prompt: str,
    num_images: int,
    steps: int,
) -> tuple[list[Path], list[Path], list[Path], dict]:
    """Start the Serve app for `model_dir` (or add it to a running Serve), send one generate request with the
    bundled reference photo, write what came back under OUT/generated/; → (images, fusion masks, mask overlays,
    the response without its pictures)."""
    import httpx

    from serving.app import start
    from serving.settings import ServeConfig

    port = serve_http_port() or port or free_port()
    url = start(
        ServeConfig(
            model=model_dir,
            port=port,
            app_name=app_name,
            route_prefix=route_prefix,
            torch_threads=1,
            num_cpus=0.5,
            encoder_num_cpus=0.25,
            ingress_num_cpus=0.1,
            min_replicas=1,
            max_replicas=1,
        )
    )
    reference = base64.b64encode(ASTRONAUT.read_bytes()).decode()
    request = {
        "prompt": prompt,
        "references": [reference],
        "num_images": num_images,
        "seed": 42,
        "steps": steps,
        "return_masks": True,
    }
    response = httpx.post(f"{url}/v1/generate", json=request, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"generate answered {response.status_code}: {response.text[:300]}")
    return write_response(response.json(), out / "generated")


def write_response(body: dict, generated: Path) -> tuple[list[Path], list[Path], list[Path], dict]:
    """A generate response → its images, fusion masks and overlays as PNGs under `generated` (made here), and
    response.json without the pictures; → (images, fusion masks, overlays, that summary)."""
    generated.mkdir()
    images = [
        write_png(b64, generated / f"image-{k}-seed{seed}.png")
        for k, (b64, seed) in enumerate(zip(body["images"], body["seeds"]))
    ]
    masks = [write_png(body["fusion_masks"], generated / "fusion-masks.png")] if body.get("fusion_masks") else []
    overlays = [write_png(b64, generated / f"overlay-{k}.png") for k, b64 in enumerate(body.get("overlays") or [])]
    summary = {k: v for k, v in body.items() if k not in ("images", "fusion_masks", "overlays")}
    (generated / "response.json").write_text(json.dumps(summary, indent=2))
    return images, masks, overlays, summary
