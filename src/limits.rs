//! Process limits a server with many connections needs raised.

/// Raises the open-file soft limit to the hard limit and returns the limit in
/// force. Every connection is a file descriptor, and the usual default soft
/// limit (1024) would cap a process at about a thousand connections. The hard
/// limit itself can only be raised by a privileged shell or service manager
/// (`ulimit -Hn`, `LimitNOFILE=`).
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// The open-file soft limit in force (0 if it can't be read).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur
}

/// How much lower than the matcher the other busy threads (socket I/O,
/// driver actors) run, in nice steps. Every booking passes through the one
/// matcher thread; on a saturated machine, with the same priority, it waits
/// for a core behind them (profiled under 5,000 requests/s: the matcher
/// thread ran 2.8 s and waited runnable 5.1 s in 12 s, and those waits were
/// the p99 of request→offer). Four steps give it about 2.4 times their
/// share when they contend, and preempt them when it wakes.
pub const BUSY_THREAD_NICENESS: i32 = 4;

/// Lowers the calling thread's priority by `steps` nice steps (Linux: a
/// thread's niceness is its own). Raising it again would need privileges;
/// lowering never does. Failure is harmless and ignored.
pub fn lower_this_thread(steps: i32) {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // arguments and acts on the calling thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, now + steps);
    }
}

/// The wall clock in milliseconds since the Unix epoch (`None` before it).
pub fn unix_ms() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let now = super::raise_open_file_limit();
        assert!(now > 0);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct passed.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(limit.rlim_cur, now);
    }
}
