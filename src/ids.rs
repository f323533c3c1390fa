//! Users and groups by name or number, and permission modes, as the options give them.

/// A group name or number.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    // SAFETY: getgrnam_r with the buffers `by_name` passes, as its signature says.
    by_name(text, "group", |name, entry, buf, len, found| unsafe {
        libc::getgrnam_r(name, entry, buf, len, found)
    })
    .map(|group: libc::group| group.gr_gid)
}

/// A user name or number.
pub fn parse_user(text: &str) -> Result<u32, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid);
    }
    // SAFETY: getpwnam_r with the buffers `by_name` passes, as its signature says.
    by_name(text, "user", |name, entry, buf, len, found| unsafe {
        libc::getpwnam_r(name, entry, buf, len, found)
    })
    .map(|user: libc::passwd| user.pw_uid)
}

/// The entry a get*nam_r call (`get`) finds for `name`; `what` names it in errors. Its
/// string pointers dangle once this returns: only its ids may be read.
fn by_name<T>(
    name: &str,
    what: &str,
    get: impl FnOnce(*const libc::c_char, *mut T, *mut libc::c_char, usize, *mut *mut T) -> i32,
) -> Result<T, String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("bad {what} name {name:?}"))?;
    // SAFETY: group and passwd are C structs of integers and pointers: all zeroes is valid.
    let mut entry: T = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut T = std::ptr::null_mut();
    let rc = get(
        c_name.as_ptr(),
        &mut entry,
        buf.as_mut_ptr(),
        buf.len(),
        &mut found,
    );
    if rc != 0 || found.is_null() {
        return Err(format!("no {what} named {name:?}"));
    }
    Ok(entry)
}

/// Permission bits in octal (`660`, `0660`, `0o660`).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|&m| m <= 0o777)
        .ok_or_else(|| format!("{text:?} is not a mode (octal permission bits, like 0660)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_modes() {
        assert_eq!(parse_user("root"), Ok(0));
        assert_eq!(parse_user("1234"), Ok(1234));
        assert!(parse_user("no-such-user-here")
            .unwrap_err()
            .contains("no user named"));
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("7777").is_err());
    }
}
