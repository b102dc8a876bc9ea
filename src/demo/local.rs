//! Processes of a local ScopeHold: the test API server, the controller and
//! the node plugin, each a child that dies with this process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
    let what = what.into();
    move |source| LocalError::Io { what, source }
}

/// Builds the API server binary, or finds it in the cache (`build.sh` prints
/// its progress on stderr, which the user sees).
pub async fn apiserver_binary(repo: &Path) -> Result<PathBuf, LocalError> {
    let script = repo.join("tests/apiserver/build.sh");
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(io(format!("running {}", script.display())))?;
    if !output.status.success() {
        return Err(LocalError::Failed(format!(
            "{} failed ({})",
            script.display(),
            output.status
        )));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// A running API server; it exits when this value (its stdin) is dropped.
pub struct ApiServer {
    pub kubeconfig: PathBuf,
    pub url: String,
    _child: Child,
}

pub async fn start_apiserver(binary: &Path, dir: &Path) -> Result<ApiServer, LocalError> {
    let log =
        std::fs::File::create(dir.join("apiserver.log")).map_err(io("creating apiserver.log"))?;
    let mut child = Command::new(binary)
        .arg("--dir")
        .arg(dir.join("apiserver"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("starting {}", binary.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LocalError::Failed("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(180), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("ready ") {
                return Some(url.to_owned());
            }
        }
        None
    })
    .await;
    match ready {
        Ok(Some(url)) => Ok(ApiServer {
            kubeconfig: dir.join("apiserver/kubeconfig"),
            url,
            _child: child,
        }),
        _ => Err(LocalError::Failed(format!(
            "the API server did not become ready; see {}",
            dir.join("apiserver.log").display()
        ))),
    }
}

/// A ScopeHold process with its output in a log file.
pub struct Process {
    pub log: PathBuf,
    child: Child,
}

impl Process {
    pub fn spawn(
        binary: &Path,
        args: &[String],
        kubeconfig: &Path,
        log: PathBuf,
    ) -> Result<Self, LocalError> {
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("cloning a log handle"))?;
        let child = Command::new(binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        Ok(Process { log, child })
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub async fn wait_for(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, LocalError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LocalError::Failed(format!(
                    "{} exited ({status}); see {}",
                    needle,
                    self.log.display()
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LocalError::Failed(format!(
                    "no {needle:?} in {} after {timeout:?}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A string field of the first JSON log line that has it.
    pub async fn wait_for_field(
        &mut self,
        field: &str,
        timeout: Duration,
    ) -> Result<String, LocalError> {
        let line = self.wait_for(&format!("\"{field}\""), timeout).await?;
        serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v[field].as_str().map(str::to_owned))
            .ok_or_else(|| LocalError::Failed(format!("no {field} in {line}")))
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Where a local node plugin keeps its socket, token and directories: all
/// under one directory (the demo's and the benchmarks' run directory).
#[derive(Debug, Clone)]
pub struct NodePluginLayout {
    pub socket: PathBuf,
    pub token_file: PathBuf,
    pub kubelet_dir: PathBuf,
    pub state_dir: PathBuf,
    pub scratch_dir: PathBuf,
}

impl NodePluginLayout {
    pub fn under(dir: &Path) -> Self {
        Self {
            socket: dir.join("csi.sock"),
            token_file: dir.join("node-token"),
            kubelet_dir: dir.join("kubelet"),
            state_dir: dir.join("node-state"),
            scratch_dir: dir.join("node-scratch"),
        }
    }

    /// `scopehold node` arguments for a plugin on `node_name` that talks
    /// plaintext to custody at `custody_addr` and logs JSON.
    pub fn args(&self, node_name: &str, custody_addr: &str) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "node".into(),
            "--endpoint".into(),
            format!("unix://{}", self.socket.display()),
            "--node-name".into(),
            node_name.into(),
            "--custody-endpoint".into(),
            format!("http://{custody_addr}"),
            "--custody-plaintext".into(),
            "--token-file".into(),
            path(&self.token_file),
            "--kubelet-dir".into(),
            path(&self.kubelet_dir),
            "--state-dir".into(),
            path(&self.state_dir),
            "--scratch-dir".into(),
            path(&self.scratch_dir),
            "--log-format".into(),
            "json".into(),
        ]
    }
}
