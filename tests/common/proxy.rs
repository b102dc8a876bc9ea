//! A loopback TCP proxy the test controls, between a process under test and the
//! API server: `cut` severs every connection through it and refuses new ones (a
//! partition, as the process sees it), `stall` keeps every connection open but
//! moves no more bytes (an API server that hangs), `restore` lets connections
//! through again. `hold_replies` makes the connections accepted from then on
//! pass the client's bytes but keep the server's until `release_replies`: an
//! answer decided now that arrives late, while older connections (a stream
//! opened before) go on as they were. `freeze_quiet` holds the server's bytes
//! on every connection open now until its client sends something: the watches
//! of a kube client (HTTP/1.1, one connection per watch, the client silent after
//! its request) stop delivering events, while its requests (new connections, or
//! pooled ones that send a request) are answered: a replica whose watches lag.
//! TLS passes through untouched (the API server's certificate is for 127.0.0.1).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Open,
    Cut,
    Stalled,
}

pub struct TcpProxy {
    /// `127.0.0.1:PORT` to connect to instead of the upstream.
    pub addr: SocketAddr,
    open: Arc<watch::Sender<Mode>>,
    /// Whether connections accepted now hold the server's bytes.
    hold: Arc<watch::Sender<bool>>,
    /// Since when quiet connections are frozen (`None`: not frozen).
    freeze: Arc<watch::Sender<Option<Instant>>>,
    upstream: Arc<std::sync::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:0` → `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(watch::channel(Mode::Open).0);
        let hold = Arc::new(watch::channel(false).0);
        let freeze = Arc::new(watch::channel(None).0);
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let task = tokio::spawn({
            let open = open.clone();
            let hold = hold.clone();
            let freeze = freeze.clone();
            let upstream = upstream.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    let mode = *open.borrow();
                    match mode {
                        Mode::Cut => {
                            drop(inbound); // refused while cut
                            continue;
                        }
                        Mode::Stalled => {
                            // Accepted and never answered, until restored.
                            let mut mode = open.subscribe();
                            tokio::spawn(async move {
                                let _held = inbound;
                                let _ = mode.wait_for(|m| *m != Mode::Stalled).await;
                            });
                            continue;
                        }
                        Mode::Open => {}
                    }
                    let to = *upstream.lock().unwrap();
                    let mut mode = open.subscribe();
                    let gates = Gates {
                        held: (*hold.borrow()).then(|| hold.subscribe()),
                        freeze: freeze.subscribe(),
                        accepted: Instant::now(),
                    };
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(to).await else {
                            return;
                        };
                        tokio::select! {
                            _ = forward(inbound, outbound, gates) => {}
                            _ = mode.wait_for(|m| *m != Mode::Open) => {}
                        }
                        if *mode.borrow() == Mode::Stalled {
                            // Hold both ends open, silent, until restored or cut.
                            let _ = mode.wait_for(|m| *m != Mode::Stalled).await;
                        }
                        // Dropping both ends closes the connection mid-stream.
                    });
                }
            }
        });
        TcpProxy {
            addr,
            open,
            hold,
            freeze,
            upstream,
            task,
        }
    }

    /// Connections accepted from now on pass the client's bytes at once but
    /// hold the server's until [`Self::release_replies`]. Connections
    /// accepted before are not affected.
    pub fn hold_replies(&self) {
        self.hold.send_replace(true);
    }

    /// Holds the server's bytes on every connection open now until its
    /// client sends something (a request); new connections are not affected.
    pub fn freeze_quiet(&self) {
        self.freeze.send_replace(Some(Instant::now()));
    }

    /// Ends [`Self::freeze_quiet`]: what the frozen connections' servers sent
    /// is delivered.
    pub fn thaw(&self) {
        self.freeze.send_replace(None);
    }

    /// Delivers what the held connections' servers sent, and lets them (and
    /// new connections) flow freely again.
    pub fn release_replies(&self) {
        self.hold.send_replace(false);
    }

    /// Severs every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(Mode::Cut);
    }

    /// Keeps every connection open but silent, and accepts new ones without
    /// answering: an API server that hangs.
    pub fn stall(&self) {
        self.open.send_replace(Mode::Stalled);
    }

    /// Lets connections through again (stalled ones are closed: the client
    /// reconnects, as after a real hang).
    pub fn restore(&self) {
        self.open.send_replace(Mode::Open);
    }

    /// Forwards new connections to `upstream` (e.g. a restarted API server).
    pub fn retarget(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// A copy of `kubeconfig` whose server is this proxy, written to `dir`.
    pub fn kubeconfig(&self, kubeconfig: &Path, dir: &Path) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        for cluster in config["clusters"].as_array_mut().unwrap() {
            cluster["cluster"]["server"] = format!("https://{}", self.addr).into();
        }
        let path = dir.join(format!("kubeconfig-proxy-{}", self.addr.port()));
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        path
    }
}

/// What may keep a connection's server bytes from its client.
struct Gates {
    /// Accepted while replies were held: until released.
    held: Option<watch::Receiver<bool>>,
    /// Frozen since then, if the connection is older and its client has not
    /// sent anything since.
    freeze: watch::Receiver<Option<Instant>>,
    accepted: Instant,
}

/// Copies both ways until both sides are done, holding the server's bytes
/// while a gate says so.
async fn forward(inbound: TcpStream, outbound: TcpStream, gates: Gates) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut a, mut b) = (inbound, outbound);
    let (mut client_read, mut client_write) = a.split();
    let (mut server_read, mut server_write) = b.split();
    let client_spoke = std::sync::Mutex::new(gates.accepted);
    let up = async {
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    *client_spoke.lock().unwrap() = Instant::now();
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            loop {
                let held = gates.held.as_ref().is_some_and(|h| *h.borrow());
                let frozen = (*gates.freeze.borrow()).is_some_and(|since| {
                    gates.accepted < since && *client_spoke.lock().unwrap() < since
                });
                if !held && !frozen {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
