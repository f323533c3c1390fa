//! Recognizing disk image formats that are not raw, so that `file=` pointing at a qcow2 (or
//! VMDK, VDI, VHDX, VHD, QED, LUKS) image is refused instead of served as its container's
//! bytes: a guest would see a disk of garbage, and a write would corrupt the image. QEMU
//! probes the same magic numbers.

use std::io::Read;
use std::path::Path;

/// (format, offset, magic) of the formats looked for.
const MAGICS: [(&str, u64, &[u8]); 7] = [
    ("qcow2 (or qcow)", 0, b"QFI\xfb"),
    ("VMDK", 0, b"KDMV"),
    ("VDI", 0x40, b"\x7f\x10\xda\xbe"),
    ("VHDX", 0, b"vhdxfile"),
    ("VHD (vpc)", 0, b"conectix"),
    ("QED", 0, b"QED\x00"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
];

/// The image format `path` starts with, if it is one of the known non-raw ones.
pub fn sniff(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 0x48];
    let mut file = std::fs::File::open(path).ok()?;
    let n = file.read(&mut head).ok()?;
    MAGICS.iter().find_map(|&(format, at, magic)| {
        let at = at as usize;
        (n >= at + magic.len() && &head[at..at + magic.len()] == magic).then_some(format)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_images_are_named_and_raw_data_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("a.qcow2");
        std::fs::write(&qcow2, b"QFI\xfb\x00\x00\x00\x03rest of the header").unwrap();
        assert_eq!(sniff(&qcow2), Some("qcow2 (or qcow)"));
        let raw = dir.path().join("a.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(sniff(&raw), None);
        assert_eq!(sniff(&dir.path().join("missing")), None);
    }
}
