//! Harness for workspace integration tests: real `fedmesh` processes on loopback.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `fedmesh` binary built next to the running test executable.
pub fn fedmesh_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/fedmesh
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bin = dir.join("fedmesh");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p fedmesh-node --bin fedmesh` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A free loopback port (bound then released), never the same one twice in a process.
///
/// Ports come from below Linux's ephemeral range (32768–60999): a port that bind(0) handed out
/// and we released could be taken as the source port of some outgoing loopback connection
/// before the node binds it ("Address already in use", seen once in a parallel run). Each test
/// process draws from its own slice of 10000–32767 (by pid), so parallel tests rarely meet.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const LOW: u32 = 10_000;
    const SLICES: u32 = 16;
    const SLICE: u32 = (32_768 - LOW) / SLICES;
    let pid = std::process::id();
    let base = LOW + (pid % SLICES) * SLICE;
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let given = given.get_or_insert_with(HashSet::new);
    let mut x = pid.wrapping_mul(2_654_435_761) ^ given.len() as u32;
    for _ in 0..SLICE {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = u16::try_from(base + (x >> 8) % SLICE).expect("below 32768");
        if given.contains(&port) {
            continue;
        }
        // Free for TCP and UDP (QUIC listens on UDP ports).
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {base}..{}", base + SLICE);
}

/// One node process with its own data directory and ports.
#[derive(Debug)]
pub struct TestNode {
    /// Data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// MQTT 3.1.1 port.
    pub mqtt_v4: u16,
    /// MQTT 5 port.
    pub mqtt_v5: u16,
    /// HTTP port.
    pub http: u16,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    /// Starts a node in a fresh temporary data directory.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Vec::new())
    }

    /// Starts a node with extra `FEDMESH_...` environment.
    pub fn start_with(env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut node = Self {
            data_dir: tmp.path().to_path_buf(),
            mqtt_v4: free_port(),
            mqtt_v5: free_port(),
            http: free_port(),
            env,
            child: None,
            _tmp: Some(tmp),
        };
        node.spawn()?;
        Ok(node)
    }

    /// The environment that points the CLI at this node.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "FEDMESH_DATA_DIR".to_string(),
                self.data_dir.display().to_string(),
            ),
            (
                "FEDMESH_MQTT__LISTEN_V4".to_string(),
                format!("127.0.0.1:{}", self.mqtt_v4),
            ),
            (
                "FEDMESH_MQTT__LISTEN_V5".to_string(),
                format!("127.0.0.1:{}", self.mqtt_v5),
            ),
            (
                "FEDMESH_HTTP__LISTEN".to_string(),
                format!("127.0.0.1:{}", self.http),
            ),
            (
                "FEDMESH_P2P__LISTEN".to_string(),
                "/ip4/127.0.0.1/tcp/0".to_string(),
            ),
        ];
        env.extend(self.env.iter().cloned());
        env
    }

    /// A `fedmesh` command with this node's environment.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(fedmesh_bin());
        c.envs(self.cli_env()).env("RUST_LOG", "warn");
        c
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("node.log"))?;
        let child = Command::new(fedmesh_bin())
            .arg("run")
            .envs(self.cli_env())
            .env(
                "RUST_LOG",
                std::env::var("FEDMESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", fedmesh_bin().display()))?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    /// Waits until `/healthz` answers 200 and the MQTT port accepts.
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("node exited with {status}; log:\n{}", self.log());
            }
            if http_get(self.http, "/healthz").is_ok_and(|(code, _)| code == 200)
                && TcpStream::connect(("127.0.0.1", self.mqtt_v4)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("node not healthy after {timeout:?}; log:\n{}", self.log())
    }

    /// `kill -9` the node.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (what `docker stop` and systemd send) and waits at most `timeout` for
    /// the node to exit; returns its exit status, or `None` if it was still running (it is
    /// then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let mut c = self.child.take()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Sends the signal `name` (`kill -NAME`, e.g. "HUP") to the running node.
    pub fn signal(&self, name: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([format!("-{name}"), c.id().to_string()])
                .status();
        }
    }

    /// Starts the node again on the same data directory and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = http_get(self.http, "/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Polls `/status` every 100 ms until `pred` holds and returns that status; panics
    /// naming `what` (with the last status) after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.status()
                && pred(&s)
            {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: not within {timeout:?}; status: {:?}",
                self.status().ok()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The MQTT 3.1.1 address.
    pub fn mqtt_v4_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_v4))
    }
}

/// Whether a `/status` lists a remote agent called `name` (hosted by another node).
pub fn has_remote_agent(status: &serde_json::Value, name: &str) -> bool {
    status["agents"].as_array().is_some_and(|a| {
        a.iter().any(|x| {
            x["local"] == false
                && x["id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&format!("{name}@")))
        })
    })
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- node log ----\n{}", self.log());
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// MQTT helpers built on rumqttc.
pub mod mqtt {
    use std::time::Duration;

    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
    use tokio::sync::mpsc;

    /// A connected MQTT 3.1.1 client whose publishes arrive on a channel as (topic, JSON).
    #[derive(Debug)]
    pub struct Client {
        /// The client.
        pub client: AsyncClient,
        /// Messages received.
        pub rx: mpsc::Receiver<(String, serde_json::Value)>,
    }

    /// Connects `id` to `port`, subscribes to `subs` (waiting for SubAck).
    pub async fn connect(port: u16, id: &str, subs: &[&str]) -> anyhow::Result<Client> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev): (AsyncClient, EventLoop) = AsyncClient::new(opts, 64);
        ev.network_options.set_tcp_nodelay(true);
        for s in subs {
            client.subscribe(*s, QoS::AtLeastOnce).await?;
        }
        let (tx, rx) = mpsc::channel(256);
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        let mut pending = subs.len();
        tokio::spawn(async move {
            // Stop (and stop reconnecting under this client id) once the Client is dropped.
            while !tx.is_closed() {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        pending = pending.saturating_sub(1);
                        if pending == 0 {
                            let _ = ready_tx.try_send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if pending == 0 => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v =
                            serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                        if tx.send((p.topic.clone(), v)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv()).await?;
        Ok(Client { client, rx })
    }

    impl Client {
        /// Publishes JSON at QoS 1.
        pub async fn send(&self, topic: &str, v: serde_json::Value) -> anyhow::Result<()> {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&v)?)
                .await?;
            Ok(())
        }

        /// Publishes raw bytes at QoS 1.
        pub async fn send_raw(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await?;
            Ok(())
        }

        /// The next message whose JSON `type` is `ty` (others are skipped), within 10 s.
        pub async fn expect(&mut self, ty: &str) -> anyhow::Result<serde_json::Value> {
            self.expect_within(ty, Duration::from_secs(10)).await
        }

        /// The next message of type `ty` within `timeout`.
        pub async fn expect_within(
            &mut self,
            ty: &str,
            timeout: Duration,
        ) -> anyhow::Result<serde_json::Value> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let (_, v) = tokio::time::timeout_at(deadline, self.rx.recv())
                    .await
                    .map_err(|_| anyhow::anyhow!("no {ty:?} message within {timeout:?}"))?
                    .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
                if v["type"] == ty {
                    return Ok(v);
                }
            }
        }
    }

    /// Connects an agent `name` that advertises itself as an echo agent and answers every task
    /// with its input, until no task arrives for `idle`. Abort the handle to stop it earlier.
    pub async fn spawn_echo_agent(
        port: u16,
        name: &str,
        idle: Duration,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let (mut agent, _) =
            advertised_agent(port, name, "Echoes its input back", u16::MAX).await?;
        let result_topic = format!("fedmesh/v1/agent/{name}/result");
        Ok(tokio::spawn(async move {
            while let Ok(t) = agent.expect_within("task", idle).await {
                let out = serde_json::json!({"task_id": t["task_id"], "output": t["input"]});
                let _ = agent.send(&result_topic, out).await;
            }
        }))
    }

    /// The `p` quantile (0..=1) of sorted durations.
    pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Connects agent `name` to the node on `port`, subscribed to its inbox, advertises it with
    /// `description` and `capacity`, and waits for the node's `advertised`, which it returns with
    /// the client.
    pub async fn advertised_agent(
        port: u16,
        name: &str,
        description: &str,
        capacity: u16,
    ) -> anyhow::Result<(Client, serde_json::Value)> {
        let mut agent = connect(port, name, &[&format!("fedmesh/v1/agent/{name}/inbox")]).await?;
        agent
            .send(
                &format!("fedmesh/v1/agent/{name}/advertise"),
                advert(description, capacity),
            )
            .await?;
        let ack = agent.expect("advertised").await?;
        Ok((agent, ack))
    }

    /// Advertise payload for a test agent.
    pub fn advert(description: &str, capacity: u16) -> serde_json::Value {
        serde_json::json!({"description": description, "resources": {"capacity": capacity}, "ttl_s": 600})
    }
}
