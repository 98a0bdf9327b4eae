//! The ops feed (`/ws/ops`) over real sockets: a snapshot, then batches that
//! keep a watcher's picture equal to what the drivers and riders did; who
//! may watch; what a watcher may not do.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{engine, token, Client, EXPECT_WITHIN};
use futures_util::{SinkExt, StreamExt};
use ridelock::auth::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A watcher's picture, built only from what the feed sends.
#[derive(Default, Debug)]
struct Picture {
    seq: u64,
    states: Vec<String>,
    drivers: HashMap<String, Value>,
    requests: HashMap<(String, String), Value>,
    matches: Vec<Value>,
    counters: Value,
}

impl Picture {
    fn apply(&mut self, message: &Value) {
        match message["type"].as_str() {
            Some("snapshot") => {
                *self = Picture::default();
                self.seq = message["seq"].as_u64().expect("a snapshot's seq");
                self.states = serde_json::from_value(message["states"].clone()).unwrap();
                for row in message["drivers"].as_array().unwrap() {
                    self.drivers
                        .insert(row[0].as_str().unwrap().into(), row.clone());
                }
                for row in message["requests"].as_array().unwrap() {
                    self.requests.insert(key(row), row.clone());
                }
                self.matches = message["matches"].as_array().unwrap().clone();
            }
            Some("changes") => {
                let seq = message["seq"].as_u64().expect("a batch's seq");
                assert_eq!(seq, self.seq + 1, "batches come in order, none skipped");
                self.seq = seq;
                for row in message["drivers"].as_array().unwrap() {
                    self.drivers
                        .insert(row[0].as_str().unwrap().into(), row.clone());
                }
                for id in message["gone"].as_array().unwrap() {
                    self.drivers.remove(id.as_str().unwrap());
                }
                for row in message["requests"].as_array().unwrap() {
                    self.requests.insert(key(row), row.clone());
                }
                for row in message["ended"].as_array().unwrap() {
                    self.requests.remove(&key(row));
                }
                self.matches
                    .extend(message["matches"].as_array().unwrap().iter().cloned());
            }
            other => panic!("unexpected ops message type {other:?}: {message}"),
        }
        self.counters = message["counters"].clone();
    }

    fn state_of(&self, driver: &str) -> Option<&str> {
        let row = self.drivers.get(driver)?;
        Some(self.states[row[3].as_u64().unwrap() as usize].as_str())
    }
}

fn key(row: &Value) -> (String, String) {
    (
        row[0].as_str().unwrap().into(),
        row[1].as_str().unwrap().into(),
    )
}

struct Watcher {
    client: Client,
    picture: Picture,
}

impl Watcher {
    async fn open(addr: impl std::fmt::Display, bearer: &str) -> Watcher {
        let client = Client::connect_with(addr, "ops", "", Some(bearer), "ops").await;
        let mut watcher = Watcher {
            client,
            picture: Picture::default(),
        };
        let first = watcher.next().await;
        assert_eq!(first["type"], "snapshot", "the feed starts with a snapshot");
        watcher.picture.apply(&first);
        watcher
    }

    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(EXPECT_WITHIN, self.client.ws.next())
                .await
                .expect("the feed sends within the wait");
            match frame {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a feed message, got {other:?}"),
            }
        }
    }

    /// Applies batches until `done` holds of the picture.
    async fn until(&mut self, what: &str, done: impl Fn(&Picture) -> bool) {
        let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
        while !done(&self.picture) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not seen; picture {:?}",
                self.picture
            );
            let message = self.next().await;
            self.picture.apply(&message);
        }
    }
}

#[tokio::test]
async fn the_feed_follows_a_driver_from_appearing_to_a_trip_and_a_move() {
    let engine = engine(|_| {}).await;
    let addr = engine.local_addr();
    let mut ops = Watcher::open(addr, &token(Role::Ops, "operator")).await;
    assert_eq!(
        ops.picture.states,
        ["available", "offered", "on_trip", "unavailable", "offline"]
    );
    assert!(ops.picture.drivers.is_empty());

    let mut driver = Client::driver(&engine, "d1").await;
    ops.until("the driver connected, not yet available", |p| {
        p.state_of("d1") == Some("unavailable")
    })
    .await;
    driver.go_available(52.52, 13.405).await;
    ops.until("the driver available at its place", |p| {
        p.state_of("d1") == Some("available") && p.drivers["d1"][1] == json!(52.52)
    })
    .await;
    assert_eq!(ops.picture.counters["drivers"]["available"], 1);

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q1", 52.521, 13.406).await;
    rider.expect_searching("q1").await;
    let (offer_id, _) = driver.expect_offer().await;
    ops.until("the driver offered the rider's pickup", |p| {
        p.state_of("d1") == Some("offered") && p.drivers["d1"][4] == json!(52.521)
    })
    .await;
    ops.until("the open request", |p| {
        p.requests
            .get(&("r1".into(), "q1".into()))
            .is_some_and(|r| r[4] == "offered" && r[2] == json!(52.521) && r[5] == 1)
    })
    .await;
    assert_eq!(ops.picture.counters["requests"], 1);

    driver.accept(offer_id).await;
    rider.expect_matched().await;
    ops.until("the trip, the match line and the request ended", |p| {
        p.state_of("d1") == Some("on_trip")
            && p.requests.is_empty()
            && p.matches
                .iter()
                .any(|m| m[0] == "d1" && m[3] == json!(52.521))
    })
    .await;
    assert_eq!(ops.picture.counters["matched_total"], 1);
    assert_eq!(ops.picture.counters["matched_last_minute"], 1);

    driver
        .send(json!({"type": "location", "lat": 52.53, "lon": 13.41}))
        .await;
    ops.until("the driver moved", |p| {
        p.drivers["d1"][1] == json!(52.53) && p.drivers["d1"][2] == json!(13.41)
    })
    .await;

    // A second watcher starts from a snapshot holding all of it.
    let late = Watcher::open(addr, &token(Role::Ops, "operator")).await;
    assert_eq!(late.picture.state_of("d1"), Some("on_trip"));
    assert_eq!(late.picture.drivers["d1"][1], json!(52.53));
    assert_eq!(late.picture.matches.len(), 1);

    driver.close_normally().await;
    ops.until("the driver offline", |p| {
        p.state_of("d1") == Some("offline")
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn a_group_request_shows_once_with_its_size_and_waits_when_nobody_is_near() {
    let engine = engine(|_| {}).await;
    let mut ops = Watcher::open(engine.local_addr(), &token(Role::Ops, "operator")).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider
        .send(json!({"type": "request_ride", "request_id": "g1",
                     "pickup": {"lat": 52.5, "lon": 13.4}, "vehicles": 3}))
        .await;
    rider.expect_searching("g1").await;
    ops.until("one parked request for three vehicles", |p| {
        p.requests.len() == 1
            && p.requests
                .get(&("r1".into(), "g1".into()))
                .is_some_and(|r| r[4] == "waiting" && r[5] == 3)
    })
    .await;
    assert_eq!(ops.picture.counters["waiting"], 1);
    rider
        .send(json!({"type": "cancel", "request_id": "g1"}))
        .await;
    ops.until("the request ended", |p| p.requests.is_empty())
        .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn only_ops_tokens_watch_and_a_watcher_sends_nothing() {
    let engine = engine(|_| {}).await;
    let addr = engine.local_addr();
    let status = common::refused_status(addr, "/ws/ops", &token(Role::Driver, "d1")).await;
    assert_eq!(
        status,
        Some(401),
        "a driver's token does not open the ops feed"
    );
    let status = common::refused_status(addr, "/ws/ops", "").await;
    assert_eq!(status, Some(401), "nor does no token");

    let mut ops = Watcher::open(addr, &token(Role::Ops, "operator")).await;
    ops.client
        .ws
        .send(Message::text(r#"{"type":"available"}"#))
        .await
        .unwrap();
    assert_eq!(ops.client.closed_within(EXPECT_WITHIN).await, Some(1008));
    engine.shutdown().await;
}

#[tokio::test]
async fn the_watchers_past_the_limit_are_told_to_come_back_later() {
    let engine = engine(|_| {}).await;
    let addr = engine.local_addr();
    let bearer = token(Role::Ops, "operator");
    let mut watchers = Vec::new();
    for _ in 0..ridelock::ops::feed::MAX_WATCHERS {
        watchers.push(Watcher::open(addr, &bearer).await);
    }
    let mut refused = Client::connect_with(addr, "ops", "", Some(&bearer), "ops-17").await;
    assert_eq!(refused.closed_within(EXPECT_WITHIN).await, Some(1013));
    // One leaves: a place is free again.
    watchers.pop().unwrap().client.close_normally().await;
    let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
    loop {
        let mut again = Client::connect_with(addr, "ops", "", Some(&bearer), "ops-again").await;
        match tokio::time::timeout(Duration::from_millis(500), again.ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                assert!(text.contains(r#""type":"snapshot""#));
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "no place freed after a watcher left"
            ),
        }
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn open_mode_serves_the_feed_without_an_id() {
    let engine = engine(|c| c.auth_secret_file = None).await;
    let mut ops = Client::connect_with(engine.local_addr(), "ops", "", None, "ops").await;
    let first = tokio::time::timeout(EXPECT_WITHIN, ops.ws.next())
        .await
        .expect("a snapshot")
        .expect("a frame")
        .expect("not an error");
    assert!(first
        .to_text()
        .unwrap()
        .starts_with(r#"{"type":"snapshot""#));
    engine.shutdown().await;
}
