#!/usr/bin/env python3
"""Round-trip latency of pollblk's control socket (JSON-RPC 2.0, one object per line).

Starts `pollblk serve --control` in a temporary directory with no disks, keeps one client
connection, and times each method: median and p99 in microseconds. Null disks only, so it
measures the control plane, not storage.

    benches/control-latency.py [PATH-TO-POLLBLK]     # default target/release/pollblk
    benches/control-latency.py --disks 1000 [--attached] [PATH]
        at scale: the daemon starts with 1,000 one-queue null disks from a config file; with
        --attached, pollblk-bench holds an idle front end on every one of them meanwhile
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
disks = 0
attached = False
if args[:1] == ["--disks"]:
    disks, args = int(args[1]), args[2:]
if args[:1] == ["--attached"]:
    attached, args = True, args[1:]
binary = args[0] if args else os.path.join(here, "../target/release/pollblk")
work = tempfile.mkdtemp(prefix="pollblk-control-latency-")
control = os.path.join(work, "control.sock")
command = [binary, "serve", "--control", control, "--stats-dir", os.path.join(work, "stats")]
if disks:
    with open(os.path.join(work, "disks.toml"), "w") as config:
        for i in range(disks):
            config.write(f'[[export]]\nspec = "vhost-user-blk,socket={work}/s{i}.sock,null,'
                         f'size=64M,num-queues=1"\n')
    command += ["--config", os.path.join(work, "disks.toml")]
daemon = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(600):
        if os.path.exists(control) and (not disks or os.path.exists(f"{work}/s{disks - 1}.sock")):
            break
        time.sleep(0.05)
    holder = None
    if attached:
        bench = os.path.join(os.path.dirname(binary), "pollblk-bench")
        holder = subprocess.Popen([bench, "--socket", f"{work}/s{disks - 1}.sock", "--rw", "idle",
                                   "--driver", "lean", "--idle-sockets", f"{work}/s{{}}.sock",
                                   "--idle-count", str(disks - 1), "--runtime", "600"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Every front end is attached once the daemon holds a connection per disk.
        for _ in range(600):
            fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
            if fds >= 6 * disks:
                break
            time.sleep(0.1)
        else:
            sys.exit(f"the front ends did not attach ({fds} open files)")
    client = socket.socket(socket.AF_UNIX)
    client.connect(control)
    stream = client.makefile("rwb")

    def call(method, params=None):
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        stream.write((json.dumps(request) + "\n").encode())
        stream.flush()
        reply = json.loads(stream.readline())
        if "result" not in reply:
            sys.exit(f"{method}: {reply}")
        return reply["result"]

    def measure(label, count, one):
        times = []
        for i in range(count):
            start = time.perf_counter()
            one(i)
            times.append((time.perf_counter() - start) * 1e6)
        times.sort()
        print(f"{label:<48} median {times[len(times) // 2]:7.0f} us   p99 {times[int(count * 0.99) - 1]:7.0f} us")

    def spec(name):
        return f"vhost-user-blk,socket={work}/{name}.sock,null,size=1G,num-queues=4"

    def add_remove(i):
        call("export_add", {"spec": spec(f"t{i}"), "name": f"t{i}"})
        call("export_remove", {"name": f"t{i}"})

    if disks:
        def add(i):
            call("export_add", {"spec": spec(f"d{i}").replace("num-queues=4", "num-queues=1"),
                                "name": f"d{i}"})
        measure(f"export_add, disks {disks + 1} to {disks + 200}", 200, add)
        measure(f"export_list, {disks + 200} disks", 200, lambda i: call("export_list"))
        measure("export_add + export_remove, 4-queue null disk", 200, add_remove)
        sys.exit(0)
    measure("export_list, no disks", 1000, lambda i: call("export_list"))
    measure("export_add + export_remove, 4-queue null disk", 200, add_remove)
    for i in range(50):
        call("export_add", {"spec": spec(f"d{i}"), "name": f"d{i}"})
    measure("export_list, 50 disks", 500, lambda i: call("export_list"))
    measure("export_resize, no front end", 200,
            lambda i: call("export_resize", {"name": "d0", "size": (1 << 30) + (i + 1) * 4096}))
    measure("stats_get, one disk", 200, lambda i: call("stats_get", {"name": "d1"}))
finally:
    if attached and holder:
        holder.kill()
    daemon.terminate()
    daemon.wait()
    shutil.rmtree(work, ignore_errors=True)
