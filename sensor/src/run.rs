//! The probe pipeline (load, attach, read, dispatch) and the commands built on it:
//! `sensor run` (pipeline + HTTP) and `sensor events` (pipeline + JSON lines on stdout).

use std::{
    io::Write as _,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::Ebpf;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    cgroup::{Discovery, Hierarchies},
    config::Config,
    dispatch::Dispatcher,
    events::EventHub,
    health::Health,
    http,
    kernel::{self, privileges},
    loader::{self, KernelContext, LoadOptions},
    memcg::MemcgSlice,
    metrics::{LostCollector, SelfMetrics},
    oom::OomSlice,
    probe::{ProbeReport, ProbeState},
    tcp::{TcpMaps, TcpSlice},
    transport::{self, KernelCounters},
};

pub fn load_options(cfg: &Config) -> LoadOptions {
    let mut disabled = Vec::new();
    if !cfg.probes.oom.enabled {
        disabled.push("oom");
    }
    if !cfg.probes.memcg.enabled {
        disabled.push("memcg");
    }
    if !cfg.probes.tcp.enabled {
        disabled.push("tcp");
    }
    let p = &cfg.probes;
    let excluded = p
        .oom
        .exclude_hooks
        .iter()
        .map(|h| ("oom", *h))
        .chain(p.memcg.exclude_hooks.iter().map(|h| ("memcg", *h)))
        .chain(p.tcp.exclude_hooks.iter().map(|h| ("tcp", *h)))
        .collect();
    let map_sizes = vec![
        ("TCP_CONNS", p.tcp.conn_slots()),
        ("TCP_COUNTS", p.tcp.max_series),
        ("TCP_HISTS", p.tcp.max_series),
    ];
    LoadOptions {
        btf_path: cfg.btf_path.clone(),
        tracefs_path: cfg.tracefs_path.clone(),
        disabled,
        excluded,
        map_sizes,
        tcp_dest_groups: crate::tcp::dest_group_bits(&p.tcp.destinations),
        tcp_conn_slots: p.tcp.conn_slots(),
        tcp_conn_max_age: p.tcp.connect_max_age,
        perf_ring_pages: Some(cfg.perf_ring_pages),
    }
}

/// Everything between the kernel and the exporters, running.
pub struct Pipeline {
    ebpf: Ebpf,
    pub reports: Vec<ProbeReport>,
    pub metrics: Arc<SelfMetrics>,
    pub hub: Arc<EventHub>,
    pub health: Arc<Health>,
    pub kernel_release: String,
    readers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    pub stop_rx: watch::Receiver<bool>,
}

fn log_reports(reports: &[ProbeReport]) {
    for r in reports {
        let hooks: Vec<&str> = r.hooks().iter().map(|h| h.label()).collect();
        let hooks = hooks.join(",");
        match &r.state {
            ProbeState::Attached => tracing::info!(probe = r.probe, %hooks, "probe attached"),
            ProbeState::Degraded { reason } => tracing::warn!(probe = r.probe, %hooks, %reason, "probe degraded"),
            ProbeState::Unsupported { reason } => tracing::error!(probe = r.probe, %reason, "probe unsupported"),
            ProbeState::Disabled => tracing::info!(probe = r.probe, "probe disabled by configuration"),
        }
    }
}

impl Pipeline {
    pub async fn start(cfg: &Config) -> anyhow::Result<Pipeline> {
        privileges::require_tracing()?;
        let kernel_release = kernel::release();
        let opts = load_options(cfg);
        let kopts = opts.clone();
        let kctx = tokio::task::spawn_blocking(move || KernelContext::discover(&kopts)).await?;
        if let Ok(t) = &kctx.tracefs {
            if t.mounted_by_sensor {
                tracing::info!(path = %t.root.display(), "mounted tracefs");
            }
        }
        let loaded = loader::load(&kctx, &opts).context("cannot load the sensor's eBPF programs")?;
        let mut ebpf = loaded.ebpf;
        let reports = loaded.reports;
        let rings = loaded.rings;
        log_reports(&reports);
        let enabled: Vec<_> = reports.iter().filter(|r| r.state != ProbeState::Disabled).collect();
        if enabled.is_empty() {
            bail!("every probe is disabled in the configuration; nothing to do");
        }
        if !enabled.iter().any(|r| r.state.running()) {
            let why: Vec<String> = enabled.iter().map(|r| format!("{}: {:?}", r.probe, r.state)).collect();
            bail!("no probe could be attached: {}", why.join("; "));
        }
        if cfg.strict {
            let bad: Vec<String> = enabled
                .iter()
                .filter(|r| r.state != ProbeState::Attached)
                .map(|r| format!("{} is {}", r.probe, r.state.label()))
                .collect();
            if !bad.is_empty() {
                bail!("--strict: {}", bad.join(", "));
            }
        }

        let probe_names: Vec<&'static str> = loader::registry().iter().map(|p| p.name).collect();
        let metrics = Arc::new(SelfMetrics::new(&kernel_release, &probe_names));
        metrics.set_probe_reports(&reports);
        let hub = Arc::new(EventHub::new(cfg.events.history));
        let oom = Arc::new(OomSlice::new(
            &metrics.registry,
            Arc::clone(&hub),
            cfg.limits.workloads_per_metric,
            cfg.limits.vanished_grace,
        )?);
        let memcg_running = reports.iter().any(|r| r.probe == "memcg" && r.state.running());
        let reclaim_map = if memcg_running {
            let m = ebpf.take_map("RECLAIM_HIST").context("RECLAIM_HIST map missing")?;
            Some(aya::maps::PerCpuHashMap::try_from(m).context("RECLAIM_HIST")?)
        } else {
            None
        };
        let grace = cfg.limits.vanished_grace;
        let disc = {
            let (n, g) = (cfg.limits.workloads_per_metric, grace);
            Arc::new(tokio::task::spawn_blocking(move || Discovery::new(Hierarchies::discover(), n, g)).await?)
        };
        let memcg = if cfg.probes.memcg.enabled {
            let m = &metrics.registry;
            Some(MemcgSlice::new(
                m,
                Arc::clone(&hub),
                cfg.probes.memcg.clone(),
                Arc::clone(&disc),
                grace,
                reclaim_map,
            )?)
        } else {
            None
        };
        let counters = Arc::new(Mutex::new(KernelCounters::new(
            ebpf.take_map("COUNTERS").context("COUNTERS map missing")?,
        )?));
        let probe_ids = vec![
            ("oom", sensor_common::record::probe_id::OOM),
            ("memcg", sensor_common::record::probe_id::MEMCG),
            ("tcp", sensor_common::record::probe_id::TCP),
        ];
        let misses = Arc::new(crate::kernel::progstats::ProgramMisses::collect(&ebpf, &reports));
        metrics.registry.register(Box::new(LostCollector::new(
            Arc::clone(&counters),
            probe_ids,
            misses,
            Arc::clone(&metrics.daemon_lost),
        )))?;
        let tcp = if reports.iter().any(|r| r.probe == "tcp" && r.state.running()) {
            Some(start_tcp(&mut ebpf, cfg, &metrics, &hub, &disc)?)
        } else {
            None
        };

        let dispatcher = Arc::new(Dispatcher {
            metrics: Arc::clone(&metrics),
            oom: Arc::clone(&oom),
            tcp: tcp.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let health = Arc::new(Health::new(metrics.internal_errors.clone()));
        let watch: Arc<dyn transport::ReaderWatch> = Arc::clone(&health) as _;
        let readers = transport::spawn_readers(rings, dispatcher, watch, stop_rx.clone())?;
        let refresher = {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let oom = Arc::clone(&oom);
                            let _ = tokio::task::spawn_blocking(move || oom.refresh()).await;
                        }
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        if let Some(m) = &memcg {
            m.start(stop_rx.clone());
        }
        // One maintenance loop: rescan the cgroup hierarchy, then let each slice tidy up.
        let maintenance = {
            let mut stop = stop_rx.clone();
            let stop_for_slices = stop_rx.clone();
            let interval = cfg.probes.memcg.discovery_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let (d, t) = (Arc::clone(&disc), tcp.clone());
                            let _ = tokio::task::spawn_blocking(move || {
                                d.rescan();
                                if let Some(t) = t {
                                    t.maintain();
                                }
                            })
                            .await;
                            if let Some(m) = &memcg {
                                m.after_rescan(&stop_for_slices);
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        let background = vec![refresher, maintenance];
        Ok(Pipeline {
            ebpf,
            reports,
            metrics,
            hub,
            health,
            kernel_release,
            readers,
            background,
            stop_tx,
            stop_rx,
        })
    }

    /// Detaches every program (no new events after this), then drains what the kernel already
    /// wrote and stops the readers.
    pub async fn shutdown(self) {
        let Pipeline {
            ebpf,
            readers,
            background,
            stop_tx,
            ..
        } = self;
        drop(ebpf);
        let _ = stop_tx.send(true);
        for r in readers.into_iter().chain(background) {
            let _ = r.await;
        }
    }
}

/// Takes the TCP maps, loads the destination groups into the kernel and builds the slice.
fn start_tcp(
    ebpf: &mut Ebpf,
    cfg: &Config,
    metrics: &SelfMetrics,
    hub: &Arc<EventHub>,
    disc: &Arc<Discovery>,
) -> anyhow::Result<Arc<TcpSlice>> {
    let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("{name} map missing"));
    let mut with_port = aya::maps::lpm_trie::LpmTrie::try_from(take("TCP_DEST_PORT")?)?;
    let mut any_port = aya::maps::lpm_trie::LpmTrie::try_from(take("TCP_DEST_ANY")?)?;
    crate::tcp::load_destinations(&cfg.probes.tcp.destinations, &mut with_port, &mut any_port)
        .map_err(|e| anyhow::anyhow!("probes.tcp.destinations: {e}"))?;
    let maps = TcpMaps {
        counts: aya::maps::PerCpuHashMap::try_from(take("TCP_COUNTS")?)?,
        host_counts: aya::maps::PerCpuArray::try_from(take("TCP_HOST_COUNTS")?)?,
        hists: aya::maps::PerCpuHashMap::try_from(take("TCP_HISTS")?)?,
    };
    // The loaded program references both tries, so they outlive these handles.
    Ok(TcpSlice::new(
        &metrics.registry,
        Arc::clone(hub),
        &cfg.probes.tcp,
        Arc::clone(disc),
        maps,
        cfg.limits.vanished_grace,
    )?)
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn any_probe_enabled(cfg: &Config) -> bool {
    cfg.probes.oom.enabled || cfg.probes.memcg.enabled || cfg.probes.tcp.enabled
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    // With every probe disabled the daemon runs only the synthetic checks: no BPF, no
    // privileges (a blackbox-style deployment of the same binary).
    let pipeline = if any_probe_enabled(&cfg) {
        Some(Pipeline::start(&cfg).await?)
    } else if cfg.checks.is_empty() {
        bail!("every probe is disabled and no checks are configured; nothing to do");
    } else {
        tracing::info!(
            checks = cfg.checks.len(),
            "every probe disabled: running synthetic checks only"
        );
        None
    };
    let (registry, hub, health, reports, kernel_release) = match &pipeline {
        Some(p) => (
            p.metrics.registry.clone(),
            Arc::clone(&p.hub),
            Arc::clone(&p.health),
            p.reports.clone(),
            p.kernel_release.clone(),
        ),
        None => {
            let release = kernel::release();
            let names: Vec<&'static str> = loader::registry().iter().map(|p| p.name).collect();
            let m = SelfMetrics::new(&release, &names);
            let health = Arc::new(Health::new(m.internal_errors.clone()));
            (
                m.registry,
                Arc::new(EventHub::new(cfg.events.history)),
                health,
                Vec::new(),
                release,
            )
        }
    };
    let (checks_stop_tx, checks_stop_rx) = watch::channel(false);
    let checks = if cfg.checks.is_empty() {
        None
    } else {
        let engine = crate::checks::Engine::new(&registry, &cfg.checks, &cfg.alerting)?;
        let tasks = engine.spawn(checks_stop_rx.clone());
        tracing::info!(checks = cfg.checks.len(), "synthetic checks running");
        Some((engine, tasks))
    };
    let state = http::AppState {
        registry,
        hub: Arc::clone(&hub),
        reports: Arc::new(RwLock::new(reports)),
        health: Arc::clone(&health),
        checks: checks.as_ref().map(|(e, _)| Arc::clone(e)),
        web: crate::web::Live::start(&hub, &kernel_release, checks_stop_rx.clone()),
    };
    // Read before any probe work would be wasted on a typo in it.
    let web = match &cfg.web_config_file {
        Some(p) => Some(crate::webconfig::Web::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let http_stop = checks_stop_rx.clone();
    let tls = web.as_ref().and_then(|w| w.tls.clone());
    let app = http::router(state, web);
    let server = tokio::spawn(async move {
        match tls {
            Some(acceptor) => http::serve_tls(listener, acceptor, app, http_stop).await,
            None => {
                let mut stop = http_stop;
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }
        }
    });
    health.set_started(true);
    tracing::info!(listen = %local, kernel = %kernel_release, "sensor running");

    let which = shutdown_signal().await?;
    tracing::info!(signal = which, "shutting down: detaching probes");
    health.set_started(false);
    let _ = checks_stop_tx.send(true);
    if let Some((_, tasks)) = checks {
        for t in tasks {
            let _ = t.await;
        }
    }
    if let Some(p) = pipeline {
        p.shutdown().await;
    }
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// `sensor events`: one JSON line per event on stdout until SIGTERM/SIGINT.
///
/// stdout is written by a thread of its own: a consumer that stops reading stalls only that
/// thread, never the readers. Events it falls behind on are skipped and counted (logged, and in
/// the final summary); a closed stdout ends the command with an error.
pub async fn events(cfg: Config) -> anyhow::Result<()> {
    let pipeline = Pipeline::start(&cfg).await?;
    let rx = pipeline.hub.subscribe();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sensor-events-out".into())
        .spawn(move || {
            let _ = done_tx.send(print_events(rx, std::io::stdout()));
        })
        .context("cannot start the event printer")?;
    tracing::info!("streaming events as JSON lines");
    let result = tokio::select! {
        sig = shutdown_signal() => {
            tracing::info!(signal = sig?, "stopping");
            Ok(())
        }
        printed = done_rx => match printed {
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("stdout")),
            _ => Ok(()),
        },
    };
    pipeline.shutdown().await;
    result
}

/// Writes each event as a JSON line until the hub closes or a write fails; skipped events are
/// counted and reported.
fn print_events(
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::events::Sequenced>>,
    out: impl std::io::Write,
) -> std::io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut out = std::io::LineWriter::new(out);
    let mut skipped = 0u64;
    loop {
        match rx.blocking_recv() {
            Ok(ev) => match serde_json::to_string(&*ev) {
                Ok(line) => writeln!(out, "{line}")?,
                Err(e) => tracing::error!(error = %e, seq = ev.seq, "event not serializable; skipped"),
            },
            Err(RecvError::Lagged(n)) => {
                skipped += n;
                tracing::warn!(
                    skipped = n,
                    total_skipped = skipped,
                    "stdout's reader fell behind; events skipped (still in /api/v1/events of a daemon)"
                );
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
