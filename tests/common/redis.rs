//! A private `redis-server` for tests: its own socket, no persistence,
//! killed when dropped, so tests can kill, pause and restart it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A private `redis-server` (no persistence), killed on drop. It listens on
/// a Unix socket of its own rather than a TCP port: tests run in parallel,
/// and a port picked free can be taken by another test's server or client
/// before this one binds it; a path can't.
pub struct RedisServer {
    child: Child,
    path: PathBuf,
    pub url: String,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ridelock-redis-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        RedisServer::at(&path)
    }

    /// A server on `path` (again, after [`kill`](Self::kill): a restart, empty).
    pub fn at(path: &Path) -> RedisServer {
        let _ = std::fs::remove_file(path);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(path)
            .args(["--unixsocketperm", "700"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README)");
        // Owned from here on: a failed start below still kills it.
        let server = RedisServer {
            child,
            path: path.to_path_buf(),
            url: format!("redis+unix://{}", path.display()),
        };
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on {}", path.display());
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server answering without closing its sockets (SIGSTOP).
    pub fn pause(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and has no memory effects here.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}
