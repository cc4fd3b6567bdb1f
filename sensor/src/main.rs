//! `sensor` command line. Errors are printed as one clear message, never a backtrace.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use sensor::{config::Config, doctor, run};

/// The static build (`cargo xtask dist`, x86_64-unknown-linux-musl) uses mimalloc: musl's own
/// malloc takes one global lock, which serialises tokio's worker threads on every allocation.
/// mimalloc rather than jemalloc because it is a single C file that musl-tools' `musl-gcc`
/// builds in seconds, with no autoconf step. glibc builds (development, tests) keep glibc's
/// malloc, which has per-thread arenas already, so their measured memory numbers stay valid.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sensor",
    version,
    about = "eBPF host telemetry sensor: OOM kills, memory pressure, TCP connects, synthetic checks"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (embedded default config unless --config is given).
    Run(RunArgs),
    /// Show what this kernel supports and which hook each probe would use.
    Doctor(DoctorArgs),
    /// Load the probes and print each event (OOM kill, ...) as one JSON line until SIGINT.
    Events(RunArgs),
    /// Run the configured synthetic checks once and print the results (exit 1 if any fails).
    Check(CheckArgs),
    /// Console dashboard of a running daemon: checks (10 minutes, 1 hour), alerts, OOM and TCP.
    Top(TopArgs),
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Only these checks (repeatable).
    #[arg(long = "name")]
    names: Vec<String>,
    /// One JSON object per check instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TopArgs {
    /// Base URL of the daemon.
    #[arg(long, default_value = "http://127.0.0.1:9442")]
    url: String,
    /// Refresh of the 10-minute view.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// Refresh of the 1-hour view.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    refresh_long: Duration,
    /// Print one snapshot as text and exit (no terminal needed).
    #[arg(long)]
    once: bool,
    /// CA certificates (PEM) for an https:// daemon; default: the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Accept any certificate of an https:// daemon.
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Basic auth user for a daemon with basic_auth_users; the password comes from
    /// SENSOR_PASSWORD (never a flag: it would show in `ps`).
    #[arg(long)]
    user: Option<String>,
}

impl TopArgs {
    fn client(&self) -> anyhow::Result<sensor::checks::http::ToolClient> {
        let mut c = sensor::checks::http::ToolClient::default();
        if self.url.starts_with("https://") {
            let opts = sensor::checks::config::TlsOptions {
                ca_file: self.ca_file.clone(),
                insecure_skip_verify: self.insecure_skip_verify,
                ..Default::default()
            };
            c.tls = Some(sensor::checks::conn::tls_client(&opts, &[b"http/1.1"]).map_err(anyhow::Error::msg)?);
        }
        if let Some(user) = &self.user {
            let pw = std::env::var("SENSOR_PASSWORD")
                .map_err(|_| anyhow::anyhow!("--user needs the password in SENSOR_PASSWORD"))?;
            let token = sensor::webconfig::base64_encode(format!("{user}:{pw}").as_bytes());
            c.headers.push((
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(&format!("Basic {token}"))?,
            ));
        }
        Ok(c)
    }
}

/// Every flag overrides the config key of the same name (`a.b_c` -> `--a.b-c`).
#[derive(Args)]
struct RunArgs {
    /// YAML config file; unset means the embedded default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Fail unless every enabled probe attaches with its preferred hook.
    #[arg(long)]
    strict: bool,
    #[arg(long)]
    btf_path: Option<PathBuf>,
    #[arg(long)]
    tracefs_path: Option<PathBuf>,
    #[arg(long)]
    perf_ring_pages: Option<usize>,
    /// TLS and basic auth for the endpoints (Prometheus exporter-toolkit web config file).
    #[arg(long = "web.config.file")]
    web_config_file: Option<PathBuf>,
    #[arg(long = "probes.oom.enabled")]
    oom_enabled: Option<bool>,
    /// Hooks the OOM probe must not use, comma-separated (fentry,kprobe,raw_tracepoint,tracepoint).
    #[arg(long = "probes.oom.exclude-hooks", value_delimiter = ',')]
    oom_exclude_hooks: Option<Vec<sensor::probe::HookKind>>,
    #[arg(long = "probes.memcg.enabled")]
    memcg_enabled: Option<bool>,
    #[arg(long = "probes.memcg.discovery-interval", value_parser = humantime::parse_duration)]
    memcg_discovery_interval: Option<Duration>,
    /// Hooks the TCP probe must not use, comma-separated (raw_tracepoint,tracepoint).
    #[arg(long = "probes.tcp.exclude-hooks", value_delimiter = ',')]
    tcp_exclude_hooks: Option<Vec<sensor::probe::HookKind>>,
    #[arg(long = "probes.tcp.enabled")]
    tcp_enabled: Option<bool>,
    #[arg(long = "limits.workloads-per-metric")]
    workloads_per_metric: Option<usize>,
    #[arg(long = "limits.vanished-grace", value_parser = humantime::parse_duration)]
    vanished_grace: Option<Duration>,
    #[arg(long = "alerting.availability-threshold")]
    availability_threshold: Option<f64>,
    #[arg(long = "alerting.window", value_parser = humantime::parse_duration)]
    alerting_window: Option<Duration>,
    #[arg(long = "alerting.min-samples")]
    alerting_min_samples: Option<usize>,
    /// URL receiving each alert and recovery as a JSON POST.
    #[arg(long = "alerting.webhook")]
    alerting_webhook: Option<String>,
    #[arg(long = "events.history")]
    events_history: Option<usize>,
}

#[derive(Args)]
struct DoctorArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    btf_path: Option<PathBuf>,
    #[arg(long)]
    tracefs_path: Option<PathBuf>,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::parse(sensor::config::EMBEDDED_DEFAULT, "<embedded default>")?,
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        c.strict |= self.strict;
        if let Some(v) = &self.btf_path {
            c.btf_path = Some(v.clone());
        }
        if let Some(v) = &self.tracefs_path {
            c.tracefs_path = Some(v.clone());
        }
        if let Some(v) = self.perf_ring_pages {
            c.perf_ring_pages = v;
        }
        if let Some(v) = &self.web_config_file {
            c.web_config_file = Some(v.clone());
        }
        if let Some(v) = self.oom_enabled {
            c.probes.oom.enabled = v;
        }
        if let Some(v) = &self.oom_exclude_hooks {
            c.probes.oom.exclude_hooks = v.clone();
        }
        if let Some(v) = &self.tcp_exclude_hooks {
            c.probes.tcp.exclude_hooks = v.clone();
        }
        if let Some(v) = self.memcg_enabled {
            c.probes.memcg.enabled = v;
        }
        if let Some(v) = self.memcg_discovery_interval {
            c.probes.memcg.discovery_interval = v;
        }
        if let Some(v) = self.tcp_enabled {
            c.probes.tcp.enabled = v;
        }
        if let Some(v) = self.workloads_per_metric {
            c.limits.workloads_per_metric = v;
        }
        if let Some(v) = self.vanished_grace {
            c.limits.vanished_grace = v;
        }
        if let Some(v) = self.availability_threshold {
            c.alerting.availability_threshold = v;
        }
        if let Some(v) = self.alerting_window {
            c.alerting.window = v;
        }
        if let Some(v) = self.alerting_min_samples {
            c.alerting.min_samples = v;
        }
        if let Some(v) = &self.alerting_webhook {
            c.alerting.webhook = Some(v.clone());
        }
        if let Some(v) = self.events_history {
            c.events.history = v;
        }
        c.validate("<command line>")?;
        Ok(c)
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.cmd {
        Cmd::Run(args) => (|| -> anyhow::Result<()> {
            let cfg = args.config()?;
            if args.print_config {
                print!("{}", serde_yaml_ng::to_string(&cfg)?);
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run::run(cfg))
        })(),
        Cmd::Events(args) => (|| -> anyhow::Result<()> {
            let cfg = args.config()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run::events(cfg))
        })(),
        Cmd::Check(args) => (|| -> anyhow::Result<()> {
            let cfg = args.run.config()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let results = rt.block_on(sensor::checks::run_all_once(&cfg, &args.names))?;
            if args.json {
                for r in &results {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print!("{}", sensor::checks::render_results(&results));
            }
            let failed = results.iter().filter(|r| !r.success).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {} checks failed", results.len());
            }
            Ok(())
        })(),
        Cmd::Top(args) => (|| -> anyhow::Result<()> {
            let opts = sensor::top::TopOptions {
                client: args.client()?,
                url: args.url,
                short_refresh: args.refresh,
                long_refresh: args.refresh_long,
            };
            if args.once {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                print!("{}", rt.block_on(sensor::top::once(&opts))?);
                Ok(())
            } else {
                sensor::top::interactive(opts)
            }
        })(),
        Cmd::Doctor(args) => (|| -> anyhow::Result<()> {
            let opts = sensor::loader::LoadOptions {
                btf_path: args.btf_path,
                tracefs_path: args.tracefs_path,
                ..Default::default()
            };
            let r = doctor::report(&opts);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", doctor::render_text(&r));
            }
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
