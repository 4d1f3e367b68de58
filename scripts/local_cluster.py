#!/usr/bin/env python3
"""A multi-node Ray cluster on one machine: a head and worker nodes, each in its own network
namespace, joined by veth pairs to a bridge inside one private outer namespace.

Layout (root is a short directory such as /tmp/pc-1a2b, so Ray's Unix socket paths stay short):

    root/ctl.sock        the controller's control socket (JSON lines)
    root/state.json      what clients need: the pids of the namespaces' holders, addresses, inodes
    root/auth_token      the cluster's own Ray token (RAY_AUTH_TOKEN_PATH)
    root/controller.log  the controller's log
    root/nodes/NAME/     each node's private disk; NAME.log is its `ray start --block` output
    root/ray, root/tmp   mount points: every node sees ITS OWN nodes/NAME/{ray,tmp} there
                         (--temp-dir and TMPDIR), as separate machines see separate disks

Namespaces: ``unshare --net --mount --pid`` makes the outer namespace. Its network has only
loopback and the bridge ``pcbr0`` (10.213.7.254/24) -- no physical interface and no route -- so no
packet can leave it. Its PID 1 (``_init`` below) only reaps; when it goes, the kernel kills every
process of the cluster. A private tmpfs on /run holds the ``ip netns`` names, so they never clash
with the host's. Each node is ``ip netns add NAME`` plus a veth pair (``pcvI`` on the bridge,
``eth0`` inside with 10.213.7.I/24), and its processes run under ``ip netns exec NAME`` with its
own mount namespace (the bind mounts above). Killing a node kills every pid in its network
namespace -- raylet, object store, workers, agents -- and deletes the namespace.

Nothing here imports Ray; the nodes run ``<venv>/bin/ray``. Clients (``ray job submit``) must run
inside the outer namespace: ``LocalCluster.run`` / ``scripts/cluster exec`` do that with nsenter.
Needs root (unshare, ip netns, mount).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SUBNET = "10.213.7"
BRIDGE = "pcbr0"
OUTER_IP = f"{SUBNET}.254"
HEAD_IP = f"{SUBNET}.1"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
MAX_INDEX = 253  # 10.213.7.1 .. .253 for nodes; .254 is the outer namespace's bridge address
READY_MARK = "Ray runtime started."
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_ENV = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TERM")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stdout.strip()}")
    return proc


def _ns_inode_of(path: str) -> int | None:
    """The namespace inode behind /proc/PID/ns/KIND (``net:[4026532…]``), None if unreadable."""
    try:
        link = os.readlink(path)
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def _send(sock_path: str | os.PathLike, request: dict, timeout: float = 600.0) -> Any:
    """One JSON request to the controller, one JSON answer; raises on an error answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(sock_path))
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError("the cluster controller closed the connection without an answer")
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error", "unknown controller error"))
    return answer.get("result")


# --------------------------------------------------------------------------------------------
# Inside the outer namespace: PID 1 and the controller
# --------------------------------------------------------------------------------------------

class Controller:
    """Runs inside the outer namespaces; owns the bridge, the node namespaces and node processes."""

    def __init__(self, root: Path, spec: dict):
        self.root = root
        self.spec = spec
        self.ray = spec.get("ray_bin") or str(VENV_BIN / "ray")
        self.token = (root / "auth_token").read_text().strip()
        self.nodes: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.used_indices: set[int] = set()
        self.last_index = 1
        self.worker_count = 0
        self.lock = threading.RLock()
        self.stopping = threading.Event()  # no new nodes
        self.finished = threading.Event()  # every node is down

    # -- outer namespace -----------------------------------------------------------------------
    def setup_outer(self) -> None:
        _sh("ip", "link", "set", "lo", "up")
        # Private /run: `ip netns` names live in this mount namespace only.
        _sh("mount", "-n", "-t", "tmpfs", "-o", "mode=755,size=16m", "pc-run", "/run")
        for d in ("netns", "lock"):
            os.makedirs(f"/run/{d}", exist_ok=True)
        os.chmod("/run/lock", 0o1777)
        os.symlink("/dev/shm", "/run/shm")
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{OUTER_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for d in ("nodes", "ray", "tmp"):
            (self.root / d).mkdir(exist_ok=True)

    # -- nodes -------------------------------------------------------------------------------
    def _node_env(self, name: str, extra: dict | None = None) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.update({
            "PATH": f"{Path(self.ray).parent}:{SYSTEM_PATH}",
            "OMP_NUM_THREADS": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "TMPDIR": str(self.root / "tmp"),
            "LIBMOUNT_UTAB": str(self.root / "utab"),
            "PERSE_CLUSTER_NODE": name,
        })
        if self.spec.get("output"):
            env["PERSE_CLUSTER_OUTPUT"] = self.spec["output"]
        env.update(self.spec.get("env") or {})
        env.update(extra or {})
        return env

    def _in_node(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv run in node NAME's network namespace with its private disk mounted."""
        disk = self.root / "nodes" / name
        script = ('mount -n --bind "$1" "$2" && mount -n --bind "$3" "$4" && shift 4 && '
                  'exec "$@"')
        return ["ip", "netns", "exec", name, "bash", "-c", script, "node",
                str(disk / "ray"), str(self.root / "ray"), str(disk / "tmp"),
                str(self.root / "tmp"), *argv]

    def _ray_start_argv(self, node: dict) -> list[str]:
        argv = [self.ray, "start", "--block", "--node-ip-address", node["ip"],
                "--num-cpus", str(node["cpus"]), "--num-gpus", str(node["gpus"]),
                "--object-store-memory", str(int(node["object_store_mb"]) * 1024 * 1024),
                "--temp-dir", str(self.root / "ray"), "--disable-usage-stats"]
        if node["resources"]:
            argv += ["--resources", json.dumps(node["resources"])]
        if node["role"] == "head":
            argv += ["--head", "--port", str(GCS_PORT), "--dashboard-host", "0.0.0.0",
                     "--dashboard-port", str(DASHBOARD_PORT), "--include-dashboard", "true",
                     "--ray-client-server-port", str(CLIENT_PORT)]
            if self.spec.get("system_config"):
                argv += ["--system-config", json.dumps(self.spec["system_config"])]
        else:
            argv += ["--address", f"{HEAD_IP}:{GCS_PORT}"]
        return argv + list(node.get("ray_args") or [])

    def _free_index(self, role: str) -> int:
        """The head is .1; a new worker gets the next address never used, so a node that joins
        is never mistaken for one that died (addresses are reused only after .253)."""
        if role == "head":
            return 1
        for i in [*range(self.last_index + 1, MAX_INDEX + 1), *range(2, self.last_index + 1)]:
            if i not in self.used_indices:
                self.last_index = i
                return i
        raise RuntimeError("no free address left on the bridge")

    def start_node(self, role: str, opts: dict) -> dict:
        if self.stopping.is_set():
            raise RuntimeError("the cluster is going down")
        if role == "head" and "head" in self.nodes:
            raise RuntimeError("the cluster already has a head node")
        if role == "worker" and self.nodes.get("head", {}).get("state") != "alive":
            raise RuntimeError("the head node is not alive")
        cpus = opts.get("cpus", 1)
        if float(cpus) != int(cpus) or int(cpus) < 0:
            raise ValueError(f"a node's CPUs are a whole number (ray start --num-cpus): {cpus}")
        if role == "head":
            name = "head"
        else:
            self.worker_count += 1
            name = opts.get("name") or f"w{self.worker_count}"
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,11}", name) or name == "head":
                raise ValueError(f"bad node name {name!r} (a-z, 0-9, -; at most 12)")
            if name in self.nodes and self.nodes[name]["state"] in ("starting", "alive", "exited"):
                raise RuntimeError(f"node {name} exists")
        index = self._free_index(role)
        ip = f"{SUBNET}.{index}"
        veth = f"pcv{index}"
        self.used_indices.add(index)
        node = {
            "name": name, "role": role, "index": index, "ip": ip, "veth": veth,
            "cpus": int(cpus), "gpus": int(opts.get("gpus") or 0),
            "object_store_mb": opts.get("object_store_mb", 300),
            "resources": opts.get("resources") or {}, "ray_args": opts.get("ray_args") or [],
            "env": {str(k): str(v) for k, v in (opts.get("env") or {}).items()},
            "state": "starting", "netns_inode": None, "started_at": time.time(),
            "ready_s": None, "log": str(self.root / "nodes" / f"{name}.log"), "returncode": None,
        }
        self.nodes[name] = node
        t0 = time.monotonic()
        try:
            _sh("ip", "netns", "add", name)
            node["netns_inode"] = os.stat(f"/run/netns/{name}").st_ino
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            _sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            _sh("ip", "-n", name, "link", "set", "lo", "up")
            _sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", name, "link", "set", "eth0", "up")
            disk = self.root / "nodes" / name
            if disk.exists():  # a name used before: a fresh disk, as for a new machine
                shutil.rmtree(disk)
            (disk / "ray").mkdir(parents=True)
            (disk / "tmp").mkdir()
            log = open(node["log"], "ab")
            self.procs[name] = subprocess.Popen(
                self._in_node(name, self._ray_start_argv(node)),
                env=self._node_env(name, node["env"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            log.close()
            self._wait_ready(node, float(opts.get("timeout", self.spec.get("node_timeout", 180))))
        except Exception:
            node["state"] = "failed"
            self._sweep(node)
            raise
        node["ready_s"] = round(time.monotonic() - t0, 2)
        node["state"] = "alive"
        _log(f"node {name} ({ip}, {node['cpus']} CPUs) is up in {node['ready_s']} s")
        return self._public(node)

    def _wait_ready(self, node: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[node["name"]]
        while True:
            text = Path(node["log"]).read_text(errors="replace")
            if READY_MARK in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"node {node['name']}: ray start exited ({proc.returncode}):\n"
                                   + text[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node['name']} not registered after {timeout:.0f} s:\n"
                                   + text[-3000:])
            time.sleep(0.2)
        if node["role"] != "head":
            return
        while True:  # the job API answers
            try:
                status, _ = self.http("GET", "/api/version", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the head's dashboard did not answer in time")
            time.sleep(0.3)

    def netns_pids(self, name: str) -> list[int]:
        proc = _sh("ip", "netns", "pids", name, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []

    def _sweep(self, node: dict, grace: float = 0.0) -> list[int]:
        """End every process in the node's network namespace (SIGTERM to `ray start` first when
        grace > 0), then delete the namespace; its veth pair goes with it."""
        name = node["name"]
        seen: set[int] = set()
        proc = self.procs.get(name)
        if grace > 0 and proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.netns_pids(name):
                time.sleep(0.1)
        if os.path.exists(f"/run/netns/{name}"):
            deadline = time.monotonic() + 30
            while True:
                pids = self.netns_pids(name)
                if not pids:
                    break
                for pid in pids:
                    seen.add(pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {name}: processes survive SIGKILL: {pids}")
                time.sleep(0.05)
        if proc is not None:
            try:
                node["returncode"] = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if os.path.exists(f"/run/netns/{name}"):
            _sh("ip", "netns", "del", name, check=False)
        self.used_indices.discard(node["index"])
        return sorted(seen)

    def stop_node(self, name: str, grace: float) -> dict:
        node = self.nodes.get(name)
        if node is None:
            raise RuntimeError(f"no node {name}; nodes: {', '.join(self.nodes)}")
        if node["state"] not in ("alive", "starting", "exited"):
            raise RuntimeError(f"node {name} is already {node['state']}")
        t0 = time.monotonic()
        killed = self._sweep(node, grace)
        node["state"] = "removed" if grace > 0 else "killed"
        _log(f"node {name} {node['state']} ({len(killed)} processes)")
        return {"node": self._public(node), "killed_pids": killed,
                "seconds": round(time.monotonic() - t0, 3)}

    def set_link(self, name: str, up: bool) -> dict:
        node = self.nodes[name]
        _sh("ip", "link", "set", node["veth"], "up" if up else "down")
        node["link"] = "up" if up else "down"
        return self._public(node)

    def _public(self, node: dict) -> dict:
        proc = self.procs.get(node["name"])
        if node["state"] == "alive" and proc is not None and proc.poll() is not None:
            node["state"] = "exited"
            node["returncode"] = proc.returncode
        out = {k: v for k, v in node.items() if k != "ray_args"}
        out["pid"] = proc.pid if proc is not None else None  # inside the cluster's PID namespace
        return out

    def http(self, method: str, path: str, body: Any = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{HEAD_IP}:{DASHBOARD_PORT}{path}", data=data,
                                     method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def status(self) -> dict:
        return {"nodes": [self._public(n) for n in self.nodes.values()],
                "stopping": self.stopping.is_set()}

    def shutdown(self) -> None:
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            nodes = [n for n in self.nodes.values() if n["state"] in ("alive", "starting", "exited")]
            # workers first, then the head; a short grace so raylets leave the GCS cleanly
            for node in sorted(nodes, key=lambda n: n["role"] == "head"):
                try:
                    self._sweep(node, grace=float(self.spec.get("down_grace", 3)))
                    node["state"] = "removed"
                except Exception as e:  # keep going: PID 1 exiting kills whatever is left
                    _log(f"shutdown: {node['name']}: {e}")
            self.finished.set()

    # -- control socket ------------------------------------------------------------------------
    def handle(self, req: dict) -> Any:
        cmd = req.get("cmd")
        if cmd == "ping":
            return "pong"
        if cmd == "status":
            return self.status()
        if cmd == "http":
            status, body = self.http(req.get("method", "GET"), req["path"], req.get("body"),
                                     float(req.get("timeout", 30)))
            return {"status": status, "body": body}
        if cmd == "netns_pids":
            return self.netns_pids(req["name"])
        with self.lock:
            if cmd == "up":
                out = [self.start_node("head", req.get("head") or {})]
                for w in req.get("workers") or []:  # one after the other (2 busy cores)
                    out.append(self.start_node("worker", w))
                return out
            if cmd == "add_node":
                return self.start_node("worker", req)
            if cmd == "kill_node":
                return self.stop_node(req["name"], grace=0.0)
            if cmd == "remove_node":
                return self.stop_node(req["name"], grace=float(req.get("grace", 20)))
            if cmd in ("disconnect", "reconnect"):
                return self.set_link(req["name"], up=cmd == "reconnect")
        if cmd == "down":
            self.shutdown()
            return "down"
        raise ValueError(f"unknown command {cmd!r}")

    def serve(self, owner_fd: int | None) -> None:
        sock_path = self.root / "ctl.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        srv.listen(16)
        srv.settimeout(0.5)
        if owner_fd is not None:  # the owner (a test process) died: go down
            def watch() -> None:
                try:
                    while os.read(owner_fd, 1):
                        pass
                except OSError:
                    pass
                if not self.stopping.is_set():
                    _log("owner went away: shutting down")
                    self.shutdown()
            threading.Thread(target=watch, daemon=True).start()
        (self.root / "controller.ready").write_text(json.dumps({
            "outer_netns": _ns_inode_of("/proc/self/ns/net"),
            "pidns": _ns_inode_of("/proc/self/ns/pid"),
            "mntns": _ns_inode_of("/proc/self/ns/mnt"),
        }))

        def client(conn: socket.socket) -> None:
            with conn:
                try:
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    answer = {"ok": True, "result": self.handle(json.loads(buf))}
                except Exception as e:
                    answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall((json.dumps(answer) + "\n").encode())
                except OSError:
                    pass

        while not self.finished.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            threading.Thread(target=client, args=(conn,), daemon=True).start()
        time.sleep(0.5)  # let the answer to `down` go out
        srv.close()


def _init_main(root: Path, owner_fd: int | None) -> int:
    """PID 1 of the cluster's PID namespace: set up, fork the controller, reap everything."""
    spec = json.loads((root / "spec.json").read_text())
    pid = os.fork()
    if pid == 0:
        os.setsid()
        ctl = Controller(root, spec)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=ctl.shutdown).start())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = 0
        try:
            ctl.setup_outer()
            ctl.serve(owner_fd)
        except BaseException as e:
            _log(f"controller failed: {e!r}")
            code = 1
        finally:
            ctl.shutdown()
        os._exit(code)

    def forward(signum, _frame):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if done == pid:
            # Returning from PID 1 makes the kernel SIGKILL every process left in the namespace.
            return os.waitstatus_to_exitcode(status)


# --------------------------------------------------------------------------------------------
# Outside: the client API
# --------------------------------------------------------------------------------------------

def host_pids_in_ns(kind: str, inode: int) -> list[int]:
    """Host pids of the processes in the namespace KIND (net, pid, mnt) with this inode."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_inode_of(f"/proc/{entry}/ns/{kind}") == inode:
            out.append(int(entry))
    return sorted(out)


def process_memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    vals = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            vals[parts[0]] = int(parts[1])
    return vals.get("Rss:", 0), vals.get("Pss:", 0)


class LocalCluster:
    """A Ray head and worker nodes in private network namespaces on this machine.

        with LocalCluster(workers=2, output="/path/shared") as c:
            c.submit("python -c 'import ray; ray.init(); print(ray.nodes())'")
            c.kill_node("w1"); c.add_worker()

    ``owned=True`` (the default) ties the cluster's life to this process: if it dies, the cluster
    goes down by itself. ``scripts/cluster up`` uses ``owned=False`` and ``attach(root)``.
    """

    def __init__(self, workers: int = 2, cpus_head: int = 2, cpus_worker: int = 2,
                 output: str | os.PathLike | None = None, object_store_mb: int = 300,
                 system_config: dict | None = None, env: dict | None = None,
                 root: str | os.PathLike | None = None, owned: bool = True, keep: bool = False,
                 ray_bin: str | None = None, node_timeout: float = 180, down_grace: float = 3):
        self.workers = workers
        self.cpus_head = cpus_head
        self.cpus_worker = cpus_worker
        self.object_store_mb = object_store_mb
        self.output = str(Path(output).resolve()) if output else None
        self.system_config = system_config
        self.env_extra = dict(env or {})
        self.root = Path(root) if root else None
        self.owned = owned
        self.keep = keep
        self.ray_bin = ray_bin or str(VENV_BIN / "ray")
        self.node_timeout = node_timeout
        self.down_grace = down_grace
        self.holder_pid: int | None = None   # the `unshare` process (host pid)
        self.init_pid: int | None = None     # PID 1 of the cluster (host pid), nsenter target
        self.inodes: dict[str, int] = {}
        self.startup: dict[str, float] = {}
        self._owner_w: int | None = None
        self._last_nodes: list[dict] = []
        self._proc: subprocess.Popen | None = None

    # -- addresses -------------------------------------------------------------------------
    dashboard_address = f"http://{HEAD_IP}:{DASHBOARD_PORT}"
    gcs_address = f"{HEAD_IP}:{GCS_PORT}"
    client_address = f"ray://{HEAD_IP}:{CLIENT_PORT}"

    @property
    def addresses(self) -> dict[str, str]:
        return {"dashboard": self.dashboard_address, "jobs": self.dashboard_address,
                "gcs": self.gcs_address, "client": self.client_address}

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def sock(self) -> Path:
        return self.root / "ctl.sock"

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        if os.geteuid() != 0:
            raise PermissionError("LocalCluster needs root (unshare, ip netns, mount)")
        for tool in ("unshare", "nsenter", "ip", "mount"):
            if shutil.which(tool) is None:
                raise FileNotFoundError(f"LocalCluster needs `{tool}` (util-linux / iproute2)")
        t0 = time.monotonic()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
        else:
            self.root.mkdir(parents=True, exist_ok=False)
        if len(str(self.root)) > 24:
            raise ValueError(f"root {self.root} is too long for Ray's socket paths (24 chars max)")
        if self.output:
            Path(self.output).mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        spec = {"output": self.output, "system_config": self.system_config,
                "env": self.env_extra, "ray_bin": self.ray_bin,
                "node_timeout": self.node_timeout, "down_grace": self.down_grace}
        (self.root / "spec.json").write_text(json.dumps(spec))
        pass_fds: tuple[int, ...] = ()
        args = [sys.executable, str(Path(__file__).resolve()), "_init", str(self.root)]
        if self.owned:
            r, self._owner_w = os.pipe()
            pass_fds = (r,)
            args += ["--owner-fd", str(r)]
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.update({"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LIBMOUNT_UTAB": str(self.root / "utab"),
                    "PYTHONUNBUFFERED": "1"})
        log = open(self.root / "controller.log", "ab")
        try:
            self._proc = subprocess.Popen(
                ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc",
                 "--propagation", "private", "--", *args],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=pass_fds, start_new_session=True, cwd="/")
        finally:
            log.close()
            for fd in pass_fds:
                os.close(fd)
        self.holder_pid = self._proc.pid
        try:
            self._wait_controller(60)
            self.init_pid = self._find_init_pid()
            self._write_state()
            nodes = _send(self.sock, {
                "cmd": "up",
                "head": {"cpus": self.cpus_head, "object_store_mb": self.object_store_mb},
                "workers": [{"cpus": self.cpus_worker, "object_store_mb": self.object_store_mb}
                            for _ in range(self.workers)]})
        except BaseException:
            self.stop()
            raise
        self.startup = {n["name"]: n["ready_s"] for n in nodes}
        self.startup["total"] = round(time.monotonic() - t0, 2)
        self._write_state()
        return self

    def _wait_controller(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = self.root / "controller.ready"
        while not ready.exists():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError("the cluster controller exited:\n" + self.controller_log())
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster controller did not start:\n"
                                   + self.controller_log())
            time.sleep(0.05)
        self.inodes = json.loads(ready.read_text())

    def _find_init_pid(self) -> int:
        for _ in range(100):
            try:
                kids = Path(f"/proc/{self.holder_pid}/task/{self.holder_pid}/children").read_text()
            except OSError:
                kids = ""
            if kids.split():
                return int(kids.split()[0])
            time.sleep(0.05)
        raise RuntimeError("cannot find the cluster's PID 1")

    def _write_state(self) -> None:
        state = {"root": str(self.root), "holder_pid": self.holder_pid, "init_pid": self.init_pid,
                 "inodes": self.inodes, "addresses": self.addresses, "output": self.output,
                 "token_path": str(self.token_path), "startup_s": self.startup,
                 "owned": self.owned, "cpus_worker": self.cpus_worker,
                 "object_store_mb": self.object_store_mb}
        (self.root / "state.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(cls, root: str | os.PathLike) -> "LocalCluster":
        """A client for a cluster started elsewhere (``scripts/cluster up``)."""
        root = Path(root)
        state = json.loads((root / "state.json").read_text())
        c = cls(root=root, owned=False, output=state.get("output"),
                cpus_worker=state.get("cpus_worker", 2),
                object_store_mb=state.get("object_store_mb", 300))
        c.holder_pid, c.init_pid = state["holder_pid"], state["init_pid"]
        c.inodes, c.startup = state["inodes"], state.get("startup_s") or {}
        return c

    def alive(self) -> bool:
        return self.init_pid is not None and _ns_inode_of(f"/proc/{self.init_pid}/ns/pid") == \
            self.inodes.get("pidns")

    def stop(self, timeout: float = 60) -> None:
        """Take every node down (their processes by id, their namespaces), then the outer
        namespace; remove the root unless ``keep``. Idempotent."""
        if self.root is None:
            return
        if self.sock.exists() and self.alive():
            try:
                self.nodes()  # remember the nodes' namespaces for leftovers()
                _send(self.sock, {"cmd": "down"}, timeout=timeout)
            except (OSError, RuntimeError) as e:
                _log(f"down: {e}")
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():  # PID 1 going takes every process of the cluster with it
            os.kill(self.init_pid, signal.SIGKILL)
            while self.alive():
                time.sleep(0.05)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        elif self.holder_pid:
            try:
                os.waitpid(self.holder_pid, 0)
            except ChildProcessError:
                pass
        if self._owner_w is not None:
            os.close(self._owner_w)
            self._owner_w = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> dict[str, list[int]]:
        """Host processes still in any of the cluster's namespaces (empty after ``stop``)."""
        out = {}
        if self.inodes.get("pidns"):
            out["pid"] = host_pids_in_ns("pid", self.inodes["pidns"])
        if self.inodes.get("outer_netns"):
            out["outer net"] = host_pids_in_ns("net", self.inodes["outer_netns"])
        for node in self._last_nodes:
            if node.get("netns_inode"):
                out[f"{node['name']} net"] = host_pids_in_ns("net", node["netns_inode"])
        return {k: v for k, v in out.items() if v}

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- nodes -----------------------------------------------------------------------------
    def _call(self, req: dict, timeout: float = 600) -> Any:
        return _send(self.sock, req, timeout)

    def nodes(self) -> list[dict]:
        """The controller's view: name, role, ip, state, cpus, netns_inode, ready_s, log …"""
        nodes = self._call({"cmd": "status"})["nodes"]
        self._last_nodes = nodes
        return nodes

    def node(self, name: str) -> dict:
        for n in self.nodes():
            if n["name"] == name:
                return n
        raise KeyError(name)

    def add_worker(self, cpus: int | None = None, object_store_mb: int | None = None,
                   resources: dict | None = None, name: str | None = None,
                   timeout: float | None = None, gpus: int = 0, env: dict | None = None,
                   ray_args: Sequence[str] = ()) -> str:
        """Start one more worker node and wait until it has registered; returns its name.
        ``env`` is added to this node's environment (e.g. CUDA_VISIBLE_DEVICES), ``ray_args``
        to its ``ray start``."""
        req = {"cmd": "add_node", "cpus": self.cpus_worker if cpus is None else cpus,
               "object_store_mb": object_store_mb or self.object_store_mb,
               "resources": resources or {}, "name": name, "gpus": gpus, "env": env or {},
               "ray_args": list(ray_args)}
        if timeout:
            req["timeout"] = timeout
        node = self._call(req)
        self.startup[node["name"]] = node["ready_s"]
        return node["name"]

    def kill_node(self, name: str) -> dict:
        """SIGKILL every process in the node's network namespace at once (raylet, object store,
        workers, agents), then delete the namespace -- a machine that vanished."""
        return self._call({"cmd": "kill_node", "name": name})

    def remove_node(self, name: str, grace: float = 20) -> dict:
        """Stop a node gracefully (SIGTERM to its `ray start`, SIGKILL after ``grace`` s)."""
        return self._call({"cmd": "remove_node", "name": name, "grace": grace})

    def disconnect(self, name: str) -> dict:
        """Take the node's link to the bridge down (a network partition); processes live on."""
        return self._call({"cmd": "disconnect", "name": name})

    def reconnect(self, name: str) -> dict:
        return self._call({"cmd": "reconnect", "name": name})

    def node_pids(self, name: str) -> list[int]:
        """Host pids of every process in the node's network namespace."""
        inode = self.node(name)["netns_inode"]
        return host_pids_in_ns("net", inode) if inode else []

    def memory(self) -> dict[str, dict]:
        """Per live node: process count and RSS / PSS sums in MiB (from /proc)."""
        out = {}
        for n in self.nodes():
            if n["state"] != "alive":
                continue
            pids = host_pids_in_ns("net", n["netns_inode"])
            rss = pss = 0
            for pid in pids:
                r, p = process_memory_kb(pid)
                rss, pss = rss + r, pss + p
            out[n["name"]] = {"processes": len(pids), "rss_mib": round(rss / 1024, 1),
                              "pss_mib": round(pss / 1024, 1)}
        out["total"] = {k: round(sum(v[k] for v in out.values()), 1)
                        for k in ("processes", "rss_mib", "pss_mib")}
        return out

    # -- the Ray side (through the head's dashboard) -------------------------------------------
    def http(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30):
        """A request to the head's dashboard (with the token); returns (status, text)."""
        r = self._call({"cmd": "http", "path": path, "method": method, "body": body,
                        "timeout": timeout}, timeout=timeout + 10)
        return r["status"], r["body"]

    def ray_nodes(self) -> list[dict]:
        """Ray's own node table (state API): node_id, node_ip, state, is_head_node, …"""
        status, body = self.http("/api/v0/nodes?limit=10000&detail=1")
        if status != 200:
            raise RuntimeError(f"state API: {status} {body[:500]}")
        data = json.loads(body)
        return data["data"]["result"]["result"]

    def wait_nodes(self, alive: int, timeout: float = 60, dead: int | None = None) -> list[dict]:
        """Wait until Ray counts ``alive`` ALIVE nodes (and ``dead`` DEAD ones, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = self.ray_nodes()
            except (RuntimeError, OSError, KeyError, ValueError):
                nodes = []
            n_alive = sum(n["state"] == "ALIVE" for n in nodes)
            n_dead = sum(n["state"] == "DEAD" for n in nodes)
            if n_alive == alive and (dead is None or n_dead == dead):
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"wanted {alive} alive / {dead} dead nodes, Ray has "
                                   f"{n_alive} alive / {n_dead} dead: "
                                   + json.dumps([(n.get("node_ip"), n["state"]) for n in nodes]))
            time.sleep(0.5)

    def job(self, submission_id: str) -> dict:
        """The job's record from the job API (status, message, start/end time …)."""
        status, body = self.http(f"/api/jobs/{submission_id}")
        if status != 200:
            raise RuntimeError(f"job API: {status} {body[:500]}")
        return json.loads(body)

    def job_logs(self, submission_id: str) -> str:
        status, body = self.http(f"/api/jobs/{submission_id}/logs")
        if status != 200:
            raise RuntimeError(f"job API: {status} {body[:500]}")
        return json.loads(body).get("logs", "")

    def wait_job(self, submission_id: str, timeout: float = 600) -> dict:
        """Wait until the job is SUCCEEDED, FAILED or STOPPED; returns its record."""
        deadline = time.monotonic() + timeout
        info, last_error = {}, None
        while True:
            try:
                info = self.job(submission_id)
            except (RuntimeError, OSError) as e:  # a dashboard slow to answer (a node just died): ask again
                last_error = e
            else:
                if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                    return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {info.get('status')} after {timeout:.0f} s"
                                   + (f" (last job API error: {last_error})" if last_error else ""))
            time.sleep(0.5)

    # -- commands inside the cluster's network -------------------------------------------------
    def env(self, node: str | None = None) -> dict[str, str]:
        """What a client needs: RAY_ADDRESS, the token, the venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({
            "RAY_ADDRESS": self.gcs_address if node else self.dashboard_address,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PATH": f"{VENV_BIN}:{env.get('PATH', SYSTEM_PATH)}",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "RAY_USAGE_STATS_ENABLED": "0", "LIBMOUNT_UTAB": str(self.root / "utab"),
            "PERSE_CLUSTER": str(self.root),
        })
        if self.output:
            env["PERSE_CLUSTER_OUTPUT"] = self.output
        return env

    def command(self, argv: Sequence[str], node: str | None = None,
                cwd: str | os.PathLike | None = None) -> list[str]:
        """argv wrapped to run inside the outer namespace (``node=None``: like a laptop on the
        cluster's network) or on a node (like ssh to it: its network and its own disk)."""
        cwd = os.fspath(cwd or os.getcwd())
        wrapped = ["nsenter", f"--target={self.init_pid}", "--net", "--mount", "--pid",
                   f"--wd={cwd}", "--"]
        if node is None:
            return wrapped + list(argv)
        disk = self.root / "nodes" / node
        script = ('mount -n --bind "$1" "$2" && mount -n --bind "$3" "$4" && '
                  'export TMPDIR="$4" && shift 4 && exec "$@"')
        return wrapped + ["ip", "netns", "exec", node, "bash", "-c", script, "node",
                          str(disk / "ray"), str(self.root / "ray"), str(disk / "tmp"),
                          str(self.root / "tmp"), *argv]

    def run(self, argv: Sequence[str] | str, node: str | None = None, check: bool = False,
            timeout: float | None = None, cwd: str | os.PathLike | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside the cluster's network (see ``command``); a str runs in bash."""
        if isinstance(argv, str):
            argv = ["bash", "-c", argv]
        kwargs.setdefault("text", True)
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        return subprocess.run(self.command(argv, node, cwd), env=self.env(node), check=check,
                              timeout=timeout, **kwargs)

    def submit(self, entrypoint: Sequence[str] | str, working_dir: str | os.PathLike | None = None,
               runtime_env: dict | None = None, timeout: float | None = 600,
               extra: Sequence[str] = (), **kwargs) -> subprocess.CompletedProcess:
        """``ray job submit --address <dashboard> [--working-dir …] -- entrypoint`` (waits)."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard_address]
        if working_dir is not None:
            cmd += ["--working-dir", os.fspath(working_dir)]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        cmd += list(extra) + ["--"]
        cmd += shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        return self.run(cmd, timeout=timeout, **kwargs)

    def controller_log(self, tail: int = 4000) -> str:
        try:
            return (self.root / "controller.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def node_log(self, name: str, tail: int = 4000) -> str:
        try:
            return (self.root / "nodes" / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# CLI (scripts/cluster)
# --------------------------------------------------------------------------------------------

def _find_root(args) -> Path:
    root = args.dir or os.environ.get("PERSE_CLUSTER")
    if root:
        return Path(root)
    found = [p.parent for p in Path("/tmp").glob("pc-*/state.json")]
    if len(found) == 1:
        return found[0]
    raise SystemExit("which cluster? pass --dir or set PERSE_CLUSTER"
                     + (f" (found: {', '.join(map(str, found))})" if found else " (none running)"))


def _print_up(c: LocalCluster, nodes: list[dict]) -> None:
    alive = [n for n in nodes if n["state"] == "alive"]
    print(f"cluster {c.root}: {len(alive)} node{'s' if len(alive) != 1 else ''} up in "
          f"{c.startup.get('total', '?')} s")
    for n in nodes:
        print(f"  {n['name']:<5} {n['ip']:<12} {n['cpus']:>4} CPUs  {n['state']:<8} "
              f"ready in {n['ready_s']} s")
    print(f"  dashboard / jobs: {c.dashboard_address}")
    print(f"  GCS:              {c.gcs_address}")
    print(f"  Ray client:       {c.client_address}")
    print(f"  token:            {c.token_path}")
    if c.output:
        print(f"  shared output:    {c.output}")
    print("These addresses exist only inside the cluster's private network. Run clients there:")
    print(f"  export PERSE_CLUSTER={c.root}")
    out = c.output or "$PWD/out/cluster"
    print("  scripts/cluster exec -- ray job submit --working-dir . -- python jobs/build_avatars.py"
          f" --input $PWD/examples/portraits --output {out} --preset cpu-smoke")
    print("  scripts/cluster shell      # a shell with RAY_ADDRESS and the token set")
    print("  scripts/cluster down")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_init"]:
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("root")
        p.add_argument("--owner-fd", type=int)
        a = p.parse_args(argv)
        return _init_main(Path(a.root), a.owner_fd)

    p = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="A multi-node Ray cluster on this machine: every node in its own network "
                    "namespace on a private bridge (10.213.7.0/24) no packet can leave. Needs root.")
    p.add_argument("--dir", help="the cluster's root (default: $PERSE_CLUSTER, or the only one)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head and K worker nodes (one after the other)")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-head", type=int, default=2)
    up.add_argument("--cpus-worker", type=int, default=2)
    up.add_argument("--object-store-mb", type=int, default=300)
    up.add_argument("--output", help="shared output directory (the cluster's shared file system)")
    up.add_argument("--system-config", type=json.loads, help="Ray system config JSON (head)")
    up.add_argument("--root", help="root directory to create (short, e.g. /tmp/pc-mine)")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground; Ctrl-C takes the cluster down")
    add = sub.add_parser("add-node", help="start one more worker node and wait for it to join")
    add.add_argument("--cpus", type=int)
    add.add_argument("--object-store-mb", type=int)
    add.add_argument("--resources", type=json.loads)
    for name, help_ in (("kill-node", "SIGKILL every process of the node at once"),
                        ("remove-node", "stop the node gracefully (SIGTERM, then SIGKILL)"),
                        ("disconnect", "take the node's link down (partition)"),
                        ("reconnect", "bring the node's link back up")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("name")
    sub.add_parser("status", help="nodes as the controller and as Ray see them")
    sub.add_parser("memory", help="RSS / PSS of each node's processes")
    ex = sub.add_parser("exec", help="run a command inside the cluster's network, e.g. "
                                     "`exec -- ray job submit -- python …`")
    ex.add_argument("--on", metavar="NODE", help="run on this node (its network and disk)")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("shell", help="an interactive shell inside the cluster's network")
    sub.add_parser("env", help="print the client environment (RAY_ADDRESS, token) as exports")
    sub.add_parser("down", help="stop every node and remove the namespaces")
    a = p.parse_args(argv)

    if a.cmd == "up":
        c = LocalCluster(workers=a.workers, cpus_head=a.cpus_head, cpus_worker=a.cpus_worker,
                         output=a.output, object_store_mb=a.object_store_mb,
                         system_config=a.system_config, root=a.root, owned=a.foreground)
        c.start()
        _print_up(c, c.nodes())
        sys.stdout.flush()
        if a.foreground:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            finally:
                c.stop()
        return 0

    c = LocalCluster.attach(_find_root(a))
    if a.cmd in ("exec", "shell"):
        node = getattr(a, "on", None)
        if a.cmd == "shell":
            cmd = [os.environ.get("SHELL", "bash")]
        else:
            cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        if not cmd:
            raise SystemExit("exec: give a command after --")
        os.execvpe("nsenter", c.command(cmd, node), c.env(node))
    if a.cmd == "env":
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "PERSE_CLUSTER"):
            print(f"export {k}={shlex.quote(c.env()[k])}")
        return 0
    if a.cmd == "down":
        c.stop()
        print(f"cluster {c.root} is down")
        return 0
    if a.cmd == "status":
        nodes = c.nodes()
        for n in nodes:
            print(f"{n['name']:<5} {n['ip']:<12} {n['cpus']:>4} CPUs  {n['state']:<8} "
                  f"pid {n['pid']}  ready in {n['ready_s']} s  log {n['log']}")
        try:
            for n in c.ray_nodes():
                print(f"ray: {n['node_ip']:<12} {n['state']:<5} head={n['is_head_node']} "
                      f"{n['node_id'][:12]}")
        except (RuntimeError, ConnectionError, ValueError, KeyError) as e:
            print(f"ray: state API not answering ({e})")
        return 0
    if a.cmd == "memory":
        print(json.dumps(c.memory(), indent=1))
        return 0
    if a.cmd == "add-node":
        name = c.add_worker(cpus=a.cpus, object_store_mb=a.object_store_mb, resources=a.resources)
        print(json.dumps(c.node(name), indent=1))
        return 0
    method = {"kill-node": c.kill_node, "remove-node": c.remove_node,
              "disconnect": c.disconnect, "reconnect": c.reconnect}[a.cmd]
    print(json.dumps(method(a.name), indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `scripts/cluster status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
