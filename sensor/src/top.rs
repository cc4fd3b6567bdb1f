//! `sensor top`: a console dashboard of a running daemon, usable over SSH.
//!
//! It only reads the daemon's HTTP API (`/api/v1/checks`, `/api/v1/summary`), the endpoints the
//! web view (`/`) draws from, so it needs no privileges and the console and the page never
//! disagree.

use std::time::{Duration, Instant};

use ratatui::{
    backend::{Backend, TestBackend},
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
    Frame, Terminal,
};
use serde_json::Value;

pub struct TopOptions {
    /// Daemon base URL, e.g. `http://127.0.0.1:9442`.
    pub url: String,
    /// TLS and basic auth for a daemon behind `--web.config.file`.
    pub client: crate::checks::http::ToolClient,
    /// Refresh of the 10-minute view.
    pub short_refresh: Duration,
    /// Refresh of the 1-hour view.
    pub long_refresh: Duration,
}

/// What the dashboard shows; filled from the daemon's API.
#[derive(Default)]
pub struct Model {
    pub url: String,
    pub checks: Vec<Value>,
    /// Check name -> its 1h window, refreshed on the long interval.
    pub long: std::collections::BTreeMap<String, Value>,
    pub alerts: Vec<Value>,
    pub threshold: Option<f64>,
    pub probes: Vec<(String, String)>,
    /// Kills counted and the newest kill (`oom` in `/api/v1/summary`).
    pub oom_kills_total: f64,
    pub last_kill: Option<Value>,
    /// `oom_imminent` warnings holding now, newest first.
    pub imminent: Vec<Value>,
    /// Failed connects by result (`tcp.totals` in `/api/v1/summary`).
    pub tcp_failures: std::collections::BTreeMap<String, u64>,
    pub tcp_failures_total: u64,
    pub updated: Option<String>,
    pub long_updated: Option<String>,
    pub error: Option<String>,
    pub refresh: (Duration, Duration),
    pub client: crate::checks::http::ToolClient,
    /// Alerts scrolled past (newest first), so every alert in the history can be read.
    pub alert_scroll: usize,
}

async fn get_json(client: &crate::checks::http::ToolClient, url: &str) -> Result<Value, String> {
    let (status, body) = client.get(url, Duration::from_secs(3)).await?;
    if status == 401 {
        return Err(format!(
            "{url}: HTTP 401: the daemon wants basic auth (--user, SENSOR_PASSWORD)"
        ));
    }
    if status != 200 {
        return Err(format!("{url}: HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}

fn clock() -> String {
    let s = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    s.get(11..19).unwrap_or(&s).to_string()
}

impl Model {
    pub fn new(url: &str, refresh: (Duration, Duration), client: crate::checks::http::ToolClient) -> Model {
        Model {
            url: url.trim_end_matches('/').to_string(),
            refresh,
            client,
            ..Default::default()
        }
    }

    /// The 10-minute view, alerts, probes and kernel events.
    pub async fn refresh_short(&mut self) {
        match self.fetch_short().await {
            Ok(()) => {
                self.error = None;
                self.updated = Some(clock());
            }
            Err(e) => self.error = Some(e),
        }
    }

    async fn fetch_short(&mut self) -> Result<(), String> {
        let checks = get_json(&self.client, &format!("{}/api/v1/checks", self.url)).await?;
        self.checks = checks["checks"].as_array().cloned().unwrap_or_default();
        self.alerts = checks["alerts"].as_array().cloned().unwrap_or_default();
        self.threshold = checks["alerting"]["availability_threshold"].as_f64();
        // The kernel side comes from the summary the web view draws, so both show the same.
        let sum = get_json(&self.client, &format!("{}/api/v1/summary", self.url)).await?;
        self.probes = sum["probes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        let name = p["probe"].as_str().unwrap_or("?").to_string();
                        (name, p["state"].as_str().unwrap_or("?").to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.oom_kills_total = sum["oom"]["kills_total"].as_f64().unwrap_or(0.0);
        self.last_kill = sum["oom"]["recent"].get(0).cloned();
        self.imminent = sum["oom"]["imminent"].as_array().cloned().unwrap_or_default();
        self.tcp_failures = sum["tcp"]["totals"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "success")
            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as u64)))
            .filter(|(_, v)| *v > 0)
            .collect();
        self.tcp_failures_total = self.tcp_failures.values().sum();
        Ok(())
    }

    /// The 1-hour view: copied from the checks' "1h" windows.
    pub async fn refresh_long(&mut self) {
        match get_json(&self.client, &format!("{}/api/v1/checks", self.url)).await {
            Ok(v) => {
                self.long = v["checks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["windows"]["1h"].clone())))
                    .collect();
                self.long_updated = Some(clock());
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn probe_running(&self, name: &str) -> bool {
        self.probes
            .iter()
            .any(|(n, s)| n == name && (s == "attached" || s == "degraded"))
    }
}

fn secs(v: &Value) -> String {
    match v.as_f64() {
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|a| format!("{:.1}%", a * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn codes(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k}:{}", n.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn window_table<'a>(title: String, rows: Vec<(String, String, Option<bool>, &'a Value, String)>) -> Table<'a> {
    // The name column fits the longest name (up to 32), the error column takes the rest.
    let name_width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(5).clamp(5, 32) as u16;
    let header = Row::new(
        [
            "CHECK",
            "TYPE",
            "UP",
            "AVAIL",
            "RUNS",
            "AVG",
            "MAX",
            "AVG TTFB",
            "MAX TTFB",
            "CODES",
            "LAST ERROR",
        ]
        .into_iter()
        .map(|h| Cell::from(h).style(Style::default().add_modifier(Modifier::BOLD))),
    );
    let body = rows.into_iter().map(|(name, kind, up, w, err)| {
        let (up_s, color) = match up {
            Some(true) => ("up", Color::Green),
            Some(false) => ("DOWN", Color::Red),
            None => ("-", Color::Gray),
        };
        Row::new(vec![
            Cell::from(name),
            Cell::from(kind),
            Cell::from(up_s).style(Style::default().fg(color)),
            Cell::from(pct(&w["availability"])),
            Cell::from(w["runs"].as_u64().unwrap_or(0).to_string()),
            Cell::from(secs(&w["avg_response_seconds"])),
            Cell::from(secs(&w["max_response_seconds"])),
            Cell::from(secs(&w["avg_ttfb_seconds"])),
            Cell::from(secs(&w["max_ttfb_seconds"])),
            Cell::from(codes(&w["codes"])),
            Cell::from(err),
        ])
    });
    Table::new(
        body,
        [
            Constraint::Length(name_width),
            Constraint::Length(9),
            Constraint::Length(4),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(14),
            Constraint::Fill(1),
        ],
    )
    .header(header)
    .block(Block::default().borders(Borders::ALL).title(title))
}

static NULL: Value = Value::Null;

/// Draws the whole dashboard; pure function of the model, so it renders the same in a test
/// buffer as on a terminal.
pub fn draw(f: &mut Frame, m: &Model) {
    let area = f.area();
    let n = m.checks.len() as u16;
    let kernel_lines = 4u16;
    let [head, short, long, alerts, kernel] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(n + 3),
        Constraint::Length(n + 3),
        Constraint::Min(4),
        Constraint::Length(kernel_lines),
    ])
    .areas(area);
    let mut title = vec![
        Span::styled("sensor top ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "{}  updated {}  ",
            m.url,
            m.updated.as_deref().unwrap_or("never")
        )),
        Span::styled(
            "q quits, r refreshes, arrows scroll alerts",
            Style::default().fg(Color::DarkGray),
        ),
    ];
    if let Some(e) = &m.error {
        title.push(Span::styled(format!("  ! {e}"), Style::default().fg(Color::Red)));
    }
    f.render_widget(Paragraph::new(Line::from(title)), head);

    let rows_short = m
        .checks
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("?").to_string(),
                c["type"].as_str().unwrap_or("?").to_string(),
                c["up"].as_bool(),
                &c["windows"]["10m"],
                c["last"]["error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    f.render_widget(
        window_table(
            format!(" Checks: last 10 minutes (every {}) ", fmt_dur(m.refresh.0)),
            rows_short,
        ),
        short,
    );
    let rows_long = m
        .checks
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap_or("?").to_string();
            let w = m.long.get(&name).unwrap_or(&NULL);
            (
                name,
                c["type"].as_str().unwrap_or("?").to_string(),
                c["up"].as_bool(),
                w,
                String::new(),
            )
        })
        .collect();
    let long_title = format!(
        " Checks: last hour (every {}, updated {}) ",
        fmt_dur(m.refresh.1),
        m.long_updated.as_deref().unwrap_or("never")
    );
    f.render_widget(window_table(long_title, rows_long), long);

    let visible = alerts.height.saturating_sub(2) as usize;
    let skip = m.alert_scroll.min(m.alerts.len().saturating_sub(visible));
    let lines: Vec<Line> = m
        .alerts
        .iter()
        .rev()
        .skip(skip)
        .take(visible)
        .map(|a| {
            let firing = a["state"].as_str() == Some("firing");
            let color = if firing { Color::Red } else { Color::Green };
            Line::from(Span::styled(
                a["message"].as_str().unwrap_or("").to_string(),
                Style::default().fg(color),
            ))
        })
        .collect();
    let shown = if m.alerts.len() > visible {
        format!(
            ", showing {}-{}, arrows scroll",
            skip + 1,
            (skip + visible).min(m.alerts.len())
        )
    } else {
        String::new()
    };
    let alerts_title = format!(
        " Alerts ({} in history, newest first{shown}; down at availability <= {}) ",
        m.alerts.len(),
        m.threshold
            .map(|t| format!("{:.0}%", t * 100.0))
            .unwrap_or_else(|| "-".into())
    );
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(alerts_title)),
        alerts,
    );
    f.render_widget(kernel_summary(m), kernel);
}

/// ` (Deployment ledger)` of a kill event, the owner of its pod; empty off Kubernetes.
fn owner_suffix(k: &Value) -> String {
    match (k["owner_kind"].as_str(), k["owner"].as_str()) {
        (Some(kind), Some(name)) if !kind.is_empty() => format!(" ({kind} {name})"),
        _ => String::new(),
    }
}

/// `: <reason>: <verdict>` of a kill event, empty when it has none (an older daemon).
fn verdict_suffix(k: &Value) -> String {
    match (k["reason"].as_str(), k["lead_up"]["verdict"].as_str()) {
        (Some(r), Some(v)) => format!(": {r}: {v}"),
        _ => String::new(),
    }
}

/// Warnings shown at most (the web view lists them all).
const IMMINENT_LINES: usize = 3;

/// `OOM imminent: <cgroup>: +<rate>/min, the <limit> limit of <limit cgroup> (<scope>) in ~<n> s`.
fn imminent_line(w: &Value) -> String {
    let mib = |k: &str| w[k].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    format!(
        "OOM imminent: {}: +{:.0} MiB/min, the {:.0} MiB limit of {} ({}) in ~{:.0} s",
        w["cgroup"].as_str().unwrap_or("?"),
        mib("growth_bytes_per_minute"),
        mib("limit_bytes"),
        w["limit_cgroup"].as_str().unwrap_or("?"),
        w["limit_scope"].as_str().unwrap_or("?"),
        w["projected_seconds"].as_f64().unwrap_or(0.0)
    )
}

fn kernel_summary(m: &Model) -> Paragraph<'_> {
    let mut lines = Vec::new();
    if m.probe_running("oom") {
        let last = m.last_kill.as_ref().map(|k| {
            format!(
                "  last: {} {} (pid {}) in {}",
                k["time_rfc3339"].as_str().map(str::to_string).unwrap_or_else(|| {
                    k["time"]
                        .as_f64()
                        .map(crate::checks::alert::rfc3339)
                        .unwrap_or_default()
                }),
                k["victim_comm"].as_str().unwrap_or("?"),
                k["victim_pid"].as_i64().unwrap_or(0),
                k["cgroup"].as_str().unwrap_or("?")
            ) + &owner_suffix(k)
                + &verdict_suffix(k)
        });
        lines.push(Line::from(format!(
            "OOM kills since the sensor started: {}{}",
            m.oom_kills_total,
            last.unwrap_or_default()
        )));
        for w in m.imminent.iter().take(IMMINENT_LINES) {
            lines.push(Line::from(imminent_line(w)));
        }
    }
    if m.probe_running("tcp") {
        let by: Vec<String> = m.tcp_failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.push(Line::from(format!(
            "TCP connect failures since the sensor started: {}  {}",
            m.tcp_failures_total,
            by.join(", ")
        )));
    }
    if lines.is_empty() {
        lines.push(Line::from("kernel probes: none running (checks-only daemon)"));
    }
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Kernel "))
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Renders one frame into text lines (for `--once` and the README).
pub fn render_text(m: &Model, width: u16, height: u16) -> std::io::Result<String> {
    let mut t = Terminal::new(TestBackend::new(width, height)).map_err(std::io::Error::other)?;
    t.draw(|f| draw(f, m)).map_err(std::io::Error::other)?;
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// `sensor top --once`: one snapshot printed as text.
pub async fn once(opts: &TopOptions) -> anyhow::Result<String> {
    let mut m = Model::new(&opts.url, (opts.short_refresh, opts.long_refresh), opts.client.clone());
    m.refresh_short().await;
    if let Some(e) = &m.error {
        anyhow::bail!("cannot read the daemon: {e}");
    }
    m.refresh_long().await;
    // Tall enough for every check and the ten newest alerts; as wide as the terminal, if any.
    let w = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        ratatui::crossterm::terminal::size()
            .map(|s| s.0)
            .unwrap_or(120)
            .max(100)
    } else {
        120
    };
    let n = m.checks.len() as u16;
    let h = 1 + 2 * (n + 3) + (m.alerts.len().min(10) as u16 + 2).max(4) + 4;
    Ok(render_text(&m, w, h)?)
}

/// The interactive dashboard; returns when the user presses `q` (or Esc, Ctrl-C).
pub fn interactive(opts: TopOptions) -> anyhow::Result<()> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("sensor top needs a terminal; use --once or /api/v1/checks for scripts");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut m = Model::new(&opts.url, (opts.short_refresh, opts.long_refresh), opts.client.clone());
    let mut terminal = ratatui::try_init()?;
    let r = event_loop(&mut terminal, &rt, &mut m, &opts);
    ratatui::restore();
    r
}

fn event_loop<B: Backend>(
    terminal: &mut Terminal<B>,
    rt: &tokio::runtime::Runtime,
    m: &mut Model,
    opts: &TopOptions,
) -> anyhow::Result<()>
where
    B::Error: Send + Sync + 'static,
{
    let mut next_short = Instant::now();
    let mut next_long = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_short {
            rt.block_on(m.refresh_short());
            next_short = now + opts.short_refresh;
        }
        if now >= next_long {
            rt.block_on(m.refresh_long());
            next_long = now + opts.long_refresh;
        }
        terminal.draw(|f| draw(f, m))?;
        let wait = next_short.min(next_long).saturating_duration_since(Instant::now());
        if event::poll(wait.min(Duration::from_millis(500)))? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                    match k.code {
                        KeyCode::Char('r') => {
                            next_short = Instant::now();
                            next_long = Instant::now();
                        }
                        KeyCode::Down | KeyCode::Char('j') => m.alert_scroll = m.alert_scroll.saturating_add(1),
                        KeyCode::Up | KeyCode::Char('k') => m.alert_scroll = m.alert_scroll.saturating_sub(1),
                        KeyCode::PageDown => m.alert_scroll = m.alert_scroll.saturating_add(10),
                        KeyCode::PageUp => m.alert_scroll = m.alert_scroll.saturating_sub(10),
                        KeyCode::Home => m.alert_scroll = 0,
                        _ => {}
                    }
                    // Never past the oldest alert.
                    m.alert_scroll = m.alert_scroll.min(m.alerts.len().saturating_sub(1));
                }
                // The next draw notices the new size and clears the screen itself
                // (`Terminal::clear` would ask the terminal for the cursor position, a round
                // trip that slow SSH links and some emulators never answer).
                Event::Resize(_, _) => {}
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(alerts: usize) -> Model {
        let mut m = Model::new(
            "http://127.0.0.1:9442",
            (Duration::from_secs(10), Duration::from_secs(60)),
            Default::default(),
        );
        m.checks = vec![serde_json::json!({
            "name": "shop", "type": "http", "up": false,
            "last": {"error": "connect: Connection refused"},
            "windows": {"10m": {"availability": 0.25, "runs": 4, "avg_response_seconds": 0.002,
                                "max_response_seconds": 0.004, "codes": {}}}
        })];
        m.alerts = (0..alerts)
            .map(|i| serde_json::json!({"state": "firing", "message": format!("alert number {i}")}))
            .collect();
        m.threshold = Some(0.8);
        m
    }

    #[test]
    fn rows_and_scrolled_alerts() {
        let mut m = model(30);
        let text = render_text(&m, 120, 30).unwrap();
        let row = text.lines().find(|l| l.contains("shop")).unwrap();
        assert!(
            row.contains("DOWN") && row.contains("25.0%") && row.contains("connect: Connection refused"),
            "{row}"
        );
        assert!(
            text.contains("alert number 29") && !text.contains("alert number 0\n"),
            "{text}"
        );
        assert!(text.contains("30 in history, newest first, showing 1-"), "{text}");
        // Scrolled to the end: the oldest alert is visible, the newest is not.
        m.alert_scroll = 29;
        let text = render_text(&m, 120, 30).unwrap();
        assert!(
            text.lines()
                .any(|l| l.contains("alert number 0 ") || l.trim_end().ends_with("alert number 0│")),
            "{text}"
        );
        assert!(!text.contains("alert number 29"), "{text}");
        assert!(text.contains("kernel probes: none running"), "{text}");
    }

    #[test]
    fn an_imminent_kill_shows_its_workload_rate_limit_and_time() {
        let w = serde_json::json!({
            "cgroup": "/shop/cart", "growth_bytes_per_minute": 125829120.0, "limit_bytes": 536870912u64,
            "limit_cgroup": "/shop", "limit_scope": "ancestor", "projected_seconds": 41.6
        });
        assert_eq!(
            imminent_line(&w),
            "OOM imminent: /shop/cart: +120 MiB/min, the 512 MiB limit of /shop (ancestor) in ~42 s"
        );
    }

    #[test]
    fn the_last_kill_shows_its_verdict() {
        let k = serde_json::json!({"reason": "growth", "lead_up": {"verdict": "steady growth of 38 MiB/min for 9 min until the 512 MiB limit (leak-like)"}});
        assert_eq!(
            verdict_suffix(&k),
            ": growth: steady growth of 38 MiB/min for 9 min until the 512 MiB limit (leak-like)"
        );
        assert_eq!(verdict_suffix(&serde_json::json!({"cgroup": "/a"})), "");
    }

    #[test]
    fn the_last_kill_shows_its_owner() {
        let k = serde_json::json!({"owner_kind": "StatefulSet", "owner": "pg-main"});
        assert_eq!(owner_suffix(&k), " (StatefulSet pg-main)");
        let off = serde_json::json!({"owner_kind": "", "owner": ""});
        assert_eq!(owner_suffix(&off), "", "off Kubernetes");
        assert_eq!(owner_suffix(&serde_json::json!({})), "", "an older daemon");
    }
}
