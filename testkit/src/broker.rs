//! A real mosquitto for the tests, and a small subscriber to watch it.
//!
//! [`Mosquitto`] runs `/usr/sbin/mosquitto` (Debian's `mosquitto` package)
//! on a free loopback port with passwords, an ACL and persistence in a
//! temporary directory: devices may only use their own topics (plus the
//! fleet's command topic, read-only), `admin` may use everything under
//! `ferry/v1/`. Sessions and retained messages survive [`Mosquitto::restart`].
//! [`Subscriber`] is a plain MQTT client (rumqttc, through ferry-link's
//! re-exports) that records what it receives.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_link::{AsyncClient, Event, Incoming, MqttOptions, QoS, SubAck, SubscribeReasonCode};
use tempfile::TempDir;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::free_port;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD: &str = "mosquitto_passwd";

/// The operator account: reads and writes everything under `ferry/v1/`.
pub const ADMIN: &str = "admin";

/// The password of `user` in every test broker.
pub fn password(user: &str) -> String {
    format!("pw-{user}")
}

/// Certificates for a TLS listener, made with the `openssl` CLI.
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 / localhost, and a client
    /// certificate (CN = the device id, which the broker takes as the user
    /// name) for each of `devices`. Also an unrelated CA, for "wrong CA".
    pub fn new(devices: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=ferry test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        let leaf = |name: &str, cn: &str, ext: &str| {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.pem"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        };
        leaf(
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        for device in devices {
            leaf(
                &format!("client-{device}"),
                device,
                "extendedKeyUsage=clientAuth\n",
            );
        }
        Pki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the broker uses.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// (certificate, key) of `device`.
    pub fn client(&self, device: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        (
            d.join(format!("client-{device}.pem")),
            d.join(format!("client-{device}.key")),
        )
    }

    fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        )
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install openssl"));
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mosquitto process; killed on drop.
pub struct Mosquitto {
    dir: TempDir,
    port: u16,
    tls_port: Option<u16>,
    child: Option<Child>,
}

impl Mosquitto {
    /// A broker that knows `admin` and each of `devices` (user = device id,
    /// password = [`password`]).
    pub fn start(devices: &[&str]) -> Mosquitto {
        Self::start_with(devices, None)
    }

    /// Also a TLS listener (see [`Mosquitto::tls_url`]) that requires a
    /// client certificate from `pki` and takes its CN as the user name.
    pub fn start_with(devices: &[&str], pki: Option<&Pki>) -> Mosquitto {
        if !Path::new(MOSQUITTO).exists() {
            panic!(
                "{MOSQUITTO} not found: these tests need a real broker, run `apt-get install mosquitto`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        let port = free_port();
        let tls_port = pki.map(|_| free_port());

        let passwd = d.join("passwd");
        for (i, user) in std::iter::once(&ADMIN).chain(devices).enumerate() {
            let mut cmd = Command::new(MOSQUITTO_PASSWD);
            if i == 0 {
                cmd.arg("-c");
            }
            let out = cmd
                .arg("-b")
                .arg(&passwd)
                .arg(user)
                .arg(password(user))
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run {MOSQUITTO_PASSWD} ({e}): apt-get install mosquitto")
                });
            assert!(
                out.status.success(),
                "mosquitto_passwd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Devices: their own subtree (any fleet) and the fleet-wide command
        // topic, read-only. The operator: everything under ferry/v1/.
        let acl = format!(
            "user {ADMIN}\ntopic readwrite ferry/v1/#\n\n\
             pattern readwrite ferry/v1/+/%u/#\n\
             pattern read ferry/v1/+/all/cmd\n"
        );
        std::fs::write(d.join("acl"), acl).unwrap();

        let mut conf = String::new();
        let p = |p: &Path| p.display().to_string();
        writeln!(conf, "per_listener_settings false").unwrap();
        writeln!(conf, "allow_anonymous false").unwrap();
        writeln!(conf, "password_file {}", p(&passwd)).unwrap();
        writeln!(conf, "acl_file {}", p(&d.join("acl"))).unwrap();
        writeln!(conf, "persistence true").unwrap();
        writeln!(conf, "persistence_location {}/", p(&d.join("data"))).unwrap();
        // Running as root (CI): keep root instead of switching to the
        // `mosquitto` user, which could not read this temporary directory.
        writeln!(conf, "user root").unwrap();
        writeln!(conf, "log_dest stderr").unwrap();
        writeln!(conf, "connection_messages true").unwrap();
        // Persistent subscribers of the tests may fall far behind.
        writeln!(conf, "max_queued_messages 1000000").unwrap();
        writeln!(conf, "listener {port} 127.0.0.1").unwrap();
        if let (Some(pki), Some(tls_port)) = (pki, tls_port) {
            let (cert, key) = pki.server();
            writeln!(conf, "listener {tls_port} 127.0.0.1").unwrap();
            writeln!(conf, "cafile {}", p(&pki.ca())).unwrap();
            writeln!(conf, "certfile {}", p(&cert)).unwrap();
            writeln!(conf, "keyfile {}", p(&key)).unwrap();
            writeln!(conf, "require_certificate true").unwrap();
            writeln!(conf, "use_identity_as_username true").unwrap();
        }
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();

        let mut broker = Mosquitto {
            dir,
            port,
            tls_port,
            child: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("mosquitto.log"))
            .unwrap();
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports = std::iter::once(self.port)
            .chain(self.tls_port)
            .collect::<Vec<_>>();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("mosquitto exited at start ({status}):\n{}", self.log());
            }
            if ports
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGTERM (mosquitto saves its sessions and retained messages) and wait.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto ignored SIGTERM for 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop, then start again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `mqtts://127.0.0.1:<port>` of the TLS listener (`start_with` a `Pki`).
    pub fn tls_url(&self) -> String {
        format!(
            "mqtts://127.0.0.1:{}",
            self.tls_port.expect("started without TLS")
        )
    }

    /// What mosquitto logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message as a subscriber saw it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Set by the broker when it re-delivers to this subscriber (after the
    /// subscriber reconnected): not the publisher's doing.
    pub dup: bool,
}

/// A test-side MQTT client that subscribes and records every message. It
/// reconnects by itself (50 ms apart) when the broker goes away.
pub struct Subscriber {
    client: AsyncClient,
    messages: Arc<Mutex<Vec<Message>>>,
    subacks: Arc<Mutex<Vec<SubAck>>>,
    subacked: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Options for [`Subscriber::connect`].
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    pub user: String,
    pub client_id: String,
    /// `false`: the broker keeps the session and queues QoS 1 messages
    /// while this client is away.
    pub clean_session: bool,
    pub filters: Vec<String>,
}

impl SubscriberOptions {
    /// The admin, clean session, on `filters`.
    pub fn admin(filters: &[&str]) -> SubscriberOptions {
        SubscriberOptions {
            user: ADMIN.into(),
            client_id: format!("admin-{}", fastrand::u64(..)),
            clean_session: true,
            filters: filters.iter().map(|f| f.to_string()).collect(),
        }
    }
}

impl Message {
    /// The payload as JSON (panics when it is not: every Ferry payload is).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap()
    }
}

impl Subscriber {
    /// Connects and waits for the SUBACK of every filter (QoS 1).
    pub async fn connect(broker: &Mosquitto, options: SubscriberOptions) -> Subscriber {
        Self::connect_to(broker.port(), options).await
    }

    pub async fn connect_to(port: u16, options: SubscriberOptions) -> Subscriber {
        let mut o = MqttOptions::new(options.client_id.clone(), "127.0.0.1", port);
        o.set_credentials(options.user.clone(), password(&options.user));
        o.set_clean_session(options.clean_session);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(Mutex::new(Vec::new()));
        let subacked = Arc::new(Notify::new());
        let task = {
            let messages = messages.clone();
            let subacks = subacks.clone();
            let subacked = subacked.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Incoming::Publish(p))) => {
                            messages.lock().unwrap().push(Message {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                dup: p.dup,
                            });
                        }
                        Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                            subacks.lock().unwrap().push(ack);
                            subacked.notify_one();
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        let subscriber = Subscriber {
            client,
            messages,
            subacks,
            subacked,
            task,
        };
        for filter in &options.filters {
            assert!(
                subscriber.subscribe(filter).await,
                "the broker refused {filter} to {}",
                options.user
            );
        }
        subscriber
    }

    /// Subscribes with QoS 1; false when the broker refused (ACL).
    pub async fn subscribe(&self, filter: &str) -> bool {
        let before = self.subacks.lock().unwrap().len();
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(ack) = self.subacks.lock().unwrap().get(before) {
                return ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
            }
            assert!(Instant::now() < deadline, "no SUBACK within 10 s");
            let _ =
                tokio::time::timeout(Duration::from_millis(100), self.subacked.notified()).await;
        }
    }

    /// Everything received so far.
    /// What arrived on `topic`, in order.
    pub fn on(&self, topic: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the messages received (true), or gives
    /// up after `timeout` (false).
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Message]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.messages.lock().unwrap()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes with QoS 1 (not retained).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub fn clear(&self) {
        self.messages.lock().unwrap().clear();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay between clients and the broker that a test can cut, or tell
/// to hold back the broker's replies (PUBACKs stay in flight): a network
/// failure without a broker restart.
pub struct Relay {
    port: u16,
    hold: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relays a free loopback port to the broker's `port`.
    pub async fn start(port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap().port();
        let hold = Arc::new(AtomicBool::new(false));
        let pipes = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (hold, pipes) = (hold.clone(), pipes.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        continue;
                    };
                    let pipe = tokio::spawn(relay(client, upstream, hold.clone()));
                    pipes.lock().unwrap().push(pipe);
                }
            })
        };
        Relay {
            port: local,
            hold,
            pipes,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// While on, nothing flows from the broker to the clients.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// Closes every relayed connection now (new ones are accepted).
    pub fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    hold: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut upstream_rx, mut upstream_tx) = upstream.into_split();
    let up = tokio::io::copy(&mut client_rx, &mut upstream_tx);
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match upstream_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Checked after the read: a read already waiting when
                    // the hold began must not slip through.
                    while hold.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
