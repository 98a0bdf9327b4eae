//! The Redis lock scripts and the Redlock quorum against real `redis-server`
//! processes, each started by the test on a free port (so tests can kill them)
//! and killed when the test ends.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use ridelock::cluster::redlock::AttemptFailed;
use ridelock::cluster::store::{
    GroupMember, LockError, LockServer, Redlock, Renewal, Settled, TripRecord,
};
use ridelock::location::LatLon;

const TIMEOUT: Duration = Duration::from_millis(200);

/// A trip record for a confirm under `owner`, for a rider on node "a".
fn trip(owner: &str, trip_id: u64) -> TripRecord {
    TripRecord {
        owner: owner.to_string(),
        trip_id,
        offer_id: 1,
        fencing_token: 1,
        rider_id: "r".into(),
        request_id: "q".into(),
        pickup: LatLon::new(52.52, 13.405).unwrap(),
        rider_node: "a".into(),
        rider_is_remote: true,
        rider_incarnation: 1,
    }
}

/// Marks node "a" (the riders' node in these tests) alive on every server:
/// a confirm needs its rider's node alive.
async fn node_a_alive(servers: &[&RedisServer]) {
    for server in servers {
        let mut raw = redis::Client::open(server.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("ridelock:node:a:alive")
            .arg(1)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
}

/// The lock server's clock in microseconds, as its `TIME` says.
async fn server_clock_us(url: &str) -> u64 {
    let mut raw = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut raw).await.unwrap();
    secs * 1_000_000 + micros
}

#[tokio::test]
async fn a_driver_is_locked_once_and_tokens_grow() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    let before = server_clock_us(&redis.url).await;
    let first = server
        .try_acquire("d1", "node-a:1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    // Never below the server's clock: tokens keep growing even after the
    // counter is lost.
    assert!(first >= before, "{first} < {before}");
    // Held: nobody else gets it, whatever token floor they bring.
    assert_eq!(
        server.try_acquire("d1", "node-b:2", ttl, 0).await.unwrap(),
        None
    );
    assert_eq!(
        server.try_acquire("d1", "node-a:1", ttl, 0).await.unwrap(),
        None
    );
    // Another driver is another lock.
    assert!(server
        .try_acquire("d2", "node-b:2", ttl, 0)
        .await
        .unwrap()
        .is_some());

    assert!(server.release("d1", "node-a:1").await.unwrap());
    let second = server
        .try_acquire("d1", "node-b:3", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(second > first);
    // A floor above the counter and the clock lifts the token past it.
    assert!(server.release("d1", "node-b:3").await.unwrap());
    let floor = second + 1_000_000_000;
    assert_eq!(
        server
            .try_acquire("d1", "node-c:4", ttl, floor)
            .await
            .unwrap(),
        Some(floor + 1)
    );
}

#[tokio::test]
async fn only_the_owner_releases_or_confirms() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    node_a_alive(&[&redis]).await;
    let ttl = Duration::from_secs(15);
    server
        .try_acquire("d", "mine", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(!server.release("d", "theirs").await.unwrap());
    assert!(!server.confirm("d", &trip("theirs", 1)).await.unwrap());
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    assert!(server.confirm("d", &trip("mine", 1)).await.unwrap());
    // Confirmed: the lock is kept for the trip, renewable only by its owner.
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    assert_eq!(
        server.renew("d", &trip("mine", 1), true).await.unwrap(),
        Renewal::Kept
    );
    assert_eq!(
        server.renew("d", &trip("theirs", 1), true).await.unwrap(),
        Renewal::Lost
    );
    // The trip ends: the owner finishes it, and the next offer may lock.
    assert!(!server.finish("d", "theirs", 1).await.unwrap());
    assert!(server.finish("d", "mine", 1).await.unwrap());
    assert_eq!(
        server.renew("d", &trip("mine", 1), true).await.unwrap(),
        Renewal::Finished,
        "a late renewal hears the trip is over and takes nothing back"
    );
    let next = server
        .try_acquire("d", "next", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(server.release("d", "next").await.unwrap());

    // Lost (a restart without persistence): the next renewal takes the
    // trip's lock back (the other servers of a quorum still hold it), and
    // tokens go on growing from the server's clock.
    let mut raw = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let held = server
        .try_acquire("d", "mine2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(held > next);
    assert!(server.confirm("d", &trip("mine2", 2)).await.unwrap());
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    assert_eq!(
        server.renew("d", &trip("mine2", 2), false).await.unwrap(),
        Renewal::Lost,
        "an actor the app has left takes nothing back"
    );
    assert_eq!(
        server.renew("d", &trip("mine2", 2), true).await.unwrap(),
        Renewal::Kept
    );
    assert_eq!(
        server.try_acquire("d", "theirs2", ttl, 0).await.unwrap(),
        None,
        "repaired: the driver is still on its trip"
    );
    assert_eq!(
        server.current_trip("d").await.unwrap().map(|t| t.trip_id),
        Some(2)
    );
    assert!(server.finish("d", "mine2", 2).await.unwrap());
    let after = server
        .try_acquire("d", "next2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(after > held, "{after} after {held}");
}

#[tokio::test]
async fn an_expired_lock_is_free_and_its_late_owner_can_do_nothing() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    node_a_alive(&[&redis]).await;
    server
        .try_acquire("d", "slow-node:1", Duration::from_millis(50), 0)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let token = server
        .try_acquire("d", "fast-node:2", Duration::from_secs(15), 0)
        .await
        .unwrap();
    assert!(token.is_some());
    // The stalled owner wakes up: its confirm and release touch nothing.
    assert!(!server.confirm("d", &trip("slow-node:1", 1)).await.unwrap());
    assert!(!server.release("d", "slow-node:1").await.unwrap());
    assert!(server.confirm("d", &trip("fast-node:2", 2)).await.unwrap());
}

#[tokio::test]
async fn an_unreachable_server_at_start_is_a_clear_error() {
    // A port bound but not listening: connections to it are refused, and
    // nobody else can take it while the test runs.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = held.local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}/");
    let error = match LockServer::connect(&url, TIMEOUT).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
}

#[tokio::test]
async fn redlock_goes_on_by_majority_and_refuses_without_one() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let redlock = Redlock::connect(&urls, TIMEOUT).await.unwrap();
    node_a_alive(&servers.iter().collect::<Vec<_>>()).await;
    let ttl = Duration::from_secs(15);

    let grant = redlock.acquire("d", "a:1", ttl, 0).await.unwrap();
    assert_eq!(grant.granted, 3);
    assert!(grant.validity > Duration::from_secs(14) && grant.validity < ttl);
    assert!(matches!(
        redlock.acquire("d", "b:2", ttl, 0).await,
        Err(LockError::Refused {
            reason: AttemptFailed::NoQuorum { granted: 0, .. },
            ..
        })
    ));
    assert_eq!(redlock.release("d", "a:1").await, 3);

    // One of three gone: locking goes on by majority.
    servers[0].kill();
    let first = grant.fencing_token;
    let grant = redlock
        .acquire("d", "a:3", ttl, grant.fencing_token)
        .await
        .unwrap();
    assert_eq!(grant.granted, 2);
    assert!(grant.fencing_token > first);
    assert_eq!(redlock.confirm("d", &trip("a:3", 5)).await, Some(true));
    assert_eq!(
        redlock.renew("d", &trip("a:3", 5), true).await,
        Some(Renewal::Kept)
    );
    assert_eq!(
        redlock
            .current_trip("d")
            .await
            .map(|t| t.map(|t| t.trip_id)),
        Ok(Some(5))
    );
    assert!(redlock.finish("d", "a:3", 5).await);
    assert_eq!(redlock.current_trip("d").await, Ok(None));
    assert_eq!(
        redlock.renew("d", &trip("a:3", 5), true).await,
        Some(Renewal::Finished),
        "the trip is over"
    );

    // Two of three gone: no majority, and the one grant is given back.
    servers[1].kill();
    match redlock.acquire("d", "a:4", ttl, 0).await {
        Err(LockError::Refused {
            reason:
                AttemptFailed::NoQuorum {
                    granted: 1,
                    servers: 3,
                    needed: 2,
                },
            unreachable: 2,
        }) => {}
        other => panic!("expected no quorum, got {other:?}"),
    }
    let survivor = LockServer::connect(&servers[2].url, TIMEOUT).await.unwrap();
    assert_eq!(
        survivor
            .try_acquire("d", "other", ttl, 0)
            .await
            .unwrap()
            .map(|t| t > 0),
        Some(true),
        "the failed attempt must have released its grant"
    );
}

#[tokio::test]
async fn a_lost_server_refuses_then_recovers() {
    let mut redis = RedisServer::start();
    let url = redis.url.clone();
    let redlock = Redlock::connect(std::slice::from_ref(&url), TIMEOUT)
        .await
        .unwrap();
    let ttl = Duration::from_secs(15);
    assert!(redlock.acquire("d", "a:1", ttl, 0).await.is_ok());

    redis.kill();
    assert!(matches!(
        redlock.acquire("e", "a:2", ttl, 0).await,
        Err(LockError::Refused { unreachable: 1, .. })
    ));

    // Back on the same port (empty: no persistence): locks are granted again.
    let _restarted = RedisServer::at(redis.path());
    let mut recovered = false;
    for _ in 0..100 {
        if redlock.acquire("e", "a:3", ttl, 0).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "locking did not resume after redis came back");
}

#[tokio::test]
async fn settling_tells_what_became_of_a_lock_and_stops_late_actors() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    node_a_alive(&[&redis]).await;
    let ttl = Duration::from_secs(15);

    // Still held: settling frees it, and neither a confirm nor a new acquire
    // under that owner can succeed afterwards.
    server
        .try_acquire("d", "a/1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.settle("d", "a/1").await.unwrap(), None);
    assert!(!server.confirm("d", &trip("a/1", 7)).await.unwrap());
    assert_eq!(server.try_acquire("d", "a/1", ttl, 0).await.unwrap(), None);
    // Someone else may lock the driver at once.
    assert!(server
        .try_acquire("d", "b/1", ttl, 0)
        .await
        .unwrap()
        .is_some());
    assert!(server.release("d", "b/1").await.unwrap());

    // Accepted before the settle: the settle finds the trip.
    server
        .try_acquire("d", "a/2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(server.confirm("d", &trip("a/2", 42)).await.unwrap());
    assert_eq!(server.settle("d", "a/2").await.unwrap(), Some(42));

    // Never taken (the request was lost on the way): settled before the
    // late request arrives, which is then refused.
    assert_eq!(server.settle("d", "a/3").await.unwrap(), None);
    assert_eq!(server.try_acquire("d", "a/3", ttl, 0).await.unwrap(), None);
}

#[tokio::test]
async fn redlock_settles_by_majority() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let redlock = Redlock::connect(&urls, TIMEOUT).await.unwrap();
    node_a_alive(&servers.iter().collect::<Vec<_>>()).await;
    let ttl = Duration::from_secs(15);

    redlock.acquire("d", "a/1", ttl, 0).await.unwrap();
    assert_eq!(redlock.confirm("d", &trip("a/1", 9)).await, Some(true));
    assert_eq!(redlock.settle("d", "a/1").await, Some(Settled::Trip(9)));
    assert_eq!(redlock.release("d", "a/1").await, 3, "the trip ended");

    redlock.acquire("d", "a/2", ttl, 0).await.unwrap();
    servers[0].kill();
    // One down: the two that answer make a majority without a trip.
    assert_eq!(redlock.settle("d", "a/2").await, Some(Settled::Dead));
    assert!(
        redlock.confirm("d", &trip("a/2", 10)).await == Some(false),
        "settled: too late to book"
    );

    // A trip confirmed on a majority that includes a server now down: the
    // one left with it can't make a majority alone, and absence can't be
    // proved either, so the settle is undecided rather than wrong.
    redlock.acquire("d", "a/3", ttl, 0).await.unwrap();
    assert_eq!(redlock.confirm("d", &trip("a/3", 11)).await, Some(true));
    servers[1].kill();
    assert_eq!(redlock.settle("d", "a/3").await, None);
    // Likewise a confirm asked again: one server alone can't tell.
    assert_eq!(redlock.confirm("d", &trip("a/3", 11)).await, None);
}

#[tokio::test]
async fn a_confirm_needs_the_riders_node_alive() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    server
        .try_acquire("d", "a/1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    // Node a's liveness key is missing: its rider is gone, nobody would be
    // told of the trip.
    assert!(!server.confirm("d", &trip("a/1", 1)).await.unwrap());
    node_a_alive(&[&redis]).await;
    assert!(server.confirm("d", &trip("a/1", 1)).await.unwrap());
    assert_eq!(
        server.current_trip("d").await.unwrap().map(|t| t.owner),
        Some("a/1".to_string())
    );
    // Only the trip's owner finishes it.
    assert!(!server.finish("d", "a/2", 1).await.unwrap());
    assert!(server.current_trip("d").await.unwrap().is_some());
    assert!(server.finish("d", "a/1", 1).await.unwrap());
    assert_eq!(server.current_trip("d").await.unwrap(), None);
}

#[tokio::test]
async fn the_trip_record_refuses_an_older_fencing_token() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    node_a_alive(&[&redis]).await;
    let ttl = Duration::from_secs(15);
    let with_token = |owner: &str, token: u64| TripRecord {
        fencing_token: token,
        ..trip(owner, token)
    };
    // A trip booked with token 100 sets the driver's fence.
    server
        .try_acquire("d", "a/1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(server.confirm("d", &with_token("a/1", 100)).await.unwrap());
    assert!(server.finish("d", "a/1", 1).await.unwrap());
    // A later lock whose confirm carries an older token (a node acting on
    // what it knew before) is refused, though it owns the lock.
    server
        .try_acquire("d", "a/2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(!server.confirm("d", &with_token("a/2", 99)).await.unwrap());
    assert_eq!(server.current_trip("d").await.unwrap(), None);
    // The same token again (a confirm asked twice) and a newer one pass.
    assert!(server.confirm("d", &with_token("a/2", 100)).await.unwrap());
    assert!(server.confirm("d", &with_token("a/2", 101)).await.unwrap());
}

#[tokio::test]
async fn a_finish_heard_by_one_server_ends_the_trip_for_its_holder() {
    // The simulation found it: a finish reached one server of three, the
    // finishing node died, and the node still holding the trip renewed it
    // (the two other servers kept it) for as long as the trip could last.
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let redlock = Redlock::connect(&urls, TIMEOUT).await.unwrap();
    node_a_alive(&servers.iter().collect::<Vec<_>>()).await;
    redlock
        .acquire("d", "a:1", Duration::from_secs(15), 0)
        .await
        .unwrap();
    assert_eq!(redlock.confirm("d", &trip("a:1", 7)).await, Some(true));
    assert_eq!(
        redlock.renew("d", &trip("a:1", 7), true).await,
        Some(Renewal::Kept)
    );

    let one = LockServer::connect(&servers[0].url, TIMEOUT).await.unwrap();
    assert!(one.finish("d", "a:1", 7).await.unwrap());
    assert_eq!(
        redlock.renew("d", &trip("a:1", 7), true).await,
        Some(Renewal::Finished),
        "the holder lets go"
    );
}

/// A lock's time to live on `server`, in milliseconds (-2: no such key).
async fn lock_pttl(url: &str, driver: &str) -> i64 {
    let mut raw = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("PTTL")
        .arg(format!("ridelock:driver:{driver}:lock"))
        .query_async(&mut raw)
        .await
        .unwrap()
}

/// How long a booked group's locks are kept in these tests.
const KEEP: Duration = Duration::from_secs(45);

/// Member `driver` of a group, under `owner` with `token`, on trip `trip_id`.
fn member(driver: &str, owner: &str, token: u64, trip_id: u64) -> GroupMember {
    GroupMember {
        driver: driver.into(),
        trip: TripRecord {
            fencing_token: token,
            rider_is_remote: false,
            ..trip(owner, trip_id)
        },
    }
}

#[tokio::test]
async fn a_hold_keeps_only_its_owners_lock_for_the_group() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let offer = Duration::from_secs(2);
    let hold = Duration::from_secs(40);
    let token = server
        .try_acquire("d", "a/1", offer, 0)
        .await
        .unwrap()
        .unwrap();

    // Another owner, or an older token than the driver's fence: refused,
    // and the lock keeps its short life.
    assert!(!server.hold("d", "b/1", hold, token).await.unwrap());
    let left = lock_pttl(&redis.url, "d").await;
    assert!(left > 0 && left <= 2_000, "{left} ms left");
    assert!(server.hold("d", "a/1", hold, token).await.unwrap());
    let left = lock_pttl(&redis.url, "d").await;
    assert!(left > 30_000, "held for the group: {left} ms left");

    // Once its requester has settled it, the owner can't hold it again.
    assert_eq!(server.settle("d", "a/1").await.unwrap(), None);
    assert!(!server.hold("d", "a/1", hold, token).await.unwrap());
}

#[tokio::test]
async fn a_group_is_booked_whole_or_not_at_all() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    let t1 = server
        .try_acquire("d1", "a/1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    let t2 = server
        .try_acquire("d2", "a/2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    let group = [member("d1", "a/1", t1, 11), member("d2", "a/2", t2, 12)];

    // One member's lock is gone (its hold ran out and was settled): nothing
    // is booked, not even the member whose lock still holds.
    assert_eq!(server.settle("d2", "a/2").await.unwrap(), None);
    assert!(!server.confirm_group(&group, KEEP).await.unwrap());
    assert_eq!(server.current_trip("d1").await.unwrap(), None);
    assert_eq!(server.settle("d1", "a/1").await.unwrap(), None, "no trip");

    // Every lock holds: every trip is booked, and asking again says so.
    let t3 = server
        .try_acquire("d1", "a/3", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    let t4 = server
        .try_acquire("d2", "a/4", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    let group = [member("d1", "a/3", t3, 13), member("d2", "a/4", t4, 14)];
    assert!(server.confirm_group(&group, KEEP).await.unwrap());
    assert!(
        server.confirm_group(&group, KEEP).await.unwrap(),
        "idempotent"
    );
    // Kept past the members' holds (`KEEP`), not a trip lock's 30 s: a
    // member whose news is lost finds its lock when its hold ends.
    let left = lock_pttl(&redis.url, "d1").await;
    assert!(left > 40_000, "{left} ms left");
    let current = server.current_trip("d2").await.unwrap().unwrap();
    assert_eq!((current.trip_id, current.owner.as_str()), (14, "a/4"));
    // A member's hold running out after the booking finds its trip.
    assert_eq!(server.settle("d1", "a/3").await.unwrap(), Some(13));
    // The trips hold the drivers: nobody else locks them.
    assert_eq!(server.try_acquire("d2", "b/1", ttl, 0).await.unwrap(), None);

    // A member whose token is older than its driver's fence (a newer lock
    // booked it since) fails the whole group.
    server.finish("d1", "a/3", 13).await.unwrap();
    server.finish("d2", "a/4", 14).await.unwrap();
    let t5 = server
        .try_acquire("d1", "a/5", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    server
        .try_acquire("d2", "a/6", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    // Token 1: older than the fence the booking above set (t4).
    let stale = [member("d1", "a/5", t5, 15), member("d2", "a/6", 1, 16)];
    assert!(!server.confirm_group(&stale, KEEP).await.unwrap());
    assert_eq!(server.current_trip("d1").await.unwrap(), None);
}

#[tokio::test]
async fn redlock_books_a_group_by_majority() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let redlock = Redlock::connect(&urls, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    let g1 = redlock.acquire("d1", "a/1", ttl, 0).await.unwrap();
    let g2 = redlock.acquire("d2", "a/2", ttl, 0).await.unwrap();
    let hold = Duration::from_secs(40);
    assert_eq!(
        redlock.hold("d1", "a/1", hold, g1.fencing_token).await,
        Some(true)
    );
    assert_eq!(
        redlock.hold("d2", "a/2", hold, g2.fencing_token).await,
        Some(true)
    );
    let group = [
        member("d1", "a/1", g1.fencing_token, 21),
        member("d2", "a/2", g2.fencing_token, 22),
    ];
    servers[2].kill();
    assert_eq!(redlock.confirm_group(&group, KEEP).await, Some(true));
    assert_eq!(redlock.settle("d2", "a/2").await, Some(Settled::Trip(22)));

    // A second server down: one alone can't tell either way.
    servers[1].kill();
    assert_eq!(redlock.confirm_group(&group, KEEP).await, None);
    assert_eq!(
        redlock.hold("d1", "a/1", hold, g1.fencing_token).await,
        None
    );
}
