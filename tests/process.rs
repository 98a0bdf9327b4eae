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
