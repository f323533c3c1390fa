//! vhost-user messages from a hostile front end, in any order, against pollblk's back-end
//! handler with live reactors: memory tables with overlapping, huge or file-less regions,
//! vring sizes, addresses and bases anywhere, kicks before addresses, in-flight and log
//! regions of any size, config reads and writes at any offset.
//!
//! Invariants: no message panics or hangs the handler (every reply within the handler's
//! bounded waits), a refused message leaves the handler usable, and closing the connection
//! (stop_all) always returns with every queue detached from its reactor.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pollblk_engine::backend::NullBackend;
use pollblk_engine::device::{BlkDevice, DiskOptions};
use pollblk_engine::reactor::{PollConfig, ReactorHandle, Reactors};
use pollblk_vhost_user::handler::BlkHandler;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, OnceLock};
use vhost::vhost_user::message::*;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Msg {
    SetFeatures(u64),
    SetProtocolFeatures(u64),
    /// Regions: (guest address, size in pages, user address, file pages, mmap offset pages).
    SetMemTable(Vec<(u32, u8, u32, u8, u8)>),
    AddMemRegion(u32, u8, u32, u8),
    RemoveMemRegion(u32, u8, u32),
    SetVringNum(u8, u32),
    SetVringAddr(u8, u32, u32, u32),
    SetVringBase(u8, u32),
    GetVringBase(u8),
    SetVringKick(u8, bool),
    SetVringCall(u8, bool),
    SetVringEnable(u8, bool),
    GetConfig(u32, u32),
    SetConfig(u32, Vec<u8>),
    GetInflightFd(u16, u16),
    SetInflightFd(u32, u32, u16, u16),
    SetLogBase(u32, u32),
    ResetDevice,
}

const PAGE: u64 = 4096;

fn memfd(pages: u8) -> File {
    // SAFETY: plain syscall; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), 0) };
    assert!(fd >= 0);
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(u64::from(pages % 16) * PAGE).unwrap();
    file
}

fn eventfd() -> File {
    let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: a fresh eventfd handed over as the front end would.
    unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
}

/// One device and two reactors for the whole run (starting threads per input is too slow);
/// kept in a static so they stay reachable (no leak report at exit).
fn rig() -> &'static (Arc<BlkDevice>, Vec<ReactorHandle>, Reactors) {
    static RIG: OnceLock<(Arc<BlkDevice>, Vec<ReactorHandle>, Reactors)> = OnceLock::new();
    RIG.get_or_init(|| {
        let reactors = Reactors::start(&[0, 0], PollConfig::default(), None).unwrap();
        let handles = (0..reactors.len())
            .map(|i| reactors.for_queue(i).clone())
            .collect();
        let options = DiskOptions::named("fuzz", 4);
        let device = Arc::new(BlkDevice::new(
            options,
            Arc::new(NullBackend::new(1 << 20, true)),
        ));
        (device, handles, reactors)
    })
}

fuzz_target!(|msgs: Vec<Msg>| {
    let (device, reactors, _) = rig();
    let mut h = BlkHandler::new(device.clone(), reactors.clone());
    let _ = h.set_owner();
    for msg in msgs.into_iter().take(32) {
        let _ = match msg {
            Msg::SetFeatures(f) => h.set_features(f),
            Msg::SetProtocolFeatures(f) => h.set_protocol_features(f),
            Msg::SetMemTable(regions) => {
                let regions: Vec<_> = regions.into_iter().take(8).collect();
                let msgs: Vec<_> = regions
                    .iter()
                    .map(|&(gpa, pages, user, _, off)| {
                        VhostUserMemoryRegion::new(
                            u64::from(gpa) * PAGE,
                            u64::from(pages) * PAGE,
                            u64::from(user) * PAGE,
                            u64::from(off) * PAGE,
                        )
                    })
                    .collect();
                let files = regions.iter().map(|&(_, _, _, f, _)| memfd(f)).collect();
                h.set_mem_table(&msgs, files, None).map(|_| ())
            }
            Msg::AddMemRegion(gpa, pages, user, file) => {
                let r = VhostUserSingleMemoryRegion::new(
                    u64::from(gpa) * PAGE,
                    u64::from(pages) * PAGE,
                    u64::from(user) * PAGE,
                    0,
                );
                h.add_mem_region(&r, memfd(file), None).map(|_| ())
            }
            Msg::RemoveMemRegion(gpa, pages, user) => {
                let r = VhostUserSingleMemoryRegion::new(
                    u64::from(gpa) * PAGE,
                    u64::from(pages) * PAGE,
                    u64::from(user) * PAGE,
                    0,
                );
                h.remove_mem_region(&r)
            }
            Msg::SetVringNum(i, n) => h.set_vring_num(u32::from(i % 6), n),
            Msg::SetVringAddr(i, d, u, a) => h.set_vring_addr(
                u32::from(i % 6),
                VhostUserVringAddrFlags::empty(),
                u64::from(d),
                u64::from(u),
                u64::from(a),
                0,
            ),
            Msg::SetVringBase(i, b) => h.set_vring_base(u32::from(i % 6), b),
            Msg::GetVringBase(i) => h.get_vring_base(u32::from(i % 6)).map(|_| ()),
            Msg::SetVringKick(i, fd) => h.set_vring_kick(i % 6, fd.then(eventfd)),
            Msg::SetVringCall(i, fd) => h.set_vring_call(i % 6, fd.then(eventfd)),
            Msg::SetVringEnable(i, e) => h.set_vring_enable(u32::from(i % 6), e),
            Msg::GetConfig(off, size) => h
                .get_config(off, size, VhostUserConfigFlags::empty())
                .map(|_| ()),
            Msg::SetConfig(off, buf) => h.set_config(off, &buf, VhostUserConfigFlags::empty()),
            Msg::GetInflightFd(queues, size) => h
                .get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size))
                .map(|_| ()),
            Msg::SetInflightFd(size, off, queues, qsize) => {
                let file = memfd((size % 16) as u8);
                h.set_inflight_fd(
                    &VhostUserInflight::new(u64::from(size), u64::from(off), queues, qsize),
                    file,
                )
            }
            Msg::SetLogBase(size, off) => h.set_log_base(
                &VhostUserLog::new(u64::from(size), u64::from(off)),
                memfd((size % 16) as u8),
            ),
            Msg::ResetDevice => h.reset_device(),
        };
    }
    h.stop_all();
});
