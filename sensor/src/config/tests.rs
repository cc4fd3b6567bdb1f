//! The config's unit tests: parsing, defaults, errors naming the key, flags.

use super::*;

fn err(text: &str) -> String {
    Config::parse(text, "test.yaml").unwrap_err().to_string()
}

#[test]
fn empty_and_comment_only_are_defaults() {
    assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    assert_eq!(Config::parse("# nothing\n", "x").unwrap(), Config::default());
}

#[test]
fn embedded_default_parses() {
    let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
    assert!(c.probes.oom.enabled);
    assert_eq!(c.listen.port(), 9442);
}

#[test]
fn conventions_example_parses() {
    let text = r#"
listen: 0.0.0.0:9442
probes:
  oom: {enabled: true}
  memcg: {enabled: true}
  tcp:
    enabled: true
    destinations: {postgres: "10.0.0.0/8:5432", dns: "0.0.0.0/0:53"}
limits: {workloads_per_metric: 1000}
alerting: {availability_threshold: 0.8, window: 2m, webhook: null}
checks:
  - {name: shop, type: http, url: "https://shop.example/health", interval: 10s, timeout: 5s,
     expect: {status: [200], body_regex: "ok"}}
  - name: inventory
    type: websocket
    url: "ws://127.0.0.1:8080/"
    interval: 30s
    gauges: [{name: inventory, labels: [store, model], value: inventory}]
"#;
    let c = Config::parse(text, "x").unwrap();
    assert_eq!(c.alerting.window, Duration::from_secs(120));
    assert_eq!(c.checks.len(), 2);
    assert_eq!(c.checks[1].timeout, Duration::from_secs(5));
    let pg = &c.probes.tcp.destinations["postgres"];
    assert_eq!((pg.prefix, pg.port), (8, Some(5432)));
}

#[test]
fn unknown_key_names_file_and_key() {
    let e = err("probes:\n  oom:\n    enabeld: true\n");
    assert!(e.starts_with("config test.yaml: key 'probes.oom"), "{e}");
    assert!(e.contains("unknown field `enabeld`"), "{e}");
    let e = err("lisen: 1.2.3.4:5\n");
    assert!(e.contains("unknown field `lisen`"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let e = err("probes:\n  oom: {enabled: maybe}\n");
    assert!(e.contains("key 'probes.oom.enabled'"), "{e}");
    let e = err("listen: not-an-address\n");
    assert!(e.contains("key 'listen'"), "{e}");
}

#[test]
fn http_limits_parse_and_are_checked() {
    let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
    assert_eq!(c.http, HttpLimits::default(), "default-config.yaml and the code agree");
    let c = Config::parse("http: {max_connections: 10, header_read_timeout: 2s}\n", "t").unwrap();
    assert_eq!(c.http.max_connections, 10);
    assert_eq!(c.http.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.http.max_body_bytes, 1 << 20);
    let e = err("http: {max_connections: 0}\n");
    assert!(
        e.contains("key 'http.max_connections'") && e.contains("greater than 0"),
        "{e}"
    );
    let e = err("http: {header_read_timeout: 0s}\n");
    assert!(e.contains("key 'http.header_read_timeout'"), "{e}");
    let e = err("http: {max_header_size: 1}\n");
    assert!(e.contains("max_header_size"), "{e}");
}

#[test]
fn journal_keys_parse_and_are_checked() {
    let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
    assert_eq!(
        c.journal,
        JournalConfig::default(),
        "default-config.yaml and the code agree"
    );
    assert_eq!(c.journal.max_bytes, 64 << 20);
    let c = Config::parse(
        "journal: {path: /tmp/j, max_bytes: 1MiB, fsync: batch, fsync_interval: 5s}\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.journal.max_bytes, 1 << 20);
    assert_eq!(c.journal.segment_bytes(), 128 << 10);
    assert_eq!(c.journal.fsync, Fsync::Batch);
    assert_eq!(c.journal.path, std::path::PathBuf::from("/tmp/j"));
    let c = Config::parse("journal: {max_bytes: 131072}\n", "t").unwrap();
    assert_eq!(c.journal.max_bytes, 131072);
    let e = err("journal: {max_bytes: 1KiB}\n");
    assert!(e.contains("key 'journal.max_bytes'") && e.contains("at least"), "{e}");
    let e = err("journal: {max_bytes: lots}\n");
    assert!(e.contains("journal.max_bytes") && e.contains("bad size"), "{e}");
    let e = err("journal: {fsync: sometimes}\n");
    assert!(e.contains("journal.fsync"), "{e}");
    let o = |key: &str, v: &str| Override {
        key: flag(key),
        values: vec![v.to_string()],
    };
    let c = Config::default()
        .with_overrides(&[
            o("journal.path", "/tmp/x"),
            o("journal.max_bytes", "2MiB"),
            o("journal.enabled", "false"),
            o("journal.fsync", "never"),
        ])
        .unwrap();
    assert_eq!(c.journal.max_bytes, 2 << 20);
    assert!(!c.journal.enabled);
    assert_eq!(c.journal.fsync, Fsync::Never);
}

#[test]
fn bad_duration_and_ranges() {
    let e = err("alerting: {window: 2 fortnights}\n");
    assert!(e.contains("key 'alerting.window'") && e.contains("bad duration"), "{e}");
    let e = err("alerting: {availability_threshold: 1.5}\n");
    assert!(
        e.contains("alerting.availability_threshold") && e.contains("outside 0..1"),
        "{e}"
    );
    let e = err("perf_ring_pages: 3\n");
    assert!(e.contains("power of two"), "{e}");
    let e = err("probes: {tcp: {connect_max_age: 10ms}}\n");
    assert!(
        e.contains("probes.tcp.connect_max_age") && e.contains("at least 100ms"),
        "{e}"
    );
    let e = err("probes: {tcp: {max_tracked_connects: 100000000}}\n");
    assert!(
        e.contains("probes.tcp.max_tracked_connects") && e.contains("at most 16777216"),
        "{e}"
    );
}

#[test]
fn connect_table_rounds_up_to_a_power_of_two() {
    let t = |n| TcpConfig {
        max_tracked_connects: n,
        ..TcpConfig::default()
    };
    assert_eq!(t(64).conn_slots(), 64);
    assert_eq!(t(100).conn_slots(), 128);
    assert_eq!(t(65536).conn_slots(), 65536);
    assert_eq!(t(65537).conn_slots(), 131072);
}

#[test]
fn psi_triggers_validated() {
    let c = Config::parse(
        "probes: {memcg: {psi_triggers: [{level: full, stall: 200ms, window: 2s}]}}\n",
        "x",
    )
    .unwrap();
    assert_eq!(c.probes.memcg.psi_triggers[0].level, PsiLevel::Full);
    let e = err("probes: {memcg: {psi_triggers: [{level: some, stall: 1s, window: 30s}]}}\n");
    assert!(
        e.contains("probes.memcg.psi_triggers[0]") && e.contains("between 500ms and 10s"),
        "{e}"
    );
    let e = err("probes: {memcg: {psi_triggers: [{level: some, stall: 3s, window: 2s}]}}\n");
    assert!(e.contains("shorter than the window"), "{e}");
    let e = err("probes: {memcg: {psi_triggers: [{level: most, stall: 1s, window: 2s}]}}\n");
    assert!(e.contains("probes.memcg.psi_triggers[0].level"), "{e}");
}

#[test]
fn bad_destination() {
    let e = err("probes: {tcp: {destinations: {pg: \"10.0.0.0/33:5432\"}}}\n");
    assert!(
        e.contains("probes.tcp.destinations.pg") && e.contains("longer than 32"),
        "{e}"
    );
    let e = err("probes: {tcp: {destinations: {pg: \"10.0.0.0/8:99999\"}}}\n");
    assert!(e.contains("bad port"), "{e}");
    let d: Destination = "[fd00::/8]:443".parse().unwrap();
    assert_eq!((d.prefix, d.port), (8, Some(443)));
    let d: Destination = "::1/128".parse().unwrap();
    assert_eq!(d.port, None);
}

#[test]
fn checks_validated_by_name() {
    let e = err("checks: [{name: a, type: http, url: 'ftp://x'}]\n");
    assert!(e.contains("checks[0].url") && e.contains("check 'a'"), "{e}");
    let e = err("checks: [{name: a, type: http, url: 'http://x'}, {name: a, type: http, url: 'http://y'}]\n");
    assert!(e.contains("defined twice"), "{e}");
    let e = err("checks: [{name: a, type: gopher, url: 'http://x'}]\n");
    assert!(e.contains("checks[0].type"), "{e}");
}

#[test]
fn vantage_keys_parse_and_are_checked() {
    let c = Config::parse(
            "vantage: {location: eu-west-1a, node: n1, sample: 0.1}\nchecks: [{name: a, type: http, url: 'http://x', sample: 0.5}]\n",
            "f",
        )
        .unwrap();
    assert_eq!(
        (c.vantage.location.as_str(), c.vantage.node.as_str(), c.vantage.sample),
        ("eu-west-1a", "n1", 0.1)
    );
    assert_eq!(c.checks[0].sample, Some(0.5));
    let e = err("vantage: {sample: 2}\n");
    assert!(
        e.contains("key 'vantage.sample'") && e.contains("outside (0, 1]"),
        "{e}"
    );
    let e = err("checks: [{name: a, type: http, url: 'http://x', sample: 0}]\n");
    assert!(e.contains("key 'checks[0].sample'") && e.contains("check 'a'"), "{e}");
    let e = err("vantage: {zone: x}\n");
    assert!(e.contains("vantage") && e.contains("zone"), "{e}");
}

#[test]
fn syntax_error_has_location() {
    let e = err("probes: [unclosed\n");
    assert!(e.starts_with("config test.yaml:") && e.contains("line"), "{e}");
}

fn flag(key: &str) -> FlagKey {
    flag_keys()
        .into_iter()
        .find(|k| k.key == key)
        .unwrap_or_else(|| panic!("no flag for {key}"))
}

#[test]
fn every_key_has_a_flag_named_after_it() {
    let keys = flag_keys();
    for (key, name, kind) in [
        ("listen", "listen", FlagKind::Text),
        ("strict", "strict", FlagKind::Bool),
        ("perf_ring_pages", "perf-ring-pages", FlagKind::Yaml),
        ("btf_path", "btf-path", FlagKind::Yaml),
        ("web_config_file", "web.config.file", FlagKind::Yaml),
        ("probes.oom.enabled", "probes.oom.enabled", FlagKind::Bool),
        ("probes.oom.exclude_hooks", "probes.oom.exclude-hooks", FlagKind::List),
        (
            "probes.memcg.exclude_hooks",
            "probes.memcg.exclude-hooks",
            FlagKind::List,
        ),
        (
            "probes.memcg.discovery_interval",
            "probes.memcg.discovery-interval",
            FlagKind::Text,
        ),
        ("probes.memcg.psi_triggers", "probes.memcg.psi-triggers", FlagKind::List),
        ("probes.tcp.destinations", "probes.tcp.destinations", FlagKind::Yaml),
        ("probes.tcp.max_series", "probes.tcp.max-series", FlagKind::Yaml),
        ("limits.vanished_grace", "limits.vanished-grace", FlagKind::Text),
        ("workloads.runtimes", "workloads.runtimes", FlagKind::List),
        ("workloads.lookup_timeout", "workloads.lookup-timeout", FlagKind::Text),
        ("workloads.cache_size", "workloads.cache-size", FlagKind::Yaml),
        ("alerting.webhook", "alerting.webhook", FlagKind::Yaml),
        ("events.history", "events.history", FlagKind::Yaml),
        ("journal.enabled", "journal.enabled", FlagKind::Bool),
        ("journal.path", "journal.path", FlagKind::Text),
        ("journal.max_bytes", "journal.max-bytes", FlagKind::Text),
        ("journal.fsync", "journal.fsync", FlagKind::Text),
        ("journal.fsync_interval", "journal.fsync-interval", FlagKind::Text),
        ("journal.queue", "journal.queue", FlagKind::Yaml),
        ("checks", "checks", FlagKind::List),
        ("vantage.location", "vantage.location", FlagKind::Text),
        ("vantage.node", "vantage.node", FlagKind::Text),
        ("vantage.sample", "vantage.sample", FlagKind::Yaml),
    ] {
        let k = keys
            .iter()
            .find(|k| k.key == key)
            .unwrap_or_else(|| panic!("no flag for {key}"));
        assert_eq!((k.flag.as_str(), k.kind), (name, kind), "{key}");
    }
    // Every leaf of the default config has exactly one flag.
    let mut flags: Vec<&str> = keys.iter().map(|k| k.flag.as_str()).collect();
    flags.sort_unstable();
    flags.dedup();
    assert_eq!(flags.len(), keys.len());
}

#[test]
fn overrides_apply_to_the_file_and_are_checked() {
    let base = Config::parse("probes:\n  tcp:\n    max_series: 128\n", "f.yaml").unwrap();
    let o = |key: &str, v: &[&str]| Override {
        key: flag(key),
        values: v.iter().map(|s| (*s).to_string()).collect(),
    };
    let c = base
        .clone()
        .with_overrides(&[
            o("strict", &["true"]),
            o("probes.oom.enabled", &["false"]),
            o("probes.memcg.exclude_hooks", &["tracepoint"]),
            o("probes.oom.exclude_hooks", &["fentry,kprobe"]),
            o("checks", &["[{name: a, type: http, url: \"http://127.0.0.1:1/\"}]"]),
            o("probes.memcg.discovery_interval", &["200ms"]),
            o("probes.tcp.destinations", &["{pg: \"10.0.0.0/8:5432\"}"]),
            o("perf_ring_pages", &["8"]),
            o("alerting.webhook", &["http://127.0.0.1:9/hook"]),
        ])
        .unwrap();
    assert!(c.strict && !c.probes.oom.enabled);
    assert_eq!(c.probes.memcg.exclude_hooks, vec![crate::probe::HookKind::Tracepoint]);
    use crate::probe::HookKind::{Fentry, Kprobe};
    assert_eq!(c.probes.oom.exclude_hooks, vec![Fentry, Kprobe]);
    assert_eq!(c.checks.len(), 1);
    assert_eq!(c.probes.memcg.discovery_interval, Duration::from_millis(200));
    assert_eq!(c.probes.tcp.max_series, 128, "the file's value stays");
    assert_eq!(c.probes.tcp.destinations.len(), 1);
    assert_eq!(c.perf_ring_pages, 8);
    assert_eq!(c.alerting.webhook.as_deref(), Some("http://127.0.0.1:9/hook"));
    let e = base
        .clone()
        .with_overrides(&[o("probes.oom.enabled", &["maybe"])])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("config <command line>: key 'probes.oom.enabled': invalid type"),
        "{e}"
    );
    let e = base
        .clone()
        .with_overrides(&[o("perf_ring_pages", &["3"])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("key 'perf_ring_pages': 3 is not a power of two"), "{e}");
    let e = base
        .with_overrides(&[o("probes.tcp.destinations", &["{pg: [unclosed"])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("key 'probes.tcp.destinations': not valid YAML"), "{e}");
}

#[test]
fn workloads_defaults_flags_and_errors() {
    let c = Config::parse(EMBEDDED_DEFAULT, "embedded").unwrap();
    assert_eq!(
        c.workloads,
        WorkloadsConfig::default(),
        "embedded default = built-in default"
    );
    let kinds: Vec<(RuntimeKind, bool)> = c.workloads.runtimes.iter().map(|r| (r.kind, r.optional)).collect();
    assert_eq!(
        kinds,
        [
            (RuntimeKind::Containerd, true),
            (RuntimeKind::Docker, true),
            (RuntimeKind::Crio, true)
        ]
    );
    let o = |key: &str, v: &str| Override {
        key: flag(key),
        values: vec![v.to_string()],
    };
    let c = Config::default()
        .with_overrides(&[
            o(
                "workloads.runtimes",
                "[{kind: docker, socket: /run/podman/podman.sock}]",
            ),
            o("workloads.lookup_timeout", "500ms"),
            o("workloads.cache_size", "50"),
        ])
        .unwrap();
    assert_eq!(c.workloads.runtimes.len(), 1);
    assert_eq!(c.workloads.runtimes[0].socket, Path::new("/run/podman/podman.sock"));
    assert!(!c.workloads.runtimes[0].optional, "listed by hand: must be there");
    assert_eq!(c.workloads.lookup_timeout, Duration::from_millis(500));
    assert_eq!(c.workloads.cache_size, 50);
    for (yaml, key) in [
        ("workloads: {cache_size: 0}", "workloads.cache_size"),
        ("workloads: {lookup_timeout: 0s}", "workloads.lookup_timeout"),
        (
            "workloads: {runtimes: [{kind: containerd, socket: /x}]}",
            "workloads.runtimes[0].namespaces",
        ),
        (
            "workloads: {runtimes: [{kind: docker, socket: /x, namespaces: [a]}]}",
            "workloads.runtimes[0].namespaces",
        ),
        (
            "workloads: {runtimes: [{kind: rkt, socket: /x}]}",
            "workloads.runtimes[0].kind",
        ),
        (
            "workloads: {runtimes: [{kind: docker, sock: /x}]}",
            "workloads.runtimes[0]",
        ),
    ] {
        let e = Config::parse(yaml, "f.yaml").unwrap_err().to_string();
        assert!(e.contains(&format!("key '{key}")), "{yaml}: {e}");
    }
}
