//! The Redis lock scripts and the Redlock quorum against real `redis-server`
//! processes, each started by the test on a free port (so tests can kill them)
//! and killed when the test ends.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::redis::RedisServer;
use ridelock::cluster::redlock::AttemptFailed;
use ridelock::cluster::store::{LockError, LockServer, Redlock, Settled};

const TIMEOUT: Duration = Duration::from_millis(200);

#[tokio::test]
async fn a_driver_is_locked_once_and_tokens_grow() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    let first = server.try_acquire("d1", "node-a:1", ttl, 0).await.unwrap();
    assert_eq!(first, Some(1));
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
    assert_eq!(
        server.try_acquire("d2", "node-b:2", ttl, 0).await.unwrap(),
        Some(1)
    );

    assert!(server.release("d1", "node-a:1").await.unwrap());
    let second = server.try_acquire("d1", "node-b:3", ttl, 0).await.unwrap();
    assert_eq!(second, Some(2));
    // A floor lifts a lagging counter.
    assert!(server.release("d1", "node-b:3").await.unwrap());
    assert_eq!(
        server.try_acquire("d1", "node-c:4", ttl, 40).await.unwrap(),
        Some(41)
    );
}

#[tokio::test]
async fn only_the_owner_releases_or_confirms() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
    let ttl = Duration::from_secs(15);
    server
        .try_acquire("d", "mine", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(!server.release("d", "theirs").await.unwrap());
    assert!(!server.confirm("d", "theirs", 1).await.unwrap());
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    assert!(server.confirm("d", "mine", 1).await.unwrap());
    // Confirmed: the lock is kept for the trip, renewable only by its owner.
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    assert!(server.renew("d", "mine").await.unwrap());
    assert!(!server.renew("d", "theirs").await.unwrap());
    // Lost (a restart without persistence): the trip's renewal takes it back.
    let mut raw = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    assert!(server.renew("d", "mine").await.unwrap());
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    // The trip ends: the owner releases it, and the next offer may lock.
    assert!(server.release("d", "mine").await.unwrap());
    assert!(!server.release("d", "mine").await.unwrap());
    assert_eq!(
        server.try_acquire("d", "next", ttl, 0).await.unwrap(),
        Some(1),
        "the counter went with the flush; the actor's floor is what lifts it"
    );
}

#[tokio::test]
async fn an_expired_lock_is_free_and_its_late_owner_can_do_nothing() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, TIMEOUT).await.unwrap();
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
    assert_eq!(token, Some(2));
    // The stalled owner wakes up: its confirm and release touch nothing.
    assert!(!server.confirm("d", "slow-node:1", 1).await.unwrap());
    assert!(!server.release("d", "slow-node:1").await.unwrap());
    assert!(server.confirm("d", "fast-node:2", 2).await.unwrap());
}

#[tokio::test]
async fn an_unreachable_server_at_start_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    let grant = redlock
        .acquire("d", "a:3", ttl, grant.fencing_token)
        .await
        .unwrap();
    assert_eq!(grant.granted, 2);
    assert_eq!(grant.fencing_token, 2);
    assert!(redlock.confirm("d", "a:3", 5).await);
    assert_eq!(redlock.renew("d", "a:3").await, 2);
    assert_eq!(redlock.release("d", "a:3").await, 2);

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
    let _restarted = RedisServer::on_port(redis.port());
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
    let ttl = Duration::from_secs(15);

    // Still held: settling frees it, and neither a confirm nor a new acquire
    // under that owner can succeed afterwards.
    server
        .try_acquire("d", "a/1", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.settle("d", "a/1").await.unwrap(), None);
    assert!(!server.confirm("d", "a/1", 7).await.unwrap());
    assert_eq!(server.try_acquire("d", "a/1", ttl, 0).await.unwrap(), None);
    // Someone else may lock the driver at once.
    assert_eq!(
        server.try_acquire("d", "b/1", ttl, 0).await.unwrap(),
        Some(2)
    );
    assert!(server.release("d", "b/1").await.unwrap());

    // Accepted before the settle: the settle finds the trip.
    server
        .try_acquire("d", "a/2", ttl, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(server.confirm("d", "a/2", 42).await.unwrap());
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
    let ttl = Duration::from_secs(15);

    redlock.acquire("d", "a/1", ttl, 0).await.unwrap();
    assert!(redlock.confirm("d", "a/1", 9).await);
    assert_eq!(redlock.settle("d", "a/1").await, Some(Settled::Trip(9)));
    assert_eq!(redlock.release("d", "a/1").await, 3, "the trip ended");

    redlock.acquire("d", "a/2", ttl, 0).await.unwrap();
    servers[0].kill();
    // One down: the two that answer make a majority without a trip.
    assert_eq!(redlock.settle("d", "a/2").await, Some(Settled::Dead));
    assert!(
        !redlock.confirm("d", "a/2", 10).await,
        "settled: too late to book"
    );

    // A trip confirmed on a majority that includes a server now down: the
    // one left with it can't make a majority alone, and absence can't be
    // proved either, so the settle is undecided rather than wrong.
    redlock.acquire("d", "a/3", ttl, 0).await.unwrap();
    assert!(redlock.confirm("d", "a/3", 11).await);
    servers[1].kill();
    assert_eq!(redlock.settle("d", "a/3").await, None);
}
