//! The simulator's smoke scenario against a real engine on an ephemeral port:
//! the simulator runs as its own process, the engine in this one.

use std::process::Command;

use ridelock::{Config, Engine};
use serde_json::Value;

/// A private `redis-server` for the cluster run (the engine's own test helper).
#[path = "../../tests/common/redis.rs"]
#[allow(dead_code)] // pausing and killing are for the engine's own tests
mod redis;

/// The engine's metrics recorder is global to the process: the runs take
/// turns so one's traffic never shows in the other's counts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The engine's test secret: the engines verify tokens, and the simulator
/// mints them from the same file.
fn secret_file() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/auth-secret").to_string()
}

fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        offer_timeout_ms: 300,
        search_timeout_ms: 2_000,
        auth_secret_file: Some(secret_file().into()),
        // Offers at once: the smoke runs are short, and batching is
        // tested on the engine's side.
        dispatch: ridelock::config::DispatchMode::Greedy,
        ..Config::default()
    }
}

/// Runs the smoke scenario against `engines` (one, or a cluster's nodes) and
/// checks its report, which it returns; `extra` flags go to the simulator.
async fn smoke(engines: &[&Engine], extra: &[&str]) -> Value {
    let _serial = SERIAL.lock().await;
    let report_path = std::env::temp_dir().join(format!(
        "ridelock-smoke-{}-{}.json",
        std::process::id(),
        engines.len()
    ));
    let url = engines
        .iter()
        .map(|e| format!("ws://{}", e.local_addr()))
        .collect::<Vec<_>>()
        .join(",");
    let pid = std::process::id().to_string();
    let json = report_path.to_str().unwrap().to_string();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_simulator"))
            .args([
                "--scenario",
                "smoke",
                "--url",
                &url,
                "--engine-pid",
                &pid,
                "--json",
                &json,
                "--quiet",
                "--auth-secret-file",
                &secret_file(),
            ])
            .args(&extra)
            .output()
            .expect("the simulator runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "simulator failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("VIOLATIONS"), "{stdout}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report_path);
    let n = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing: {report}"))
    };
    assert_eq!(n("violations"), 0, "{report}");
    assert!(report["violation_examples"].as_array().unwrap().is_empty());
    assert!(n("matches") >= 1, "{report}");
    assert!(n("requests") >= 20, "{report}");
    assert_eq!(n("acknowledged"), n("requests"), "{report}");
    // Every acknowledged request ended exactly once.
    assert_eq!(
        n("matches") + n("no_driver") + n("cancelled"),
        n("acknowledged"),
        "{report}"
    );
    // One accepted offer per match, and one more per extra vehicle of a
    // group.
    let accepted = report["offers"]["accepted"].as_u64().unwrap();
    if report["groups"]["requests"].as_u64() == Some(0) {
        assert_eq!(accepted, n("matches"), "{report}");
    } else {
        assert!(accepted >= n("matches") + report["groups"]["matched"].as_u64().unwrap());
    }
    assert_eq!(n("connected_drivers_peak"), 60);
    assert_eq!(n("connect_errors"), 0, "{report}");
    // Nothing the engine said surprised a client: offer_expired for an answer
    // that crossed the offer's end is the only error a driver may get, and a
    // rider none at all.
    assert_eq!(n("driver_errors"), 0, "{report}");
    assert_eq!(n("rider_errors"), 0, "{report}");
    assert_eq!(report["plan"]["authenticated"], true);
    assert!(report["matches_per_s"].as_f64().unwrap() > 0.0);
    let sent = report["location_updates_per_s"].as_f64().unwrap();
    let taken = report["engine_location_updates_per_s"].as_f64().unwrap();
    // In-process nodes share this process's recorder: each node's /metrics
    // shows every node's updates, and the simulator's sum over the nodes
    // counts them once per node.
    let taken = taken / engines.len() as f64;
    assert!(
        sent > 0.0 && (taken - sent).abs() <= sent * 0.5,
        "sent {sent}/s, engine took {taken}/s"
    );
    if engines.len() == 1 {
        // (Over in-process nodes the shared recorder skews this sum too.)
        assert_eq!(report["location_backlog"].as_i64(), Some(0), "{report}");
    }
    for latency in ["request_to_offer", "request_to_matched"] {
        let l = &report["latency_ms"][latency];
        let (p50, p99, max) = (
            l["p50"].as_f64().unwrap(),
            l["p99"].as_f64().unwrap(),
            l["max"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}: {l}");
    }
    // The engine's own request→offer over the steady phase, read off its
    // histogram as the phase began and ended.
    let engine = &report["engine_request_to_offer_ms"];
    let (p50, p99) = (engine["p50"].as_f64(), engine["p99"].as_f64());
    assert!(
        matches!((p50, p99), (Some(p50), Some(p99)) if 0.0 < p50 && p50 <= p99 && p99 < 60_000.0),
        "{engine}"
    );
    assert!(n("engine_rss_kib_peak") > 0);
    assert_eq!(report["plan"]["duration"], "3s");
    report
}

/// With two ops watchers beside the load: each gets a snapshot and then
/// batches, and the run is as clean as without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_scenario_finds_no_violations() {
    let engine = Engine::start(config()).await.expect("engine starts");
    let report = smoke(&[&engine], &["--ops-watchers", "2"]).await;
    let feed = &report["ops_feed"];
    assert!(feed["snapshot_bytes_max"].as_u64().unwrap() > 0, "{report}");
    // Two snapshots, and batches while drivers moved and rides were booked.
    assert!(feed["messages"].as_u64().unwrap() > 4, "{report}");
    assert!(feed["bytes_per_s"].as_f64().unwrap() > 0.0, "{report}");
    engine.shutdown().await;
}

/// A third of the requests ask for two or three vehicles: every `matched`
/// names as many drivers as asked, each of whom accepted, and no driver is
/// offered anything while held for a group (the live checker's rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_requests_find_no_violations() {
    let engine = Engine::start(config()).await.expect("engine starts");
    let report = smoke(&[&engine], &["--group-prob", "0.33", "--max-vehicles", "3"]).await;
    let groups = &report["groups"];
    assert!(groups["requests"].as_u64().unwrap() >= 3, "{report}");
    assert!(groups["matched"].as_u64().unwrap() >= 1, "{report}");
    let l = &report["latency_ms"]["group_request_to_matched"];
    assert!(
        l["count"].as_u64() == groups["matched"].as_u64(),
        "{report}"
    );
    engine.shutdown().await;
}

/// Riders pooled over a few long-lived connections, as engineers run it for
/// high rates: the per-rider limit is lifted for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_riders_find_no_violations() {
    let engine = Engine::start(Config {
        max_requests_per_rider: 10_000,
        ..config()
    })
    .await
    .expect("engine starts");
    smoke(
        &[&engine],
        &["--riders", "pooled", "--rider-connections", "4"],
    )
    .await;
    engine.shutdown().await;
}

/// Nodes "a" and "b" sharing `redis`.
async fn two_nodes(redis: &redis::RedisServer) -> (Engine, Engine) {
    let node = |id: &str| Config {
        redis: vec![redis.url.clone()],
        node_id: Some(id.into()),
        ..config()
    };
    let a = Engine::start(node("a")).await.expect("node a starts");
    let b = Engine::start(node("b")).await.expect("node b starts");
    (a, b)
}

/// The same city over two cluster nodes sharing a Redis: drivers and riders
/// alternate between the nodes, so most matches cross from one to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_scenario_over_two_cluster_nodes_finds_no_violations() {
    let redis = redis::RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    smoke(&[&a, &b], &[]).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Group requests over two cluster nodes sharing a Redis: a group's drivers
/// are on both nodes, booked in Redis all or nothing; the live checker
/// finds no partial `matched`, no driver in two groups, no offer to a held
/// driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_requests_over_two_cluster_nodes_find_no_violations() {
    let redis = redis::RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let report = smoke(&[&a, &b], &["--group-prob", "0.33", "--max-vehicles", "3"]).await;
    let groups = &report["groups"];
    assert!(groups["requests"].as_u64().unwrap() >= 3, "{report}");
    assert!(groups["matched"].as_u64().unwrap() >= 1, "{report}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Two worker processes against two cluster nodes: no violations over
/// both workers' events (a rider's `matched` and the accept it names often
/// come from different workers), and while they run, the nodes hold every
/// driver of both workers' slices, each id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_against_two_nodes_find_no_violations() {
    let redis = redis::RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let watch = async {
        // The run starts once `smoke` has the lock (other tests may hold it
        // first); its drivers connect over a 1 s ramp.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let mut ids = Vec::new();
            for engine in [&a, &b] {
                ids.extend(drivers_on(engine).await);
            }
            if ids.len() >= 60 || tokio::time::Instant::now() > deadline {
                return ids;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let nodes = [&a, &b];
    let (report, ids) = tokio::join!(smoke(&nodes, &["--workers", "2"]), watch);
    assert_eq!(report["plan"]["workers"], 2, "{report}");
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ids.len(),
        "a driver id on both nodes: {ids:?}"
    );
    let expected: Vec<String> = (0..60).map(|n| format!("sim-d{n}")).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        sorted, expected_sorted,
        "both workers' drivers (sim-d0..29 and sim-d30..59) are in the engine"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The driver ids in `engine`'s ops snapshot.
async fn drivers_on(engine: &Engine) -> Vec<String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let secret = ridelock::auth::read_secret(std::path::Path::new(&secret_file())).unwrap();
    let token = ridelock::auth::mint(
        &secret,
        ridelock::auth::Role::Ops,
        "test",
        std::time::Duration::from_secs(60),
    );
    let mut request = format!("ws://{}/ws/ops", engine.local_addr())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let first = ws.next().await.expect("a snapshot").expect("a frame");
    let snapshot: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    snapshot["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_unreachable_engine_is_a_clear_error() {
    // A port bound but not listening: nothing answers there, and nobody else
    // can take it while the test runs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = runtime.block_on(async { tokio::net::TcpSocket::new_v4().unwrap() });
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = held.local_addr().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_simulator"))
        .args(["--url", &format!("ws://{addr}"), "--quiet"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not answer GET /metrics"), "{stderr}");
}
