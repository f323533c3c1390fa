#!/usr/bin/env python3
# The control experiment of the migration tests: the same guest (target/guest, built by
# tests/guest/build-guest.sh) and the same migration during fio write+verify as
# tests/guest.rs migrate_guest, but on QEMU's own virtio-blk (no vhost-user, no pollblk).
# If this guest crashes on the destination too, the fault is QEMU's, not pollblk's.
# As the Rust test, the destination starts paused and its memory is compared with the
# source's, page by page, before it runs ("stale pages").
#   tests/guest/migration-control.py                            # MTTCG (QEMU's default)
#   ACCEL=tcg,thread=single tests/guest/migration-control.py
#   DRIVE=file=rbd:rbd/img:conf=CEPH_CONF ACCEL=tcg,thread=single tests/guest/migration-control.py
#     (QEMU's own librbd driver on a cluster from tests/ceph/cluster.sh)
# Prints "RESULT ok" or "RESULT FAIL DIR" and the destination console's tail.
import json, os, socket, subprocess, sys, tempfile, time
gd = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../target/guest")
d = tempfile.mkdtemp(prefix="mig-builtin-", dir=os.environ.get("TMPDIR", "/tmp"))
img = os.path.join(d, "guest.img")
with open(img, "wb") as f: f.truncate(1 << 30)
drive = os.environ.get("DRIVE", f"file={img},file.locking=off,cache=none")
def qemu(log, qmp, extra):
    return subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-accel", os.environ.get("ACCEL", "tcg"), "-cpu", "max", "-smp", "2", "-m", "1G",
        "-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-numa", "node,memdev=mem",
        "-drive", f"{drive},if=none,id=d0,format=raw",
        "-device", "virtio-blk-pci,drive=d0,num-queues=2",
        "-nographic", "-no-reboot", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-kernel", f"{gd}/vmlinuz", "-initrd", f"{gd}/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1 quiet"] + extra,
        stdin=subprocess.DEVNULL, stdout=open(log, "w"))
class Qmp:
    def __init__(self, path):
        for _ in range(1200):
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError: time.sleep(0.05)
        self.f = self.s.makefile("rw"); self.f.readline(); self.ex("qmp_capabilities")
    def ex(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); self.f.flush()
        while True:
            v = json.loads(self.f.readline())
            if "return" in v or "error" in v: return v
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
la, lb = os.path.join(d, "a.log"), os.path.join(d, "b.log")
a = qemu(la, os.path.join(d, "qa"), [])
b = qemu(lb, os.path.join(d, "qb"), ["-S", "-incoming", f"tcp:127.0.0.1:{port}"])
qa = Qmp(os.path.join(d, "qa")); qb = Qmp(os.path.join(d, "qb"))
while "vda rc=0" not in open(la, errors="replace").read(): time.sleep(0.2)
time.sleep(5)
qa.ex("migrate", uri=f"tcp:127.0.0.1:{port}")
while True:
    st = qa.ex("query-migrate")["return"]
    if st.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.2)
print("migration", st.get("status"), st.get("downtime"))
while qb.ex("query-status")["return"]["status"] != "paused": time.sleep(0.1)
ma, mb = os.path.join(d, "mem-a"), os.path.join(d, "mem-b")
qa.ex("pmemsave", val=0, size=1 << 30, filename=ma); qb.ex("pmemsave", val=0, size=1 << 30, filename=mb)
stale = []
with open(ma, "rb") as fa, open(mb, "rb") as fb:
    for page in range(1 << 18):
        pa, pb = fa.read(4096), fb.read(4096)
        if pa != pb:
            diff = [i for i in range(4096) if pa[i] != pb[i]]
            stale.append(f"{page * 4096:#x}: {len(diff)} [{diff[0]:#x}..={diff[-1]:#x}]")
os.remove(ma); os.remove(mb)
print("stale pages", len(stale), stale[:16])
qb.ex("cont")
a.kill()
t = time.time()
while b.poll() is None and time.time() - t < 240: time.sleep(0.5)
b.kill()
out = open(lb, errors="replace").read()
ok = "POLLBLK-GUEST: done" in out and "BUG" not in out and "fault" not in out and not stale
print("RESULT", "ok" if ok else "FAIL", d)
if not ok: print(out[-3000:])
