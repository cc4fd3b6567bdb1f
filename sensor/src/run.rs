//! `sensor run`: load, attach, read, serve, and shut down cleanly on SIGTERM/SIGINT.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex, RwLock,
};

use anyhow::{bail, Context as _};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    config::Config,
    dispatch::Dispatcher,
    events::EventHub,
    http,
    kernel::{self, privileges},
    loader::{self, KernelContext, LoadOptions},
    metrics::{LostCollector, SelfMetrics},
    oom::OomSlice,
    probe::ProbeState,
    transport::{self, KernelCounters},
};

pub fn load_options(cfg: &Config) -> LoadOptions {
    let mut disabled = Vec::new();
    if !cfg.probes.oom.enabled {
        disabled.push("oom");
    }
    LoadOptions {
        btf_path: cfg.btf_path.clone(),
        tracefs_path: cfg.tracefs_path.clone(),
        disabled,
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    privileges::require_tracing()?;
    let kernel_release = kernel::release();
    let opts = load_options(&cfg);
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
    for r in &reports {
        match &r.state {
            ProbeState::Attached { hook } => tracing::info!(probe = r.probe, hook = hook.label(), "probe attached"),
            ProbeState::Degraded { hook, reason } => {
                tracing::warn!(probe = r.probe, hook = hook.label(), %reason, "probe attached with a fallback hook")
            }
            ProbeState::Unsupported { reason } => tracing::error!(probe = r.probe, %reason, "probe unsupported"),
            ProbeState::Disabled => tracing::info!(probe = r.probe, "probe disabled by configuration"),
        }
    }
    let enabled: Vec<_> = reports.iter().filter(|r| r.state != ProbeState::Disabled).collect();
    if enabled.is_empty() {
        bail!("every probe is disabled in the configuration; nothing to do");
    }
    if !enabled.iter().any(|r| r.state.hook().is_some()) {
        let why: Vec<String> = enabled.iter().map(|r| format!("{}: {:?}", r.probe, r.state)).collect();
        bail!("no probe could be attached: {}", why.join("; "));
    }
    if cfg.strict {
        let bad: Vec<String> = enabled
            .iter()
            .filter(|r| !matches!(r.state, ProbeState::Attached { .. }))
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
    let oom = OomSlice::new(&metrics.registry, Arc::clone(&hub))?;
    let counters = KernelCounters::new(ebpf.take_map("COUNTERS").context("COUNTERS map missing")?)?;
    let probe_ids = vec![("oom", sensor_common::record::probe_id::OOM)];
    metrics
        .registry
        .register(Box::new(LostCollector::new(Arc::new(Mutex::new(counters)), probe_ids)))?;

    let dispatcher = Arc::new(Dispatcher {
        metrics: Arc::clone(&metrics),
        oom,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let readers = transport::spawn_readers(
        ebpf.take_map("EVENTS").context("EVENTS map missing")?,
        cfg.perf_ring_pages,
        dispatcher,
        stop_rx.clone(),
    )?;

    let ready = Arc::new(AtomicBool::new(false));
    let state = http::AppState {
        registry: metrics.registry.clone(),
        hub: Arc::clone(&hub),
        reports: Arc::new(RwLock::new(reports)),
        ready: Arc::clone(&ready),
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        let r = axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    ready.store(true, Ordering::Release);
    tracing::info!(listen = %local, kernel = %kernel_release, "sensor running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down: detaching probes");
    ready.store(false, Ordering::Release);
    // Dropping the object detaches every program and link; no new events after this.
    drop(ebpf);
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}
