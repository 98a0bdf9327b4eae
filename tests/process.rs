//! The `ridelock` binary as a real process: it logs where it serves, serves,
//! and shuts down cleanly on SIGTERM and SIGINT.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Starts the binary on an ephemeral port; returns it and the address it logged.
fn start_engine() -> (common::EngineProcess, String) {
    common::spawn_engine(&["--listen", "127.0.0.1:0"])
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("engine did not exit within 10 s of the signal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_and_exits_cleanly() {
    let (mut child, addr) = start_engine();
    let health = common::http_get(&addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let mut driver = common::Client::connect(&addr, "driver", "d").await;
    signal(&child, "TERM");
    let frame = tokio::time::timeout(Duration::from_secs(10), driver.ws.next())
        .await
        .expect("the engine closes the connection");
    match frame {
        Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), 1001),
        other => panic!("expected a going-away close frame, got {other:?}"),
    }
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_cleanly() {
    let (mut child, addr) = start_engine();
    assert!(common::http_get(&addr, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    signal(&child, "INT");
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn an_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["--listen", &addr])
        .output()
        .expect("ridelock runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_mints_tokens_the_engine_accepts() {
    let output = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["token", "--role", "driver", "--id", "d1", "--ttl", "10m"])
        .arg("--auth-secret-file")
        .arg(common::secret_file())
        .output()
        .expect("ridelock token runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let claims = ridelock::auth::Verifier::new(&common::secret(), Duration::ZERO)
        .verify(&token, ridelock::auth::Role::Driver)
        .expect("a valid driver token");
    assert_eq!(claims.sub, "d1");
    let ttl = claims.exp - ridelock::auth::unix_now();
    assert!((590..=600).contains(&ttl), "expires in {ttl} s");

    // The engine, as a process, takes it.
    let (_child, addr) = start_engine();
    let refused = common::try_upgrade(&addr, "/ws/driver", &[]).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(401));
    let connected = common::try_upgrade(
        &addr,
        "/ws/driver",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert!(connected.is_ok());

    // A bad role or id is refused by the command itself.
    for args in [
        ["--role", "admin", "--id", "d1"],
        ["--role", "driver", "--id", "d 1"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_ridelock"))
            .arg("token")
            .args(args)
            .arg("--auth-secret-file")
            .arg(common::secret_file())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn open_mode_refuses_a_public_address_unless_told() {
    let refused = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("RIDELOCK_AUTH_SECRET_FILE")
        .output()
        .expect("ridelock runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--insecure-open"), "{stderr}");

    // With --insecure-open it serves, and warns.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["--listen", "0.0.0.0:0", "--insecure-open"])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ridelock starts");
    let stdout = child.stdout.take().unwrap();
    let mut warned = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        warned |= line.contains("open mode");
        if line.contains("local_addr=") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "open mode is announced");
}

#[test]
fn a_short_secret_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("ridelock-short-secret-{}", std::process::id()));
    std::fs::write(&path, "tooshort\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["--listen", "127.0.0.1:0", "--auth-secret-file"])
        .arg(&path)
        .output()
        .expect("ridelock runs");
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
}
