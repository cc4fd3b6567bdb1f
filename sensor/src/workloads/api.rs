//! The runtimes' answers: one request per lookup over the runtime's unix socket, and the
//! mapping of what it says to workload names.

use std::{collections::HashMap, path::Path};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::{config::RuntimeKind, containerd, Names};

/// Larger answers are garbage to us (a Docker inspect is a few KiB).
const MAX_ANSWER: usize = 4 << 20;

/// Why a runtime could not answer; counted as `result="error"`.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("connect {socket}: {source}")]
    Connect { socket: String, source: std::io::Error },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("answered {0}")]
    Status(u16),
    #[error("answer is not the expected JSON: {0}")]
    Garbage(String),
    #[error("gRPC: {0}")]
    Grpc(String),
}

/// What a runtime knows about a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// The runtime's own name for it (Docker/Podman `Name`, CRI-O `name`, nerdctl's label).
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// Its annotations (CRI-O's; containerd's OCI spec annotations; cri-dockerd's
    /// `annotation.*` labels): where a sandbox keeps the pod's config source.
    pub annotations: HashMap<String, String>,
    /// The pod sandbox of a Kubernetes container (empty otherwise, or when it is the sandbox).
    pub sandbox_id: String,
    /// It is a pod's sandbox (pause) container: its labels are the pod's.
    pub is_sandbox: bool,
}

pub const K8S_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const K8S_POD: &str = "io.kubernetes.pod.name";
pub const K8S_CONTAINER: &str = "io.kubernetes.container.name";
pub const K8S_POD_UID: &str = "io.kubernetes.pod.uid";

/// containerd's CRI plugin: the spec annotations naming a container's sandbox and its type.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// cri-dockerd (dockershim's heir): the labels naming a container's sandbox and its type, and
/// the prefix of the pod's annotations kept as labels on the sandbox.
pub const DOCKER_SANDBOX_ID: &str = "io.kubernetes.sandbox.id";
pub const DOCKER_TYPE: &str = "io.kubernetes.docker.type";
const DOCKER_ANNOTATION: &str = "annotation.";
/// CRI-O: the annotation naming a container's type.
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";

/// The names of a found container: Kubernetes names from its `io.kubernetes.*` labels; outside
/// Kubernetes (no such labels) `container` is the runtime's name and `namespace`/`pod` empty.
pub fn names(found: &Found, runtime: RuntimeKind) -> Names {
    let label = |k: &str| found.labels.get(k).cloned().unwrap_or_default();
    let k8s = found.labels.contains_key(K8S_POD) || found.labels.contains_key(K8S_CONTAINER);
    Names {
        namespace: label(K8S_NAMESPACE),
        pod: label(K8S_POD),
        container: if k8s {
            label(K8S_CONTAINER)
        } else {
            found.name.trim_start_matches('/').to_string()
        },
        image: found.image.clone(),
        runtime: runtime.label().to_string(),
        ..Names::default()
    }
}

/// Aborts a spawned task when dropped (a lookup that timed out drops its connection).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` over the unix socket; (status, body).
pub async fn unix_get(socket: &Path, path: &str) -> Result<(u16, Bytes), LookupError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| LookupError::Connect {
            socket: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| LookupError::Http(e.to_string()))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "runtime API connection ended");
        }
    }));
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| LookupError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| LookupError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| LookupError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

#[derive(Deserialize)]
struct DockerInspect {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Config")]
    config: DockerConfig,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(rename = "Image", default)]
    image: String,
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
}

/// A Docker Engine API answer to `GET /containers/{id}/json`: 200 found, 404 not found.
pub fn docker_answer(status: u16, body: &[u8]) -> Result<Option<Found>, LookupError> {
    match status {
        200 => {
            let v: DockerInspect = serde_json::from_slice(body).map_err(|e| LookupError::Garbage(e.to_string()))?;
            let labels = v.config.labels.unwrap_or_default();
            let annotations = labels
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(DOCKER_ANNOTATION)?.to_string(), v.clone())))
                .collect();
            Ok(Some(Found {
                name: v.name,
                image: v.config.image,
                sandbox_id: labels.get(DOCKER_SANDBOX_ID).cloned().unwrap_or_default(),
                is_sandbox: labels.get(DOCKER_TYPE).is_some_and(|t| t == "podsandbox"),
                annotations,
                labels,
            }))
        }
        404 => Ok(None),
        s => Err(LookupError::Status(s)),
    }
}

#[derive(Deserialize)]
struct CrioInfo {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
    /// The sandbox's id (the same as its infra container's).
    #[serde(default)]
    sandbox: String,
}

/// A CRI-O answer to `GET /containers/{id}` (its `ContainerInfo`): 200 found, 404 not found
/// (older CRI-O says 500 with "can't find the container"; that is also not found).
pub fn crio_answer(status: u16, body: &[u8]) -> Result<Option<Found>, LookupError> {
    match status {
        200 => {
            let v: CrioInfo = serde_json::from_slice(body).map_err(|e| LookupError::Garbage(e.to_string()))?;
            let annotations = v.annotations.unwrap_or_default();
            Ok(Some(Found {
                name: v.name,
                image: v.image,
                labels: v.labels.unwrap_or_default(),
                is_sandbox: annotations.get(CRIO_CONTAINER_TYPE).is_some_and(|t| t == "sandbox"),
                sandbox_id: v.sandbox,
                annotations,
            }))
        }
        404 => Ok(None),
        500 if String::from_utf8_lossy(body).contains("can't find the container") => Ok(None),
        s => Err(LookupError::Status(s)),
    }
}

/// containerd: `containers.v1.Containers/Get` in each namespace until one knows the id.
pub async fn containerd_lookup(socket: &Path, namespaces: &[String], id: &str) -> Result<Option<Found>, LookupError> {
    if !socket.exists() {
        return Err(LookupError::Connect {
            socket: socket.display().to_string(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let mut client = containerd::Client::connect(socket)
        .await
        .map_err(|e| LookupError::Grpc(e.to_string()))?;
    for ns in namespaces {
        match client.get_container(ns, id).await {
            Ok(Some(c)) => {
                let annotations = containerd::spec_annotations(c.spec.as_ref());
                return Ok(Some(containerd_found(c.labels, c.image, annotations)));
            }
            Ok(None) => continue,
            Err(e) => return Err(LookupError::Grpc(e.to_string())),
        }
    }
    Ok(None)
}

/// containerd has no container name beyond its id: nerdctl keeps one in a label. The CRI
/// plugin names a container's sandbox in its spec annotations (a sandbox names itself).
pub fn containerd_found(labels: HashMap<String, String>, image: String, annotations: HashMap<String, String>) -> Found {
    let is_sandbox = annotations.get(CRI_CONTAINER_TYPE).is_some_and(|t| t == "sandbox");
    Found {
        name: labels.get("nerdctl/name").cloned().unwrap_or_default(),
        image,
        labels,
        sandbox_id: match is_sandbox {
            true => String::new(),
            false => annotations.get(CRI_SANDBOX_ID).cloned().unwrap_or_default(),
        },
        is_sandbox,
        annotations,
    }
}

/// Whether the runtime answers at all (for `sensor doctor`): its version, or why not.
pub async fn ping(kind: RuntimeKind, socket: &Path) -> Result<String, LookupError> {
    match kind {
        RuntimeKind::Containerd => {
            let mut client = containerd::Client::connect(socket)
                .await
                .map_err(|e| LookupError::Grpc(e.to_string()))?;
            let v = client.version().await.map_err(|e| LookupError::Grpc(e.to_string()))?;
            Ok(format!("containerd {}", v.version))
        }
        // `/_ping` is the Docker API's own liveness call (its `/version` gathers host facts
        // and can take a second on Podman).
        RuntimeKind::Docker => {
            let (status, body) = unix_get(socket, "/_ping").await?;
            if status != 200 || body.as_ref() != b"OK" {
                return Err(LookupError::Status(status));
            }
            Ok("Docker Engine API answers /_ping".to_string())
        }
        RuntimeKind::Crio => {
            let (status, body) = unix_get(socket, "/info").await?;
            if status != 200 {
                return Err(LookupError::Status(status));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| LookupError::Garbage(e.to_string()))?;
            let storage = v.get("storage_driver").and_then(|x| x.as_str()).unwrap_or("?");
            Ok(format!("CRI-O answers /info (storage driver {storage})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_answers_found_not_found_garbage() {
        let body = br#"{"Id":"abc","Name":"/web-1","Image":"sha256:1","Config":{"Image":"nginx:1.27","Labels":{"app":"web"}}}"#;
        let f = docker_answer(200, body).unwrap().unwrap();
        assert_eq!(
            names(&f, RuntimeKind::Docker),
            Names {
                namespace: String::new(),
                pod: String::new(),
                container: "web-1".into(),
                image: "nginx:1.27".into(),
                runtime: "docker".into(),
                ..Names::default()
            }
        );
        // Podman answers null labels for a container without any.
        let body = br#"{"Name":"p","Config":{"Image":"localhost/x:1","Labels":null}}"#;
        assert_eq!(docker_answer(200, body).unwrap().unwrap().labels.len(), 0);
        assert!(docker_answer(404, br#"{"message":"no such container"}"#)
            .unwrap()
            .is_none());
        assert!(matches!(docker_answer(200, b"<html>"), Err(LookupError::Garbage(_))));
        assert!(matches!(
            docker_answer(200, br#"{"Name":1}"#),
            Err(LookupError::Garbage(_))
        ));
        assert!(matches!(docker_answer(200, b""), Err(LookupError::Garbage(_))));
        assert!(matches!(docker_answer(500, b"boom"), Err(LookupError::Status(500))));
    }

    #[test]
    fn kubernetes_labels_win_over_the_runtime_name() {
        let body = br#"{"Name":"/k8s_cart_cart-7f9c_shop_uid_0","Config":{"Image":"shop/cart:3","Labels":{
            "io.kubernetes.pod.namespace":"shop","io.kubernetes.pod.name":"cart-7f9c","io.kubernetes.container.name":"cart"}}}"#;
        let n = names(&docker_answer(200, body).unwrap().unwrap(), RuntimeKind::Docker);
        assert_eq!(
            (n.namespace.as_str(), n.pod.as_str(), n.container.as_str()),
            ("shop", "cart-7f9c", "cart")
        );
        assert_eq!(n.image, "shop/cart:3");
    }

    #[test]
    fn crio_answers_found_not_found_garbage() {
        let body = br#"{"name":"k8s_cart_cart-7f9c_shop_1","pid":42,"image":"quay.io/shop/cart:3","labels":{
            "io.kubernetes.pod.namespace":"shop","io.kubernetes.pod.name":"cart-7f9c","io.kubernetes.container.name":"cart"},
            "annotations":{},"root":"/x","sandbox":"/y","ip_addresses":[]}"#;
        let n = names(&crio_answer(200, body).unwrap().unwrap(), RuntimeKind::Crio);
        assert_eq!(
            (
                n.namespace.as_str(),
                n.pod.as_str(),
                n.container.as_str(),
                n.image.as_str(),
                n.runtime.as_str()
            ),
            ("shop", "cart-7f9c", "cart", "quay.io/shop/cart:3", "crio")
        );
        assert!(crio_answer(404, b"").unwrap().is_none());
        assert!(crio_answer(500, b"can't find the container with id 0123")
            .unwrap()
            .is_none());
        assert!(matches!(crio_answer(500, b"internal"), Err(LookupError::Status(500))));
        assert!(matches!(crio_answer(200, b"[1,2"), Err(LookupError::Garbage(_))));
    }

    /// Where each runtime says which sandbox a container belongs to, and which is the sandbox
    /// (cri-dockerd's labels and CRI-O's inspect fields as they write them; containerd's spec
    /// annotations are also read from a real containerd in tests/workloads.rs).
    #[test]
    fn each_runtime_names_the_sandbox() {
        let app = br#"{"Name":"/k8s_ledger_ledger-5d8f6c7b9-x2x4k_shop_uid_0","Config":{"Image":"l:1","Labels":{
            "io.kubernetes.pod.name":"ledger-5d8f6c7b9-x2x4k","io.kubernetes.sandbox.id":"s1","io.kubernetes.docker.type":"container"}}}"#;
        let f = docker_answer(200, app).unwrap().unwrap();
        assert_eq!((f.sandbox_id.as_str(), f.is_sandbox), ("s1", false));
        let pause = br#"{"Name":"/k8s_POD_ledger","Config":{"Image":"pause:3.9","Labels":{
            "io.kubernetes.docker.type":"podsandbox","pod-template-hash":"5d8f6c7b9","annotation.kubernetes.io/config.source":"api"}}}"#;
        let f = docker_answer(200, pause).unwrap().unwrap();
        assert!(f.is_sandbox);
        assert_eq!(
            f.annotations.get("kubernetes.io/config.source").map(String::as_str),
            Some("api")
        );
        assert_eq!(f.labels.get("pod-template-hash").map(String::as_str), Some("5d8f6c7b9"));

        let app = br#"{"name":"k8s_ledger","image":"l:1","labels":{"io.kubernetes.pod.name":"p"},
            "annotations":{"io.kubernetes.cri-o.ContainerType":"container"},"sandbox":"s2"}"#;
        let f = crio_answer(200, app).unwrap().unwrap();
        assert_eq!((f.sandbox_id.as_str(), f.is_sandbox), ("s2", false));
        let infra = br#"{"name":"k8s_POD","image":"pause","labels":{"job-name":"migrate"},
            "annotations":{"io.kubernetes.cri-o.ContainerType":"sandbox","kubernetes.io/config.source":"file"},"sandbox":"s2"}"#;
        let f = crio_answer(200, infra).unwrap().unwrap();
        assert!(f.is_sandbox);
        assert_eq!(
            f.annotations.get("kubernetes.io/config.source").map(String::as_str),
            Some("file")
        );

        let ann = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let f = containerd_found(
            HashMap::new(),
            "l:1".into(),
            ann(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "s3")]),
        );
        assert_eq!((f.sandbox_id.as_str(), f.is_sandbox), ("s3", false));
        let f = containerd_found(
            HashMap::new(),
            "pause".into(),
            ann(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "s3")]),
        );
        assert_eq!(
            (f.sandbox_id.as_str(), f.is_sandbox),
            ("", true),
            "a sandbox is its own"
        );
        // Outside Kubernetes: none.
        let f = containerd_found(HashMap::new(), "x".into(), HashMap::new());
        assert_eq!((f.sandbox_id.as_str(), f.is_sandbox), ("", false));
    }

    #[test]
    fn containerd_names_from_labels_or_nerdctl() {
        let kube: HashMap<String, String> = [(K8S_NAMESPACE, "shop"), (K8S_POD, "cart-7f9c"), (K8S_CONTAINER, "cart")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let n = names(
            &containerd_found(kube, "docker.io/shop/cart:3".into(), HashMap::new()),
            RuntimeKind::Containerd,
        );
        assert_eq!((n.container.as_str(), n.runtime.as_str()), ("cart", "containerd"));
        let nerd = [("nerdctl/name".to_string(), "db".to_string())].into_iter().collect();
        let n = names(
            &containerd_found(nerd, "postgres:16".into(), HashMap::new()),
            RuntimeKind::Containerd,
        );
        assert_eq!(
            (n.namespace.as_str(), n.pod.as_str(), n.container.as_str()),
            ("", "", "db")
        );
        let n = names(
            &containerd_found(HashMap::new(), "x".into(), HashMap::new()),
            RuntimeKind::Containerd,
        );
        assert_eq!(n.container, "", "no name anywhere: empty, never the id");
    }
}
