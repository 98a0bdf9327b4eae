//! Sockets: connecting many clients over loopback, and the open-file limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// Connections per loopback source address. One address has ~28k ephemeral
/// ports towards one server port (Linux's default range 32768–60999), and the
/// engine by default takes at most 1,024 connections from one address
/// (`--max-connections-per-address`): staying below both keeps the
/// simulator within the limits a production engine runs with.
pub const CONNECTIONS_PER_SOURCE: usize = 1_000;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Where the engine is, resolved once.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` as given in the URL (for the Host header).
    pub authority: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// An `ops` token for `/metrics`, when the engine verifies tokens.
    pub ops_token: Option<String>,
}

impl Target {
    /// Resolves `ws://HOST:PORT`.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let authority = url
            .strip_prefix("ws://")
            .context("the URL must start with ws://")?
            .trim_end_matches('/')
            .to_string();
        let addr = lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to nothing"))?;
        Ok(Target {
            authority,
            addr,
            ops_token: None,
        })
    }

    /// The source address for the `n`th connection: spread over 127.0.0.1,
    /// 127.0.0.2, … when the engine is on loopback, so that 100k connections
    /// don't run out of ephemeral ports. `None` elsewhere (the OS chooses).
    pub fn source_for(&self, n: usize, total: usize) -> Option<IpAddr> {
        match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => {
                let sources = total.div_ceil(CONNECTIONS_PER_SOURCE).clamp(1, 254);
                Some(IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (n % sources) as u8,
                )))
            }
            _ => None,
        }
    }

    /// Opens a WebSocket to `path` (e.g. `/ws/driver?id=d1`), with `token`
    /// in the `Authorization` header if given.
    pub async fn connect(
        &self,
        path: &str,
        token: Option<&str>,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Ws> {
        self.connect_with(path, token, source, client_config())
            .await
    }

    /// [`Target::connect`] with WebSocket settings of its own.
    pub async fn connect_with(
        &self,
        path: &str,
        token: Option<&str>,
        source: Option<IpAddr>,
        config: WebSocketConfig,
    ) -> anyhow::Result<Ws> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            defer_port_choice(&socket);
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding a client socket to {ip}"))?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{}{path}", self.authority).into_client_request()?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse()?);
        }
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .context("WebSocket handshake")?;
        Ok(ws)
    }

    /// `GET path` over plain HTTP; the body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(self.addr).await?;
        let authorization = self
            .ops_token
            .as_ref()
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{authorization}Connection: close\r\n\r\n",
            self.authority
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        Ok(body.to_string())
    }
}

/// Asks Linux to pick the source port at `connect` rather than at `bind`
/// (IP_BIND_ADDRESS_NO_PORT). Chosen at bind time, a port must be free for
/// every destination, and the kernel's search for one grows with the number
/// of sockets: tens of thousands of binds then burn whole cores in the kernel.
fn defer_port_choice(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the stated size.
    // Failure (an old kernel) only loses the optimisation.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Client WebSocket buffers: small, like the engine's, so that 100k clients
/// fit beside the engine on one machine.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

pub use ridelock::limits::raise_open_file_limit;

/// A process's resident set size in KiB, from /proc (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) a process has used so far, from /proc (Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks > 0.0).then(|| (utime + stime) / ticks)
}

/// The value of an unlabelled counter or gauge in a Prometheus exposition.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// A Prometheus histogram's cumulative buckets in `exposition` (every
/// series of `name`, summed by bound): `(le, count)`, ascending, `+Inf`
/// last. Empty when the histogram is missing.
pub fn histogram_buckets(exposition: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut sums: Vec<(f64, f64)> = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(le) = labels.split(',').find_map(|l| l.strip_prefix("le=\"")) else {
            continue;
        };
        let le = match le.trim_end_matches('"') {
            "+Inf" => f64::INFINITY,
            le => match le.parse() {
                Ok(le) => le,
                Err(_) => continue,
            },
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        match sums.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, sum)) => *sum += count,
            None => sums.push((le, count)),
        }
    }
    sums.sort_by(|a, b| a.0.total_cmp(&b.0));
    sums
}

/// The `q`-quantile, in milliseconds, of what a histogram counted between
/// two scrapes of its buckets (`before` may be empty: from the start),
/// interpolated within its bucket as Prometheus' `histogram_quantile` does.
/// `None` when nothing was counted in between.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let earlier = |le: f64| {
        before
            .iter()
            .find(|(bound, _)| *bound == le)
            .map_or(0.0, |(_, count)| *count)
    };
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, count)| (le, count - earlier(le)))
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut low, mut below) = (0.0, 0.0);
    for (le, count) in counts {
        if count >= rank {
            if le.is_infinite() {
                return Some(low * 1000.0);
            }
            let span = count - below;
            let within = if span > 0.0 {
                (rank - below) / span
            } else {
                0.0
            };
            return Some((low + (le - low) * within) * 1000.0);
        }
        (low, below) = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_quantile_counts_only_what_came_between_two_scrapes() {
        let scrape = |a: u64, b: u64, c: u64| {
            format!(
                "# TYPE h histogram\n\
                 h_bucket{{le=\"0.001\"}} {a}\n\
                 h_bucket{{le=\"0.002\"}} {b}\n\
                 h_bucket{{le=\"+Inf\"}} {c}\n\
                 h_sum 1\nh_count {c}\nother 3\n"
            )
        };
        // Before: 100 slow ones (the ramp). Between: 90 under 1 ms, 10
        // between 1 and 2 ms, none slower.
        let before = histogram_buckets(&scrape(0, 0, 100), "h");
        let after = histogram_buckets(&scrape(90, 100, 200), "h");
        assert_eq!(
            before,
            vec![(0.001, 0.0), (0.002, 0.0), (f64::INFINITY, 100.0)]
        );
        let p50 = quantile_between(&before, &after, 0.5).unwrap();
        assert!((p50 - 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p99 = quantile_between(&before, &after, 0.99).unwrap();
        assert!((p99 - 1.9).abs() < 1e-9, "{p99}");
        // Over the whole run the slow ones dominate the tail.
        assert_eq!(quantile_between(&[], &after, 0.99), Some(2.0));
        // Nothing counted in between: no quantile.
        assert_eq!(quantile_between(&after, &after, 0.5), None);
        // Two nodes' series add up.
        let both = histogram_buckets(&(scrape(1, 2, 3) + &scrape(10, 20, 30)), "h");
        assert_eq!(both[2], (f64::INFINITY, 33.0));
    }

    #[test]
    fn connections_spread_over_loopback_sources() {
        let target = Target {
            authority: "127.0.0.1:8080".into(),
            addr: "127.0.0.1:8080".parse().unwrap(),
            ops_token: None,
        };
        assert_eq!(
            target.source_for(5, 100),
            Some("127.0.0.1".parse().unwrap())
        );
        let mut per_source = std::collections::HashMap::new();
        for n in 0..100_000 {
            *per_source
                .entry(target.source_for(n, 100_000).unwrap())
                .or_insert(0) += 1;
        }
        // Within the engine's default of 1,024 connections per address.
        assert_eq!(per_source.len(), 100);
        assert!(per_source.values().all(|&n| n <= CONNECTIONS_PER_SOURCE));
        let remote = Target {
            authority: "10.0.0.1:80".into(),
            addr: "10.0.0.1:80".parse().unwrap(),
            ops_token: None,
        };
        assert_eq!(remote.source_for(1, 10), None);
    }

    #[test]
    fn reads_our_own_rss_and_metric_values() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let before = cpu_seconds(std::process::id()).unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {}
        assert!(cpu_seconds(std::process::id()).unwrap() > before);
        let exposition = "# TYPE x counter\nridelock_a_total 12\nridelock_ab_total 3\n";
        assert_eq!(metric_value(exposition, "ridelock_a_total"), Some(12.0));
        assert_eq!(metric_value(exposition, "ridelock_missing"), None);
    }
}
