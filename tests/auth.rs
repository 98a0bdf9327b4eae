//! Identity comes from a verified token: refusals before the upgrade change
//! nothing, a token names its holder whatever the URL says, tokens expire
//! mid-connection, and tokens from another JWT library work.

mod common;

use std::time::Duration;

use common::{try_upgrade, wait_for_available, Client};
use ridelock::auth::{self, Role};
use ridelock::protocol::ServerMessage;
use serde_json::json;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// A token signed with another secret.
fn forged(role: Role, id: &str) -> String {
    auth::mint(
        b"not-the-engine-secret-but-long-enough",
        role,
        id,
        Duration::from_secs(3600),
    )
}

/// A token whose `exp` passed a minute ago.
fn expired(role: Role, id: &str) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let claims = auth::Claims {
        sub: id.into(),
        role,
        exp: auth::unix_now() - 60,
    };
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(&common::secret()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_get_401_and_change_nothing() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    // d1 is connected, available, and offered to r1.
    let mut d1 = Client::available_driver(&engine, "d1", LAT, LON).await;
    let mut r1 = Client::rider(&engine, "r1").await;
    r1.request_ride("q", LAT, LON).await;
    r1.expect_searching("q").await;
    let (offer_id, _) = d1.expect_offer().await;

    let bearer = |t: &str| format!("Bearer {t}");
    let rider_token = common::token(Role::Rider, "d1");
    // (what, path, headers)
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        ("no token", "/ws/driver?id=d1".into(), vec![]),
        (
            "malformed",
            "/ws/driver".into(),
            vec![("Authorization", bearer("not.a.jwt"))],
        ),
        (
            "wrong scheme",
            "/ws/driver".into(),
            vec![("Authorization", "Basic ZDE6eA==".into())],
        ),
        (
            "bad signature",
            "/ws/driver".into(),
            vec![("Authorization", bearer(&forged(Role::Driver, "d1")))],
        ),
        (
            "expired",
            "/ws/driver".into(),
            vec![("Authorization", bearer(&expired(Role::Driver, "d1")))],
        ),
        (
            "rider token on the driver endpoint",
            "/ws/driver".into(),
            vec![("Authorization", bearer(&rider_token))],
        ),
        (
            "expired, in the query",
            format!("/ws/driver?token={}", expired(Role::Driver, "d1")),
            vec![],
        ),
    ];
    for (what, path, headers) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match try_upgrade(addr, &path, &headers).await {
            Err((401, body)) => {
                assert_eq!(body.lines().count(), 1, "{what}: one line: {body:?}");
            }
            Err(other) => panic!("{what}: expected 401, got {other:?}"),
            Ok(_) => panic!("{what}: upgraded"),
        }
    }
    let expired_body = try_upgrade(
        addr,
        "/ws/driver",
        &[(
            "Authorization",
            &format!("Bearer {}", expired(Role::Driver, "d1")),
        )],
    )
    .await
    .err()
    .unwrap()
    .1;
    assert!(expired_body.contains("expired"), "{expired_body}");
    let role_body = try_upgrade(
        addr,
        "/ws/driver",
        &[("Authorization", &bearer(&rider_token))],
    )
    .await
    .err()
    .unwrap()
    .1;
    assert!(role_body.contains("role rider"), "{role_body}");

    // Nothing happened to d1: still connected (no 1008 for a replacement),
    // its offer still open, and its accept still matches r1.
    d1.expect_silence(Duration::from_millis(100)).await;
    d1.accept(offer_id).await;
    assert!(matches!(
        d1.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    assert_eq!(r1.expect_matched().await, "d1");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_names_the_driver_whatever_the_url_says() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let mut d2 = Client::available_driver(&engine, "d2", LAT, LON).await;
    // d1's token with id=d2 in the URL, sent in the query as a browser would.
    let token = common::token(Role::Driver, "d1");
    let mut d1 = try_upgrade(addr, &format!("/ws/driver?id=d2&token={token}"), &[])
        .await
        .expect("d1's token connects");
    // d2 was not replaced, and the new connection is d1: it goes available
    // and is a second driver, not d2.
    d1.go_available(LAT, LON + 0.01).await;
    wait_for_available(&engine, 2).await;
    d2.expect_silence(Duration::from_millis(100)).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON + 0.01).await;
    rider.expect_searching("q").await;
    let (offer, _) = d1.expect_offer().await;
    // d1 can't answer d2's offers: d2 gets one for a pickup next to it.
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q2").await;
    let (offer2, _) = d2.expect_offer().await;
    d1.accept(offer2).await;
    assert_eq!(d1.expect_error().await, "unknown_offer");
    d1.accept(offer).await;
    assert!(matches!(
        d1.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    match rider.recv().await {
        ServerMessage::Matched {
            driver_id,
            request_id,
            ..
        } => assert_eq!((&*driver_id, &*request_id), ("d1", "q")),
        other => panic!("expected matched, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cannot_cancel_another_riders_request() {
    let engine = common::engine(|_| {}).await;
    let mut r1 = Client::rider(&engine, "r1").await;
    r1.request_ride("q", LAT, LON).await;
    r1.expect_searching("q").await;
    // r2 claims to be r1 in the URL; the token says r2.
    let token = common::token(Role::Rider, "r2");
    let mut r2 =
        Client::connect_with(engine.local_addr(), "rider", "?id=r1", Some(&token), "r2").await;
    r2.send(json!({"type": "cancel", "request_id": "q"})).await;
    assert_eq!(r2.expect_error().await, "unknown_request");
    assert_eq!(engine.stats().await.searches, 1);
    // r1's search goes on: a driver who shows up gets its offer.
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    driver.expect_offer().await;
    r1.expect_silence(Duration::from_millis(50)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_token_expires_is_closed_with_1008() {
    let engine = common::engine(|_| {}).await;
    let token = auth::mint(&common::secret(), Role::Driver, "d", Duration::from_secs(2));
    let mut driver =
        Client::connect_with(engine.local_addr(), "driver", "", Some(&token), "d").await;
    driver.go_available(LAT, LON).await;
    wait_for_available(&engine, 1).await;
    match tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::StreamExt::next(&mut driver.ws),
    )
    .await
    .expect("closed within 10 s of a 2 s token")
    {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert!(frame.reason.contains("token expired"), "{}", frame.reason);
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
    // And the driver is no longer offerable.
    wait_for_available(&engine, 0).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_in_a_thousand_years_is_served() {
    // Found in review: exp far in the future overflowed the connection's
    // deadline and killed its task right after the upgrade.
    use jsonwebtoken::{encode, EncodingKey, Header};
    let engine = common::engine(|_| {}).await;
    let claims = auth::Claims {
        sub: "d".into(),
        role: Role::Driver,
        exp: u64::MAX / 2,
    };
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(&common::secret()),
    )
    .unwrap();
    let mut driver =
        Client::connect_with(engine.local_addr(), "driver", "", Some(&token), "d").await;
    driver.go_available(LAT, LON).await;
    wait_for_available(&engine, 1).await;
    driver.send(json!({"type": "accept", "offer_id": 1})).await;
    assert_eq!(driver.expect_error().await, "unknown_offer");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_header_that_is_not_ascii_is_refused_not_skipped() {
    // A broken header must not fall back to a token in the query.
    let engine = common::engine(|_| {}).await;
    let token = common::token(Role::Driver, "d");
    let mut stream = tokio::net::TcpStream::connect(engine.local_addr())
        .await
        .unwrap();
    let request = format!(
        "GET /ws/driver?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer \u{e9}\r\n\r\n"
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    engine.shutdown().await;
}

/// A token made by PyJWT, a JWT library that is not ours.
fn pyjwt_token(role: &str, id: &str) -> String {
    let secret = String::from_utf8(common::secret()).unwrap();
    let script = "import jwt, sys, time\n\
                  print(jwt.encode({'sub': sys.argv[2], 'role': sys.argv[1], \
                  'exp': int(time.time()) + 600}, sys.argv[3], algorithm='HS256'))";
    let output = std::process::Command::new("python3")
        .args(["-c", script, role, id, &secret])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "PyJWT failed (pip install pyjwt; .ci/run does): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_another_jwt_library_work() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let driver_token = pyjwt_token("driver", "d-py");
    let rider_token = pyjwt_token("rider", "r-py");
    let mut driver = Client::connect_with(addr, "driver", "", Some(&driver_token), "d-py").await;
    driver.go_available(LAT, LON).await;
    wait_for_available(&engine, 1).await;
    let mut rider = Client::connect_with(
        addr,
        "rider",
        &format!("?token={rider_token}"),
        None,
        "r-py",
    )
    .await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer, _) = driver.expect_offer().await;
    driver.accept(offer).await;
    assert_eq!(rider.expect_matched().await, "d-py");
    // And PyJWT's token for the wrong role is still refused.
    let wrong = pyjwt_token("rider", "d-py");
    assert_eq!(
        common::refused_status(addr, "/ws/driver", &wrong).await,
        Some(401)
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_ops_token_on_the_public_port() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let scrape = |auth: Option<String>| {
        let header = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        common::http_raw(
            addr,
            Box::leak(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{header}\r\n").into_boxed_str()),
        )
    };
    assert!(scrape(None).await.starts_with("HTTP/1.1 401"));
    let driver = common::token(Role::Driver, "d");
    assert!(scrape(Some(driver)).await.starts_with("HTTP/1.1 401"));
    let ops = scrape(Some(common::token(Role::Ops, "prometheus"))).await;
    assert!(ops.starts_with("HTTP/1.1 200"), "{ops}");
    assert!(ops.contains("ridelock_connections"), "{ops}");
    // /healthz stays open for load balancers.
    assert!(common::http_get(addr, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_to_their_own_address() {
    let engine = common::engine(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let private = engine.metrics_addr().expect("a metrics address");
    let public = common::http_get(engine.local_addr(), "/metrics").await;
    assert!(public.starts_with("HTTP/1.1 404"), "{public}");
    let scraped = common::http_get(private, "/metrics").await;
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    assert!(scraped.contains("ridelock_connections"));
    assert!(common::http_get(private, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    // WebSockets are not served there.
    let token = common::token(Role::Driver, "d");
    assert_eq!(
        common::refused_status(private, "/ws/driver", &token).await,
        Some(404)
    );
    engine.shutdown().await;
}
