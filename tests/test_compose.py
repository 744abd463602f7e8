"""The container setup without a Docker engine: docker-compose.yml validates, describes the architecture,
and its scaled topology (the edge, two gateways, two bridges, Redis) answers calls when run as plain
processes, each with the environment compose gives its container and the Dockerfile's entrypoint and
health check; the edge is Debian's haproxy with the mounted configuration and the compose health check.

Only addresses are rewritten for loopback: a service name becomes 127.0.0.1 and a free port, the
Docker host's LM Studio becomes a fake one, the log volume a temporary directory, a bind mount its
source. The Host values a bridge accepts are kept, and checked with the compose service names."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
import redis
import yaml

from tests.conftest import CHAT_TOOL, default_models, free_port, llm_hub_command, redis_server, service
from tests.fake_lmstudio import FakeLMStudio, serve
from tests.test_edge import certificate, haproxy, requests_served, trusting

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

LMSTUDIO_ON_HOST = "host.docker.internal:1234"
REDIS_SERVICE = "redis:6379"
SCALED_MARKER = "[scaled]"
GATEWAYS = {"gateway", "gateway-2"}
EDGE_MONITOR = "127.0.0.1:8404"

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


# -- docker-compose and the files it reads ---------------------------------------------------------


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail(
            "docker-compose is missing: apt-get install -y docker-compose (.ci/run does). It validates "
            "docker-compose.yml and needs no Docker engine."
        )
    return found


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [docker_compose(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    # PATH only: variables in the caller's environment would win over the env file.
    return subprocess.run(
        command,
        check=False,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@functools.cache  # docker-compose takes a second or two to start
def resolved(env_file: Path, *options: str) -> dict[str, Any]:
    """The compose file as docker-compose resolves it with this env file: variables substituted."""
    result = compose(env_file, *options, "config")
    assert result.returncode == 0, f"docker-compose config failed with {env_file.name}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def scaled_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """.env.example with its `[scaled]` block uncommented, as the file tells a user to do, and the
    edge's certificate directory in a temporary one (the test makes edge.pem there)."""
    tmp_path = tmp_path_factory.mktemp("env")
    lines = ENV_EXAMPLE.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if SCALED_MARKER in line), None)
    assert start is not None, f".env.example has no {SCALED_MARKER} block"
    for i in range(start + 1, len(lines)):
        if not lines[i].strip():
            break
        if re.match(r"#[A-Z][A-Z0-9_]*=", lines[i]):
            lines[i] = lines[i][1:]
    (tmp_path / "certs").mkdir()
    lines.append(f"EDGE_CERT_DIR={tmp_path / 'certs'}")
    path = tmp_path / "scaled.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def dockerfile_instruction(name: str) -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = re.search(rf"^{name}\s+(.*)$", text, re.MULTILINE)
    assert found, f"the Dockerfile has no {name}"
    return found.group(1)


def entrypoint() -> list[str]:
    return json.loads(dockerfile_instruction("ENTRYPOINT"))


def healthcheck_command() -> list[str]:
    found = re.search(r"\bCMD\s+(\[.*\])$", dockerfile_instruction("HEALTHCHECK"))
    assert found, "the HEALTHCHECK has no CMD in exec form"
    return json.loads(found.group(1))


def ours(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository."""
    return {name: s for name, s in config["services"].items() if "build" in s}


def bridges(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in ours(config).items() if s["command"][:2] == ["llm-hub", "serve"]}


def profiles(env_file: Path) -> set[str]:
    """The profiles an env file switches on (COMPOSE_PROFILES; a later line wins)."""
    values = [
        line.partition("=")[2] for line in env_file.read_text().splitlines() if line.startswith("COMPOSE_PROFILES=")
    ]
    return {p.strip() for p in values[-1].split(",") if p.strip()} if values else set()


def running(config: dict[str, Any], active: set[str]) -> set[str]:
    """The services `docker-compose up` starts with these profiles."""
    return {name for name, s in config["services"].items() if not s.get("profiles") or active & set(s["profiles"])}


def port_mapping(port: dict[str, Any] | str) -> tuple[str | None, str, int]:
    """(host address or None, published port, container port): docker-compose 1.x writes a mapping
    with a host address as a string ("127.0.0.1:8080:8080/tcp"), others as a mapping."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port["published"]), int(port["target"])
    *host, published, target = port.split("/")[0].split(":")
    return (host[0] if host else None), published, int(target)


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """What a service's container gets: a variable resolved to null is not passed at all."""
    return {key: str(value) for key, value in (spec.get("environment") or {}).items() if value is not None}


# -- the file itself -------------------------------------------------------------------------------


def test_compose_file_validates_with_the_example_env_and_the_scaled_profile(scaled_env: Path) -> None:
    resolved(ENV_EXAMPLE)
    resolved(ENV_EXAMPLE, "--profile", "scaled")
    resolved(scaled_env)  # the [scaled] block of .env.example switched on


def test_missing_secrets_stop_compose_with_a_message_naming_them(tmp_path: Path) -> None:
    for secret in ("LLM_HUB_API_KEYS", "LLM_HUB_BRIDGE_TOKEN"):
        env_file = tmp_path / f"without-{secret}.env"
        env_file.write_text(
            "".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith(f"{secret}="))
        )
        result = compose(env_file, "config", "--quiet")
        assert result.returncode != 0 and secret in result.stderr, result.stderr


@pytest.mark.parametrize("scaled", [False, True], ids=["default", "scaled"])
def test_compose_file_follows_the_architecture(scaled_env: Path, scaled: bool) -> None:
    env_file = scaled_env if scaled else ENV_EXAMPLE
    config = resolved(env_file)
    services = config["services"]
    assert set(services) == {"edge", "gateway", "gateway-2", "bridge", "bridge-2", "redis"}
    up = running(config, profiles(env_file))
    assert up == (set(services) if scaled else {"gateway", "bridge"})

    # Every gateway that runs knows exactly the bridges that run, and Redis when it runs.
    running_bridges = {f"http://{name}:3000" for name in bridges(config) if name in up}
    for name in GATEWAYS & up:
        gateway = environment(services[name])
        assert set(gateway["LLM_HUB_BRIDGES"].split(",")) == running_bridges, name
        assert urlsplit(gateway.get("LLM_HUB_REDIS_URL", "")).netloc == (REDIS_SERVICE if scaled else ""), name
        # About two descriptors per stream: far more than Docker's usual 1,024.
        assert services[name]["ulimits"]["nofile"]["soft"] >= 65536, name
    gateway = environment(services["gateway"])

    # The gateway is published on 8080; scaled, the edge is the way in (TLS on 8443) and the gateway
    # stays on the host's loopback. Everything shares llm-hub-net.
    published = {name: [port_mapping(p) for p in s["ports"]] for name, s in services.items() if s.get("ports")}
    assert published == (
        {"gateway": [("127.0.0.1", "8080", 8080)], "edge": [(None, "8443", 8443)]}
        if scaled
        else {"gateway": [(None, "8080", 8080)], "edge": [(None, "8443", 8443)]}
    )
    network = config["networks"]["llm-hub-net"]
    assert network.get("name", "llm-hub-net") == "llm-hub-net"
    assert network["ipam"]["config"] == [{"subnet": "172.20.0.0/16"}]
    for name, s in services.items():
        assert set(s["networks"]) == {"llm-hub-net"}, name
        assert s["restart"] == "unless-stopped", name
        limits = s["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], name
    assert services["redis"]["healthcheck"]["test"] and services["edge"]["healthcheck"]["test"]

    # The edge: the official image, the shipped configuration mounted read-only, every gateway behind it.
    edge = services["edge"]
    assert edge["image"].split(":")[0] == "haproxy" and edge["read_only"]
    assert f"{ROOT}/deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in edge["volumes"]
    assert all(str(v).endswith(":ro") for v in edge["volumes"])
    assert {v for k, v in environment(edge).items() if k.startswith("GATEWAY_")} == {f"{g}:8080" for g in GATEWAYS}

    for name, s in bridges(config).items():
        env = environment(s)
        assert "host.docker.internal:host-gateway" in s["extra_hosts"], name
        assert LMSTUDIO_ON_HOST in env["LMSTUDIO_URL"], name
        assert f"{name}:3000" in env["LLM_HUB_ALLOWED_HOSTS"].split(","), name  # the Host the gateway sends
        assert env["LLM_HUB_BRIDGE_TOKEN"] == gateway["LLM_HUB_BRIDGE_TOKEN"], name

    # Ours listen on 0.0.0.0 at the port the health check asks, and log into the volume, one file each.
    log_files = set()
    for name, s in ours(config).items():
        env = environment(s)
        assert env["LLM_HUB_HOST"] == "0.0.0.0" and env["LLM_HUB_PORT"] == ("8080" if name in GATEWAYS else "3000")
        assert [str(v).split(":")[:2] for v in s["volumes"]] == [["llm-hub-logs", "/var/log/llm-hub"]], name
        assert env["LOG_FILE"] == f"/var/log/llm-hub/{name}.log"
        log_files.add(env["LOG_FILE"])
    assert len(log_files) == len(ours(config)) and "llm-hub-logs" in config["volumes"]


# -- the topology as processes ---------------------------------------------------------------------


def _address(url: str) -> str:
    return urlsplit(url).netloc


def _rewrite(value: str, addresses: dict[str, str]) -> str:
    for name, address in addresses.items():
        value = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", address, value)
    return value


def image_path() -> str:
    """PATH with the installed commands first, as the image's venv is."""
    return f"{Path(llm_hub_command()).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _rewrite_paths(value: str, mounts: dict[str, Path]) -> str:
    for target, source in mounts.items():
        value = value.replace(target, str(source))
    return value


def process_environment(
    spec: dict[str, Any], port: int, addresses: dict[str, str], mounts: dict[str, Path]
) -> dict[str, str]:
    """The container's environment for a loopback process: addresses and mounted paths rewritten."""
    env = {"PATH": image_path()}
    for key, value in environment(spec).items():
        if key == "LLM_HUB_HOST":
            value = "127.0.0.1"  # 0.0.0.0 in a container
        elif key == "LLM_HUB_PORT":
            value = str(port)
        elif key != "LLM_HUB_ALLOWED_HOSTS":  # kept: the bridge must accept its service name as Host
            value = _rewrite_paths(_rewrite(value, addresses), mounts)
        env[key] = value
    return env


def volume_mounts(spec: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """Container path -> the host path of a bind mount (docker-compose config makes it absolute), or a
    directory under tmp_path standing in for a named volume."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("/"):
            mounts[target] = Path(source)
        else:
            mounts[target] = tmp_path / source
            mounts[target].mkdir(exist_ok=True)
    return mounts


async def edge_healthcheck(spec: dict[str, Any], monitor_port: int) -> int:
    """The compose file's health check of the edge, with its monitor port moved to `monitor_port`."""
    test = spec["healthcheck"]["test"]
    assert test[0] == "CMD", test
    host, port = EDGE_MONITOR.split(":")
    command = [arg.replace(f"/dev/tcp/{host}/{port}", f"/dev/tcp/{host}/{monitor_port}") for arg in test[1:]]
    return (await anyio.run_process(command, check=False)).returncode


async def healthcheck(port: int) -> int:
    """The Dockerfile's HEALTHCHECK, run as Docker would, against a service on `port`."""
    env = {"PATH": image_path(), "LLM_HUB_PORT": str(port)}
    return (await anyio.run_process(healthcheck_command(), env=env, check=False)).returncode


async def initialize(http: httpx2.AsyncClient, url: str, host: str, token: str | None) -> int:
    """The status of an MCP initialize sent with this Host header and bearer token."""
    headers = {**MCP_HEADERS, "Host": host, **({"Authorization": f"Bearer {token}"} if token else {})}
    return (await http.post(url, json=INIT, headers=headers)).status_code


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, seconds: float = 15) -> None:
    with anyio.move_on_after(seconds):
        while not await condition():
            await anyio.sleep(0.1)
        return
    pytest.fail(f"gave up after {seconds} s waiting for {what}")


@pytest.mark.anyio
async def test_scaled_topology_as_processes_answers_calls_through_the_edge(tmp_path: Path, scaled_env: Path) -> None:
    binary = haproxy()
    config = resolved(scaled_env)
    services = ours(config)
    bridge_names = sorted(bridges(config))
    assert bridge_names == ["bridge", "bridge-2"]
    ports = {name: free_port() for name in services}
    edge_spec = config["services"]["edge"]
    edge_mounts = volume_mounts(edge_spec, tmp_path)
    _, ca = certificate(edge_mounts["/usr/local/etc/haproxy/certs"])  # edge.pem, where the edge reads it
    edge_port, monitor_port = free_port(), free_port()
    gateway_env = environment(services["gateway"])
    key = gateway_env["LLM_HUB_API_KEYS"].split(",")[0].partition(":")[2]  # the first NAME:KEY of .env.example
    token = gateway_env["LLM_HUB_BRIDGE_TOKEN"]

    with redis_server() as (redis_url, _):
        async with serve(FakeLMStudio(default_models()).app) as lmstudio_url, AsyncExitStack() as stack:
            addresses = {LMSTUDIO_ON_HOST: _address(lmstudio_url), REDIS_SERVICE: _address(redis_url)}
            for name, s in services.items():
                addresses[f"{name}:{environment(s)['LLM_HUB_PORT']}"] = f"127.0.0.1:{ports[name]}"

            async def start(name: str) -> None:
                s = services[name]
                env = process_environment(s, ports[name], addresses, volume_mounts(s, tmp_path))
                await stack.enter_async_context(
                    service(
                        [*entrypoint(), *s["command"]],
                        env,
                        f"http://127.0.0.1:{ports[name]}/health",
                        tmp_path / f"{name}.docker-log",
                        ready=(200,),
                    )
                )

            async with anyio.create_task_group() as starting:  # as compose does: the bridges together,
                for name in bridge_names:
                    starting.start_soon(start, name)
            for name in sorted(GATEWAYS):  # then what depends on them
                await start(name)
            edge_env = process_environment(edge_spec, 0, addresses, edge_mounts)
            edge_env.update(EDGE_BIND=f"127.0.0.1:{edge_port}", EDGE_MONITOR_BIND=f"127.0.0.1:{monitor_port}")
            edge_command = [binary, *(_rewrite_paths(arg, edge_mounts) for arg in edge_spec["command"][1:])]
            await stack.enter_async_context(
                service(
                    edge_command,
                    edge_env,
                    f"http://127.0.0.1:{monitor_port}/health",
                    tmp_path / "edge.docker-log",
                    ready=(200,),
                )
            )

            # Each bridge accepts the Host the gateway sends in compose (its service name), with the token.
            async with httpx2.AsyncClient(timeout=10) as http:
                for name in bridge_names:
                    mcp = f"http://127.0.0.1:{ports[name]}/mcp"
                    assert await initialize(http, mcp, f"{name}:3000", token) == 200, name
                    assert await initialize(http, mcp, "evil.example:3000", token) == 421, name
                    assert await initialize(http, mcp, f"{name}:3000", None) == 401, name

            for name in services:
                assert await healthcheck(ports[name]) == 0, f"the Dockerfile's health check fails for {name}"
            assert await healthcheck(free_port()) != 0
            assert await edge_healthcheck(edge_spec, monitor_port) == 0, "the edge's health check fails"
            assert await edge_healthcheck(edge_spec, free_port()) != 0

            gateway = f"http://127.0.0.1:{ports['gateway']}"
            async with httpx2.AsyncClient(
                base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http:

                async def both_bridges_healthy() -> bool:
                    states = (await http.get("/v1/bridges")).json()["bridges"]
                    return len(states) == 2 and all(b["healthy"] for b in states)

                await wait_for(both_bridges_healthy, "both bridges healthy in the gateway")
                for _ in range(2):
                    answer = await http.post(f"/v1/tools/{CHAT_TOOL}", json={"prompt": "Say hello"})
                    assert answer.status_code == 200, answer.text
                    body = answer.json()
                    assert not body.get("isError"), body
                    assert body["structuredContent"]["text"] == "Hello from the fake model."
                calls = {b["url"]: b["calls"] for b in (await http.get("/v1/bridges")).json()["bridges"]}
                assert sorted(calls.values()) == [1, 1], calls  # round-robin over both bridges
                assert (await http.get("/v1/tools", headers={"Authorization": "Bearer wrong"})).status_code == 401

            # The edge: TLS with the mounted certificate, the calls spread over both gateways.
            async with httpx2.AsyncClient(
                base_url=f"https://127.0.0.1:{edge_port}",
                verify=trusting(ca),
                timeout=30,
                headers={"Authorization": f"Bearer {key}"},
            ) as https:
                for _ in range(2):
                    answer = await https.post(f"/v1/tools/{CHAT_TOOL}", json={"prompt": "Say hello"})
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["structuredContent"]["text"] == "Hello from the fake model."
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
                metrics = (await http.get(f"http://127.0.0.1:{ports['gateway-2']}/metrics")).text
            assert requests_served(metrics, "/v1/tools/{name}") >= 1  # the replica only the edge reaches

            # The shared rate-limit budget lives in the compose file's Redis.
            assert await anyio.to_thread.run_sync(lambda: redis.Redis.from_url(redis_url).dbsize()) > 0

            # Logs reach the volume: JSON lines, one file per service, tool calls in the bridges' files.
            volume = tmp_path / "llm-hub-logs"

            async def calls_logged() -> bool:
                files = [volume / f"{name}.log" for name in services]
                return all(f.exists() for f in files) and all(
                    "done in" in (volume / f"{name}.log").read_text() for name in bridge_names
                )

            await wait_for(calls_logged, "tool calls in the bridges' log files")
            for name in services:
                lines = (volume / f"{name}.log").read_text().splitlines()
                assert lines and all(isinstance(json.loads(line), dict) for line in lines), name
