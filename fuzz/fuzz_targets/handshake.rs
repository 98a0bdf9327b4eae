//! The engine's front door on arbitrary bytes: the HTTP request head, the
//! token check and the WebSocket upgrade, and (after a valid upgrade) the
//! session reading arbitrary frames. One engine serves every input over an
//! in-memory pipe, exactly as it serves a TCP socket.
//!
//! The first byte picks what the rest is:
//! - 0: a whole connection (request head and anything after it);
//! - 1 or 2: WebSocket frames after a valid driver (1) or rider (2)
//!   handshake, so that mutations reach the session and the actors.
//!
//! Checked: no panic, no hang; the engine answers every head with an HTTP
//! status line or closes; every frame it sends is well-formed (unmasked, a
//! known opcode, JSON server messages in text frames, allowed close codes);
//! and it keeps serving.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ridelock::auth::{self, Role};
use ridelock::protocol::ServerMessage;
use ridelock::{Config, Engine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const SECRET_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/auth-secret");
/// Longest the engine may take over one input before it counts as a hang.
const PER_INPUT: Duration = Duration::from_secs(5);

struct World {
    runtime: Runtime,
    engine: Engine,
    driver_head: Vec<u8>,
    rider_head: Vec<u8>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            auth_secret_file: Some(SECRET_FILE.into()),
            handshake_timeout_ms: 200,
            ..Config::default()
        };
        let engine = runtime
            .block_on(Engine::start(config))
            .expect("the engine starts");
        let secret = auth::read_secret(SECRET_FILE.as_ref()).expect("the test secret");
        let head = |role: Role, path: &str, id: &str| {
            let token = auth::mint(&secret, role, id, Duration::from_secs(365 * 24 * 3600));
            format!(
                "GET {path} HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .into_bytes()
        };
        World {
            driver_head: head(Role::Driver, "/ws/driver", "fuzz-d"),
            rider_head: head(Role::Rider, "/ws/rider", "fuzz-r"),
            runtime,
            engine,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let world = world();
    let (input, upgraded) = match mode % 3 {
        0 => (rest.to_vec(), false),
        1 => ([world.driver_head.as_slice(), rest].concat(), true),
        _ => ([world.rider_head.as_slice(), rest].concat(), true),
    };
    world.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = world.engine.serve_io(server);
        let talking = async {
            // The engine may answer (and close) before reading everything.
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut response = Vec::new();
            let _ = client.read_to_end(&mut response).await;
            response
        };
        let (_, response) = tokio::time::timeout(PER_INPUT, async { tokio::join!(serving, talking) })
            .await
            .expect("the engine finished with the input in time");
        check_response(&response, upgraded);
    });
});

fn check_response(response: &[u8], upgraded: bool) {
    if response.is_empty() {
        assert!(!upgraded, "a valid upgrade is answered");
        return;
    }
    assert!(response.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(response));
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        panic!("an unfinished response head");
    };
    let head = String::from_utf8_lossy(&response[..end]);
    if upgraded {
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    if head.starts_with("HTTP/1.1 101") {
        check_frames(&response[end + 4..]);
    }
}

/// Every frame the engine sends after an upgrade is well-formed.
fn check_frames(mut bytes: &[u8]) {
    while bytes.len() >= 2 {
        let (b0, b1) = (bytes[0], bytes[1]);
        assert_eq!(b1 & 0x80, 0, "server frames are not masked");
        let (len, header) = match b1 & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => panic!("the engine never sends 64 KiB frames"),
            126 => return, // cut short by the client's close
            n => (n as usize, 2),
        };
        if bytes.len() < header + len {
            return;
        }
        let payload = &bytes[header..header + len];
        match b0 & 0x0f {
            0x1 => {
                let text = std::str::from_utf8(payload).expect("text frames are UTF-8");
                serde_json::from_str::<ServerMessage>(text)
                    .unwrap_or_else(|e| panic!("an unknown message {text}: {e}"));
            }
            0x8 => {
                if payload.len() >= 2 {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    // The engine's own codes, or a client's valid code
                    // echoed (RFC 6455: 3000-4999 are the applications');
                    // tungstenite replaces an invalid one with 1002.
                    assert!(
                        matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999),
                        "close code {code}"
                    );
                }
            }
            0x9 | 0xa => {}
            other => panic!("opcode {other:#x} from the engine"),
        }
        bytes = &bytes[header + len..];
    }
}
