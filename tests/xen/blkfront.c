/*
 * A blkif front end for testing pollblk's Xen back end over the loopback platform
 * (frontends/xen/src/loopback.rs), built on Xen's own public headers: the ring is set up and
 * driven with ring.h's macros (SHARED_RING_INIT, FRONT_RING_INIT,
 * RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_RESPONSES) and requests are
 * blkif.h's structures, so the layouts are Xen's, not ours. Built for x86_64 it speaks
 * x86_64-abi; built with -m32 it speaks x86_32-abi, as a 32-bit PV guest would.
 *
 *   blkfront SOCKET DOMID DEVID QUEUES ORDER
 *            [refuse|overrun|vanish|nocleanup|readonly|4k|nopersist|bench SECONDS IODEPTH]
 *
 * Connects (handshake through the store), then on every queue: direct and indirect writes
 * read back and compared, partial-page segments, a full ring of requests at once, flush,
 * flush with data, discard, and requests that must fail (bad segment, sector past the end,
 * unknown grant, unknown operation). Closes the device at the end. With "refuse", expects
 * the back end to refuse the QUEUES/ORDER asked for (the reason in its error key). With
 * "overrun", first breaks queue 0 (req_prod far past the ring: the back end must stop that
 * ring and answer nothing on it) and checks the other queues still work. With "vanish",
 * connects, leaves requests in the ring and exits without closing (a crashed or destroyed
 * guest): the back end must tear the device down and serve the next front end. With "bench",
 * instead of the checks: 4 KiB random reads at IODEPTH on queue 0 for SECONDS, polling for
 * responses (as a polled front end would), printing IOPS (benches/xen-loopback.sh).
 * With "nocleanup", leaves stale multi-queue-num-queues / ring-page-order keys of an earlier
 * front end alone, as Linux's talk_to_blkback does (the store must have removed them). With
 * "readonly", checks a readonly=on disk: VDISK_READONLY in info, mode "r", no discard, reads
 * served and every write refused. With "4k", checks a block-size=4096 disk: sector-size and
 * physical-sector-size, 4 KiB-aligned requests served, misaligned ones refused. With
 * "nopersist", offers feature-persistent=0 and expects to be refused.
 *
 * Every response is checked as Linux blkfront's blkif_interrupt checks it (no more responses
 * than the ring holds, an id in range and pending, the request's operation - the inner one
 * of an INDIRECT request), and its status is one of blkif.h's three. Linux disables the disk
 * on any of these; this front end dies with Linux's words.
 * Build with -fno-strict-aliasing, as Linux is built: requests are made through blkif.h's
 * several request structs over one buffer.
 * Exits 0 if every check passed; prints what failed otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define __XEN_TOOLS__ 1
#define xen_mb() __sync_synchronize()
#define xen_rmb() __asm__ __volatile__("" ::: "memory")
#define xen_wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/io/blkif.h>
#include <xen/io/ring.h>
#include <xen/io/xenbus.h>
#include <xen/io/protocols.h>

#define PAGE 4096
#define MAX_QUEUES 16
#define DATA_PAGES 512 /* per queue: 2 MiB of buffers */
#define INDIRECT_SEGS 256

static int store_fd;
static char fe[128], be[256];
static int failures;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "blkfront: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(2);
}

static void check(int ok, const char *fmt, ...)
{
	if (ok)
		return;
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "blkfront: FAILED: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	failures++;
}

/* One store request (with fds); returns the answer after "ok", or NULL for "enoent". */
static char *call(const int *fds, int nfds, const char *fmt, ...)
{
	static char answer[4096];
	char line[4096];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	line[n++] = '\n';
	struct iovec iov = { line, (size_t)n };
	char cbuf[CMSG_SPACE(sizeof(int) * 4)];
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		memset(cbuf, 0, sizeof(cbuf));
		msg.msg_control = cbuf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	if (sendmsg(store_fd, &msg, 0) != n)
		die("store: send: %s", strerror(errno));
	size_t got = 0;
	for (;;) {
		ssize_t r = read(store_fd, answer + got, 1);
		if (r != 1)
			die("store: connection closed");
		if (answer[got] == '\n')
			break;
		if (++got == sizeof(answer) - 1)
			die("store: answer too long");
	}
	answer[got] = 0;
	if (strncmp(answer, "ok", 2) == 0)
		return answer[2] == ' ' ? answer + 3 : answer + 2;
	if (strcmp(answer, "enoent") == 0)
		return NULL;
	die("store: %s -> %s", line, answer);
	return NULL;
}

static long read_number(const char *dir, const char *key, long dflt)
{
	char *v = call(NULL, 0, "read %s/%s", dir, key);
	return v ? strtol(v, NULL, 10) : dflt;
}

/* A request id's state (Linux blkfront's shadow entries): ids are indexes below the ring
 * size, given out by submit() and taken back by wait_for(). */
enum { FREE, WAITING, ANSWERED };
struct shadow {
	uint8_t state;
	uint8_t op; /* the operation its response must carry */
	int16_t status;
};

struct queue {
	blkif_front_ring_t ring;
	struct shadow shadow[512];
	int to_back, to_front;
	unsigned first_data_gref; /* DATA_PAGES pages */
	unsigned indirect_gref;   /* one page of segment descriptors */
	uint8_t *data;
	struct blkif_request_segment *indirect;
};

static uint8_t *mem;
static struct queue queues[MAX_QUEUES];
static uint64_t sectors;
/* Sectors per logical block: 1 (512-byte blocks) or 8 (4096). */
static unsigned lbs = 1;

static void kick(struct queue *q)
{
	int notify;
	RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->ring, notify);
	if (notify) {
		uint64_t one = 1;
		if (write(q->to_back, &one, 8) != 8)
			die("notify: %s", strerror(errno));
	}
}

/* Takes every response the back end published, checked as blkif_interrupt checks them. */
static void reap(struct queue *q)
{
	RING_IDX rp = q->ring.sring->rsp_prod;
	xen_rmb();
	if (RING_RESPONSE_PROD_OVERFLOW(&q->ring, rp))
		die("illegal number of responses %u", rp - q->ring.rsp_cons);
	for (RING_IDX i = q->ring.rsp_cons; i != rp; i++) {
		blkif_response_t rsp;
		RING_COPY_RESPONSE(&q->ring, i, &rsp);
		if (rsp.id >= RING_SIZE(&q->ring))
			die("response has incorrect id (%" PRIu64 ")", (uint64_t)rsp.id);
		struct shadow *s = &q->shadow[rsp.id];
		if (s->state != WAITING)
			die("response references no pending request (id %" PRIu64 ")", (uint64_t)rsp.id);
		if (rsp.operation != s->op)
			die("response has wrong operation (%u instead of %u)", rsp.operation, s->op);
		if (rsp.status != BLKIF_RSP_OKAY && rsp.status != BLKIF_RSP_ERROR &&
		    rsp.status != BLKIF_RSP_EOPNOTSUPP)
			die("response has unknown status %d", rsp.status);
		s->status = rsp.status;
		s->state = ANSWERED;
	}
	q->ring.rsp_cons = rp;
}

/* Puts a copy of `req` on the ring under a free id; returns the id. */
static unsigned submit(struct queue *q, const blkif_request_t *req)
{
	unsigned id = 0;
	while (id < RING_SIZE(&q->ring) && q->shadow[id].state != FREE)
		id++;
	if (id == RING_SIZE(&q->ring))
		die("no free request id");
	uint8_t op = req->operation;
	if (op == BLKIF_OP_INDIRECT)
		op = ((const blkif_request_indirect_t *)req)->indirect_op;
	q->shadow[id] = (struct shadow){ WAITING, op, 0 };
	/* Copied as bytes: `req` may hold an indirect or discard request (built through other
	 * struct types, as blkfront builds them), and id sits at one offset in all three. */
	uint64_t id64 = id;
	blkif_request_t *slot = RING_GET_REQUEST(&q->ring, q->ring.req_prod_pvt);
	memcpy(slot, req, sizeof(*slot));
	memcpy((uint8_t *)slot + offsetof(blkif_request_t, id), &id64, sizeof(id64));
	q->ring.req_prod_pvt++;
	return id;
}

/* Waits for the response to request `id`; returns its status and frees the id. */
static int16_t wait_for(struct queue *q, unsigned id)
{
	while (q->shadow[id].state != ANSWERED) {
		int more;
		RING_FINAL_CHECK_FOR_RESPONSES(&q->ring, more);
		if (more) {
			reap(q);
			continue;
		}
		struct pollfd p = { q->to_front, POLLIN, 0 };
		if (poll(&p, 1, 20000) != 1)
			die("no response to request %u within 20 s", id);
		uint64_t n;
		if (read(q->to_front, &n, 8) != 8)
			die("event channel read: %s", strerror(errno));
	}
	q->shadow[id].state = FREE;
	return q->shadow[id].status;
}

/* Sends one prepared request and returns its status. */
static int16_t one(struct queue *q, blkif_request_t *req)
{
	unsigned id = submit(q, req);
	kick(q);
	return wait_for(q, id);
}

/* The byte at offset `byte` (< 512) of disk sector `sector`, as written with `seed`. */
static uint8_t pattern(uint64_t sector, unsigned byte, unsigned seed)
{
	return (uint8_t)(sector * 131 + byte * 7 + seed * 29 + (byte >> 5));
}

static void fill(uint8_t *buf, uint64_t sector, unsigned bytes, unsigned seed)
{
	for (unsigned i = 0; i < bytes; i++)
		buf[i] = pattern(sector + i / 512, i % 512, seed);
}

static int same(const uint8_t *buf, uint64_t sector, unsigned bytes, unsigned seed)
{
	for (unsigned i = 0; i < bytes; i++)
		if (buf[i] != pattern(sector + i / 512, i % 512, seed))
			return 0;
	return 1;
}

/* A direct request of `nseg` whole pages starting at data page `page`. */
static void direct(blkif_request_t *req, struct queue *q, uint8_t op, uint64_t sector,
		   unsigned page, unsigned nseg)
{
	memset(req, 0, sizeof(*req));
	req->operation = op;
	req->nr_segments = nseg;
	req->sector_number = sector;
	for (unsigned i = 0; i < nseg; i++) {
		req->seg[i].gref = q->first_data_gref + page + i;
		req->seg[i].first_sect = 0;
		req->seg[i].last_sect = 7;
	}
}

static int16_t indirect(struct queue *q, uint8_t op, uint64_t sector, unsigned page,
			unsigned nseg)
{
	blkif_request_t raw;
	blkif_request_indirect_t *req = (blkif_request_indirect_t *)&raw;
	memset(&raw, 0, sizeof(raw));
	req->operation = BLKIF_OP_INDIRECT;
	req->indirect_op = op;
	req->nr_segments = nseg;
	req->sector_number = sector;
	req->indirect_grefs[0] = q->indirect_gref;
	for (unsigned i = 0; i < nseg; i++) {
		q->indirect[i].gref = q->first_data_gref + page + i;
		q->indirect[i].first_sect = 0;
		q->indirect[i].last_sect = 7;
	}
	return one(q, &raw);
}

static void exercise(int qi, long max_indirect, int discard)
{
	struct queue *q = &queues[qi];
	blkif_request_t req;
	/* Each queue works on its own 4 MiB of the disk. */
	uint64_t base = (uint64_t)qi * 8192;
	unsigned seed = 1 + qi;
	if (base + 8192 > sectors)
		die("disk too small: %" PRIu64 " sectors", sectors);

	/* Direct: 11 pages written, read back elsewhere, compared. */
	fill(q->data, base, 11 * PAGE, seed);
	direct(&req, q, BLKIF_OP_WRITE, base, 0, BLKIF_MAX_SEGMENTS_PER_REQUEST);
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: direct write", qi);
	memset(q->data + 16 * PAGE, 0, 11 * PAGE);
	direct(&req, q, BLKIF_OP_READ, base, 16, BLKIF_MAX_SEGMENTS_PER_REQUEST);
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: direct read", qi);
	check(same(q->data + 16 * PAGE, base, 11 * PAGE, seed), "queue %d: direct data", qi);

	if (lbs == 1) {
		/* Partial pages: sectors 2..5 of one page read into sectors 1..4 of another. */
		memset(q->data + 32 * PAGE, 0xee, PAGE);
		direct(&req, q, BLKIF_OP_READ, base + 3, 32, 1);
		req.seg[0].first_sect = 1;
		req.seg[0].last_sect = 4;
		check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: partial read", qi);
		check(same(q->data + 32 * PAGE + 512, base + 3, 4 * 512, seed) &&
			      q->data[32 * PAGE] == 0xee && q->data[32 * PAGE + 5 * 512] == 0xee,
		      "queue %d: partial read touched the wrong bytes", qi);
	} else {
		/* 4 KiB blocks: a start or a length off the block is refused. */
		direct(&req, q, BLKIF_OP_READ, base + 3, 32, 1);
		check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: misaligned start", qi);
		direct(&req, q, BLKIF_OP_READ, base, 32, 1);
		req.seg[0].last_sect = 3;
		check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: half a block", qi);
	}

	/* Indirect: as many segments as offered (at most 256), written and read back. */
	if (max_indirect > 0) {
		unsigned nseg = max_indirect < INDIRECT_SEGS ? max_indirect : INDIRECT_SEGS;
		uint64_t at = base + (lbs == 1 ? 100 : 104);
		fill(q->data + 64 * PAGE, at, nseg * PAGE, seed + 7);
		check(indirect(q, BLKIF_OP_WRITE, at, 64, nseg) == BLKIF_RSP_OKAY,
		      "queue %d: indirect write of %u segments", qi, nseg);
		memset(q->data + 64 * PAGE, 0, nseg * PAGE);
		check(indirect(q, BLKIF_OP_READ, at, 64, nseg) == BLKIF_RSP_OKAY,
		      "queue %d: indirect read", qi);
		check(same(q->data + 64 * PAGE, at, nseg * PAGE, seed + 7),
		      "queue %d: indirect data", qi);
		check(indirect(q, BLKIF_OP_READ, base, 64, INDIRECT_SEGS + 1) == BLKIF_RSP_ERROR,
		      "queue %d: indirect request over the limit not refused", qi);
		/* Only reads and writes go indirect: blkback answers anything else ERROR. */
		check(indirect(q, BLKIF_OP_FLUSH_DISKCACHE, base, 64, 1) == BLKIF_RSP_ERROR,
		      "queue %d: indirect flush not refused", qi);
	}

	/* A full ring at once: one notification, every response comes. */
	unsigned n = RING_SIZE(&q->ring), ids[512];
	for (unsigned i = 0; i < n; i++) {
		direct(&req, q, BLKIF_OP_READ, base + 8 * (i % 64), 320 + i % 64, 1);
		ids[i] = submit(q, &req);
	}
	kick(q);
	for (unsigned i = 0; i < n; i++) {
		int16_t status = wait_for(q, ids[i]);
		check(status == BLKIF_RSP_OKAY, "queue %d: ring request %u: %d", qi, i, status);
	}

	/* Flush, and flush with data (blkfront's preflush + FUA write). */
	memset(&req, 0, sizeof(req));
	req.operation = BLKIF_OP_FLUSH_DISKCACHE;
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: flush", qi);
	fill(q->data + 400 * PAGE, base + 4000, PAGE, seed + 3);
	direct(&req, q, BLKIF_OP_FLUSH_DISKCACHE, base + 4000, 400, 1);
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: flush with data", qi);
	direct(&req, q, BLKIF_OP_READ, base + 4000, 401, 1);
	check(one(q, &req) == BLKIF_RSP_OKAY && same(q->data + 401 * PAGE, base + 4000, PAGE, seed + 3),
	      "queue %d: data of the flush", qi);

	if (discard) {
		blkif_request_discard_t *d = (blkif_request_discard_t *)&req;
		memset(&req, 0, sizeof(req));
		d->operation = BLKIF_OP_DISCARD;
		d->sector_number = base + 4096;
		d->nr_sectors = 2048;
		check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: discard", qi);
		/* No sectors: nothing to do, OKAY (as current Linux back ends answer). */
		d->nr_sectors = 0;
		check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: discard of no sectors", qi);
		if (lbs > 1) {
			d->nr_sectors = 4;
			check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: discard of half a block",
			      qi);
		}
	}

	/* What must fail, and must not stop the ring. */
	direct(&req, q, BLKIF_OP_READ, base, 500, 1);
	req.seg[0].first_sect = 5;
	req.seg[0].last_sect = 2;
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: first_sect > last_sect", qi);
	direct(&req, q, BLKIF_OP_READ, base, 500, 1);
	req.seg[0].last_sect = 8;
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: segment past the page", qi);
	direct(&req, q, BLKIF_OP_READ, sectors - 4, 500, 1);
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: read past the end", qi);
	direct(&req, q, BLKIF_OP_WRITE, base, 500, 1);
	req.seg[0].gref = 0x7fffffff;
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: unknown grant", qi);
	direct(&req, q, BLKIF_OP_READ, base, 500, 1);
	req.nr_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST + 1;
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: too many segments", qi);
	memset(&req, 0, sizeof(req));
	req.operation = BLKIF_OP_RESERVED_1;
	check(one(q, &req) == BLKIF_RSP_EOPNOTSUPP, "queue %d: unknown operation", qi);
	direct(&req, q, BLKIF_OP_WRITE_BARRIER, base, 500, 1);
	check(one(q, &req) == BLKIF_RSP_EOPNOTSUPP, "queue %d: barrier (not offered)", qi);

	/* The ring still works. */
	direct(&req, q, BLKIF_OP_READ, base, 16, 1);
	check(one(q, &req) == BLKIF_RSP_OKAY && same(q->data + 16 * PAGE, base, PAGE, seed),
	      "queue %d: read after the errors", qi);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* 4 KiB random reads at `depth` on queue 0 for `seconds`; prints IOPS. */
static void bench(double seconds, unsigned depth)
{
	struct queue *q = &queues[0];
	if (depth < 1 || depth > RING_SIZE(&q->ring) || depth > DATA_PAGES)
		die("iodepth must be 1 to %u", RING_SIZE(&q->ring));
	uint64_t pages = sectors / 8, seed = 88172645463325252ull, done = 0, errors = 0;
	unsigned in_flight = 0;
	double start = now(), end = start + seconds;
	for (;;) {
		int more = 0;
		while (in_flight < depth) {
			blkif_request_t *r = RING_GET_REQUEST(&q->ring, q->ring.req_prod_pvt);
			seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
			direct(r, q, BLKIF_OP_READ, (seed % pages) * 8, in_flight, 1);
			r->id = q->ring.req_prod_pvt;
			q->ring.req_prod_pvt++;
			in_flight++;
			more = 1;
		}
		if (more)
			kick(q);
		while (RING_HAS_UNCONSUMED_RESPONSES(&q->ring)) {
			blkif_response_t *rsp = RING_GET_RESPONSE(&q->ring, q->ring.rsp_cons);
			errors += rsp->status != BLKIF_RSP_OKAY;
			q->ring.rsp_cons++;
			in_flight--;
			done++;
		}
		if ((done & 1023) == 0 && now() >= end)
			break;
	}
	double elapsed = now() - start;
	/* Let the rest finish before closing. */
	while (in_flight > 0) {
		while (RING_HAS_UNCONSUMED_RESPONSES(&q->ring)) {
			q->ring.rsp_cons++;
			in_flight--;
		}
	}
	printf("{\"iops\": %.0f, \"ios\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"seconds\": %.3f}\n",
	       done / elapsed, done, errors, elapsed);
	check(errors == 0, "%" PRIu64 " reads failed", errors);
}

/* Waits until the back end's state is `want`; a back end that goes Closing while we wait
 * for Connected refused us: say why at once instead of waiting for the alarm. */
static void wait_backend(int want)
{
	for (int tries = 0; tries < 4000; tries++) {
		long st = read_number(be, "state", 0);
		if (st == want)
			return;
		if (want == XenbusStateConnected && st == XenbusStateClosing) {
			char *why = call(NULL, 0, "read %s/error", be);
			die("the back end refused the connection: %s", why ? why : "(no error key)");
		}
		usleep(5000);
	}
	die("the back end did not reach state %d within 20 s", want);
}

/* The refusal as Linux's xenbus_dev_fatal reports it: "ERRNO reason" in
 * error/<backend path>/error, and the reason in the back end's error key. */
static void check_refusal(int domid, int devid, const char *expected)
{
	char *why = call(NULL, 0, "read %s/error", be);
	check(why != NULL, "refused without an error key");
	if (why) {
		printf("refused: %s\n", why);
		check(strstr(why, expected) != NULL, "refused for %s, not %s", why, expected);
	}
	char *fatal = call(NULL, 0, "read /local/domain/0/error/backend/vbd/%d/%d/error", domid,
			   devid);
	check(fatal != NULL, "no error/<backend path>/error key (xenbus_dev_fatal's)");
	if (fatal) {
		char *rest;
		long errno_value = strtol(fatal, &rest, 10);
		check(errno_value > 0 && *rest == ' ' && strstr(rest, expected) != NULL,
		      "error/<backend path>/error is %s", fatal);
	}
}

/* A readonly=on disk: info says so, the toolstack's mode is "r", no discard, reads are
 * served and every kind of write is refused with the operation it asked for. */
static void exercise_readonly(int qi, long max_indirect)
{
	struct queue *q = &queues[qi];
	blkif_request_t req;
	check((read_number(be, "info", 0) & VDISK_READONLY) != 0, "info lacks VDISK_READONLY");
	char *mode = call(NULL, 0, "read %s/mode", be);
	check(mode != NULL && strcmp(mode, "r") == 0, "mode is %s, not r", mode ? mode : "absent");
	check(read_number(be, "feature-discard", 0) == 0, "discard offered on a read-only disk");
	direct(&req, q, BLKIF_OP_READ, 0, 0, 4);
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: read", qi);
	direct(&req, q, BLKIF_OP_WRITE, 0, 0, 4);
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: write not refused", qi);
	if (max_indirect > 0)
		check(indirect(q, BLKIF_OP_WRITE, 0, 0, 16) == BLKIF_RSP_ERROR,
		      "queue %d: indirect write not refused", qi);
	direct(&req, q, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, 1);
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: flush with data not refused", qi);
	blkif_request_discard_t *d = (blkif_request_discard_t *)&req;
	memset(&req, 0, sizeof(req));
	d->operation = BLKIF_OP_DISCARD;
	d->nr_sectors = 8;
	check(one(q, &req) == BLKIF_RSP_ERROR, "queue %d: discard not refused", qi);
	/* An empty flush has nothing to write: served (blkback refuses it; Linux then takes
	 * flushes as unsupported, which on a read-only disk changes nothing). */
	memset(&req, 0, sizeof(req));
	req.operation = BLKIF_OP_FLUSH_DISKCACHE;
	check(one(q, &req) == BLKIF_RSP_OKAY, "queue %d: empty flush", qi);
}

int main(int argc, char **argv)
{
	if (argc < 6)
		die("usage: blkfront SOCKET DOMID DEVID QUEUES ORDER [MODE]");
	int domid = atoi(argv[2]), devid = atoi(argv[3]);
	int nq = atoi(argv[4]), order = atoi(argv[5]);
	int refuse = argc > 6 && strcmp(argv[6], "refuse") == 0;
	int overrun = argc > 6 && strcmp(argv[6], "overrun") == 0;
	int vanish = argc > 6 && strcmp(argv[6], "vanish") == 0;
	int benchmark = argc > 8 && strcmp(argv[6], "bench") == 0;
	int nocleanup = argc > 6 && strcmp(argv[6], "nocleanup") == 0;
	int readonly = argc > 6 && strcmp(argv[6], "readonly") == 0;
	int four_k = argc > 6 && strcmp(argv[6], "4k") == 0;
	int nopersist = argc > 6 && strcmp(argv[6], "nopersist") == 0;
	if (overrun && nq < 2)
		die("overrun needs two queues or more");
	if (nq < 1 || nq > MAX_QUEUES || order < 0 || order > 4)
		die("bad queues or order");
	alarm(benchmark ? 120 + atoi(argv[7]) : 120);

	store_fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", argv[1]);
	if (connect(store_fd, (struct sockaddr *)&addr, sizeof(addr)))
		die("connect %s: %s", argv[1], strerror(errno));
	call(NULL, 0, "hello %d", domid);
	snprintf(fe, sizeof(fe), "/local/domain/%d/device/vbd/%d", domid, devid);
	char *b = call(NULL, 0, "read %s/backend", fe);
	if (!b)
		die("no back end for %s", fe);
	snprintf(be, sizeof(be), "%s", b);

	/* (Again) initialising: a back end we closed before offers the device anew. */
	call(NULL, 0, "write %s/state %d", fe, XenbusStateInitialising);
	wait_backend(XenbusStateInitWait);
	long max_queues = read_number(be, "multi-queue-max-queues", 1);
	long max_order = read_number(be, "max-ring-page-order", 0);
	long max_indirect = read_number(be, "feature-max-indirect-segments", 0);
	int discard = read_number(be, "feature-discard", 0) == 1;
	if (!refuse && (nq > max_queues || order > max_order))
		die("back end offers %ld queues, order %ld", max_queues, max_order);

	/* Grants: one memfd; page N is grant ref N. */
	unsigned ring_pages = 1u << order;
	unsigned per_queue = ring_pages + DATA_PAGES + 1;
	size_t total = (size_t)per_queue * nq * PAGE;
	/* Sealed against shrinking: the back end refuses pages that could vanish under it. */
	int memfd = memfd_create("blkfront-grants", MFD_ALLOW_SEALING);
	if (memfd < 0 || ftruncate(memfd, total) || fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK))
		die("memfd: %s", strerror(errno));
	mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	call(&memfd, 1, "grants");

	for (int qi = 0; qi < nq; qi++) {
		struct queue *q = &queues[qi];
		unsigned first = qi * per_queue;
		blkif_sring_t *sring = (blkif_sring_t *)(mem + (size_t)first * PAGE);
		SHARED_RING_INIT(sring);
		FRONT_RING_INIT(&q->ring, sring, ring_pages * PAGE);
		q->first_data_gref = first + ring_pages;
		q->indirect_gref = first + ring_pages + DATA_PAGES;
		q->data = mem + (size_t)q->first_data_gref * PAGE;
		q->indirect = (struct blkif_request_segment *)(mem + (size_t)q->indirect_gref * PAGE);
		q->to_back = eventfd(0, EFD_NONBLOCK);
		q->to_front = eventfd(0, EFD_NONBLOCK);
		int fds[2] = { q->to_back, q->to_front };
		char *port = call(fds, 2, "evtchn");
		char prefix[64] = "";
		if (nq > 1)
			snprintf(prefix, sizeof(prefix), "queue-%d/", qi);
		for (unsigned k = 0; k < ring_pages; k++) {
			if (order == 0)
				call(NULL, 0, "write %s/%sring-ref %u", fe, prefix, first);
			else
				call(NULL, 0, "write %s/%sring-ref%u %u", fe, prefix, k, first + k);
		}
		call(NULL, 0, "write %s/%sevent-channel %s", fe, prefix, port);
	}
	/* Linux writes these only when they are not the default, and never removes them. */
	if (nq > 1)
		call(NULL, 0, "write %s/multi-queue-num-queues %d", fe, nq);
	else if (!nocleanup)
		call(NULL, 0, "rm %s/multi-queue-num-queues", fe);
	if (order > 0)
		call(NULL, 0, "write %s/ring-page-order %d", fe, order);
	else if (!nocleanup)
		call(NULL, 0, "rm %s/ring-page-order", fe);
#ifdef __i386__
	call(NULL, 0, "write %s/protocol %s", fe, XEN_IO_PROTO_ABI_X86_32);
#else
	call(NULL, 0, "write %s/protocol %s", fe, XEN_IO_PROTO_ABI_X86_64);
#endif
	call(NULL, 0, "write %s/feature-persistent %d", fe, !nopersist);
	call(NULL, 0, "write %s/state %d", fe, XenbusStateInitialised);

	if (refuse || nopersist) {
		wait_backend(XenbusStateClosing);
		check_refusal(domid, devid, nopersist ? "feature-persistent=1" : "this back end offers");
		call(NULL, 0, "write %s/state %d", fe, XenbusStateClosed);
		wait_backend(XenbusStateClosed);
		return failures ? 1 : 0;
	}

	wait_backend(XenbusStateConnected);
	/* What blkfront_connect gathers: all three or the disk fails. */
	sectors = (uint64_t)read_number(be, "sectors", 0);
	long sector_size = read_number(be, "sector-size", 0);
	long physical = read_number(be, "physical-sector-size", sector_size);
	if (sectors == 0 || sector_size == 0 || !call(NULL, 0, "read %s/info", be))
		die("reading backend fields at %s", be);
	check(sector_size == (four_k ? 4096 : 512) && physical == sector_size,
	      "sector-size %ld, physical-sector-size %ld", sector_size, physical);
	lbs = (unsigned)sector_size / 512;
	call(NULL, 0, "write %s/state %d", fe, XenbusStateConnected);

	if (overrun) {
		struct queue *q = &queues[0];
		blkif_request_t *r = RING_GET_REQUEST(&q->ring, q->ring.req_prod_pvt);
		direct(r, q, BLKIF_OP_READ, 0, 0, 1);
		q->ring.req_prod_pvt += RING_SIZE(&q->ring) * 2 + 5;
		kick(q);
		usleep(300 * 1000);
		check(!RING_HAS_UNCONSUMED_RESPONSES(&q->ring),
		      "queue 0: the back end answered on an overrun ring");
	}
	if (vanish) {
		struct queue *q = &queues[0];
		for (unsigned i = 0; i < 8; i++) {
			blkif_request_t req;
			direct(&req, q, BLKIF_OP_WRITE, 8 * i, i, 1);
			submit(q, &req);
		}
		kick(q);
		_exit(0);
	}
	if (benchmark)
		bench(atof(argv[7]), atoi(argv[8]));
	else if (readonly)
		for (int qi = 0; qi < nq; qi++)
			exercise_readonly(qi, max_indirect);
	else
		for (int qi = overrun ? 1 : 0; qi < nq; qi++)
			exercise(qi, max_indirect, discard);

	call(NULL, 0, "write %s/state %d", fe, XenbusStateClosing);
	wait_backend(XenbusStateClosing);
	call(NULL, 0, "write %s/state %d", fe, XenbusStateClosed);
	wait_backend(XenbusStateClosed);
	if (!benchmark)
		printf("blkfront: %d queue(s), ring order %d, %s: %s\n", nq, order,
#ifdef __i386__
	       "x86_32-abi",
#else
	       "x86_64-abi",
#endif
	       failures ? "FAILED" : "ok");
	return failures ? 1 : 0;
}
