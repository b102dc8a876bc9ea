//! Command-line flags of `kubectl-scopehold`, parsed by clap. Global flags
//! follow kubectl's names and may appear before or after the subcommand.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-scopehold",
    bin_name = "kubectl scopehold",
    version,
    about = "Grant, inspect, audit and revoke ScopeHold access to Secrets",
    long_about = "Grant, inspect, audit and revoke ScopeHold access to Secrets.\n\n\
                  Agents (AgentIdentity) receive only the Secret keys that a SecretGrant \
                  names, for a bounded time. Secret values are never printed.",
    after_help = "Incident path: `kubectl scopehold exposure SECRET --revoke` lists every \
                  agent and pod that received SECRET and revokes all of its grants."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

const GLOBAL: &str = "Global options";

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file (a colon-separated list is merged, as kubectl does).
    #[arg(
        long,
        env = "KUBECONFIG",
        hide_env_values = true,
        global = true,
        value_name = "PATH",
        help_heading = GLOBAL
    )]
    pub kubeconfig: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME", help_heading = GLOBAL)]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else "default").
    #[arg(
        short = 'n',
        long,
        global = true,
        value_name = "NAMESPACE",
        help_heading = GLOBAL
    )]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        default_value_t = OutputFormat::Table,
        help_heading = GLOBAL
    )]
    pub output: OutputFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Grant an agent some keys of one Secret, for a bounded time and a reason.
    Grant(GrantArgs),
    /// Revoke a SecretGrant (kept as the record; files are withdrawn from pods).
    Revoke {
        /// SecretGrant name.
        grant: String,
    },
    /// Suspend an agent: none of its grants resolve and mounted files are withdrawn.
    Suspend {
        /// AgentIdentity name.
        agent: String,
    },
    /// Resume a suspended agent.
    Resume {
        /// AgentIdentity name.
        agent: String,
    },
    /// What an agent can resolve right now.
    Access {
        /// AgentIdentity name.
        agent: String,
    },
    /// Every grant on a Secret: agent, keys, phase and expiry.
    WhoCan {
        /// Secret name.
        secret: String,
    },
    /// Recent resolutions, denials and grant transitions (Kubernetes Events), newest first.
    Audit(AuditArgs),
    /// Incident path: every grant, agent and pod that received a Secret; optionally revoke them all.
    Exposure(ExposureArgs),
    /// Where and when a proxy grant's keys were used (all grants of an agent when no grant has that name).
    Usage(UsageArgs),
    /// Print a pod with the proxy sidecar added, as the admission webhook adds it (delivery mode proxy).
    Inject(InjectArgs),
    /// Run ScopeHold locally (a real API server, the controller, the node plugin) and walk the five steps and the incident path.
    Demo,
}

#[derive(Args, Debug)]
pub struct GrantArgs {
    /// AgentIdentity that receives the keys.
    pub agent: String,
    /// Secret (same namespace) that holds the keys.
    #[arg(long, value_name = "NAME")]
    pub secret: String,
    /// A key to grant, optionally mounted under another file name. Repeatable.
    #[arg(long = "key", value_name = "KEY[=FILE]", required = true)]
    pub keys: Vec<String>,
    /// How long the grant lasts, such as 8h or 1h30m (units h, m, s).
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub ttl: Option<String>,
    /// When the grant ends (RFC 3339, such as 2030-01-01T18:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<String>,
    /// Why the agent needs these keys (shown in audit records).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// SecretGrant name (default: AGENT-SECRET).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only records about this AgentIdentity.
    #[arg(long, value_name = "AGENT")]
    pub agent: Option<String>,
    /// Only records about grants on this Secret.
    #[arg(long, value_name = "SECRET")]
    pub secret: Option<String>,
    /// At most this many records.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// SecretGrant name, or AgentIdentity name (when no grant has that name).
    pub name: String,
    /// NAME is an AgentIdentity, even if a grant has the same name.
    #[arg(long)]
    pub agent: bool,
    /// Only places used within this long, such as 1h or 30m.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExposureArgs {
    /// Secret name.
    pub secret: String,
    /// Revoke every grant on the Secret that is not revoked yet.
    #[arg(long)]
    pub revoke: bool,
    /// Do not ask for confirmation before revoking.
    #[arg(long, requires = "revoke")]
    pub yes: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "kubectl-scopehold",
            "access",
            "bot",
            "-n",
            "team",
            "-o",
            "json",
            "--context",
            "dev",
        ])
        .unwrap();
        assert_eq!(cli.global.namespace.as_deref(), Some("team"));
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.context.as_deref(), Some("dev"));
    }

    #[test]
    fn ttl_and_expires_at_conflict() {
        let parsed = Cli::try_parse_from([
            "kubectl-scopehold",
            "grant",
            "bot",
            "--secret",
            "s",
            "--key",
            "k",
            "--reason",
            "r",
            "--ttl",
            "1h",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ]);
        assert!(parsed.is_err());
    }

    #[test]
    fn yes_requires_revoke() {
        assert!(Cli::try_parse_from(["kubectl-scopehold", "exposure", "s", "--yes"]).is_err());
        assert!(
            Cli::try_parse_from(["kubectl-scopehold", "exposure", "s", "--revoke", "--yes"])
                .is_ok()
        );
    }
}

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// The pod manifest (YAML or JSON); `-` reads stdin.
    #[arg(short = 'f', long)]
    pub filename: String,
    /// The ScopeHold image that runs the sidecar.
    #[arg(
        long,
        env = "SCOPEHOLD_IMAGE",
        default_value = "ghcr.io/scopehold/scopehold:latest"
    )]
    pub image: String,
    /// Where the sidecar reports uses (the controller's /usage, as the
    /// webhook's --proxy-usage-url); needs --usage-ca-file.
    #[arg(long, env = "SCOPEHOLD_USAGE_URL", requires = "usage_ca_file")]
    pub usage_url: Option<String>,
    /// PEM of the custody CA (the `ca.crt` of the scopehold-custody-ca ConfigMap).
    #[arg(long, env = "SCOPEHOLD_USAGE_CA_FILE", requires = "usage_url")]
    pub usage_ca_file: Option<String>,
    /// Loopback port of the sidecar (as the webhook's --proxy-port).
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// PEM of extra CAs the sidecar trusts for upstream TLS (as the
    /// webhook's --proxy-upstream-ca-file).
    #[arg(long, env = "SCOPEHOLD_PROXY_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<String>,
}
