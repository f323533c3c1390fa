//! Users and groups by name or number, and permission modes, as the options give them.

/// A group name or number.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(text).map_err(|_| format!("bad group name {text:?}"))?;
    // SAFETY: a C struct of integers and pointers: all zeroes is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r fills `group` with pointers into `buf`, both alive for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group named {text:?}"));
    }
    Ok(group.gr_gid)
}

/// A user name or number.
pub fn parse_user(text: &str) -> Result<u32, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid);
    }
    let name = std::ffi::CString::new(text).map_err(|_| format!("bad user name {text:?}"))?;
    // SAFETY: a C struct of integers and pointers: all zeroes is a valid value.
    let mut user: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r fills `user` with pointers into `buf`, both alive for the call.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut user,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no user named {text:?}"));
    }
    Ok(user.pw_uid)
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
