//! A cluster of `nats-server`s with JetStream, routed to each other on loopback.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use async_nats::ServerAddr;
use async_nats::jetstream::{self, stream};

use crate::{Error, NatsServer, Options};

/// The cluster name every node is configured with.
pub const CLUSTER_NAME: &str = "jetsaga-test";

/// Upper bound for JetStream to accept a stream replicated to every node.
const JETSTREAM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one probe attempt, so a hung request cannot eat the whole budget.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one JetStream API request of a probe.
const PROBE_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How many times a cluster start is tried when a port turns out to be taken.
const START_ATTEMPTS: u32 = 3;
/// The stream created and deleted to prove JetStream is ready on every node.
const PROBE_STREAM: &str = "JETSAGA_TESTKIT_PROBE";

/// `n` JetStream servers named `n0`, `n1`, … in one cluster, each with its own port and temporary
/// directory, routed to each other on `127.0.0.1`.
///
/// [`start`](Self::start) returns once a stream replicated to all `n` nodes can be created, so a
/// test may create R3 streams right away. Nodes are [`NatsServer`]s: a test can
/// [`kill`](NatsServer::kill) or [`restart`](NatsServer::restart) one through
/// [`node_mut`](Self::node_mut). Dropping the cluster kills every node and removes their
/// directories.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts an `n`-node cluster (3 is typical) and waits until JetStream is ready on it.
    ///
    /// # Panics
    ///
    /// Panics with the reason if it cannot start; see [`try_start`](Self::try_start).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cluster = jetsaga_testkit::Cluster::start(3);
    /// let client = async_nats::connect(cluster.server_addrs()).await?;
    /// # Ok(()) }
    /// ```
    pub fn start(n: usize) -> Self {
        Self::try_start(n).unwrap_or_else(|e| panic!("cannot start a {n}-node nats cluster: {e}"))
    }

    /// Like [`start`](Self::start), returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// As for [`NatsServer::try_start`], plus [`Error::JetStreamNotReady`] if no stream replicated
    /// to all nodes could be created within 30 s. Taken ports are retried with fresh ones.
    pub fn try_start(n: usize) -> Result<Self, Error> {
        Self::try_start_with(n, &Options::default())
    }

    /// Like [`try_start`](Self::try_start), with every node configured by `options`
    /// (e.g. `sync_always` for `sync_interval: always`; `extra_config` is appended to each
    /// node's cluster settings).
    ///
    /// # Errors
    ///
    /// As for [`try_start`](Self::try_start).
    pub fn try_start_with(n: usize, options: &Options) -> Result<Self, Error> {
        let mut attempt = 1;
        loop {
            match Self::try_start_once(n.max(1), options) {
                Err(Error::PortInUse { .. }) if attempt < START_ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    /// The client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs of all nodes joined by commas, for configuration values.
    ///
    /// async-nats does not split such a string: connect with [`urls`](Self::urls) or
    /// [`server_addrs`](Self::server_addrs) instead.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// The nodes' addresses, ready for `async_nats::connect` or `ConnectOptions::connect`.
    ///
    /// # Panics
    ///
    /// Never in practice: the URLs are built from a loopback IP and a port.
    pub fn server_addrs(&self) -> Vec<ServerAddr> {
        self.urls()
            .iter()
            .map(|url| {
                url.parse()
                    .unwrap_or_else(|e| panic!("invalid server url {url}: {e}"))
            })
            .collect()
    }

    /// The `i`-th node.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not below the number of nodes.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The `i`-th node, to stop, kill or restart it.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not below the number of nodes.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    fn try_start_once(n: usize, base: &Options) -> Result<Self, Error> {
        // Hold every listener until all ports are chosen, so no two nodes get the same one.
        let listeners = (0..2 * n)
            .map(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        drop(listeners);
        let (client_ports, route_ports) = ports.split_at(n);

        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::with_capacity(n);
        for (i, (client_port, route_port)) in client_ports.iter().zip(route_ports).enumerate() {
            let mut extra_config = String::new();
            let _ = write!(
                extra_config,
                "server_name: n{i}\ncluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"
            );
            extra_config.push_str(&base.extra_config);
            let options = Options {
                sync_always: base.sync_always,
                extra_config,
                max_store: base.max_store.clone(),
            };
            nodes.push(NatsServer::configured(&options, *client_port)?);
        }
        // Spawn all before waiting: a node's routes are only useful once its peers are up.
        for node in &mut nodes {
            node.spawn()?;
        }
        for node in &mut nodes {
            node.wait_ready()?;
        }
        let cluster = Self { nodes };
        cluster.wait_jetstream(n)?;
        Ok(cluster)
    }

    /// Waits until a memory stream with `replicas` replicas can be created (and deletes it).
    ///
    /// Runs its own runtime on a helper thread, so it works from sync and async tests alike.
    fn wait_jetstream(&self, replicas: usize) -> Result<(), Error> {
        let urls = self.urls();
        let probe = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(probe_until_ready(urls, replicas))
        });
        probe.join().unwrap_or_else(|_| {
            Err(Error::JetStreamNotReady {
                waited: Duration::ZERO,
                last_error: "the probe thread panicked".to_owned(),
            })
        })
    }
}

async fn probe_until_ready(urls: Vec<String>, replicas: usize) -> Result<(), Error> {
    let started = Instant::now();
    let mut last_error = String::from("no attempt finished");
    while started.elapsed() < JETSTREAM_READY_TIMEOUT {
        match tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, probe_once(&urls, replicas)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = format!("probe timed out after {PROBE_ATTEMPT_TIMEOUT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::JetStreamNotReady {
        waited: started.elapsed(),
        last_error,
    })
}

async fn probe_once(urls: &[String], replicas: usize) -> Result<(), String> {
    let client = async_nats::connect(urls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // Requests go unanswered until a meta leader exists: fail fast and retry.
    let js = jetstream::ContextBuilder::new()
        .timeout(PROBE_REQUEST_TIMEOUT)
        .build(client);
    js.query_account()
        .await
        .map_err(|e| format!("account info: {e}"))?;
    js.create_stream(stream::Config {
        name: PROBE_STREAM.to_owned(),
        subjects: vec!["_jetsaga_testkit.probe".to_owned()],
        storage: stream::StorageType::Memory,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create R{replicas} stream: {e}"))?;
    js.delete_stream(PROBE_STREAM)
        .await
        .map_err(|e| format!("delete probe stream: {e}"))?;
    Ok(())
}
