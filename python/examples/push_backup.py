#!/usr/bin/env python3
"""Full and incremental push backups of a qemu-storage-daemon disk, driven from Python.

The only Rust in the loop is vbackup's engine (`vbackup_core.Domain`): this script owns the
daemon, talks QMP over the unix socket itself, carries out the engine's file and store outputs,
and checks both backups with `qemu-img compare`:

1. create a qcow2 image and write data into it with qemu-io;
2. start qemu-storage-daemon on it (QMP monitor, and a writable NBD export as the "guest");
3. create checkpoint c0, then a full push backup that creates checkpoint c1 atomically;
4. write through the guest export, then an incremental push backup from c1 creating c2;
5. compare the full backup with the image as it was, and the incremental, rebased onto the
   full backup, with the disk as it was when the incremental began.

Run: python3 python/examples/push_backup.py [--dir DIR] [--keep]
Needs qemu-img, qemu-io and qemu-storage-daemon (qemu-utils 10). Exits non-zero on any failure.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import vbackup_core

MIB = 1024 * 1024
DISK_BYTES = 64 * MIB
# Bounds: one step of the engine never needs long; a backup of a few MiB takes well under this.
STEP_TIMEOUT_S = 60.0
MAX_STEPS = 100_000


def now_ms():
    # Wall-clock milliseconds: checkpoint creation times and file suffixes derive from them.
    return int(time.time() * 1000)


def run(*argv):
    """Runs a command, failing with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


class Qmp:
    """A QMP connection over a unix socket: JSON messages, one per line."""

    def __init__(self, path, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP socket at {path} after {timeout_s} s")
                time.sleep(0.05)
        self.buffer = b""

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv(self, timeout_s):
        """The next message, or None when nothing arrived within `timeout_s`."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise RuntimeError("QMP connection closed by the daemon")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        self.sock.close()


class Driver:
    """Feeds QMP traffic and requests into the engine and carries out every output."""

    def __init__(self, domain, qmp, store_dir):
        self.domain = domain
        self.qmp = qmp
        self.store_dir = store_dir
        self.next_request = 1
        self.answers = {}
        self.events = []

    def feed(self, message):
        pending = [message]
        while pending:
            outputs = self.domain.handle(now_ms(), pending.pop(0))
            pending.extend(self.carry_out(outputs))

    def carry_out(self, outputs):
        """Does what the outputs say, in order; returns the inputs they produce."""
        inputs = []
        for output in outputs:
            if "send" in output:
                self.qmp.send(output["send"])
            elif "file" in output:
                inputs.append({"file-done": self.file_op(output["file"])})
            elif "persist" in output:
                self.persist(output["persist"])
            elif "respond" in output:
                self.answers[output["respond"]["id"]] = output["respond"]
            elif "emit" in output:
                event = output["emit"]
                self.events.append(event)
                print(f"  event: {json.dumps(event, sort_keys=True)}")
            else:
                raise RuntimeError(f"unknown output {output}")
        return inputs

    def file_op(self, op):
        path = op["path"]
        try:
            if op["op"] == "create-exclusive":
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            elif op["op"] == "remove":
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            elif op["op"] == "sync":
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                return {"id": op["id"], "error": f"unknown file operation {op['op']}"}
        except OSError as err:
            return {"id": op["id"], "error": f"{op['op']} {path}: {err}"}
        print(f"  file: {op['op']} {path}")
        return {"id": op["id"]}

    def persist(self, op):
        """A tiny store: one file per checkpoint, the current checkpoint, the job journal."""
        kind = op["op"]
        checkpoints = os.path.join(self.store_dir, "checkpoints")
        os.makedirs(checkpoints, exist_ok=True)
        if kind == "put-checkpoint":
            write_atomic(os.path.join(checkpoints, op["name"] + ".xml"), op["xml"])
        elif kind == "delete-checkpoint":
            os.remove(os.path.join(checkpoints, op["name"] + ".xml"))
        elif kind == "set-current-checkpoint":
            write_atomic(os.path.join(self.store_dir, "current"), op["name"] or "")
        elif kind == "put-backup-journal":
            write_atomic(os.path.join(self.store_dir, "journal.json"), json.dumps(op["journal"]))
        elif kind == "delete-backup-journal":
            try:
                os.remove(os.path.join(self.store_dir, "journal.json"))
            except FileNotFoundError:
                pass
        elif kind == "set-pending-checkpoints":
            write_atomic(os.path.join(self.store_dir, "pending.json"), json.dumps(op["names"]))
        else:
            raise RuntimeError(f"unknown store operation {op}")
        print(f"  persist: {kind} {op.get('name') or ''}".rstrip())

    def step(self, until_s):
        """Waits for one message (or the engine's deadline) and feeds it."""
        deadline_ms = self.domain.next_deadline()
        wait_s = until_s - time.monotonic()
        if deadline_ms is not None:
            wait_s = min(wait_s, (deadline_ms - now_ms()) / 1000)
        message = self.qmp.recv(wait_s)
        if message is not None:
            self.feed(message)
        elif deadline_ms is not None and now_ms() >= deadline_ms:
            self.feed("tick")

    def run_until(self, done, what):
        until_s = time.monotonic() + STEP_TIMEOUT_S
        for _ in range(MAX_STEPS):
            if done():
                return
            if time.monotonic() > until_s:
                break
            self.step(until_s)
        raise RuntimeError(f"timed out waiting for {what}")

    def call(self, request, **fields):
        """Sends a request and waits for its answer; raises on an error answer."""
        request_id = self.next_request
        self.next_request += 1
        self.feed({"request": request, "id": request_id, **fields})
        self.run_until(lambda: request_id in self.answers, f"the answer to {request}")
        answer = self.answers.pop(request_id)
        if "error" in answer:
            raise RuntimeError(f"{request} failed: {answer['error']}")
        return answer["ok"]


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_daemon(work, image):
    """qemu-storage-daemon with the image as `vda-format` (qcow2 over a file node), a QMP
    monitor and a writable NBD export `guest-vda` through a raw node over the disk."""
    qmp_sock = os.path.join(work, "qmp.sock")
    nbd_sock = os.path.join(work, "nbd.sock")
    pid_file = os.path.join(work, "qsd.pid")
    log = open(os.path.join(work, "qsd.log"), "ab")
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=vda-file,filename={image}",
        "--blockdev", "driver=qcow2,node-name=vda-format,file=vda-file",
        "--blockdev", "driver=raw,node-name=vda-guest,file=vda-format",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=guest-vda,node-name=vda-guest,name=guest-vda,writable=on",
        "--chardev", f"socket,id=qmp,path={qmp_sock},server=on,wait=off",
        "--monitor", "chardev=qmp",
        "--pidfile", pid_file,
    ]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    return process, qmp_sock, f"nbd+unix:///guest-vda?socket={nbd_sock}"


def allocated_bytes(image):
    """Bytes of data the image itself holds (not its backing chain)."""
    extents = json.loads(run("qemu-img", "map", "--output=json", image))
    return sum(e["length"] for e in extents if e.get("data") and e.get("depth") == 0)


def backup_xml(target, incremental=None):
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (
        f"<domainbackup mode='push'>{inc}<disks>"
        f"<disk name='vda' type='file'><target file='{target}'/><driver type='qcow2'/></disk>"
        f"</disks></domainbackup>"
    )


def backup(driver, target, checkpoint, incremental=None):
    """A push backup that creates `checkpoint` atomically; waits for it to complete."""
    before = len(driver.events)
    driver.call(
        "backup-begin",
        xml=backup_xml(target, incremental),
        **{"checkpoint-xml": f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>"},
    )

    def completed():
        return any(e["event"] == "job-completed" for e in driver.events[before:])

    driver.run_until(completed, "the backup to complete")
    stats = next(e for e in driver.events[before:] if e["event"] == "job-completed")["stats"]
    if stats.get("success") is not True:
        raise RuntimeError(f"backup to {target} did not succeed: {stats}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed (qemu-utils 10 has it)", file=sys.stderr)
            return 1
    work = args.dir or tempfile.mkdtemp(prefix="vbackup-py-")
    os.makedirs(work, exist_ok=True)
    image = os.path.join(work, "vda.qcow2")
    full = os.path.join(work, "full.qcow2")
    inc = os.path.join(work, "inc.qcow2")
    ref_full = os.path.join(work, "ref-full.raw")
    ref_inc = os.path.join(work, "ref-inc.raw")
    process = None
    qmp = None
    try:
        print(f"work directory: {work}")
        run("qemu-img", "create", "-q", "-f", "qcow2", image, str(DISK_BYTES))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 512k",
            image)
        # The disk as the full backup must see it: nothing writes between here and the backup.
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, ref_full)

        process, qmp_sock, guest_uri = start_daemon(work, image)
        print(f"qemu-storage-daemon pid {process.pid}")
        qmp = Qmp(qmp_sock)
        domain = vbackup_core.Domain(
            {"name": "vm", "disks": {"vda": {"node-name": "vda-format", "path": image}}}
        )
        driver = Driver(domain, qmp, os.path.join(work, "store"))
        driver.run_until(lambda: domain.connected, "the QMP session to be negotiated")

        print("checkpoint-create c0")
        driver.call("checkpoint-create", xml="<domaincheckpoint><name>c0</name></domaincheckpoint>")
        print("full push backup, creating checkpoint c1")
        backup(driver, full, "c1")

        print("guest writes 64 KiB at 1 MiB and 100 KiB at 20 MiB")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x6b 20M 100k",
            guest_uri)
        # The disk as the incremental backup must see it.
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", guest_uri, ref_inc)

        print("incremental push backup from c1, creating checkpoint c2")
        backup(driver, inc, "c2", incremental="c1")
        names = driver.call("checkpoint-list", topological=True)["names"]
        print(f"checkpoints: {' '.join(names)}")
        if names != ["c0", "c1", "c2"]:
            raise RuntimeError(f"unexpected checkpoints {names}")

        print("checking the full backup against the disk at its point in time")
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", full, ref_full)
        # The engine gives an incremental target the disk as its backing file (as libvirt
        # does); point it at the full backup instead, without copying anything.
        run("qemu-img", "rebase", "-u", "-b", full, "-F", "qcow2", inc)
        inc_bytes = allocated_bytes(inc)
        print(f"incremental holds {inc_bytes} bytes of data")
        # Only the dirty 64 KiB granules: 1 at 1 MiB and 2 at 20 MiB.
        if not 0 < inc_bytes <= 256 * 1024:
            raise RuntimeError(f"incremental holds {inc_bytes} bytes, expected only the dirty ones")
        print("checking the incremental, rebased onto the full backup")
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", inc, ref_inc)
        print("OK: full and incremental backups match the disk")
        return 0
    except Exception as err:  # the example reports any failure and exits non-zero
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if qmp is not None:
            qmp.close()
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
