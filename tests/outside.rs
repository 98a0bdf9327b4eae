//! What was found by trying the engine from outside, each kept from coming
//! back: ids that collapse or carry control characters, pickups in GeoJSON
//! order, close handshakes left unanswered, protocol violations that dropped
//! TCP, and HTTP/1.0 health checks.

mod common;

use std::time::Duration;

use common::{try_upgrade, Client};
use futures_util::{SinkExt, StreamExt};
use ridelock::auth::Role;
use ridelock::protocol::ServerMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// An engine in open mode (ids from the URL), as `cargo run` starts it.
async fn open_engine() -> ridelock::Engine {
    common::engine(|c| c.auth_secret_file = None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_would_collapse_or_carry_control_characters_are_refused() {
    let engine = open_engine().await;
    let addr = engine.local_addr();
    // %ff and %fe both decoded to U+FFFD and were one driver; now neither is.
    for id in [
        "%ff",
        "%fe",
        "d%0a1",       // newline
        "d%e2%80%ae1", // right-to-left override
        "d%001",       // NUL
        "d%20x",       // space
        "",
    ] {
        match try_upgrade(addr, &format!("/ws/driver?id={id}"), &[]).await {
            Err((400, body)) => assert!(body.contains("A-Z"), "{id}: {body}"),
            other => panic!("{id}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
    // Longer than 64 bytes: 400 too; 64 is fine.
    let long = "x".repeat(65);
    let refused = try_upgrade(addr, &format!("/ws/rider?id={long}"), &[]).await;
    assert_eq!(refused.err().map(|(s, _)| s), Some(400));
    let ok = try_upgrade(addr, &format!("/ws/rider?id={}", "x".repeat(64)), &[]).await;
    assert!(ok.is_ok());
    // A token whose sub breaks the alphabet is an invalid token (401).
    let secret_engine = common::engine(|_| {}).await;
    let token = ridelock::auth::mint(
        &common::secret(),
        Role::Driver,
        "d\u{202e}1",
        Duration::from_secs(60),
    );
    let refused = try_upgrade(
        secret_engine.local_addr(),
        "/ws/driver",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(refused.err().map(|(s, _)| s), Some(401));
    secret_engine.shutdown().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickup_in_geojson_order_is_refused() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider
        .send_text(r#"{"type":"request_ride","request_id":"q","pickup":[13.405,52.52]}"#)
        .await;
    assert_eq!(rider.expect_error().await, "invalid_field");
    assert_eq!(engine.stats().await.searches, 0);
    driver.expect_silence(Duration::from_millis(100)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_close_is_answered() {
    let engine = common::engine(|_| {}).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.close_normally().await;
    // The engine echoes the close (before, clients saw 1006: no reply).
    match tokio::time::timeout(common::EXPECT_WITHIN, rider.ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    engine.shutdown().await;
}

/// A WebSocket opened by hand, to send frames no library would.
async fn raw_rider(engine: &ridelock::Engine) -> TcpStream {
    let mut stream = TcpStream::connect(engine.local_addr()).await.unwrap();
    let token = common::token(Role::Rider, "raw");
    let request = format!(
        "GET /ws/rider HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A masked client frame with the first byte `b0` (FIN, RSV, opcode).
fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![b0, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads server frames until a close frame; its code.
async fn close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let mut head = [0u8; 2];
        tokio::time::timeout(common::EXPECT_WITHIN, stream.read_exact(&mut head))
            .await
            .expect("a frame in time")
            .expect("a close frame, not a dropped connection");
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.unwrap();
                u16::from_be_bytes(ext) as usize
            }
            127 => panic!("no frame here is that long"),
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        if head[0] & 0x0f == 0x8 {
            assert!(len >= 2, "a close frame with a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_and_bad_utf8_with_1007() {
    let engine = common::engine(|_| {}).await;
    // Opcode 0x3 is reserved.
    let mut reserved = raw_rider(&engine).await;
    reserved.write_all(&client_frame(0x83, b"x")).await.unwrap();
    assert_eq!(close_code(&mut reserved).await, 1002);
    // RSV1 set with no extension negotiated.
    let mut rsv = raw_rider(&engine).await;
    rsv.write_all(&client_frame(0xc1, b"{}")).await.unwrap();
    assert_eq!(close_code(&mut rsv).await, 1002);
    // A text frame that is not UTF-8.
    let mut not_utf8 = raw_rider(&engine).await;
    not_utf8
        .write_all(&client_frame(0x81, &[0xff, 0xfe, 0x41]))
        .await
        .unwrap();
    assert_eq!(close_code(&mut not_utf8).await, 1007);
    // And a well-formed raw frame still works: the hand-made client is sound.
    let mut fine = raw_rider(&engine).await;
    fine.write_all(&client_frame(
        0x81,
        br#"{"type":"cancel","request_id":"x"}"#,
    ))
    .await
    .unwrap();
    let mut head = [0u8; 2];
    fine.read_exact(&mut head).await.unwrap();
    let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
    fine.read_exact(&mut payload).await.unwrap();
    let reply: ServerMessage = serde_json::from_slice(&payload).unwrap();
    assert!(
        matches!(&reply, ServerMessage::Error { code, .. } if code.as_str() == "unknown_request"),
        "{reply:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_health_checks_and_oversized_heads() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let health = common::http_raw(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "y".repeat(16 * 1024)
    );
    let refused = common::http_raw(addr, &huge).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    let post = common::http_raw(
        addr,
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let garbage = common::http_raw(addr, "\u{1}\u{2}garbage\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_an_answer() {
    // Found by the handshake fuzzer: hyper dropped the connection unanswered
    // when the client shut down its sending side after the request.
    let engine = common::engine(|_| {}).await;
    let mut stream = TcpStream::connect(engine.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // And an upgrade sent the same way is answered 101.
    let mut stream = TcpStream::connect(engine.local_addr()).await.unwrap();
    let token = common::token(Role::Driver, "d");
    stream
        .write_all(
            format!(
                "GET /ws/driver HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer:?}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_sent_past_the_allowance_is_still_answered() {
    // A close frame read ahead while the allowance is spent ends the session
    // at once (it is not held for a token) and is answered. (The review that
    // prompted this thought the echo could be lost; tungstenite flushes the
    // queued reply even on the failed write, so this passed before too: it
    // guards the promise, not a reproduced bug.)
    let engine = common::engine(|c| c.max_messages_per_s = 1).await;
    let mut rider = Client::rider(&engine, "r").await;
    for _ in 0..3 {
        rider.ws.feed(Message::text("{}")).await.unwrap();
    }
    rider.close_normally().await;
    assert_eq!(rider.closed_within(common::EXPECT_WITHIN).await, Some(1000));
    engine.shutdown().await;
}
