//! Starting and stopping a whole engine: the actor system, the matcher, the
//! driver arbiters and the listener.
//!
//! Threads: the actix system runs on a thread of its own, which hosts the
//! matcher; driver actors are spread over `driver_threads` actix arbiters; the
//! sockets are served by the caller's tokio runtime (multi-threaded in the
//! binary), so parsing and I/O use every core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::actors::driver::DriverRegistry;
use crate::actors::matcher::{Admission, GetStats, Matcher, MatcherStats, OpenRequests};
use crate::actors::messages::{DriverChanges, MatcherLink};
use crate::areas::ServiceAreas;
use crate::auth::{self, Verifier};
use crate::cluster::bus::Bus;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::connections::ConnectionLimits;
use crate::ids::Ids;
use crate::ops::OpsFeed;
use crate::server::{self, Routes, Shared};

/// How long shutdown waits for connections to say goodbye.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The actor system did not come up.
    #[error("actor system failed to start: {0}")]
    Actors(String),
    /// Cluster mode: a Redis server could not be reached.
    #[error("cannot reach redis: {0}")]
    Redis(String),
}

/// A running engine.
pub struct Engine {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    drained: mpsc::Receiver<()>,
    server: JoinHandle<()>,
    system: System,
    actors: Option<std::thread::JoinHandle<()>>,
    /// Cluster mode: the link to the other nodes.
    bus: Option<Bus>,
}

async fn connect_cluster(config: &Config) -> Result<Arc<Cluster>, StartError> {
    let node = match &config.node_id {
        Some(node) if cluster::valid_node_id(node) => node.clone(),
        Some(node) => {
            return Err(StartError::Config(format!(
                "--node-id {node:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
            )))
        }
        None => format!("node-{:08x}", rand::random::<u32>()),
    };
    let cluster = Cluster::connect(&node, &config.redis, config.redis_timeout())
        .await
        .map_err(|e| StartError::Redis(e.to_string()))?;
    // Registered (run on the Redis runtime, where the connections live)
    // before anything is served.
    let registering = cluster.clone();
    cluster
        .spawn(async move { Bus::register(&registering).await })
        .await
        .map_err(|e| StartError::Redis(e.to_string()))?
        .map_err(StartError::Redis)?;
    tracing::info!(node, servers = config.redis.len(), "cluster mode");
    Ok(cluster)
}

/// The token verifier `config` asks for; in open mode, `None` after a
/// warning, and a refusal to face a network unless `--insecure-open` says so.
fn verifier(config: &Config) -> Result<Option<Verifier>, StartError> {
    if let Some(path) = &config.auth_secret_file {
        let secret = auth::read_secret(path).map_err(|e| StartError::Config(e.to_string()))?;
        return Ok(Some(Verifier::new(&secret, config.token_leeway())));
    }
    let exposed = [Some(config.listen), config.metrics_listen]
        .into_iter()
        .flatten()
        .find(|addr| !addr.ip().is_loopback());
    if let (Some(addr), false) = (exposed, config.insecure_open) {
        return Err(StartError::Config(format!(
            "refusing to serve {addr} without --auth-secret-file: anyone who reaches it could act as any driver or rider (pass --insecure-open to do it anyway)"
        )));
    }
    tracing::warn!(
        "open mode: no --auth-secret-file, so identities are taken from the URL unverified; for local use only"
    );
    Ok(None)
}

fn check_radii(config: &Config) -> Result<(), StartError> {
    let refuse = |why: &str| Err(StartError::Config(why.into()));
    if !(config.radius_m.is_finite() && config.radius_m > 0.0) {
        return refuse("--radius-m must be a positive number");
    }
    if !(config.radius_step_m.is_finite() && config.radius_step_m >= 0.0) {
        return refuse("--radius-step-m must be a number of metres, 0 or more");
    }
    let max = config.max_radius_m();
    if !(max.is_finite() && max >= config.radius_m) {
        return refuse("--max-radius-m must be a number of metres no smaller than --radius-m");
    }
    Ok(())
}

fn service_areas(config: &Config) -> Result<Option<Arc<ServiceAreas>>, StartError> {
    let Some(path) = &config.service_area else {
        return Ok(None);
    };
    let refuse =
        |why: String| StartError::Config(format!("--service-area {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| refuse(e.to_string()))?;
    let areas = ServiceAreas::from_geojson(&text).map_err(|e| refuse(e.to_string()))?;
    tracing::info!(
        areas = areas.names().len(),
        "serving only the areas of {}",
        path.display()
    );
    Ok(Some(Arc::new(areas)))
}

impl Engine {
    /// Binds `config.listen`, starts the actors, and serves on the current
    /// tokio runtime. Returns once the engine accepts connections.
    pub async fn start(config: Config) -> Result<Engine, StartError> {
        check_radii(&config)?;
        let areas = service_areas(&config)?;
        let listener = server::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let verifier = verifier(&config)?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                server::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|listener| listener.local_addr())
            .transpose()
            .map_err(|source| StartError::Bind {
                addr: config.metrics_listen.unwrap_or(config.listen),
                source,
            })?;
        let connections = ConnectionLimits::new(
            ConnectionLimits::total_cap(config.max_connections, crate::limits::open_file_limit()),
            config.max_handshakes,
            config.max_connections_per_address,
        );
        let metrics = crate::metrics::install();
        let cluster = match config.is_cluster() {
            false => None,
            true => Some(connect_cluster(&config).await?),
        };
        let config = Arc::new(config);
        let ids = Arc::new(match cluster {
            Some(_) => Ids::for_cluster(),
            None => Ids::for_node(),
        });
        let admission = Arc::new(Admission::new(config.max_queued_requests));
        let ops = OpsFeed::new();

        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (actor_config, actor_ids, actor_admission, actor_cluster, actor_ops) = (
            config.clone(),
            ids.clone(),
            admission.clone(),
            cluster.clone(),
            ops.clone(),
        );
        let actors = std::thread::Builder::new()
            .name("ridelock-matcher".into())
            .spawn(move || {
                let system = System::new();
                let started = system.block_on(async move {
                    // The matcher and the driver registry each need a way to
                    // the other: the matcher's address exists before it runs.
                    let context = Context::<Matcher>::new();
                    let address = context.address();
                    let changes = Arc::new(DriverChanges::default());
                    let link = MatcherLink {
                        answers: address.clone().recipient(),
                        ended: address.clone().recipient(),
                        held: address.clone().recipient(),
                        wake: address.clone().recipient(),
                        changes: changes.clone(),
                    };
                    let arbiters: Vec<_> = (0..actor_config.driver_threads())
                        .map(|_| Arbiter::new().handle())
                        .collect();
                    let registry = DriverRegistry::new(
                        arbiters,
                        link,
                        actor_ids.clone(),
                        actor_cluster.clone(),
                        actor_config.location_max_age(),
                        areas.clone(),
                        actor_ops,
                    );
                    let matcher = context.run(Matcher::new(
                        &actor_config,
                        actor_ids,
                        actor_admission,
                        actor_cluster,
                        registry.clone(),
                        changes,
                        areas,
                    ));
                    (System::current(), matcher, registry)
                });
                if started_tx.send(started).is_ok() {
                    let _ = system.run();
                }
            })
            .map_err(|e| StartError::Actors(e.to_string()))?;
        let (system, matcher, registry) = started_rx
            .await
            .map_err(|_| StartError::Actors("actor thread exited during start".into()))?;

        let bus = cluster.map(|cluster| Bus::start(cluster, matcher.clone(), registry.clone()));
        let shared = Arc::new(Shared {
            admission,
            config,
            registry,
            matcher,
            ids,
            metrics,
            verifier,
            connections,
            ops: ops.clone(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let matcher = shared.matcher.clone();
        tokio::spawn(ops.publish(
            move || {
                let matcher = matcher.clone();
                async move { matcher.send(OpenRequests).await.ok() }
            },
            shutdown_rx.clone(),
        ));
        let (drain, drained) = mpsc::channel(1);
        if let Some(listener) = metrics_listener {
            tokio::spawn(server::serve(
                listener,
                shared.clone(),
                Routes::Metrics,
                shutdown_rx.clone(),
                drain.clone(),
            ));
        }
        let server = tokio::spawn(server::serve(
            listener,
            shared.clone(),
            Routes::Public,
            shutdown_rx,
            drain,
        ));
        match metrics_addr {
            Some(metrics_addr) => {
                tracing::info!(%local_addr, %metrics_addr, "ridelock engine serving")
            }
            None => tracing::info!(%local_addr, "ridelock engine serving"),
        }
        Ok(Engine {
            local_addr,
            metrics_addr,
            shared,
            shutdown,
            drained,
            server,
            system,
            actors: Some(actors),
            bus,
        })
    }

    /// The address the engine serves on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves one connection over any byte stream, as if it had arrived on
    /// the public port (the fuzzer feeds it in-memory pipes).
    pub async fn serve_io<S>(&self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let shutdown = self.shutdown.subscribe();
        let _ = server::handle(io, &self.shared, Routes::Public, None, shutdown).await;
    }

    /// The private metrics address, with `--metrics-listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The matcher's counts.
    pub async fn stats(&self) -> MatcherStats {
        self.shared.matcher.send(GetStats).await.unwrap_or_default()
    }

    /// Number of driver actors alive.
    pub fn driver_actors(&self) -> usize {
        self.shared.registry.len()
    }

    /// Stops accepting, closes every connection with a going-away frame, then
    /// stops the actors.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let _ = (&mut self.server).await;
        // Every connection task holds a drain sender; recv() yields None once
        // all have finished.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.drained.recv()).await;
        if let Some(bus) = self.bus.take() {
            bus.stop().await;
        }
        self.stop_actors().await;
        tracing::info!("ridelock engine stopped");
    }

    async fn stop_actors(&mut self) {
        self.system.stop();
        if let Some(thread) = self.actors.take() {
            // The stop is a message behind whatever the matcher still has
            // queued; don't let a deep backlog hold the process hostage.
            let joined = tokio::time::timeout(
                DRAIN_TIMEOUT,
                tokio::task::spawn_blocking(move || thread.join()),
            );
            if joined.await.is_err() {
                tracing::warn!(
                    "actors still busy after {DRAIN_TIMEOUT:?}; leaving them to the process exit"
                );
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // An engine dropped without shutdown() (a failing test, say) must not
        // leave its threads serving.
        let _ = self.shutdown.send(true);
        self.server.abort();
        if self.actors.is_some() {
            self.system.stop();
        }
    }
}
