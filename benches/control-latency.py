#!/usr/bin/env python3
"""Round-trip latency of pollblk's control socket (JSON-RPC 2.0, one object per line).

Starts `pollblk serve --control` in a temporary directory with no disks, keeps one client
connection, and times each method: median and p99 in microseconds. Null disks only, so it
measures the control plane, not storage.

    benches/control-latency.py [PATH-TO-POLLBLK]     # default target/release/pollblk
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
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "../target/release/pollblk")
work = tempfile.mkdtemp(prefix="pollblk-control-latency-")
control = os.path.join(work, "control.sock")
daemon = subprocess.Popen([binary, "serve", "--control", control], cwd=work,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(200):
        if os.path.exists(control):
            break
        time.sleep(0.05)
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

    measure("export_list, no disks", 1000, lambda i: call("export_list"))
    measure("export_add + export_remove, 4-queue null disk", 200, add_remove)
    for i in range(50):
        call("export_add", {"spec": spec(f"d{i}"), "name": f"d{i}"})
    measure("export_list, 50 disks", 500, lambda i: call("export_list"))
    measure("export_resize, no front end", 200,
            lambda i: call("export_resize", {"name": "d0", "size": (1 << 30) + (i + 1) * 4096}))
    measure("stats_get, one disk", 200, lambda i: call("stats_get", {"name": "d1"}))
finally:
    daemon.terminate()
    daemon.wait()
    shutil.rmtree(work, ignore_errors=True)
