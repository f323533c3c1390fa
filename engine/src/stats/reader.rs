//! Reading any file in the KVM binary statistics layout: pollblk's own files and KVM's VM and
//! vCPU statistics fds. The header and descriptors are read once; each sample reads the data
//! block, from a read-only shared mapping where the file allows one (no system call per
//! sample) and with one pread otherwise (KVM's fds cannot be mapped).
//!
//! Hostile input: every size and offset is bounded before it is used; a file that does not
//! fit the layout is refused with a message, never a panic.

use super::format::{Desc, Header, DESC_FIXED_SIZE, HEADER_SIZE};
use crate::shm::SharedMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest name_size accepted (KVM uses 48).
pub const MAX_NAME_SIZE: u32 = 4096;
/// Most descriptors accepted.
pub const MAX_DESCRIPTORS: u32 = 1 << 16;
/// Largest data block accepted.
pub const MAX_DATA_BYTES: u64 = 16 << 20;
/// Largest descriptor block accepted.
pub const MAX_DESC_BYTES: u64 = 16 << 20;

/// An opened statistics file.
pub struct StatsReader {
    file: File,
    header: Header,
    id: String,
    id_terminated: bool,
    descs: Vec<Desc>,
    /// Whether each descriptor's name had its NUL within name_size.
    names_terminated: Vec<bool>,
    /// Bytes of data the descriptors cover (max offset + 8 * size).
    data_bytes: u64,
    map: Option<DataMap>,
}

/// The file mapped read-only from offset 0, and where its data block starts.
struct DataMap {
    map: SharedMap,
    data_offset: usize,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl StatsReader {
    pub fn open(path: &Path) -> io::Result<StatsReader> {
        StatsReader::from_file(File::open(path)?)
    }

    /// Reads the header and descriptors of an open file or fd.
    pub fn from_file(file: File) -> io::Result<StatsReader> {
        let mut raw = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut raw, 0).map_err(|e| {
            bad(format!(
                "not a statistics file (cannot read a {HEADER_SIZE}-byte header: {e})"
            ))
        })?;
        let header = Header::decode(&raw);
        if header.name_size == 0 || header.name_size > MAX_NAME_SIZE {
            return Err(bad(format!(
                "not a statistics file (a KVM binary stats header's name_size is 1 to \
                 {MAX_NAME_SIZE}; this file's first bytes read as {})",
                header.name_size
            )));
        }
        if header.num_desc > MAX_DESCRIPTORS {
            return Err(bad(format!(
                "{} descriptors (at most {MAX_DESCRIPTORS})",
                header.num_desc
            )));
        }
        if header.desc_size() as u64 * u64::from(header.num_desc) > MAX_DESC_BYTES {
            return Err(bad(format!(
                "{} descriptors of {} bytes: more than {MAX_DESC_BYTES} bytes",
                header.num_desc,
                header.desc_size()
            )));
        }
        let mut id_raw = vec![0u8; header.name_size as usize];
        file.read_exact_at(&mut id_raw, u64::from(header.id_offset))
            .map_err(|e| bad(format!("cannot read the id at {}: {e}", header.id_offset)))?;
        let id_end = id_raw.iter().position(|&c| c == 0);
        let id = String::from_utf8_lossy(&id_raw[..id_end.unwrap_or(id_raw.len())]).into_owned();
        let desc_size = header.desc_size();
        let mut raw_descs = vec![0u8; desc_size * header.num_desc as usize];
        file.read_exact_at(&mut raw_descs, u64::from(header.desc_offset))
            .map_err(|e| bad(format!("cannot read the descriptors: {e}")))?;
        let mut descs = Vec::with_capacity(header.num_desc as usize);
        let mut names_terminated = Vec::with_capacity(header.num_desc as usize);
        let mut data_bytes = 0u64;
        for chunk in raw_descs.chunks_exact(desc_size) {
            let desc = Desc::decode(chunk);
            names_terminated.push(chunk[DESC_FIXED_SIZE..].contains(&0));
            data_bytes = data_bytes.max(u64::from(desc.offset) + 8 * u64::from(desc.size));
            descs.push(desc);
        }
        if data_bytes > MAX_DATA_BYTES {
            return Err(bad(format!(
                "descriptors cover {data_bytes} bytes of data (at most {MAX_DATA_BYTES})"
            )));
        }
        let mut reader = StatsReader {
            file,
            header,
            id,
            id_terminated: id_end.is_some(),
            descs,
            names_terminated,
            data_bytes,
            map: None,
        };
        reader.map = reader.try_map();
        // One sample proves the data block is there.
        reader.sample()?;
        Ok(reader)
    }

    /// Maps the file read-only when it is a regular file long enough and the data block is
    /// 8-aligned; None means samples use pread.
    fn try_map(&self) -> Option<DataMap> {
        let data_offset = self.header.data_offset as usize;
        let len = data_offset.checked_add(self.data_bytes as usize)?;
        let meta = self.file.metadata().ok()?;
        if !meta.file_type().is_file() || meta.len() < len as u64 || !data_offset.is_multiple_of(8)
        {
            return None;
        }
        // A mapping dies with SIGBUS if the file shrinks under it: map only files whose owner
        // is trusted (this user or root), pread the others.
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && meta.uid() != 0 {
            return None;
        }
        if len == 0 {
            return None;
        }
        // Values are read with atomic loads only.
        let map = SharedMap::map(&self.file, 0, len, false).ok()?;
        Some(DataMap { map, data_offset })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the id had its NUL within name_size.
    pub fn id_terminated(&self) -> bool {
        self.id_terminated
    }

    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    pub fn name_terminated(&self, i: usize) -> bool {
        self.names_terminated[i]
    }

    /// Bytes of the data block the descriptors cover.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Whether samples come from a mapping (no system call) rather than pread.
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The data block now, as u64 values (bytes past a multiple of 8 are dropped).
    pub fn sample(&self) -> io::Result<Sample> {
        let words = (self.data_bytes / 8) as usize;
        let mut values = vec![0u64; words];
        self.sample_into(&mut values)?;
        Ok(Sample { values })
    }

    /// Refills `values` (data_bytes / 8 words) with the data block.
    pub fn sample_into(&self, values: &mut [u64]) -> io::Result<()> {
        assert_eq!(values.len(), (self.data_bytes / 8) as usize);
        match &self.map {
            Some(map) => {
                // SAFETY: data_offset + 8 * words <= len (try_map), data_offset 8-aligned on
                // a page-aligned mapping: aligned atomic loads inside the mapping.
                let base = unsafe { map.map.ptr().add(map.data_offset) }.cast::<AtomicU64>();
                for (i, v) in values.iter_mut().enumerate() {
                    // SAFETY: i < words: inside the mapped data block (see above).
                    *v = unsafe { &*base.add(i) }.load(Ordering::Relaxed);
                }
            }
            None => {
                let mut raw = vec![0u8; values.len() * 8];
                self.file
                    .read_exact_at(&mut raw, u64::from(self.header.data_offset))
                    .map_err(|e| bad(format!("cannot read the data block: {e}")))?;
                for (v, b) in values.iter_mut().zip(raw.chunks_exact(8)) {
                    *v = u64::from_ne_bytes(b.try_into().unwrap());
                }
            }
        }
        Ok(())
    }
}

/// One reading of a data block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub values: Vec<u64>,
}

impl Sample {
    /// The values of `desc`; empty if its offset is not 8-aligned or it lies outside.
    pub fn of(&self, desc: &Desc) -> &[u64] {
        if !desc.offset.is_multiple_of(8) {
            return &[];
        }
        let start = desc.offset as usize / 8;
        self.values
            .get(start..start + usize::from(desc.size))
            .unwrap_or(&[])
    }
}
