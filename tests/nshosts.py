"""Test hosts made of Linux namespaces, for `ray up` with the `local` provider (needs root).

Each host is one process tree: ``ip netns exec NS unshare --mount --pid --fork`` running an
OpenSSH server as the PID namespace's init. So a host has:

- its own network namespace on a bridge, with one address in a private /24 (and its own
  loopback); only these addresses and loopback ever receive traffic (the on-link default
  route lets Ray find its own address without any packet leaving the bridge);
- one login, :data:`USER` (not root: sshd refuses root), with the same uid on every host
  and its own home (``/home/bakeuser``) and ``/tmp`` (bind mounts in its mount namespace), so
  Ray's state files, sessions and venv are per host; the host's ``/etc/passwd`` and
  ``/etc/group`` are this machine's plus that user, :data:`NFS_OWNER` and the group
  :data:`SHARE_GROUP` (the user is in it), bound over the originals in the host only; a tmpfs
  on ``/opt`` hides this machine's package folders, one on ``/root`` its root's home;
  ``/mnt`` is the directory all hosts share (the "NFS", with numeric owners as NFSv3 has);
- its own PID namespace: killing its init (sshd) kills every process the host ever ran.

Python 3.11 is this interpreter's installation, mounted at its own path and put on PATH by
the host's ``~/.bashrc`` (as a pyenv user would have it); pip finds wheels only in the
wheelhouse mounted at ``/opt/wheelhouse`` (``~/.config/pip/pip.conf``: ``no-index``).
The client (where the user runs ``ray up``) is such a host too, without sshd.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository these tests belong to
PYTHON_PREFIX = Path(sys._base_executable).resolve().parents[1]  # the real python3.11 install
TOOLS = ("ip", "unshare", "nsenter", "rsync", "ssh", "ssh-keygen", "tail", "pgrep")
SSHD = "/usr/sbin/sshd"
# The cluster's login on the head and the workers: the same name and uid on every host, as
# NFS with numeric owners needs. NFS_OWNER owns the shared directory (the NFS admin's
# account), SHARE_GROUP may write it; USER is in SHARE_GROUP. None of them exists on this
# machine: each host sees them through its own /etc/passwd and /etc/group.
USER, USER_UID = "bakeuser", 2101
NFS_OWNER, NFS_OWNER_UID = "nfsowner", 2102
SHARE_GROUP, SHARE_GID = "bakeshare", 2103


def missing_tools() -> list[str]:
    """What this machine lacks to build namespace hosts (empty when it can)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not Path(SSHD).exists():
        missing.append(SSHD)
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a setup command, failing loudly with its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} -> {done.returncode}: {done.stderr.strip()}")
    return done


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 no route of this machine touches."""
    used = run(["ip", "-4", "route", "show", "table", "all"]).stdout
    for third in range(1, 255):
        net = ipaddress.ip_network(f"10.213.{third}.0/24")
        if f"10.213.{third}." not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24")


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    dir: Path
    proc: subprocess.Popen | None = None
    init_pid: int = 0

    @property
    def home(self) -> Path:
        return self.dir / "home"

    def pid_namespace(self) -> str:
        return os.readlink(f"/proc/{self.init_pid}/ns/pid")

    def processes(self) -> dict[int, str]:
        """Every process of this host (pid -> command line), its init included."""
        ns, out = self.pid_namespace(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") == ns:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    out[int(entry.name)] = cmd
        return out

    def enter(self) -> list[str]:
        """Prefix that runs a command inside this host's namespaces."""
        return ["nsenter", f"--target={self.init_pid}", "--net", "--mount", "--pid", "--"]


@dataclass
class Hosts:
    """A bridge, hosts on it and a shared directory; ``close()`` removes all of it."""

    root: Path
    wheelhouse: Path
    names: list[str]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    veths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.net = free_subnet()
        self.shared = self.root / "shared"
        self.key = self.root / "client_key"

    # ------------------------------------------------------------------ setup

    def start(self) -> Hosts:
        """Create the bridge and every host; sshd runs on every host but the client."""
        self.shared.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_key")])
        self.bridge = f"bkr{self.run_id}"
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        gateway = f"{self.net[1]}/{self.net.prefixlen}"
        run(["ip", "addr", "add", gateway, "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        for i, name in enumerate(self.names):
            self._add_host(name, str(self.net[10 + i]))
        return self

    def _add_host(self, name: str, ip: str) -> None:
        host = Host(name, ip, f"bkr-{self.run_id}-{name}", self.root / "hosts" / name)
        self.hosts[name] = host
        run(["ip", "netns", "add", host.netns])
        outer, inner = f"bk{self.run_id}{len(self.veths)}", "eth0"
        run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner,
             "netns", host.netns])
        self.veths.append(outer)
        run(["ip", "link", "set", outer, "master", self.bridge, "up"])
        ns = ["ip", "-n", host.netns]
        run([*ns, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", inner])
        run([*ns, "link", "set", inner, "up"])
        run([*ns, "link", "set", "lo", "up"])
        run([*ns, "route", "add", "default", "dev", inner])
        self._prepare_home(host)
        self._launch(host, client=name == "client")

    def _prepare_home(self, host: Host) -> None:
        (host.dir / "tmp").mkdir(parents=True)
        (host.dir / "tmp").chmod(0o1777)
        ssh = host.home / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        shutil.copy(self.key.with_suffix(".pub"), ssh / "authorized_keys")
        (ssh / "authorized_keys").chmod(0o600)
        (host.home / ".bashrc").write_text(
            f"# python3.11, installed by the admin\nexport PATH={PYTHON_PREFIX}/bin:$PATH\n")
        pip = host.home / ".config/pip"
        pip.mkdir(parents=True)
        (pip / "pip.conf").write_text(
            "[global]\nno-index = true\nfind-links = /opt/wheelhouse\n"
            "disable-pip-version-check = true\n")
        (host.dir / "sshd_config").write_text(
            f"ListenAddress {host.ip}\nPort 22\nHostKey /opt/ci/host_key\nPidFile none\n"
            "UsePAM no\nPermitRootLogin no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes yes\nMaxStartups 100\n"
            "MaxSessions 100\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n")
        if host.name != "client":
            self._add_accounts(host)

    @staticmethod
    def _add_accounts(host: Host) -> None:
        """The host's passwd and group files (bound over /etc's) and its user's home."""
        (host.dir / "passwd").write_text(Path("/etc/passwd").read_text() + (
            f"{USER}:x:{USER_UID}:{USER_UID}:bake-ray:/home/{USER}:/bin/bash\n"
            f"{NFS_OWNER}:x:{NFS_OWNER_UID}:{NFS_OWNER_UID}:NFS admin:/nonexistent:"
            "/usr/sbin/nologin\n"))
        (host.dir / "group").write_text(Path("/etc/group").read_text() + (
            f"{USER}:x:{USER_UID}:\n{NFS_OWNER}:x:{NFS_OWNER_UID}:\n"
            f"{SHARE_GROUP}:x:{SHARE_GID}:{USER}\n"))
        for path in [host.home, *host.home.rglob("*")]:
            os.chown(path, USER_UID, USER_UID, follow_symlinks=False)

    def _launch(self, host: Host, client: bool) -> None:
        """Start the host's init: mounts, then sshd (or a sleeper for the client).

        The client keeps this machine's /root (its Python lives there): its home is
        /opt/ci/hosts/client/home, given to each client command as $HOME.
        """
        # The repository (the client runs `ray up` from it, with its .venv) may itself lie
        # under /tmp or /opt, which the mounts below replace: keep it reachable at its own
        # path through a bind made first and carried along by the rbind of the root.
        repo = self.root / "repo"
        repo.mkdir(exist_ok=True)
        mounts = [
            f"mount --bind {REPO} {repo}",
            "mount -t tmpfs tmpfs /opt",
            "mkdir /opt/python3.11 /opt/wheelhouse /opt/ci",
            f"mount --bind {PYTHON_PREFIX} /opt/python3.11",
            f"mount --bind -o ro {self.wheelhouse} /opt/wheelhouse",
            f"mount --rbind {self.root} /opt/ci",
            f"mount --bind {self.shared} /mnt",
            *([] if client else self._account_mounts(host)),
            # Python where it was installed (its binary finds libpython by that path)
            f"mkdir -p {PYTHON_PREFIX}", f"mount --bind /opt/python3.11 {PYTHON_PREFIX}",
            f"mount --bind {host.dir / 'tmp'} /tmp",
            f"mkdir -p {REPO}", f"mount --bind /opt/ci/repo {REPO}",
            "mkdir -p /run/sshd",
        ]
        main = ("exec sleep infinity" if client
                else f"exec {SSHD} -D -e -f /opt/ci/hosts/{host.name}/sshd_config")
        script = "set -e; umask 022; " + "; ".join(mounts) + "; " + main
        log = open(host.dir / "init.log", "w")  # noqa: SIM115 (lives as long as the host)
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--pid", "--fork",
             "--kill-child", "--mount-proc", "--propagation", "private", "bash", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={"PATH": os.environ["PATH"]},
        )
        host.init_pid = self._wait_init(host)
        if not client:
            self._wait_ssh(host)

    @staticmethod
    def _account_mounts(host: Host) -> list[str]:
        """The user's home at /home/USER. /root is emptied: only the Python mounted into it
        later, at its path on this machine, which every user may read as a system one."""
        return [
            f"mount --bind {host.dir / 'passwd'} /etc/passwd",
            f"mount --bind {host.dir / 'group'} /etc/group",
            "mount -t tmpfs -o mode=0755 tmpfs /home",
            f"mkdir /home/{USER}", f"mount --bind {host.home} /home/{USER}",
            "mount -t tmpfs -o mode=0755 tmpfs /root",
        ]

    def _wait_init(self, host: Host) -> int:
        """The PID (in this namespace) of the host's init, once its mounts are done."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if host.proc.poll() is not None:
                raise RuntimeError(f"{host.name}: {(host.dir / 'init.log').read_text()}")
            children = Path(f"/proc/{host.proc.pid}/task/{host.proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    exe = os.readlink(f"/proc/{pid}/exe")
                    if exe.endswith(("sshd", "sleep")):
                        return int(pid)
            time.sleep(0.1)
        raise TimeoutError(f"{host.name}: init did not start")

    def _wait_ssh(self, host: Host) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = subprocess.run(self.ssh_cmd(host, "true"), capture_output=True, timeout=30)
            if done.returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{host.name}: sshd does not answer")

    # ------------------------------------------------------------------ use

    def ssh_cmd(self, host: Host, command: str) -> list[str]:
        """An ssh command line from the machine itself to `host`, as :data:`USER`."""
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", f"{USER}@{host.ip}", command]

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill every host (its PID namespace dies with its init), remove links and netns."""
        for host in self.hosts.values():
            if host.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.init_pid, signal.SIGKILL)
            if host.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.proc.wait(timeout=30)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True, timeout=30)
        for veth in self.veths:
            subprocess.run(["ip", "link", "delete", veth], capture_output=True, timeout=30)
        if self.bridge:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, timeout=30)
        # Each host's venv is ~6.5 GB: pytest's kept temp dirs must not pile them up.
        for host in self.hosts.values():
            shutil.rmtree(host.home / "bake-ray-venv", ignore_errors=True)


@contextlib.contextmanager
def namespace_hosts(root: Path, wheelhouse: Path, names: list[str]) -> Iterator[Hosts]:
    """Hosts for the duration of the block, removed even when it fails."""
    hosts = Hosts(root, wheelhouse, names)
    try:
        yield hosts.start()
    finally:
        hosts.close()
