//! The Redis lock scripts and the Redlock quorum against real `redis-server`
//! processes, each started by the test on a free port (so tests can kill them)
//! and killed when the test ends.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ridelock::cluster::redlock::AttemptFailed;
use ridelock::cluster::store::{LockError, LockServer, Redlock};

const TIMEOUT: Duration = Duration::from_millis(200);

/// A private `redis-server` (no persistence), killed on drop.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::on_port(port)
    }

    fn on_port(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README)");
        // Owned from here on: a failed start below still kills it.
        let server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {port}");
    }

    fn port(&self) -> u16 {
        self.url
            .trim_start_matches("redis://127.0.0.1:")
            .trim_end_matches('/')
            .parse()
            .unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

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
    assert!(!server.confirm("d", "theirs", ttl).await.unwrap());
    assert_eq!(
        server.try_acquire("d", "theirs", ttl, 0).await.unwrap(),
        None
    );
    assert!(server.confirm("d", "mine", ttl).await.unwrap());
    assert!(server.release("d", "mine").await.unwrap());
    assert!(!server.release("d", "mine").await.unwrap());
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
    assert!(!server
        .confirm("d", "slow-node:1", Duration::from_secs(15))
        .await
        .unwrap());
    assert!(!server.release("d", "slow-node:1").await.unwrap());
    assert!(server
        .confirm("d", "fast-node:2", Duration::from_secs(15))
        .await
        .unwrap());
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
    assert!(redlock.confirm("d", "a:3", ttl).await);
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
