"""How many replicas each deployment has, where they run and what the autoscaler aims at, read from the Serve
controller (never from the replicas: asking a replica is a request, which would wake a deployment scaled to zero
and, counted as load, keep it from scaling down). Serves `GET /v1/replicas` and `/healthz` under min_replicas 0."""

from __future__ import annotations

import asyncio
import time

RUNNING = "RUNNING"
_node_names: dict[str, str] = {}


def _names(node_ids: set[str]) -> dict[str, str]:
    """{node id: node name} (`ray start --node-name`; the id itself when Ray has no name for it)."""
    if node_ids - set(_node_names):
        import ray

        for node in ray.nodes():
            _node_names[node["NodeID"]] = node.get("NodeName") or node["NodeID"]
    return {node_id: _node_names.get(node_id, node_id) for node_id in node_ids}


def _details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def summarize(details: dict, app_name: str, deployments: tuple[str, ...]) -> dict:
    """Per deployment of `app_name`: its status, the autoscaler's target, replicas running and starting, the nodes
    (name → running replicas) and the autoscaling settings in force."""
    app = details.get("applications", {}).get(app_name) or {}
    found = app.get("deployments", {})
    running_nodes = {
        r["node_id"]
        for d in found.values()
        for r in d.get("replicas", [])
        if r.get("state") == RUNNING and r.get("node_id")
    }
    names = _names(running_nodes)
    out = {}
    for name in deployments:
        deployment = found.get(name)
        if deployment is None:
            out[name] = {"status": "MISSING", "target": 0, "running": 0, "starting": 0, "nodes": {}}
            continue
        replicas = deployment.get("replicas", [])
        nodes: dict[str, int] = {}
        for replica in replicas:
            if replica.get("state") == RUNNING:
                node = names.get(replica.get("node_id"), replica.get("node_id") or "?")
                nodes[node] = nodes.get(node, 0) + 1
        scaling = (deployment.get("deployment_config") or {}).get("autoscaling_config") or {}
        out[name] = {
            "status": deployment.get("status"),
            "target": deployment.get("target_num_replicas"),
            "running": sum(nodes.values()),
            "starting": sum(1 for r in replicas if r.get("state") in ("STARTING", "PENDING_MIGRATION")),
            "nodes": dict(sorted(nodes.items())),
            "autoscaling": {
                key: scaling.get(key)
                for key in (
                    "min_replicas",
                    "max_replicas",
                    "target_ongoing_requests",
                    "upscale_delay_s",
                    "downscale_delay_s",
                    "downscale_to_zero_delay_s",
                    "look_back_period_s",
                )
                if key in scaling
            },
        }
    return out


async def replica_view(app_name: str, deployments: tuple[str, ...] = ("SubjectEncoder", "Sampler")) -> dict:
    """`summarize` of the controller's current view (its call runs off the event loop)."""
    details = await asyncio.to_thread(_details)
    summary = await asyncio.to_thread(summarize, details, app_name, deployments)
    return {"app": app_name, "time": round(time.time(), 3), "deployments": summary}
