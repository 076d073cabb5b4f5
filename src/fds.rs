//! The process's file descriptor limit (`RLIMIT_NOFILE`): raised to the hard limit at start, and
//! the connection budget kept within it.
//!
//! Many systems start services with a soft limit of 1,024 and a much higher hard limit; a proxy
//! holding two descriptors per client connection (the client's, and its KMS or tunnel
//! connection) runs out at about 500 clients there, and then `accept` fails for everyone.

use std::io;

/// Descriptors a place in the connection budget may hold: a client connection's own and its
/// first upstream (KMS or tunnel) socket. A further upstream connection of an HTTP/2 client
/// connection takes a place of its own (`proxy/lane.rs`), as an HTTP/2 CONNECT tunnel does.
pub const PER_CONNECTION: u64 = 2;
/// Descriptors kept for everything else: listeners, epoll and wake-up descriptors of the
/// connection threads, the audit file, DNS lookups, files being read, and connections over the
/// limit while older ones are being closed.
pub const RESERVED: u64 = 256;

/// The soft and hard `RLIMIT_NOFILE` (`u64::MAX` for unlimited).
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct it is given, which lives here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((to_u64(limit.rlim_cur), to_u64(limit.rlim_max)))
}

fn to_u64(value: libc::rlim_t) -> u64 {
    if value == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        value
    }
}

/// Raises the soft limit to the hard limit (to `fs.nr_open` when the hard limit is unlimited,
/// which Linux does not allow as a soft limit). Returns the soft limit before, after, and the
/// hard limit.
pub fn raise_nofile() -> io::Result<(u64, u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok((soft, soft, hard));
    }
    let target = if hard == u64::MAX {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: if hard == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            hard
        },
    };
    // SAFETY: setrlimit reads one `rlimit` from the struct it is given, which lives here.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (after, hard) = nofile()?;
    Ok((soft, after, hard))
}

/// How many connections fit in `soft` descriptors.
pub fn connections_within(soft: u64) -> u64 {
    soft.saturating_sub(RESERVED) / PER_CONNECTION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_and_fits_connections_in_it() {
        let (soft, hard) = nofile().unwrap();
        assert!(soft >= 1 && soft <= hard, "{soft} {hard}");
        assert_eq!(connections_within(1024), 384);
        assert_eq!(connections_within(100), 0);
        assert_eq!(connections_within(u64::MAX), (u64::MAX - RESERVED) / 2);
    }
}
