//! `sensor` command line. Errors are printed as one clear message, never a backtrace.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use sensor::{config::Config, doctor, run};

/// mimalloc in every build (glibc and the static musl one of `cargo xtask dist`): musl's own
/// malloc takes one global lock, which serialises tokio's worker threads on every allocation,
/// and glibc's keeps what start-up freed (the parsed kernel BTF) resident in per-thread arenas:
/// docs/footprint.md has the measurements. mimalloc rather than jemalloc because it is a single
/// C file that musl-tools' `musl-gcc` builds in seconds, with no autoconf step.
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
    /// Log lines queued for stderr before new ones are dropped (and counted in
    /// sensor_log_lines_dropped_total): a stalled log reader never blocks the sensor.
    #[arg(long, global = true, default_value_t = sensor::logging::QUEUE_LINES)]
    log_queue_lines: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (embedded default config unless --config is given).
    Run(RunArgs),
    /// Show what this kernel supports and which hook each probe would use.
    Doctor(DoctorArgs),
    /// Load the probes and print each event (OOM kill, ...) as one JSON line until SIGINT;
    /// with --since, print the journal's history instead (no probes loaded).
    Events(EventsArgs),
    /// Run the configured synthetic checks once and print the results (exit 1 if any fails).
    Check(CheckArgs),
    /// Console dashboard of a running daemon: checks (10 minutes, 1 hour), alerts, OOM and TCP.
    Top(TopArgs),
    /// Receive Alertmanager webhooks and run the configured actions behind guard rails
    /// (dry-run unless the config says `dry_run: false`).
    Remediate(RemediateArgs),
}

/// Flags override the config key of the same name.
#[derive(Args)]
struct RemediateArgs {
    /// YAML config file (deploy/remediate/remediate.yaml is a documented example); unset
    /// means defaults: dry run, no rules.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TLS, client certificates and basic auth (Prometheus exporter-toolkit web config file).
    #[arg(long = "web.config.file")]
    web_config_file: Option<PathBuf>,
    /// File with the token requests must carry as `Authorization: Bearer <token>`.
    #[arg(long)]
    bearer_token_file: Option<PathBuf>,
    /// `--dry-run false` runs the actions.
    #[arg(long)]
    dry_run: Option<bool>,
}

impl RemediateArgs {
    fn config(&self) -> anyhow::Result<sensor::remediate::config::Config> {
        use sensor::remediate::config::Config as RConfig;
        let mut c = match &self.config {
            Some(p) => RConfig::load(p)?,
            None => RConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.web_config_file {
            c.web_config_file = Some(v.clone());
        }
        if let Some(v) = &self.bearer_token_file {
            c.bearer_token_file = Some(v.clone());
        }
        if let Some(v) = self.dry_run {
            c.dry_run = v;
        }
        c.validate("<command line>")?;
        Ok(c)
    }
}

#[derive(Args)]
struct EventsArgs {
    /// Print every journaled event with a larger `seq` (history across restarts, from
    /// journal.path) and exit; 0 for everything the journal holds.
    #[arg(long)]
    since: Option<u64>,
    #[command(flatten)]
    run: RunArgs,
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
    #[command(flatten)]
    keys: ConfigFlags,
}

/// One flag per config key, derived from the keys themselves (see `config::flag_keys`).
#[derive(Default)]
struct ConfigFlags(Vec<sensor::config::Override>);

impl clap::FromArgMatches for ConfigFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for key in sensor::config::flag_keys() {
            if let Some(values) = m.get_many::<String>(&key.key) {
                given.push(sensor::config::Override {
                    values: values.cloned().collect(),
                    key,
                });
            }
        }
        Ok(ConfigFlags(given))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ConfigFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        use sensor::config::FlagKind;
        cmd = cmd.next_help_heading("Config keys (each overrides the key of the same name)");
        for k in sensor::config::flag_keys() {
            let mut arg = clap::Arg::new(k.key.clone())
                .long(k.flag.clone())
                .value_name(match k.kind {
                    FlagKind::Bool => "BOOL",
                    FlagKind::Text => "TEXT",
                    FlagKind::List => "LIST",
                    FlagKind::Yaml => "YAML",
                })
                .help(format!("config key {}", k.key));
            arg = match k.kind {
                FlagKind::Bool => arg
                    .num_args(0..=1)
                    .default_missing_value("true")
                    .action(clap::ArgAction::Set),
                FlagKind::List => arg.action(clap::ArgAction::Append),
                FlagKind::Text | FlagKind::Yaml => arg.action(clap::ArgAction::Set),
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args)]
struct DoctorArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// With the verifier's log under each program the kernel refused.
    #[arg(long)]
    verbose: bool,
    #[arg(long)]
    btf_path: Option<PathBuf>,
    #[arg(long)]
    tracefs_path: Option<PathBuf>,
    /// The daemon's config file: its `workloads.runtimes` are the runtimes checked.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::parse(sensor::config::EMBEDDED_DEFAULT, "<embedded default>")?,
        };
        Ok(c.with_overrides(&self.keys.0)?)
    }
}

fn main() -> ExitCode {
    sensor::alloc::configure();
    let cli = Cli::parse();
    let log = sensor::logging::init(&cli.log_format, cli.log_queue_lines);
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
            let cfg = args.run.config()?;
            if let Some(since) = args.since {
                run::print_history(&cfg, since, std::io::stdout().lock())?;
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run::events(cfg))
        })(),
        Cmd::Check(args) => (|| -> anyhow::Result<()> {
            let cfg = args.run.config()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let results = rt.block_on(sensor::checks::run_all_once(&cfg.checks, &cfg.alerting, &args.names))?;
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
        Cmd::Remediate(args) => (|| -> anyhow::Result<()> {
            let cfg = args.config()?;
            if args.print_config {
                print!("{}", serde_yaml_ng::to_string(&cfg)?);
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(sensor::remediate::run(cfg))
        })(),
        Cmd::Doctor(args) => (|| -> anyhow::Result<()> {
            let opts = sensor::loader::LoadOptions {
                btf_path: args.btf_path,
                tracefs_path: args.tracefs_path,
                perf_ring_pages: None,
                kernel_log: false,
            };
            let probes = sensor::probes::all(&sensor::config::Probes::default());
            let mut r = doctor::report(&opts, &probes);
            let cfg = match &args.config {
                Some(p) => Config::load(p)?,
                None => Config::parse(sensor::config::EMBEDDED_DEFAULT, "<embedded default>")?,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            r.runtimes = rt.block_on(sensor::workloads::doctor(&cfg.workloads));
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", doctor::render_text(&r, args.verbose));
            }
            Ok(())
        })(),
    };
    // Queued log lines get a moment to reach stderr; a stalled consumer never holds up exit.
    log.finish(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "sensor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
