//! What the harness reads from the OS: a process's resident memory and CPU time from `/proc`, its
//! own CPU time, the file-descriptor limit, and a description of the machine for the report.

use std::time::Duration;

/// Raises the open-files limit and checks it leaves room for `sockets` (and a thousand more
/// descriptors: the database, the broker, the nodes' files).
pub fn ensure_nofile_for(sockets: usize) -> anyhow::Result<()> {
    let nofile = raise_nofile_limit();
    if (nofile as usize) < sockets + 1000 {
        anyhow::bail!("{sockets} sockets need a higher open-files limit than {nofile}");
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one (10,000 sockets need 10,000 descriptors on each
/// side); returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
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
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Resident set size of `pid`, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time `pid` has used so far (all its threads).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields we want follow its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / per_sec))
}

/// User + system CPU time this process has used so far, at microsecond resolution.
pub fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes only into the zeroed struct passed in.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Asks `pid` to shut down gracefully (SIGTERM).
pub fn terminate(pid: u32) {
    // SAFETY: kill has no memory preconditions; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the child binds it right after).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Asks the kernel for a `bytes` receive buffer on `socket` (it caps it at `net.core.rmem_max`), so
/// a burst of StatsD datagrams waits there instead of being dropped while the sink thread catches up.
pub fn raise_receive_buffer(socket: &std::net::UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; the fd is open.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Datagrams the kernel dropped so far on the IPv4 UDP socket bound to `port` (the last column of
/// `/proc/net/udp`).
pub fn udp_drops(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let wanted = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields
            .get(1)
            .filter(|local| local.ends_with(&wanted))
            .and_then(|_| fields.last()?.parse().ok())
    })
}

/// CPU model, core count, memory and kernel, for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// CPU time used so far by every process of the box, grouped: the nodes (all of the deployment), the
/// load generators, PostgreSQL (all backends), RabbitMQ (the Erlang VM) and everything else. Lets the
/// report say which process the cores went to during a phase.
pub fn cpu_by_group(
    nodes: &[u32],
    loadgens: &[u32],
) -> std::collections::BTreeMap<&'static str, Duration> {
    let mut groups = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(cpu) = cpu_time(pid) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let group = if nodes.contains(&pid) {
            "herald"
        } else if loadgens.contains(&pid) {
            "loadgen"
        } else if comm.starts_with("postgres") {
            "postgresql"
        } else if comm.starts_with("beam") || comm.starts_with("erl") {
            "rabbitmq"
        } else if pid == std::process::id() {
            "harness"
        } else {
            "other"
        };
        *groups.entry(group).or_default() += cpu;
    }
    groups
}

/// Cores each process group used between two readings of [`cpu_by_group`] `secs` apart, to two
/// decimals.
pub fn cores_used(
    before: &std::collections::BTreeMap<&'static str, Duration>,
    after: &std::collections::BTreeMap<&'static str, Duration>,
    secs: f64,
) -> std::collections::BTreeMap<&'static str, f64> {
    after
        .iter()
        .map(|(group, t)| {
            let used = t.saturating_sub(before.get(group).copied().unwrap_or_default());
            let cores = (used.as_secs_f64() / secs * 100.0).round() / 100.0;
            (*group, cores)
        })
        .collect()
}
