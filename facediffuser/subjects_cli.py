"""`facediffuser subjects add|list|rm`: a running service's saved subjects (POST/GET/DELETE /v1/subjects), over
HTTP. A client only: it talks to `--url` and never starts Ray or loads a model.

    facediffuser subjects add me-1.jpg me-2.jpg --name me      # prints the new subject's id
    facediffuser subjects list
    facediffuser subjects rm ID
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_ENV = "FACEDIFFUSER_TOKEN"
TIMEOUT_S = 300.0  # saving runs the subject encoder and face detection on every photo


class SubjectsError(ValueError):
    """What went wrong, in one line: `facediffuser` prints it and exits 2 (a ValueError, as every command's input
    errors, so also `python -m facediffuser.cli`, whose CLIError is another class, reports it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=DEFAULT_URL, help=f"the service (default: {DEFAULT_URL})")
    server.add_argument("--token", default=None, help=f"its bearer token (default: ${TOKEN_ENV})")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[server], help="save a subject from photos of one person; prints its id")
    add.add_argument("photos", nargs="+", metavar="PHOTO", help="photos of one person (JPEG, PNG, WebP, GIF, BMP)")
    add.add_argument("--name", default=None, help="a label for `list`")
    add.add_argument(
        "--reference-mode", default=None, help="whole, face or person (default: the server's, GET /v1/info)"
    )
    add.add_argument("--keep-photos", action="store_true", help="the server also keeps the photos themselves")
    actions.add_parser("list", parents=[server], help="this token's saved subjects")
    remove = actions.add_parser("rm", parents=[server], help="erase a saved subject (everything derived from it)")
    remove.add_argument("id", help="the subject's id")


def run(args: argparse.Namespace) -> int:
    import httpx

    token = args.token or os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=TIMEOUT_S) as client:
            if args.action == "add":
                print(_checked(client.post("/v1/subjects", json=_add_body(args)))["id"])
            elif args.action == "list":
                print(_table(_checked(client.get("/v1/subjects"))["subjects"]))
            else:
                print(f"deleted {_checked(client.delete(f'/v1/subjects/{args.id}'))['id']}")
    except httpx.HTTPError as exc:
        raise SubjectsError(f"cannot reach {args.url} ({type(exc).__name__}: {exc})") from None
    return 0


def _add_body(args: argparse.Namespace) -> dict:
    photos = []
    for photo in args.photos:
        path = Path(photo)
        if not path.is_file():
            raise SubjectsError(f"{photo}: no such file")
        photos.append(base64.b64encode(path.read_bytes()).decode())
    body = {"photos": photos, "keep_photos": args.keep_photos}
    body.update({k: v for k, v in (("name", args.name), ("reference_mode", args.reference_mode)) if v is not None})
    return body


def _checked(response) -> dict:
    """The JSON of a successful answer; the service's error (status, code, message) as one line otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        message = body.get("message") or response.text.strip()[:200] or response.reason_phrase
        raise SubjectsError(f"{response.status_code} {body.get('error', 'error')}: {message}")
    return body


def _table(subjects: list[dict]) -> str:
    rows = [("ID", "NAME", "PHOTOS", "FACES", "MODE", "CREATED", "MODEL VERSION")]
    for s in subjects:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
        rows.append(
            (s["id"], s["name"] or "-", str(s["num_photos"]), str(s["faces_found"]), s["reference_mode"], created,
             s["model_version"][:12])
        )  # fmt: skip
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
