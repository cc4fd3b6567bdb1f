//! Pod sandboxes: a pod's owner comes from its sandbox's labels (the pod's own, which the
//! containers of the pod do not carry). Each sandbox is read once per pod: the owner is cached
//! by sandbox id (bounded like the names, forgotten with the sandbox container), and a pod's
//! containers named at the same time wait for one read rather than each making their own.

use std::{sync::Mutex, time::Duration};

use prometheus::{IntCounterVec, Opts, Registry};

use super::{
    api::{self, Found},
    config::{RuntimeConfig, WorkloadsConfig},
    owner::{self, Owner},
    Cache, Inflight, RESULTS,
};

use crate::sync::Lock as _;

pub struct Sandboxes {
    cache: Mutex<Cache<Owner>>,
    /// Sandbox reads under way.
    inflight: Inflight,
    /// `sensor_workload_sandbox_lookups_total{runtime,result}`.
    lookups: IntCounterVec,
    timeout: Duration,
    /// This node's name (static pods' names end with it).
    node: String,
}

impl Sandboxes {
    pub fn new(cfg: &WorkloadsConfig, registry: &Registry, node: String) -> prometheus::Result<Sandboxes> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "sensor_workload_sandbox_lookups_total",
                "Pod sandbox lookups (one per pod, for its owner) by runtime and result (ok, not_found, error, timeout).",
            ),
            &["runtime", "result"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        for r in &cfg.runtimes {
            for res in RESULTS {
                lookups.with_label_values(&[r.kind.label(), res]);
            }
        }
        Ok(Sandboxes {
            cache: Mutex::new(Cache::new(cfg.cache_size)),
            inflight: Inflight::default(),
            lookups,
            timeout: cfg.lookup_timeout,
            node,
        })
    }

    /// The owner of the pod of `found` (a container `rt` named, in pod `pod`): from `found`
    /// itself when it is the sandbox, else from its sandbox, read from `rt` unless cached.
    /// Empty off Kubernetes and when the sandbox is unknown or could not be read.
    pub async fn owner(&self, rt: &RuntimeConfig, found: &Found, pod: &str) -> Owner {
        if pod.is_empty() {
            return Owner::default();
        }
        if found.is_sandbox {
            return self.owner_of(found, pod);
        }
        let id = found.sandbox_id.as_str();
        if id.is_empty() {
            return Owner::default();
        }
        if let Some(o) = self.cached(id) {
            return o;
        }
        let Some(done) = self.inflight.begin(id) else {
            // Another container of the pod is reading it: wait, then take its answer (none
            // when that read failed; this lookup does not try again at once).
            self.inflight.wait(id).await;
            return self.cached(id).unwrap_or_default();
        };
        let found = super::ask_counted(rt, id, self.timeout, &self.lookups, "sandbox").await;
        let owner = found.map(|s| self.owner_of(&s, pod));
        if let Some(o) = &owner {
            self.cache.locked().insert(id, o.clone());
        }
        self.inflight.end(id, done);
        owner.unwrap_or_default()
    }

    /// The owner from a sandbox's labels and annotations (its pod name where it has one).
    fn owner_of(&self, sandbox: &Found, pod: &str) -> Owner {
        let label = |k: &str| sandbox.labels.get(k).map(String::as_str).unwrap_or_default();
        let name = match label(api::K8S_POD) {
            "" => pod,
            n => n,
        };
        owner::resolve(
            &owner::Pod {
                name,
                uid: label(api::K8S_POD_UID),
                labels: &sandbox.labels,
                annotations: &sandbox.annotations,
            },
            &self.node,
        )
    }

    fn cached(&self, id: &str) -> Option<Owner> {
        self.cache.locked().map.get(id).cloned()
    }

    /// Forgets the owner of sandbox `id` (its container vanished: the pod is gone).
    pub fn forget(&self, id: &str) {
        self.cache.locked().remove(id);
    }

    /// Sandboxes whose owner is cached (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.cache.locked().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::config::RuntimeKind;
    use std::collections::HashMap;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sandboxes(registry: &Registry) -> Sandboxes {
        Sandboxes::new(&WorkloadsConfig::default(), registry, "node-a1".into()).unwrap()
    }

    fn rt() -> RuntimeConfig {
        RuntimeConfig {
            kind: RuntimeKind::Docker,
            socket: "/nonexistent/docker.sock".into(),
            namespaces: vec![],
            optional: false,
        }
    }

    #[tokio::test]
    async fn a_sandbox_names_its_own_owner_and_an_unreadable_one_none() {
        let registry = Registry::new();
        let s = sandboxes(&registry);
        let sandbox = Found {
            labels: labels(&[
                (api::K8S_POD, "ledger-5d8f6c7b9-x2x4k"),
                ("pod-template-hash", "5d8f6c7b9"),
            ]),
            is_sandbox: true,
            ..Found::default()
        };
        let o = s.owner(&rt(), &sandbox, "ledger-5d8f6c7b9-x2x4k").await;
        assert_eq!((o.kind, o.name.as_str()), ("Deployment", "ledger"));
        // An app container whose sandbox cannot be read: no owner, the failure counted, nothing
        // cached (the next container of the pod tries again).
        let app = Found {
            sandbox_id: "ab".repeat(32),
            ..Found::default()
        };
        assert_eq!(s.owner(&rt(), &app, "ledger-5d8f6c7b9-x2x4k").await, Owner::default());
        assert_eq!(s.lookups.with_label_values(&["docker", "error"]).get(), 1);
        assert_eq!(s.len(), 0);
        // Off Kubernetes, or a Kubernetes container with no sandbox named: nothing is read.
        assert_eq!(s.owner(&rt(), &app, "").await, Owner::default());
        assert_eq!(s.owner(&rt(), &Found::default(), "p").await, Owner::default());
        assert_eq!(s.lookups.with_label_values(&["docker", "error"]).get(), 1);
    }

    #[tokio::test]
    async fn a_cached_owner_is_not_read_again_until_forgotten() {
        let registry = Registry::new();
        let s = sandboxes(&registry);
        let id = "cd".repeat(32);
        s.cache.lock().unwrap().insert(
            &id,
            Owner {
                kind: "StatefulSet",
                name: "pg".into(),
            },
        );
        let app = Found {
            sandbox_id: id.clone(),
            ..Found::default()
        };
        assert_eq!(s.owner(&rt(), &app, "pg-0").await.name, "pg");
        assert_eq!(s.lookups.with_label_values(&["docker", "error"]).get(), 0);
        s.forget(&id);
        assert_eq!(s.owner(&rt(), &app, "pg-0").await, Owner::default());
        assert_eq!(s.lookups.with_label_values(&["docker", "error"]).get(), 1);
    }
}
