"""One node's `ray start` command line for a local cluster (cluster/local.py): its resources, and every port it
binds picked free (Ray's fixed defaults collide between nodes of one host)."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name (also Ray's node name), logical CPUs and GPUs, custom resources."""

    name: str
    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict = field(default_factory=dict)


def node_ports() -> list[str]:
    """Every port a node binds, free and distinct (Ray's fixed defaults collide between nodes of one host)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        # worker processes of this node: a random port each (Ray's own test clusters do the same)
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def start_command(
    spec: NodeSpec, head: bool, object_store_bytes: int, temp_dir: str, head_ports: tuple[int, int], address: str
) -> list[str]:
    """`ray start --block` for node `spec`: the head (`head_ports` = its GCS and dashboard ports) or a worker
    joining the head at `address`."""
    gcs_port, dashboard_port = head_ports
    command = [
        str(BIN / "ray"),
        "start",
        "--block",
        f"--node-name={spec.name}",
        f"--num-cpus={spec.num_cpus:g}",
        f"--num-gpus={spec.num_gpus:g}",
        f"--object-store-memory={object_store_bytes}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *node_ports(),
    ]
    if spec.resources:
        command.append(f"--resources={json.dumps(spec.resources)}")
    if head:
        command += [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
    else:
        command.append(f"--address={address}")
    return command
