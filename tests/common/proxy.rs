//! A loopback TCP proxy the test controls, between a process under test and the
//! API server: `cut` severs every connection through it and refuses new ones (a
//! partition, as the process sees it), `restore` lets connections through again.
//! TLS passes through untouched (the API server's certificate is for 127.0.0.1).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    /// `127.0.0.1:PORT` to connect to instead of the upstream.
    pub addr: SocketAddr,
    /// true while connections may pass.
    open: Arc<watch::Sender<bool>>,
    upstream: Arc<std::sync::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:0` → `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(watch::channel(true).0);
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let task = tokio::spawn({
            let open = open.clone();
            let upstream = upstream.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !*open.borrow() {
                        drop(inbound); // refused while cut
                        continue;
                    }
                    let to = *upstream.lock().unwrap();
                    let mut closed = open.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(to).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = closed.wait_for(|open| !*open) => {}
                        }
                        // Dropping both ends resets the connection mid-stream.
                    });
                }
            }
        });
        TcpProxy {
            addr,
            open,
            upstream,
            task,
        }
    }

    /// Severs every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
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

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
