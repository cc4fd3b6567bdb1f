//! The probe pipeline (load, attach, read, dispatch) and the commands built on it:
//! `sensor run` (pipeline + HTTP) and `sensor events` (pipeline + JSON lines on stdout).

use std::{
    io::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::Ebpf;
use sensor_common::names::maps;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    activity::ReclaimTimes,
    cgroup::{Discovery, Hierarchies},
    config::Config,
    dispatch::Dispatcher,
    events::EventHub,
    health::Health,
    http,
    kernel::{self, privileges},
    loader::{self, LoadOptions},
    metrics::{LostCollector, SelfMetrics},
    probe::{Probe, ProbeReport, ProbeSpec, ProbeState, RecordKind, Running, StartContext},
    transport::{self, KernelCounters},
};

pub fn load_options(cfg: &Config) -> LoadOptions {
    LoadOptions {
        btf_path: cfg.btf_path.clone(),
        tracefs_path: cfg.tracefs_path.clone(),
        perf_ring_pages: Some(cfg.perf_ring_pages),
        kernel_log: cfg.kernel_log,
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
    /// The probes' running halves, told to finish after the readers' final drain.
    running: Vec<Arc<dyn Running>>,
    /// What the web view's summary reads of the probes and of the losses.
    pub sources: crate::web::Sources,
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

/// Fails when nothing is enabled, nothing attached, or (with `strict`) anything fell back.
fn check_outcome(reports: &[ProbeReport], strict: bool) -> anyhow::Result<()> {
    let enabled: Vec<_> = reports.iter().filter(|r| r.state != ProbeState::Disabled).collect();
    if enabled.is_empty() {
        bail!("every probe is disabled in the configuration; nothing to do");
    }
    if !enabled.iter().any(|r| r.state.running()) {
        let why: Vec<String> = enabled.iter().map(|r| format!("{}: {:?}", r.probe, r.state)).collect();
        bail!("no probe could be attached: {}", why.join("; "));
    }
    if strict {
        let bad: Vec<String> = enabled
            .iter()
            .filter(|r| r.state != ProbeState::Attached)
            .map(|r| format!("{} is {}", r.probe, r.state.label()))
            .collect();
        if !bad.is_empty() {
            bail!("--strict: {}", bad.join(", "));
        }
    }
    Ok(())
}

/// Learns the kernel and loads and attaches every probe, off the async threads.
async fn load_probes(cfg: &Config, probes: &[Arc<dyn Probe>]) -> anyhow::Result<loader::Loaded> {
    let opts = load_options(cfg);
    let probes = probes.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut kctx = opts.kernel_context();
        if let Ok(t) = &kctx.tracefs {
            if t.mounted_by_sensor {
                tracing::info!(path = %t.root.display(), "mounted tracefs");
            }
        }
        loader::load(&mut kctx, &probes, &opts).context("cannot load the sensor's eBPF programs")
    })
    .await?
}

/// A probe that started, with what the dispatcher and the background loops need of it.
struct Started {
    name: &'static str,
    records: &'static [RecordKind],
    discovery: Option<Duration>,
    running: Arc<dyn Running>,
}

/// Starts the running half of every enabled probe and the kernel-loss collector, off the async
/// threads (they read /proc, kallsyms and cgroupfs). Returns the object back with the probes.
fn start_probes(
    mut ebpf: Ebpf,
    cfg: &Config,
    probes: &[Arc<dyn Probe>],
    reports: &[ProbeReport],
    metrics: &SelfMetrics,
    hub: &Arc<EventHub>,
    discovery: &Arc<Discovery>,
) -> anyhow::Result<(Ebpf, Vec<Started>, Arc<LostCollector>)> {
    // What one probe measures and others read goes through the start context, not the registry.
    let reclaim = Arc::new(ReclaimTimes::default());
    discovery.rank_by_reclaim(Arc::clone(&reclaim));
    let mut started = Vec::new();
    for (p, report) in probes.iter().zip(reports) {
        if !p.section().enabled() {
            continue;
        }
        let mut ctx = StartContext {
            ebpf: &mut ebpf,
            report,
            registry: &metrics.registry,
            sources: &metrics.sources,
            hub,
            discovery,
            workloads_per_metric: cfg.limits.workloads_per_metric,
            vanished_grace: cfg.limits.vanished_grace,
            reclaim: &reclaim,
        };
        let running = p
            .start(&mut ctx)
            .with_context(|| format!("starting the {} probe", p.spec().name))?;
        started.push(Started {
            name: p.spec().name,
            records: p.spec().records,
            discovery: p.discovery_interval(),
            running,
        });
    }
    let counters = Arc::new(Mutex::new(KernelCounters::new(
        ebpf.take_map(maps::COUNTERS).context("COUNTERS map missing")?,
    )?));
    let specs: Vec<&ProbeSpec> = probes.iter().map(|p| p.spec()).collect();
    let ids = specs.iter().map(|s| (s.name, s.counter_id)).collect();
    let misses = Arc::new(crate::progstats::ProgramMisses::collect(&ebpf, &specs, reports));
    let lost = Arc::new(LostCollector::new(
        counters,
        ids,
        misses,
        Arc::clone(&metrics.daemon_lost),
    ));
    metrics.sources.add(Arc::clone(&lost) as Arc<dyn crate::expo::Source>);
    Ok((ebpf, started, lost))
}

/// Runs `work` off the async threads every `interval` until `stop`; a failure (panic) is
/// logged and counted under `task`, and the loop goes on.
fn every(
    task: String,
    interval: Duration,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
    work: Arc<dyn Fn() + Send + Sync>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let w = Arc::clone(&work);
                    if let Err(e) = tokio::task::spawn_blocking(move || w()).await {
                        health.failed(&task);
                        tracing::error!(task = %task, error = %e, "background task failed; it runs again at its next interval");
                    }
                }
                _ = stop.changed() => return,
            }
        }
    })
}

/// Each probe's upkeep at its own interval, one workload rescan loop at the shortest interval a
/// probe asked for (followed by each probe's `after_discovery`), and the probes' own tasks.
fn spawn_background(
    started: &[Started],
    discovery: &Arc<Discovery>,
    health: &Arc<Health>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for s in started {
        tasks.extend(s.running.spawn(stop.clone()));
        if let Some(interval) = s.running.upkeep_interval() {
            let r = Arc::clone(&s.running);
            let work: Arc<dyn Fn() + Send + Sync> = Arc::new(move || r.upkeep());
            tasks.push(every(
                format!("{}_upkeep", s.name),
                interval,
                Arc::clone(health),
                stop.clone(),
                work,
            ));
        }
    }
    if let Some(interval) = started.iter().filter_map(|s| s.discovery).min() {
        let running: Vec<Arc<dyn Running>> = started.iter().map(|s| Arc::clone(&s.running)).collect();
        let (disc, stop_for_probes) = (Arc::clone(discovery), stop.clone());
        let work: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            disc.rescan();
            for r in &running {
                r.after_discovery(&stop_for_probes);
            }
        });
        tasks.push(every(
            "discovery".into(),
            interval,
            Arc::clone(health),
            stop.clone(),
            work,
        ));
    }
    tasks
}

impl Pipeline {
    /// `journal`: write events to the on-disk journal (`sensor run`; `sensor events` only
    /// watches and leaves the journal to the daemon).
    pub async fn start(cfg: &Config, journal: bool) -> anyhow::Result<Pipeline> {
        privileges::require_tracing()?;
        let kernel_release = kernel::release();
        let probes = crate::probes::all(&cfg.probes);
        // Everything slow that does not need the programs happens before they attach: between
        // attaching and the readers' start the rings must hold what the kernel sends.
        let discovery = {
            let (n, g) = (cfg.limits.workloads_per_metric, cfg.limits.vanished_grace);
            Arc::new(tokio::task::spawn_blocking(move || Discovery::new(Hierarchies::discover(), n, g)).await?)
        };
        let (journal, journal_metrics) = {
            let mut jc = cfg.journal.clone();
            jc.enabled &= journal;
            open_journal(jc).await?
        };
        let loaded = load_probes(cfg, &probes).await?;
        let (ebpf, reports, rings, kernel_log) = (loaded.ebpf, loaded.reports, loaded.rings, loaded.kernel_log);
        log_reports(&reports);
        check_outcome(&reports, cfg.strict)?;

        let specs: Vec<&ProbeSpec> = probes.iter().map(|p| p.spec()).collect();
        let names: Vec<&'static str> = specs.iter().map(|s| s.name).collect();
        let metrics = Arc::new(SelfMetrics::new(&kernel_release, &names));
        metrics.set_probe_reports(&specs, &reports);
        // Workload names: looked up on this runtime, never on a reader's path.
        let resolver =
            crate::workloads::Resolver::new(&cfg.workloads, &metrics.registry, tokio::runtime::Handle::current())?;
        discovery.set_resolver(Arc::new(resolver));
        metrics.registry.register(Box::new(discovery.retired_metric()))?;
        discovery.left_out_metrics().register(&metrics.registry)?;
        journal_metrics.register(&metrics.registry)?;
        let hub = Arc::new(EventHub::with_journal(cfg.events.history, journal));
        let (ebpf, started, lost) = {
            let (cfg, probes, reports) = (cfg.clone(), probes.clone(), reports.clone());
            let (metrics, hub, discovery) = (Arc::clone(&metrics), Arc::clone(&hub), Arc::clone(&discovery));
            tokio::task::spawn_blocking(move || start_probes(ebpf, &cfg, &probes, &reports, &metrics, &hub, &discovery))
                .await??
        };
        crate::alloc::release_free_memory();

        let dispatcher = Arc::new(Dispatcher::new(
            Arc::clone(&metrics),
            started
                .iter()
                .map(|s| (s.name, s.records, Arc::clone(&s.running)))
                .collect(),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let health = Arc::new(Health::new(metrics.internal_errors.clone()));
        let watch: Arc<dyn transport::ReaderWatch> = Arc::clone(&health) as _;
        let readers = transport::spawn_readers(rings, dispatcher, watch, stop_rx.clone())?;
        let mut background = spawn_background(&started, &discovery, &health, &stop_rx);
        if let Some(logger) = kernel_log {
            background.push(crate::kernel_log::spawn_reader(
                logger,
                Arc::clone(&health),
                stop_rx.clone(),
            )?);
            tracing::info!("kernel diagnostics on (kernel_log)");
        }
        Ok(Pipeline {
            ebpf,
            reports,
            metrics,
            hub,
            health,
            kernel_release,
            readers,
            background,
            running: started.iter().map(|s| Arc::clone(&s.running)).collect(),
            sources: crate::web::Sources {
                parts: view_parts(&probes, &started),
                lost: Some(lost),
            },
            stop_tx,
            stop_rx,
        })
    }

    /// Detaches every program (no new events after this), then drains what the kernel already
    /// wrote, stops the readers and closes the journal (a clean end).
    pub async fn shutdown(self) {
        let Pipeline {
            ebpf,
            readers,
            background,
            running,
            stop_tx,
            hub,
            ..
        } = self;
        drop(ebpf);
        let _ = stop_tx.send(true);
        for r in readers.into_iter().chain(background) {
            if let Err(e) = r.await {
                tracing::error!(error = %e, "a task failed while stopping");
            }
        }
        let finish = tokio::task::spawn_blocking(move || running.iter().for_each(|r| r.finish()));
        if let Err(e) = finish.await {
            tracing::error!(error = %e, "a probe failed to finish");
        }
        close_hub(hub).await;
    }
}

/// Opens the configured journal off the runtime's threads (it reads every segment).
async fn open_journal(
    jc: crate::journal::JournalConfig,
) -> anyhow::Result<(Option<Arc<crate::journal::Journal>>, crate::journal::JournalMetrics)> {
    Ok(tokio::task::spawn_blocking(move || crate::journal::open_configured(&jc)).await??)
}

/// Closes the hub's journal (writes what is queued, syncs) off the runtime's threads.
async fn close_hub(hub: Arc<EventHub>) {
    if let Err(e) = tokio::task::spawn_blocking(move || hub.close()).await {
        tracing::error!(error = %e, "closing the journal failed");
    }
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
    crate::probes::all(&cfg.probes).iter().any(|p| p.section().enabled())
}

/// The kernel side when probes are enabled, or only the self metrics when the daemon runs
/// synthetic checks alone (no BPF, no privileges: a blackbox-style deployment).
struct Core {
    pipeline: Option<Pipeline>,
    registry: prometheus::Registry,
    /// What /metrics renders besides the registry.
    metric_sources: crate::expo::Sources,
    hub: Arc<EventHub>,
    health: Arc<Health>,
    reports: Vec<ProbeReport>,
    kernel_release: String,
    sources: crate::web::Sources,
}

async fn start_core(cfg: &Config) -> anyhow::Result<Core> {
    if any_probe_enabled(cfg) {
        let p = Pipeline::start(cfg, true).await?;
        return Ok(Core {
            registry: p.metrics.registry.clone(),
            metric_sources: p.metrics.sources.clone(),
            hub: Arc::clone(&p.hub),
            health: Arc::clone(&p.health),
            reports: p.reports.clone(),
            kernel_release: p.kernel_release.clone(),
            sources: p.sources.clone(),
            pipeline: Some(p),
        });
    }
    if cfg.checks.is_empty() {
        bail!("every probe is disabled and no checks are configured; nothing to do");
    }
    tracing::info!(
        checks = cfg.checks.len(),
        "every probe disabled: running synthetic checks only"
    );
    let kernel_release = kernel::release();
    let names: Vec<&'static str> = crate::probes::specs().iter().map(|s| s.name).collect();
    let m = SelfMetrics::new(&kernel_release, &names);
    // Check alerts are events too: they keep their history across restarts like any other.
    let (journal, journal_metrics) = open_journal(cfg.journal.clone()).await?;
    journal_metrics.register(&m.registry)?;
    Ok(Core {
        pipeline: None,
        health: Arc::new(Health::new(m.internal_errors.clone())),
        registry: m.registry,
        metric_sources: m.sources,
        hub: Arc::new(EventHub::with_journal(cfg.events.history, journal)),
        reports: Vec::new(),
        kernel_release,
        sources: crate::web::Sources {
            parts: view_parts(&crate::probes::all(&cfg.probes), &[]),
            lost: None,
        },
    })
}

/// The web summary's parts: every probe with a section, started or not (then `running` is
/// `None`), so the summary's shape does not depend on the configuration.
fn view_parts(probes: &[Arc<dyn Probe>], started: &[Started]) -> Vec<crate::web::Part> {
    probes
        .iter()
        .filter_map(|p| {
            let spec = p.spec();
            spec.view.map(|view| crate::web::Part {
                probe: spec.name,
                spec: view,
                running: started
                    .iter()
                    .find(|s| s.name == spec.name)
                    .map(|s| Arc::clone(&s.running)),
            })
        })
        .collect()
}

/// The synthetic checks' engine and its tasks.
type RunningChecks = (Arc<crate::checks::Engine>, Vec<JoinHandle<()>>);

/// The synthetic checks, when any are configured; their alerts become `check_alert` events.
fn start_checks(
    cfg: &Config,
    registry: &prometheus::Registry,
    sources: &crate::expo::Sources,
    hub: &Arc<EventHub>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Option<RunningChecks>> {
    if cfg.checks.is_empty() {
        return Ok(None);
    }
    let (checks, vantage) = cfg.vantage.select(&cfg.checks);
    tracing::info!(
        running = checks.len(),
        sampled_out = vantage.sampled_out.len(),
        location = %vantage.location,
        node = %vantage.node,
        "synthetic checks running"
    );
    let engine = crate::checks::Engine::new(registry, sources, &checks, &cfg.alerting, vantage)?;
    engine.publish_alerts_to(Arc::clone(hub));
    let tasks = engine.spawn(stop.clone());
    Ok(Some((engine, tasks)))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    // Read first: probe work would be wasted on a typo in it.
    let web = match &cfg.web_config_file {
        Some(p) => Some(crate::webconfig::Web::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let core = start_core(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let checks = start_checks(&cfg, &core.registry, &core.metric_sources, &core.hub, &stop_rx)?;
    let state = http::AppState {
        registry: core.registry.clone(),
        sources: core.metric_sources.clone(),
        hub: Arc::clone(&core.hub),
        reports: Arc::new(RwLock::new(core.reports.clone())),
        health: Arc::clone(&core.health),
        checks: checks.as_ref().map(|(e, _)| Arc::clone(e)),
    };
    let view = crate::web::routes(
        state.clone(),
        crate::web::Live::start(&core.hub, &core.kernel_release, core.sources.clone(), stop_rx.clone()),
    );
    let listener = crate::http::listen(cfg.listen, cfg.http.max_connections)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let tls = web.as_ref().and_then(|w| w.tls.clone());
    let http_metrics = http::HttpMetrics::new(&core.registry)?;
    let app = http::router(state, view, web);
    let server = tokio::spawn(http::serve(
        listener,
        app,
        tls,
        cfg.http.clone(),
        http_metrics,
        stop_rx.clone(),
    ));
    core.health.set_started(true);
    tracing::info!(listen = %local, kernel = %core.kernel_release, "sensor running");

    let which = shutdown_signal().await?;
    tracing::info!(signal = which, "shutting down: detaching probes");
    core.health.set_started(false);
    let _ = stop_tx.send(true);
    let tasks = checks.into_iter().flat_map(|(_, t)| t).chain(std::iter::once(server));
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "a task failed while stopping");
        }
    }
    match core.pipeline {
        Some(p) => p.shutdown().await,
        None => close_hub(core.hub).await,
    }
    tracing::info!("stopped");
    Ok(())
}

/// `sensor events`: one JSON line per event on stdout until SIGTERM/SIGINT.
///
/// stdout is written by a thread of its own: a consumer that stops reading stalls only that
/// thread, never the readers. Events it falls behind on are skipped and counted (logged as they
/// happen, and in the summary at the end); a closed stdout ends the command with an error.
pub async fn events(cfg: Config) -> anyhow::Result<()> {
    let pipeline = Pipeline::start(&cfg, false).await?;
    let rx = pipeline.hub.subscribe();
    let counts = Arc::new(PrintCounts::default());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let c = Arc::clone(&counts);
    std::thread::Builder::new()
        .name("sensor-events-out".into())
        .spawn(move || {
            let _ = done_tx.send(print_events(rx, std::io::stdout(), &c));
        })
        .context("cannot start the event printer")?;
    tracing::info!("streaming events as JSON lines");
    let mut done_rx = done_rx;
    let stopped_by_printer = tokio::select! {
        sig = shutdown_signal() => {
            tracing::info!(signal = sig?, "stopping");
            None
        }
        printed = &mut done_rx => Some(printed),
    };
    // Stopping drops every sender of the hub: the printer writes what is queued and ends.
    pipeline.shutdown().await;
    let printed = match stopped_by_printer {
        Some(p) => Some(p),
        None => tokio::time::timeout(Duration::from_secs(2), done_rx).await.ok(),
    };
    tracing::info!(
        printed = counts.printed.load(Ordering::Relaxed),
        skipped = counts.skipped.load(Ordering::Relaxed),
        "event stream ended"
    );
    match printed {
        Some(Ok(Err(e))) => Err(anyhow::Error::new(e).context("stdout")),
        _ => Ok(()),
    }
}

/// `sensor events --since N`: prints every journaled event with `seq > N` as a JSON line,
/// oldest first, and returns how many (reads the journal's files; loads no probe).
pub fn print_history(cfg: &Config, since: u64, out: impl std::io::Write) -> anyhow::Result<u64> {
    if !cfg.journal.enabled {
        bail!("journal.enabled is false: no event history is kept across restarts");
    }
    let dir = &cfg.journal.path;
    if !dir.is_dir() {
        bail!("no journal at {} (journal.path)", dir.display());
    }
    let mut out = std::io::BufWriter::new(out);
    let mut n = 0u64;
    let mut failed = None;
    crate::journal::each_event(dir, since, |_, json| {
        match writeln!(out, "{}", serde_json::Value::Object(json)) {
            Ok(()) => {
                n += 1;
                true
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })
    .with_context(|| format!("reading the journal at {}", dir.display()))?;
    if let Some(e) = failed {
        return Err(anyhow::Error::new(e).context("stdout"));
    }
    out.flush().context("stdout")?;
    Ok(n)
}

/// What the event printer wrote and what it had to skip.
#[derive(Default)]
struct PrintCounts {
    printed: AtomicU64,
    skipped: AtomicU64,
}

/// Writes each event as a JSON line until the hub closes or a write fails.
fn print_events(
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::events::Sequenced>>,
    out: impl std::io::Write,
    counts: &PrintCounts,
) -> std::io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut out = std::io::LineWriter::new(out);
    loop {
        match rx.blocking_recv() {
            Ok(ev) => match serde_json::to_string(&*ev) {
                Ok(line) => {
                    writeln!(out, "{line}")?;
                    counts.printed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::error!(error = %e, seq = ev.seq, "event not serializable; skipped"),
            },
            Err(RecvError::Lagged(n)) => {
                let total = counts.skipped.fetch_add(n, Ordering::Relaxed) + n;
                tracing::warn!(
                    skipped = n,
                    total_skipped = total,
                    "stdout's reader fell behind; events skipped (still in /api/v1/events of a daemon)"
                );
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
