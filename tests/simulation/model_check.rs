//! The simulation's lock-server model against a real `redis-server`: the
//! same random sequence of script calls on both must give the same answers,
//! or the simulation proves things about scripts the engine does not run.
//! Tokens are compared by order (the server's clock and the model's are not
//! the same clock), everything else exactly.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridelock::cluster::store::LockServer;
use ridelock::core::booking::{GroupMember, TripRecord};
use ridelock::location::LatLon;

use super::common::redis::RedisServer;
use super::redis::{Server, ServerOp, ServerReply};

const DRIVERS: [&str; 3] = ["d0", "d1", "d2"];
const OWNERS: [&str; 5] = ["a/1", "a/2", "b/3", "b/4", "c/5"];

fn record(owner: &str, trip_id: u64, fencing_token: u64) -> TripRecord {
    TripRecord {
        owner: owner.into(),
        trip_id,
        offer_id: 1,
        fencing_token,
        rider_id: "r".into(),
        request_id: "q".into(),
        pickup: LatLon::new(52.52, 13.405).unwrap(),
        rider_node: "a".into(),
        rider_is_remote: false,
        rider_incarnation: 0,
    }
}

/// What the real server says, in the model's terms.
async fn real(server: &LockServer, op: &ServerOp) -> ServerReply {
    match op {
        ServerOp::Acquire {
            driver,
            owner,
            ttl,
            floor,
        } => ServerReply::Token(
            server
                .try_acquire(driver, owner, *ttl, *floor)
                .await
                .unwrap(),
        ),
        ServerOp::Release { driver, owner } => {
            ServerReply::Done(server.release(driver, owner).await.unwrap())
        }
        ServerOp::Confirm { driver, record } => {
            ServerReply::Done(server.confirm(driver, record).await.unwrap())
        }
        ServerOp::Renew {
            driver,
            record,
            repair,
        } => ServerReply::Renewal(server.renew(driver, record, *repair).await.unwrap()),
        ServerOp::Finish {
            driver,
            owner,
            trip_id,
        } => ServerReply::Done(server.finish(driver, owner, *trip_id).await.unwrap()),
        ServerOp::Settle { driver, owner } => {
            ServerReply::Trip(server.settle(driver, owner).await.unwrap())
        }
        ServerOp::CurrentTrip { driver } => {
            ServerReply::Record(server.current_trip(driver).await.unwrap())
        }
        ServerOp::Hold {
            driver,
            owner,
            ttl,
            token,
        } => ServerReply::Done(server.hold(driver, owner, *ttl, *token).await.unwrap()),
        ServerOp::ConfirmGroup { members, keep } => {
            ServerReply::Done(server.confirm_group(members, *keep).await.unwrap())
        }
        ServerOp::Alive { .. } | ServerOp::IsAlive { .. } => unreachable!("not drawn"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_server_model_answers_as_the_lua_scripts_do() {
    let redis = RedisServer::start();
    let server = LockServer::connect(&redis.url, Duration::from_secs(2))
        .await
        .unwrap();
    let mut model = Server::new(Instant::now());
    let mut rng = StdRng::seed_from_u64(9);
    // The newest token each side issued per driver, to compare by order.
    let mut newest = std::collections::HashMap::new();
    for step in 0..2_000 {
        let driver = DRIVERS[rng.random_range(0..DRIVERS.len())].to_string();
        let owner = OWNERS[rng.random_range(0..OWNERS.len())].to_string();
        let trip_id = rng.random_range(1..4);
        let token = rng.random_range(0..3);
        let op = match rng.random_range(0..10) {
            0 | 1 => ServerOp::Acquire {
                driver,
                owner,
                // Long enough that nothing lapses while the test runs.
                ttl: Duration::from_secs(600),
                floor: 0,
            },
            2 => ServerOp::Release { driver, owner },
            3 => ServerOp::Confirm {
                driver,
                record: record(&owner, trip_id, token),
            },
            4 => ServerOp::Renew {
                driver,
                record: record(&owner, trip_id, token),
                repair: rng.random_bool(0.5),
            },
            5 => ServerOp::Finish {
                driver,
                owner,
                trip_id,
            },
            6 => ServerOp::Settle { driver, owner },
            7 => ServerOp::Hold {
                driver,
                owner,
                ttl: Duration::from_secs(600),
                token,
            },
            8 => {
                // Two or three distinct drivers, each under its own owner.
                let size = rng.random_range(2..=3);
                let first = rng.random_range(0..DRIVERS.len());
                let members = (0..size)
                    .map(|i| {
                        let owner = OWNERS[rng.random_range(0..OWNERS.len())];
                        GroupMember {
                            driver: DRIVERS[(first + i) % DRIVERS.len()].into(),
                            trip: record(owner, rng.random_range(1..4), rng.random_range(0..3)),
                        }
                    })
                    .collect();
                ServerOp::ConfirmGroup {
                    members,
                    keep: Duration::from_secs(600),
                }
            }
            _ => ServerOp::CurrentTrip { driver },
        };
        if rng.random_bool(0.01) {
            // A restart without the data, on both.
            let mut raw = redis::Client::open(redis.url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
            model.wipe();
        }
        let expected = model.apply(&op, Instant::now());
        let got = real(&server, &op).await;
        match (&expected, &got, &op) {
            (ServerReply::Token(a), ServerReply::Token(b), ServerOp::Acquire { driver, .. }) => {
                assert_eq!(
                    a.is_some(),
                    b.is_some(),
                    "step {step}: {op:?}: model {expected:?}, redis {got:?}"
                );
                if let (Some(a), Some(b)) = (a, b) {
                    let (last_a, last_b) = newest.get(driver).copied().unwrap_or((0, 0));
                    assert!(*a > last_a && *b > last_b, "step {step}: tokens must grow");
                    newest.insert(driver.clone(), (*a, *b));
                }
            }
            _ => assert_eq!(expected, got, "step {step}: {op:?}"),
        }
    }
}
