//! Cluster mode: several engine nodes sharing drivers' locks through Redis.
//!
//! Every test starts its own `redis-server` processes on free ports (so it
//! can kill or pause them) and two or three nodes: in-process engines on
//! ephemeral ports, or `ridelock` processes where a node itself must be
//! paused with SIGSTOP.

mod common;

use std::time::Duration;

use common::redis::{signal, RedisServer};
use common::{wait_for_available, Client};
use ridelock::protocol::{NoDriverReason, RevokeReason, ServerMessage};
use ridelock::Engine;
use serde_json::json;

/// How long a test waits for news that crosses nodes (see
/// `Client::expect_offer_within`).
const CROSS_NODE: Duration = Duration::from_secs(10);

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// A cluster node on `redis` called `id`, with `adjust` applied.
async fn node(
    redis: &[&RedisServer],
    id: &str,
    adjust: impl FnOnce(&mut ridelock::Config),
) -> Engine {
    let urls: Vec<String> = redis.iter().map(|r| r.url.clone()).collect();
    common::engine(|c| {
        c.redis = urls;
        c.node_id = Some(id.to_string());
        adjust(c);
    })
    .await
}

/// Waits until `node`'s liveness key is in `redis` (it registered).
async fn wait_registered(redis: &RedisServer, node: &str) {
    wait_for_key(redis, &format!("ridelock:node:{node}:alive"), CROSS_NODE).await;
}

/// Waits up to `within` until a key matching `pattern` is in `redis`.
async fn wait_for_key(redis: &RedisServer, pattern: &str, within: Duration) {
    let mut connection = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {pattern} in Redis within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next message that is not an `offer_revoked`, within [`CROSS_NODE`].
async fn next_answer(client: &mut Client) -> ServerMessage {
    loop {
        match client
            .recv_within(CROSS_NODE)
            .await
            .unwrap_or_else(|| panic!("{}: nothing within {CROSS_NODE:?}", client.id))
        {
            ServerMessage::OfferRevoked { .. } => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_on_one_node_is_matched_to_a_driver_on_another() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;

    let mut driver = Client::available_driver(&b, "d1", LAT, LON).await;
    // Node a learns of b's driver through Redis.
    wait_for_available(&a, 1).await;

    let mut rider = Client::rider(&a, "r1").await;
    rider.request_ride("q1", LAT + 0.001, LON).await;
    rider.expect_searching("q1").await;
    let (offer_id, fencing_token) = match driver.recv().await {
        ServerMessage::Offer {
            offer_id,
            rider_id,
            request_id,
            fencing_token,
            ..
        } => {
            assert_eq!((&*rider_id, &*request_id), ("r1", "q1"));
            (offer_id, fencing_token)
        }
        other => panic!("expected an offer, got {other:?}"),
    };
    // Tokens never go below the lock server's clock (in microseconds), so
    // that they keep growing after a restart that lost the counter.
    assert!(
        fencing_token > 1_700_000_000_000_000,
        "the first lock of d1 in Redis: {fencing_token}"
    );
    driver.accept(offer_id).await;
    match driver.recv().await {
        ServerMessage::TripAssigned { offer_id: o, .. } => assert_eq!(o, offer_id),
        other => panic!("expected trip_assigned, got {other:?}"),
    }
    let trip_id = match rider.recv().await {
        ServerMessage::Matched {
            driver_id, trip_id, ..
        } => {
            assert_eq!(&*driver_id, "d1");
            trip_id
        }
        other => panic!("expected matched, got {other:?}"),
    };
    // The trip ends on b, and both nodes index the driver again.
    driver
        .send(json!({"type": "trip_completed", "trip_id": trip_id}))
        .await;
    wait_for_available(&b, 1).await;
    wait_for_available(&a, 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_riders_on_two_nodes_racing_for_one_driver_exactly_one_wins() {
    let redis = RedisServer::start();
    let short = |c: &mut ridelock::Config| c.search_timeout_ms = 1_500;
    let a = node(&[&redis], "a", short).await;
    let b = node(&[&redis], "b", short).await;

    for round in 0..4 {
        // The driver on a, then on b: both the local and the remote side
        // win some races.
        let home = if round % 2 == 0 { &a } else { &b };
        let id = format!("d{round}");
        let mut driver = Client::available_driver(home, &id, LAT, LON).await;
        wait_for_available(&a, 1).await;
        wait_for_available(&b, 1).await;

        let mut rider_a = Client::rider(&a, &format!("ra{round}")).await;
        let mut rider_b = Client::rider(&b, &format!("rb{round}")).await;
        tokio::join!(
            rider_a.request_ride("q", LAT, LON + 0.001),
            rider_b.request_ride("q", LAT, LON - 0.001),
        );
        rider_a.expect_searching("q").await;
        rider_b.expect_searching("q").await;

        let (offer_id, _) = driver.expect_offer_within(CROSS_NODE).await;
        driver.accept(offer_id).await;
        assert!(matches!(
            driver.recv().await,
            ServerMessage::TripAssigned { .. }
        ));
        let (final_a, final_b) = tokio::join!(rider_a.recv(), rider_b.recv());
        let matched = [&final_a, &final_b]
            .iter()
            .filter(|m| matches!(m, ServerMessage::Matched { .. }))
            .count();
        let refused = [&final_a, &final_b]
            .iter()
            .filter(|m| matches!(m, ServerMessage::NoDriver { .. }))
            .count();
        assert_eq!(
            (matched, refused),
            (1, 1),
            "round {round}: {final_a:?} / {final_b:?}"
        );
        // The driver was offered once only. It stays on its trip, so the
        // next round's driver is the only one available.
        driver.expect_silence(Duration::from_millis(300)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_driver_is_double_booked_across_three_nodes() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", common::scenario::adjust).await;
    let b = node(&[&redis], "b", common::scenario::adjust).await;
    let c = node(&[&redis], "c", common::scenario::adjust).await;
    common::scenario::no_double_booking(&[a.local_addr(), b.local_addr(), c.local_addr()]).await;
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

/// `rider` asks for a ride and `driver`, the only one in reach, takes it.
async fn match_one(rider: &mut Client, round: usize, mut driver: Client) {
    let request = format!("q{round}");
    rider.request_ride(&request, LAT, LON).await;
    rider.expect_searching(&request).await;
    let (offer_id, _) = driver.expect_offer_within(CROSS_NODE).await;
    driver.accept(offer_id).await;
    assert!(matches!(
        driver.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    assert_eq!(rider.expect_matched().await, driver.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locking_goes_on_by_majority_when_one_of_three_redis_servers_dies() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let a = node(&servers.iter().collect::<Vec<_>>(), "a", |_| {}).await;
    let b = node(&servers.iter().collect::<Vec<_>>(), "b", |_| {}).await;

    let mut rider = Client::rider(&a, "r").await;
    let d0 = Client::available_driver(&b, "d0", LAT, LON).await;
    wait_for_available(&a, 1).await;
    match_one(&mut rider, 0, d0).await;

    // The first server is the one both nodes listen on: its loss also moves
    // their subscriptions to the next server.
    servers[0].kill();
    let d1 = Client::available_driver(&b, "d1", LAT, LON).await;
    wait_for_available(&a, 1).await;
    match_one(&mut rider, 1, d1).await;
    let d2 = Client::available_driver(&a, "d2", LAT, LON).await;
    wait_for_available(&a, 1).await;
    match_one(&mut rider, 2, d2).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// One lock server of three restarting without its data (the one both
/// nodes listen on) must not make the other node look dead: liveness is
/// what a majority of the servers say. (It used to drop the other node's
/// drivers, settle offers to them and withdraw offers held for its riders,
/// until the next refresh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lock_server_losing_its_data_does_not_make_nodes_look_dead() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let a = node(&servers.iter().collect::<Vec<_>>(), "a", |_| {}).await;
    let b = node(&servers.iter().collect::<Vec<_>>(), "b", |_| {}).await;
    let _d0 = Client::available_driver(&b, "d0", LAT, LON).await;
    wait_for_available(&a, 1).await;
    let mut raw = redis::Client::open(servers[0].url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    // Three liveness checks' worth, with b's key kept off that server (b
    // writes it back every second): b's driver stays in a's index all along.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let _: () = redis::cmd("DEL")
            .arg("ridelock:node:b:alive")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(a.stats().await.available_drivers, 1, "b taken for dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_means_refusals_and_redis_back_means_recovery() {
    let mut redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;

    let mut local = Client::available_driver(&a, "d1", LAT, LON).await;
    wait_for_available(&a, 1).await;
    let mut rider = Client::rider(&a, "r").await;

    redis.kill();
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    match rider.recv().await {
        ServerMessage::NoDriver {
            reason: Some(NoDriverReason::LocksUnavailable),
            ..
        } => {}
        other => panic!("expected no_driver (locks_unavailable), got {other:?}"),
    }
    // Nothing was offered, and the driver is still offerable.
    local.expect_silence(Duration::from_millis(200)).await;
    wait_for_available(&a, 1).await;

    // Back, empty (no persistence): locks are granted again, and the nodes
    // announce their drivers again so that remote matching resumes too.
    let restarted = RedisServer::at(redis.path());
    let mut recovered = false;
    for attempt in 0..50 {
        let request = format!("retry{attempt}");
        rider.request_ride(&request, LAT, LON).await;
        rider.expect_searching(&request).await;
        if let Some(ServerMessage::Offer { offer_id, .. }) =
            local.recv_within(Duration::from_millis(300)).await
        {
            local.accept(offer_id).await;
            assert!(matches!(
                next_answer(&mut local).await,
                ServerMessage::TripAssigned { .. }
            ));
            assert_eq!(rider.expect_matched().await, "d1");
            recovered = true;
            break;
        }
        match rider.recv().await {
            ServerMessage::NoDriver { .. } => {}
            other => panic!("expected no_driver while redis is coming back, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "locking did not resume after redis came back");

    let mut remote = Client::available_driver(&b, "d2", LAT, LON).await;
    wait_for_available(&a, 1).await;
    // A confirm for a's rider needs a registered again (a rider's node must
    // be alive for its trip to be booked): it does so within a refresh or
    // two of Redis coming back.
    wait_registered(&restarted, "a").await;
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q2").await;
    // b may still be resubscribing, and a lock request published meanwhile
    // is lost: a settles it after 2 s and asks again.
    let offer_id = match remote.recv_within(CROSS_NODE).await {
        Some(ServerMessage::Offer { offer_id, .. }) => offer_id,
        other => panic!("expected an offer through b, got {other:?}"),
    };
    remote.accept(offer_id).await;
    match next_answer(&mut remote).await {
        ServerMessage::TripAssigned { .. } => {}
        other => panic!("expected trip_assigned through b, got {other:?}"),
    }
    match rider.recv_within(CROSS_NODE).await {
        Some(ServerMessage::Matched { driver_id, .. }) => assert_eq!(&*driver_id, "d2"),
        other => panic!("expected matched to d2, got {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_frees_its_drivers_for_the_others() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let (mut b, b_addr) = common::spawn_engine(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        &redis.url,
        "--node-id",
        "b",
    ]);
    let b_addr: std::net::SocketAddr = b_addr.parse().unwrap();

    // A driver on b, offered to a rider on a: the lock is b's driver actor's.
    let mut on_b = Client::connect(b_addr, "driver", "d").await;
    on_b.send(json!({"type": "location", "lat": LAT, "lon": LON}))
        .await;
    on_b.send(json!({"type": "available"})).await;
    wait_for_available(&a, 1).await;
    let mut rider = Client::rider(&a, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    on_b.expect_offer_within(CROSS_NODE).await;

    // b dies with the offer out. a forgets b's drivers; the rider's search
    // settles the lock (no trip) and waits for another driver.
    b.kill().unwrap();
    b.wait().unwrap();

    // The driver's app reconnects to a: offerable again, and the waiting
    // rider gets it once b's lock is gone.
    let mut on_a = Client::available_driver(&a, "d", LAT, LON).await;
    let offer_id = match on_a.recv_within(CROSS_NODE).await {
        Some(ServerMessage::Offer { offer_id, .. }) => offer_id,
        other => panic!("expected an offer once b is seen dead, got {other:?}"),
    };
    on_a.accept(offer_id).await;
    assert!(matches!(
        on_a.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    assert_eq!(rider.expect_matched().await, "d");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_the_lock_expiry_cannot_book_its_stale_accept() {
    let redis = RedisServer::start();
    let spawn = |id: &str| {
        let (child, addr) = common::spawn_engine(&[
            "--listen",
            "127.0.0.1:0",
            "--redis",
            &redis.url,
            "--node-id",
            id,
            "--offer-timeout-ms",
            "15000",
        ]);
        (child, addr.parse::<std::net::SocketAddr>().unwrap())
    };
    let (mut a, a_addr) = spawn("a");
    let (mut b, b_addr) = spawn("b");

    // The driver on a is offered to a rider on b.
    let mut on_a = Client::connect(a_addr, "driver", "d").await;
    on_a.send(json!({"type": "location", "lat": LAT, "lon": LON}))
        .await;
    on_a.send(json!({"type": "available"})).await;
    let mut rider = Client::connect(b_addr, "rider", "r1").await;
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    let (stale_offer, stale_token) = match on_a.recv().await {
        ServerMessage::Offer {
            offer_id,
            fencing_token,
            ..
        } => (offer_id, fencing_token),
        other => panic!("expected an offer, got {other:?}"),
    };

    // a stalls with the offer out, and the driver's accept waits in its
    // socket. b sees a dead (its liveness lapses after 5 s) and settles the
    // lock: from then on no confirm under it can succeed.
    signal(a.id(), libc::SIGSTOP);
    on_a.accept(stale_offer).await;
    // Waiting for the settle mark itself, not for a time it usually takes:
    // liveness lapses after 5 s, then the overdue answer is settled.
    wait_for_key(&redis, "ridelock:owner:*:settled", Duration::from_secs(14)).await;

    // a wakes up within the offer's own 15 s: its deadline has not passed,
    // so only Redis can refuse the accept, and it does. What a reads first
    // after the pause decides the words: the accept (its confirm finds the
    // lock settled: "lost its lock"), or b's withdrawal of the settled
    // offer (the offer has ended; b may already be offering the driver
    // again, under a newer lock, if a was paused before its grant reached
    // b). Either way: refused, and nothing booked.
    signal(a.id(), libc::SIGCONT);
    let mut refused = false;
    let mut next = None;
    while !refused || next.is_none() {
        match next_answer(&mut on_a).await {
            ServerMessage::Error { code, .. } => {
                assert_eq!(code.as_str(), "offer_expired");
                assert!(!refused, "one accept, one answer");
                refused = true;
            }
            // Nothing was booked; the driver is offered again, under a
            // newer lock, to the rider still waiting on b.
            ServerMessage::Offer {
                offer_id,
                fencing_token,
                rider_id,
                ..
            } => {
                assert_eq!(&*rider_id, "r1");
                assert!(next.is_none(), "one offer at a time");
                next = Some((offer_id, fencing_token));
            }
            ServerMessage::TripAssigned { .. } => panic!("the stale accept booked a trip"),
            other => panic!("expected the stale accept refused and a new offer, got {other:?}"),
        }
    }
    let (offer_id, token) = next.expect("offered again");
    assert!(token > stale_token, "{token} after {stale_token}");
    on_a.accept(offer_id).await;
    match on_a.recv().await {
        ServerMessage::TripAssigned { offer_id: o, .. } => assert_eq!(o, offer_id),
        other => panic!("expected trip_assigned, got {other:?}"),
    }
    assert_eq!(rider.expect_matched().await, "d");
    rider.expect_silence(Duration::from_millis(300)).await;
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn unreachable_redis_at_start_is_a_clear_error() {
    // A socket nobody listens on (a TCP port picked free could be taken by
    // a parallel test's server, and the node would then start and serve).
    let path = std::env::temp_dir().join(format!("ridelock-nobody-{}.sock", std::process::id()));
    let url = format!("redis+unix://{}", path.display());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .args(["--listen", "127.0.0.1:0", "--redis", &url])
        .output()
        .expect("ridelock runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach redis") && stderr.contains(&url),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_offered_to_a_dead_nodes_rider_is_freed() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;
    let mut driver = Client::available_driver(&a, "d", LAT, LON).await;
    let mut doomed = Client::rider(&b, "r1").await;
    doomed.request_ride("q1", LAT, LON).await;
    doomed.expect_searching("q1").await;
    driver.expect_offer_within(CROSS_NODE).await;

    // The rider's node dies (dropped without a shutdown: it stops serving,
    // its actors and its Redis tasks stop, and it never says goodbye):
    // nobody is left to take the driver's answer, so the offer is withdrawn
    // as if the rider had cancelled.
    drop(b);
    match driver.recv_within(CROSS_NODE).await {
        Some(ServerMessage::OfferRevoked { reason, .. }) => {
            assert_eq!(serde_json::to_value(reason).unwrap(), "rider_cancelled")
        }
        other => panic!("expected offer_revoked, got {other:?}"),
    }
    // And the driver is free for the next rider at once.
    let mut rider = Client::rider(&a, "r2").await;
    match_one(&mut rider, 2, driver).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_moving_to_another_node_stays_offerable_everywhere() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;
    let mut on_a = Client::available_driver(&a, "d", LAT, LON).await;
    wait_for_available(&b, 1).await;

    // The app connects to b (without moving): a closes its connection there,
    // and must now offer the driver through b.
    let on_b = Client::available_driver(&b, "d", LAT, LON).await;
    assert_eq!(on_a.expect_closed().await, Some(1008));
    wait_for_available(&a, 1).await;
    let mut rider = Client::rider(&a, "r").await;
    match_one(&mut rider, 0, on_b).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_reconnecting_to_another_node_mid_trip_finishes_it_there() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;
    let mut on_a = Client::available_driver(&a, "d", LAT, LON).await;
    let mut rider = Client::rider(&a, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    let (offer_id, _) = on_a.expect_offer().await;
    on_a.accept(offer_id).await;
    let trip_id = match on_a.recv().await {
        ServerMessage::TripAssigned { trip_id, .. } => trip_id,
        other => panic!("expected trip_assigned, got {other:?}"),
    };
    assert_eq!(rider.expect_matched().await, "d");

    // Mid-trip, the app reconnects to b: a closes its old connection, and b
    // takes the trip over.
    let mut on_b = Client::driver(&b, "d").await;
    match on_b.recv().await {
        ServerMessage::TripAssigned { trip_id: t, .. } => assert_eq!(t, trip_id),
        other => panic!("expected the trip resent on b, got {other:?}"),
    }
    assert_eq!(on_a.expect_closed().await, Some(1008));

    // The trip completes on b, and the driver is free everywhere.
    on_b.send(json!({"type": "trip_completed", "trip_id": trip_id}))
        .await;
    on_b.send(json!({"type": "location", "lat": LAT, "lon": LON}))
        .await;
    on_b.send(json!({"type": "available"})).await;
    on_b.expect_silence(Duration::from_millis(300)).await; // no unknown_trip
    wait_for_available(&a, 1).await;
    match_one(&mut rider, 2, on_b).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_holds_an_undecided_accept_until_it_can_tell() {
    let redis = RedisServer::start();
    // Short Redis timeouts, a long offer (and lock) and search: the offer
    // outlives every retry, and the search outlives the pause.
    let a = node(&[&redis], "a", |c| {
        c.redis_timeout_ms = 100;
        c.offer_timeout_ms = 20_000;
        c.search_timeout_ms = 30_000;
    })
    .await;
    let mut driver = Client::available_driver(&a, "d", LAT, LON).await;
    // A second driver farther away, for the search to try next.
    let mut second = Client::available_driver(&a, "d2", LAT + 0.01, LON).await;
    wait_for_available(&a, 2).await;
    let mut rider = Client::rider(&a, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    let (offer_id, _) = driver.expect_offer().await;

    // Redis stops answering (paused, not gone: every call waits out its
    // timeout). Whether the accept booked can't be told: the driver is held,
    // and told nothing, until Redis can tell; nobody else is offered it and
    // the rider waits for that answer.
    redis.pause();
    driver.accept(offer_id).await;
    driver.expect_silence(Duration::from_millis(1_500)).await;
    second.expect_silence(Duration::from_millis(1)).await;
    rider.expect_silence(Duration::from_millis(1)).await;

    // Redis answers again. The calls it held run now; the settle the driver
    // keeps asking tells whether the confirm landed. Either way the driver
    // and the rider hear the same: a trip with d, or d's offer expired and
    // the search goes on (to d2).
    redis.resume();
    match next_answer(&mut driver).await {
        ServerMessage::TripAssigned { .. } => match rider.recv_within(CROSS_NODE).await {
            Some(ServerMessage::Matched { driver_id, .. }) => assert_eq!(&*driver_id, "d"),
            other => panic!("expected matched with d, got {other:?}"),
        },
        ServerMessage::Error { code, .. } => {
            assert_eq!(code.as_str(), "offer_expired");
            let (offer_id, _) = second.expect_offer().await;
            second.accept(offer_id).await;
            assert!(matches!(
                next_answer(&mut second).await,
                ServerMessage::TripAssigned { .. }
            ));
            match rider.recv_within(CROSS_NODE).await {
                Some(ServerMessage::Matched { driver_id, .. }) => assert_eq!(&*driver_id, "d2"),
                other => panic!("expected matched with d2, got {other:?}"),
            }
        }
        other => panic!("expected the accept decided, got {other:?}"),
    }
    a.shutdown().await;
}

#[test]
fn node_ids_outside_the_alphabet_are_refused_at_start() {
    for bad in ["", "a b", "a/b", "a:b", &"n".repeat(65), "nöde"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ridelock"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--redis",
                "redis://127.0.0.1:1",
                "--node-id",
                bad,
            ])
            .output()
            .expect("ridelock runs");
        assert!(!output.status.success(), "{bad:?} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--node-id"), "{bad:?}: {stderr}");
    }
}

/// Sends a request for `vehicles` vehicles; `searching` must follow.
async fn request_group(rider: &mut Client, request_id: &str, vehicles: u8) {
    rider
        .send(json!({
            "type": "request_ride", "request_id": request_id,
            "pickup": {"lat": LAT, "lon": LON}, "vehicles": vehicles,
        }))
        .await;
    rider.expect_searching(request_id).await;
}

/// The next message must be an offer of a group of `size`; its id.
async fn expect_group_offer(driver: &mut Client, size: u8) -> u64 {
    match driver.recv_within(CROSS_NODE).await {
        Some(ServerMessage::Offer {
            offer_id,
            group_size,
            ..
        }) => {
            assert_eq!(group_size, size, "{}: the offer's group size", driver.id);
            offer_id
        }
        other => panic!("{}: expected a group offer, got {other:?}", driver.id),
    }
}

/// The rider's final message for its group, skipping its progress.
async fn group_final(rider: &mut Client) -> ServerMessage {
    loop {
        match rider.recv_within(CROSS_NODE).await {
            Some(ServerMessage::GroupProgress { .. }) => continue,
            Some(other) => return other,
            None => panic!("{}: no final message within {CROSS_NODE:?}", rider.id),
        }
    }
}

/// The driver's last word on a held offer: its trip (`Some`) or the hold
/// let go (`None`), skipping `waiting_for_group`.
async fn hold_outcome(driver: &mut Client, offer: u64) -> Option<u64> {
    loop {
        match driver.recv_within(CROSS_NODE).await {
            Some(ServerMessage::WaitingForGroup { offer_id, .. }) => assert_eq!(offer_id, offer),
            Some(ServerMessage::TripAssigned {
                offer_id, trip_id, ..
            }) => {
                assert_eq!(offer_id, offer);
                return Some(trip_id);
            }
            Some(ServerMessage::OfferRevoked { offer_id, reason }) => {
                assert_eq!(offer_id, offer);
                assert_eq!(reason, RevokeReason::GroupIncomplete);
                return None;
            }
            other => panic!("{}: expected the hold's outcome, got {other:?}", driver.id),
        }
    }
}

/// The drivers' current trips in Redis: (driver, trip id) for each key.
async fn current_trips(redis: &RedisServer) -> Vec<(String, u64)> {
    let mut raw = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("ridelock:driver:*:trip")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut trips = Vec::new();
    for key in keys {
        let value: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        let json = value.split_once('|').expect("owner|record").1;
        let record: serde_json::Value = serde_json::from_str(json).unwrap();
        let driver = key.split(':').nth(2).unwrap().to_string();
        trips.push((driver, record["trip_id"].as_u64().unwrap()));
    }
    trips.sort();
    trips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_drivers_on_two_nodes_is_booked_whole() {
    let redis = RedisServer::start();
    let a = node(&[&redis], "a", |_| {}).await;
    let b = node(&[&redis], "b", |_| {}).await;
    let mut near = Client::available_driver(&a, "d1", LAT + 0.001, LON).await;
    let mut far = Client::available_driver(&b, "d2", LAT + 0.002, LON).await;
    wait_for_available(&a, 2).await;

    let mut rider = Client::rider(&a, "r1").await;
    request_group(&mut rider, "g", 2).await;
    let near_offer = expect_group_offer(&mut near, 2).await;
    let far_offer = expect_group_offer(&mut far, 2).await;
    // The driver on the other node accepts first: held there, its lock kept
    // in Redis for the group, and the rider hears of it across nodes.
    far.accept(far_offer).await;
    match far.recv_within(CROSS_NODE).await {
        Some(ServerMessage::WaitingForGroup {
            accepted,
            group_size,
            ..
        }) => assert_eq!((accepted, group_size), (1, 2)),
        other => panic!("expected waiting_for_group, got {other:?}"),
    }
    let lock_ttl_ms: i64 = {
        let mut raw = redis::Client::open(redis.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("PTTL")
            .arg("ridelock:driver:d2:lock")
            .query_async(&mut raw)
            .await
            .unwrap()
    };
    assert!(
        lock_ttl_ms > 10_000,
        "a held driver's lock lasts until the group's hold ends, not the offer's: {lock_ttl_ms} ms"
    );
    near.accept(near_offer).await;

    let drivers = match group_final(&mut rider).await {
        ServerMessage::Matched { drivers, .. } => drivers,
        other => panic!("expected matched, got {other:?}"),
    };
    let names: Vec<&str> = drivers.iter().map(|d| &*d.driver_id).collect();
    assert_eq!(names, ["d1", "d2"], "every member, nearest first");
    let near_trip = hold_outcome(&mut near, near_offer).await;
    let far_trip = hold_outcome(&mut far, far_offer).await;
    assert_eq!(near_trip, Some(drivers[0].trip_id));
    assert_eq!(far_trip, Some(drivers[1].trip_id));
    // Both trips are in Redis, under each driver's lock.
    assert_eq!(
        current_trips(&redis).await,
        [
            ("d1".to_string(), drivers[0].trip_id),
            ("d2".to_string(), drivers[1].trip_id)
        ]
    );
    // The trip on the other node completes there, as any trip.
    far.send(json!({"type": "trip_completed", "trip_id": drivers[1].trip_id}))
        .await;
    far.send(json!({"type": "available"})).await;
    wait_for_available(&a, 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_two_nodes_racing_for_three_drivers_complete_one() {
    let redis = RedisServer::start();
    let short = |c: &mut ridelock::Config| c.search_timeout_ms = 3_000;
    let a = node(&[&redis], "a", short).await;
    let b = node(&[&redis], "b", short).await;
    let drivers = vec![
        Client::available_driver(&a, "d1", LAT + 0.001, LON).await,
        Client::available_driver(&b, "d2", LAT + 0.0015, LON).await,
        Client::available_driver(&a, "d3", LAT + 0.002, LON).await,
    ];
    wait_for_available(&a, 3).await;
    wait_for_available(&b, 3).await;
    let mut r1 = Client::rider(&a, "r1").await;
    let mut r2 = Client::rider(&b, "r2").await;
    // Both at once, one on each node: neither node knows the other's.
    for rider in [&mut r1, &mut r2] {
        rider
            .send(json!({
                "type": "request_ride", "request_id": "g",
                "pickup": {"lat": LAT, "lon": LON}, "vehicles": 2,
            }))
            .await;
    }
    r1.expect_searching("g").await;
    r2.expect_searching("g").await;

    // Every driver accepts whatever it is offered (an older group may take
    // a driver from a younger one, which then gets another offer).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = drivers
        .into_iter()
        .map(|mut driver| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut trips = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match driver.recv_within(Duration::from_millis(100)).await {
                        Some(ServerMessage::Offer { offer_id, .. }) => {
                            driver.accept(offer_id).await
                        }
                        Some(ServerMessage::TripAssigned { trip_id, .. }) => trips.push(trip_id),
                        _ => {}
                    }
                }
                (driver.id.clone(), trips)
            })
        })
        .collect();
    let mut matched = Vec::new();
    let mut failed = 0;
    for rider in [&mut r1, &mut r2] {
        match group_final(rider).await {
            ServerMessage::Matched { drivers, .. } => {
                assert_eq!(drivers.len(), 2, "never a partial match");
                matched.extend(
                    drivers
                        .into_iter()
                        .map(|d| (d.driver_id.to_string(), d.trip_id)),
                );
            }
            ServerMessage::NoDriver { .. } => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (matched.len(), failed),
        (2, 1),
        "one group of two, one failed"
    );
    // No driver in both: the two booked are on exactly those trips, the
    // third on none, and Redis holds exactly the two trips.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        let (driver, trips) = task.await.unwrap();
        let booked: Vec<u64> = matched
            .iter()
            .filter(|(d, _)| *d == driver)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(trips, booked, "{driver}");
    }
    matched.sort();
    assert_eq!(current_trips(&redis).await, matched);
    a.shutdown().await;
    b.shutdown().await;
}

/// Wound-wait across nodes: an older group on node a holds one driver and
/// waits for a second, which a younger group on node b holds (it was out of
/// the older group's reach when b took it). Neither node sees the other's
/// group; without the rule both would wait for their deadlines. When the
/// older group's reach grows to that driver, it asks the other nodes to
/// wound for it: b takes the driver back (`preempted`), its group never
/// asks it again, and the older group completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_group_takes_a_driver_from_a_younger_group_on_another_node() {
    let redis = RedisServer::start();
    let reach = |c: &mut ridelock::Config| {
        c.search_timeout_ms = 8_000;
        c.radius_m = 1_000.0;
        c.radius_step_m = 2_000.0;
        c.radius_step_ms = 2_000;
    };
    let a = node(&[&redis], "a", reach).await;
    let b = node(&[&redis], "b", reach).await;
    // 2.5 km north: where the younger group's rider waits, beyond the older
    // one's first radius.
    let north = LAT + 2_500.0 / 111_195.0;

    let mut d1 = Client::available_driver(&a, "d1", LAT + 0.001, LON).await;
    wait_for_available(&a, 1).await;
    let mut older = Client::rider(&a, "r1").await;
    request_group(&mut older, "g", 2).await;
    let first = expect_group_offer(&mut d1, 2).await;
    d1.accept(first).await;

    let mut younger = Client::rider(&b, "r2").await;
    younger
        .send(json!({
            "type": "request_ride", "request_id": "g",
            "pickup": {"lat": north, "lon": LON}, "vehicles": 2,
        }))
        .await;
    younger.expect_searching("g").await;
    let mut d2 = Client::available_driver(&b, "d2", north, LON).await;
    let taken = expect_group_offer(&mut d2, 2).await;
    d2.accept(taken).await;
    match d2.recv_within(CROSS_NODE).await {
        Some(ServerMessage::WaitingForGroup { offer_id, .. }) => assert_eq!(offer_id, taken),
        other => panic!("expected d2 held for the younger group, got {other:?}"),
    }

    // The older group's reach grows to d2: b takes it back for it.
    match d2.recv_within(CROSS_NODE).await {
        Some(ServerMessage::OfferRevoked { offer_id, reason }) => {
            assert_eq!((offer_id, reason), (taken, RevokeReason::Preempted));
        }
        other => panic!("expected d2 taken from the younger group, got {other:?}"),
    }
    let second = expect_group_offer(&mut d2, 2).await;
    d2.accept(second).await;
    let drivers = match group_final(&mut older).await {
        ServerMessage::Matched { drivers, .. } => drivers,
        other => panic!("expected the older group matched, got {other:?}"),
    };
    let names: Vec<&str> = drivers.iter().map(|d| &*d.driver_id).collect();
    assert_eq!(names, ["d1", "d2"]);
    assert!(hold_outcome(&mut d1, first).await.is_some());
    assert!(hold_outcome(&mut d2, second).await.is_some());
    // The younger group never gets d2 back, and fails at its deadline.
    match group_final(&mut younger).await {
        ServerMessage::NoDriver { .. } => {}
        other => panic!("expected the younger group to fail, got {other:?}"),
    }
    d2.expect_silence(Duration::from_millis(300)).await;
    a.shutdown().await;
    b.shutdown().await;
}
